"""The records that travel between stages, typed (``TypedDict``: plain dicts at run time, checked contracts in
tests and editors).

- ``TraceRow``: one generation as ``collect`` (and CoRD, and the importers) produce it — ``collect.make_row``;
- ``StoredTrace``: a trace row as the store keeps it (``store.TRACE_COLUMNS`` + its row id), with the judge's
  verdict and an imported corpus's own verdict;
- ``ChatRow`` / ``CorpusRow``: a training example (``{"messages": [user, assistant]}``) and the corpus line
  ``collect`` writes per kept trace (``collect.corpus_row``), which every recipe reads;
- ``CurvePoint`` / ``TrainRecord``: a checkpoint on a method's curve and the ``train/<name>/result.json`` a recipe
  writes (``train.common.write_result``), which evaluation and the report read;
- ``EvalPoint`` / ``EvalRow``: a checkpoint to evaluate (``evaluate.eval_points``) and its result on one split
  (``evaluate.evaluate_models`` → ``eval/results.json``), which the report, the method table and the curves read.

Imports nothing: any room may use it.
"""

from __future__ import annotations

from typing import Any, TypedDict


class TraceRow(TypedDict):
    problem_id: str
    teacher: str
    style: str
    sample_idx: int
    params: str  # the sampling settings, JSON
    prompt: str
    text: str  # the whole completion
    reasoning: str | None  # inside the think block
    answer_text: str | None  # after it
    parsed_answer: str | None
    verdict: str  # verify.CORRECT | WRONG | UNPARSABLE | FAILED
    token_count: int
    char_count: int
    finish_reason: str | None
    mean_logprob: float | None
    min_window_logprob: float | None
    elapsed_s: float | None
    error: str | None
    verified_with: str | None  # verify.stamp of the verdict (None: failed); another stamp → checked again



class StoredTrace(TraceRow, total=False):
    row_id: int
    judge: str | None  # verify.VALID | INVALID | UNCLEAR, or "error" (collect.judge), or an imported grade
    judge_text: str | None
    judged_with: str | None  # verify.judge_stamp of the verdict, or verify.IMPORTED; another stamp → judged again
    created_at: float
    source_verdict: str | None  # an imported corpus's own verdict column


class Message(TypedDict):
    role: str
    content: str


class ChatRow(TypedDict):
    messages: list[Message]  # [user, assistant]


class CorpusRow(ChatRow):
    problem_id: str
    teacher: str
    style: str
    sample_idx: int
    split: str | None
    level: Any  # the source's difficulty (MATH level, lab steps), or None
    question: str
    answer: str
    prompt: str
    completion: str
    reasoning: str | None
    final: str | None
    token_count: int


class CurvePoint(TypedDict, total=False):
    steps: int  # optimizer steps (per branch for MoT)
    path: str  # an HF checkpoint directory
    round: int  # MoT


class TrainRecord(TypedDict, total=False):
    name: str  # std-<teacher> | mtd | posthoc | mot | compact | qr-<student>
    method: str
    final: str  # the checkpoint evaluated as the method's model
    last: str
    curve: list[CurvePoint]
    branch_steps: int  # the compute column of the method table
    teachers: list[str]
    base_model: str  # QR: the student each row is compared with
    provenance: dict  # models.provenance(): versions and device that trained it
    trained_with: dict  # train.common.method_settings(): the settings a re-run must match to skip it
    corpora: dict  # train.common.corpus_digests(): each corpus it trained on, as it was; a re-run must match too
    tag: str  # train.tag: a variant of the result named without it
    seed: int  # train.seed it was trained with (--seeds replicas are pooled by the report)


class EvalPoint(TypedDict, total=False):
    key: str  # base | base-<student> | <name>/step-<N> | <name>/final: the eval/<key>/ directory
    model: str  # base | base-<student> | a TrainRecord's name
    steps: int | None  # optimizer steps (0 for a base, None for a final off the curve)
    round: int | None  # MoT
    path: str  # the HF checkpoint evaluated
    final: bool  # the model the method table shows for ``model``


class EvalRow(EvalPoint, total=False):
    split: str
    greedy: float | None
    pass1: float | None
    n: int
    k: int
    greedy_se: float | None
    pass1_se: float | None
    pass_at: dict | None  # {k': unbiased pass@k'}
    maj: float | None
    maj_se: float | None
    repeats: int
    pass1_runs: list | None
    pass1_std: float | None
    tokens: float | None  # mean tokens per output (the samples'; the greedy outputs' when k = 0), over problems
    tokens_se: float | None
    cut: float | None  # the share of those outputs that reached max_new_tokens
    cut_se: float | None
    temperature: float
    top_p: float
    max_new_tokens: int
    provenance: dict  # models.provenance(): versions and device that evaluated it
