"""Typed run configuration: YAML file + ``key.sub=value`` overrides.

Every section is a pydantic model whose field descriptions double as
documentation (``accord config --schema`` prints them).  Loading reports every
validation problem at once, each with its dotted field path, in the style of
litgpt's ``args.py``.  Secrets never live in the config: an API key is named by
the environment variable that holds it (``api_key_env``), so the resolved
config written to ``<run_dir>/config.yaml`` is safe to share.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from accord.errors import UsageError
from accord.registry import BACKENDS, MERGE_METHODS, METHODS, SELECT_POLICIES, STEP_SCORERS, method_choices

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def one_of(v: str, choices, what: str) -> str:
    """``v`` if it names one of ``choices`` (a registry), else an error listing them."""
    if v not in choices:
        raise ValueError(f"unknown {what} {v!r}; choose one of {', '.join(choices)}")
    return v


# transformers' attn_implementation names (``auto``: transformers' own default, SDPA where the model supports it);
# a Hub kernel ("org/repo") passes as it is: transformers fetches it where a hub is reachable
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
ATTENTION_DOC = ("attention kernel when loaded with transformers (attn_implementation): auto (transformers' "
                 "default, sdpa), sdpa, eager, flash_attention_2 / _3 (needs the flash-attn package and a CUDA "
                 "GPU; packed training rows then go through its varlen kernel in one row), flex_attention, or a "
                 "Hub kernel 'org/repo'")


def _attention(v: str) -> str:
    return v if "/" in v else one_of(v, ATTENTION, "attention implementation")


Attention = Annotated[str, AfterValidator(_attention)]


class ConfigError(UsageError):
    """A config that cannot be used; ``problems`` lists ``(path, message)`` pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source, self.problems = source, problems
        if len(problems) == 1 and not problems[0][0]:  # about the file itself: one line
            super().__init__(f"{source}: {problems[0][1]}")
            return
        lines = [f"{source}: {len(problems)} problem(s) in the config:"]
        lines += [f"  {path or '<root>'}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProblemsConfig(_Strict):
    path: str = Field(description="a .jsonl/.parquet file, a saved HF dataset dir, or lab:<task>[:<split>]")
    question_field: str = Field("question", description="column holding the question text (a dotted path "
                                "reaches inside: conversations.0.value)")
    answer_field: str = Field("answer", description="column holding the reference answer")
    id_field: str = Field("id", description="column holding a stable id; rows without it get a hash of the question")
    answer_format: Literal["auto", "raw", "gsm8k", "boxed"] = Field(
        "auto", description="how to normalise answers: auto detects GSM8K '#### x' and \\boxed{x}")
    split: Literal["all", "train", "validation", "test"] = Field(
        "all", description="which deterministic split of the problems to use")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="share of problems in the validation split")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="share of problems in the test split")
    split_seed: int = Field(0, description="seed of the id-hash split assignment")
    limit: int | None = Field(None, ge=1, description="keep only the first N problems (after splitting); reading "
                              "stops at the next one, so a large corpus is not read whole")
    skip_answers: list[str] = Field(["proof", "notfound"], description="rows whose answer is one of these "
                                    "sentinels are skipped and counted (NuminaMath-1.5)")
    on_duplicate: Literal["first", "error", "samples"] = Field(
        "first", description="rows sharing a problem id: keep the first (and warn, naming them), stop, or "
        "samples: each row is one sample of the problem (a long-format corpus, one row per generation: "
        "OpenMathReasoning) — the first row gives the question and answer, column teachers read every row")

    @model_validator(mode="after")
    def _fractions(self) -> ProblemsConfig:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction + test_fraction must be < 1")
        return self


class GeneratorConfig(_Strict):
    """A model behind the generation protocol (``accord.teachers.base.Generator``): a teacher, the CoRD
    integrator, a student under evaluation — its backend and how to reach it."""

    name: str = Field(description="short unique name; used in file names and tables")
    backend: str = Field("hf", description="one of: " + ", ".join(BACKENDS))
    model: str | None = Field(None, description="local path, hub id, lab:<model>, or the served model name")
    # hf / vllm
    device: str = Field("auto", description="hf: cpu, cuda, cuda:1, mps or auto")
    dtype: str = Field("auto", description="auto (bf16 on a capable GPU, else float32), bfloat16, float16, float32")
    batch_size: int = Field(32, ge=1, description="hf/vllm: sequences generated together")
    prefix_cache_mb: int = Field(1024, ge=0, description="hf: memory for the key/value states of recent requests "
                                 "that continue an assistant prefix, reused when a request continues one again "
                                 "(CoRD's steps, curation's answers); 0 = off")
    trust_remote_code: bool = Field(False, description="allow model code from the checkpoint (off by default)")
    attention: Attention = Field("auto", description="hf: " + ATTENTION_DOC)
    # openai-compatible
    base_url: str | list[str] | None = Field(None, description="openai: e.g. http://127.0.0.1:8000/v1, or a list of "
                                             "replicas serving the same model (round-robin; a dead one is dropped)")
    api_key_env: str | None = Field(None, description="openai: environment variable holding the API key")
    endpoint: Literal["chat", "completions"] = Field("chat", description="openai: which endpoint to call")
    tokenizer: str | None = Field(None, description="openai completions: local tokenizer whose chat template renders "
                                  "prompts")
    max_concurrency: int = Field(8, ge=1, description="openai: requests in flight at once")
    max_retries: int = Field(5, ge=0, description="openai: retries on 429/5xx/timeouts with backoff + jitter")
    timeout: float = Field(600.0, gt=0, description="openai: seconds per request")
    # shared
    system_prompt: str | None = Field(None, description="optional system message")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="variables of the model's chat template, e.g. {enable_thinking: false} for "
        "Qwen3's non-thinking mode: passed to the template (hf, vllm, openai completions with a local tokenizer) or "
        "to the server (openai chat: extra_body.chat_template_kwargs, as vLLM and SGLang read it)")
    vllm_args: dict[str, Any] = Field(default_factory=dict, description="vllm: extra LLM(...) keyword arguments")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid name (letters, digits, '_', '.', '-')")
        return v

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        return one_of(v, BACKENDS, "teacher backend")

    @model_validator(mode="after")
    def _needs(self) -> GeneratorConfig:
        missing = []
        if self.backend in ("hf", "vllm", "openai") and not self.model:
            missing.append("model")
        if self.backend == "openai" and not self.base_url:
            missing.append("base_url")
        if self.backend == "column" and not getattr(self, "column", None):
            missing.append("column")
        if missing:
            raise ValueError(f"backend {self.backend!r} needs: {', '.join(missing)}")
        if self.chat_template_kwargs and (self.backend == "column" or (
                self.backend == "openai" and self.endpoint == "completions" and not self.tokenizer)):
            raise ValueError("chat_template_kwargs needs a chat template: backend 'column' renders none, and the "
                             "openai completions endpoint renders with a local tokenizer only (set tokenizer)")
        return self


class TeacherConfig(GeneratorConfig):
    """An entry of ``teachers:``: a generator, or (backend ``column``) an existing corpus's column."""

    # column (import of existing corpora)
    column: str | None = Field(None, description="column: problem-table column holding this teacher's trace")
    answer_column: str | None = Field(None, description="column: optional column holding the final answer/attempt")
    format: Literal["text", "sharegpt", "messages", "list"] = Field(
        "text", description="column: a trace string (s1K); sharegpt turns [{from, value}] (OpenThoughts, "
        "Bespoke-Stratos); messages [{role, content}]; a list of traces, one sample each (OpenR1 generations)")
    verdict_column: str | None = Field(None, description="column: the source's own correctness (a bool, or a "
                                       "list aligned with a list column), kept beside accord's verdict")
    grade_column: str | None = Field(None, description="column: a grade such as s1K-1.1's gemini_grade "
                                     "(Yes/No), imported as a judge verdict (filters like collect.judge)")
    finish_column: str | None = Field(None, description="column: finish reasons (\"length\": truncated → incorrect)")
    where: dict[str, Any] = Field(default_factory=dict, description="column: only the rows whose fields (dotted "
                                  "paths) equal these values, a list meaning any of them — one teacher per model "
                                  "of a long-format corpus: {generation_model: QwQ-32B}")
    temperature: float | None = Field(None, ge=0, description="this teacher's sampling temperature in CoRD "
                                      "(default cord.temperature; CoRD's homogeneous setup: one model at "
                                      "0.5 / 0.6 / 0.7)")

    @model_validator(mode="after")
    def _where_on_columns(self) -> TeacherConfig:
        if self.where and self.backend != "column":
            raise ValueError("where selects rows of an imported corpus: it needs backend 'column'")
        return self

    @field_validator("name")
    @classmethod
    def _reserved(cls, v: str) -> str:
        if v in ("all", "cord"):
            raise ValueError(f"{v!r} is reserved")
        return v


class JudgeConfig(_Strict):
    teacher: str | None = Field(None, description="name of a configured teacher that also judges (it is sampled too)")
    model: GeneratorConfig | None = Field(
        None, description="or a judge that is not a teacher, as its own model entry ({name, backend, model, ...}; "
        "never sampled, no corpus): e.g. the public QR-Distill code's Mistral-7B-Instruct judge")
    max_new_tokens: int = Field(512, ge=1, description="tokens the judge may write for each verdict (greedy)")
    apply_to: Literal["correct", "all"] = Field("correct", description="judge only answer-correct traces, or all")

    @model_validator(mode="after")
    def _one_judge(self) -> JudgeConfig:
        if (self.teacher is None) == (self.model is None):
            raise ValueError("collect.judge: give either teacher (a teacher's name) or model (a model entry "
                             "{name, backend, model, ...} that only judges), not both or neither")
        return self

    @field_validator("model", mode="before")
    @classmethod
    def _generates(cls, v):
        if isinstance(v, dict) and v.get("backend") == "column":
            raise ValueError("a judge generates its verdicts; backend 'column' only reads stored text (use hf, vllm "
                             "or openai)")
        return v

    @property
    def name(self) -> str:
        return self.teacher or self.model.name


class ConfidenceConfig(_Strict):
    enabled: bool = Field(False, description="ask backends for token log-probs and store confidence scores")
    window: int = Field(2048, ge=1, description="sliding window (tokens) for the lowest-window mean log-prob")
    min_window_logprob: float | None = Field(
        None, description="filter: drop traces whose lowest window mean log-prob is below this")


class CollectConfig(_Strict):
    samples: int = Field(16, ge=1, description="samples per teacher per problem (MoT §5)")
    temperature: float = Field(0.6, ge=0, description="sampling temperature; 0 means greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set of tokens whose "
                         "probability reaches top_p (1.0: off)")
    max_new_tokens: int = Field(32768, ge=1, description="tokens per trace at most; a trace cut here is "
                                "verified as it stands (its answer usually missing: incorrect)")
    stop: list[str] = Field(default_factory=list, description="extra stop strings")
    style: str | list[str] = Field(
        "default", description="prompt style name(s) (see accord.prompts.STYLES) or a template with {question}")
    select: str = Field("random-correct", description="how corpora pick traces per problem per teacher: "
                        + "; ".join(f"{s.name} ({s.summary})" for s in SELECT_POLICIES.values()))
    verifier: str = Field("math", description="math (math-verify), numeric, choice, exact")
    numeric_tolerance: float = Field(1e-6, ge=0, description="relative tolerance of the numeric verifier")
    seed: int = Field(0, description="base of every sample's seed (a hash of seed, teacher, style, problem and "
                      "sample index) and of the selection policies' draws")
    judge: JudgeConfig | None = Field(None, description="optional LLM-judge filter (QR-Distill §2.3 step 2)")
    confidence: ConfidenceConfig = Field(default_factory=ConfidenceConfig)

    @field_validator("select")
    @classmethod
    def _select(cls, v: str) -> str:
        return one_of(v, SELECT_POLICIES, "selection policy")

    @field_validator("style")
    @classmethod
    def _style(cls, v: str | list[str]) -> str | list[str]:
        from accord.prompts import check_style

        for s in [v] if isinstance(v, str) else v:
            check_style(s)
        if isinstance(v, list) and not v:
            raise ValueError("give at least one style")
        return v

    @field_validator("verifier")
    @classmethod
    def _verifier(cls, v: str) -> str:
        from accord.verify import VERIFIERS

        return one_of(v, VERIFIERS, "verifier")

    @property
    def styles(self) -> list[str]:
        return [self.style] if isinstance(self.style, str) else list(self.style)


class StudentConfig(_Strict):
    model: str = Field("lab:student", description="the student: local path, hub id or lab:<model>")
    device: str = Field("auto", description="cpu, cuda, cuda:1, mps or auto")
    dtype: str = Field("auto", description="weights dtype when loading (auto: the checkpoint's)")
    trust_remote_code: bool = Field(False, description="allow model code from the checkpoint (off by default)")
    attention: Attention = Field("auto", description=ATTENTION_DOC + "; used for training, evaluation and analysis")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="variables of the student's chat template, e.g. {enable_thinking: "
        "false} (Qwen3, SmolLM3) or {reasoning_effort: low} (gpt-oss): its prompts are rendered with them wherever "
        "they are — training, evaluation, replay, diagnostics, drift (QR's students too: a variable a template does "
        "not read is ignored); a change retrains and re-evaluates")


class MergeConfig(_Strict):
    method: str = Field("average", description="average (MoT), ties, dare_linear, dare_ties, task_arithmetic, "
                        "linear; mergekit conventions")
    weights: list[float] | None = Field(None, description="one weight per teacher branch (default 1 each; inside "
                                        "MoT, task_arithmetic and dare_* default to 1/K: the merge replaces "
                                        "the average, App. A.2)")
    density: float = Field(1.0, gt=0, le=1, description="ties/dare: share of each task vector kept")
    normalize: bool | None = Field(None, description="divide by the sum of weights (default: the method's, "
                                   "as in mergekit)")
    seed: int = Field(0, description="seed of DARE's random masks (MoT folds the round in: new masks each round)")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return one_of(v, MERGE_METHODS, "merge method")


class LoraConfig(_Strict):
    r: int = Field(0, ge=0, description="LoRA rank; 0 = full fine-tuning")
    alpha: int = Field(16, ge=1, description="LoRA scaling: the adapter's update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input while training")
    target_modules: str | list[str] = Field("all-linear", description="peft target_modules")
    quantize: Literal["nf4"] | None = Field(
        None, description="QLoRA (Dettmers et al., 2023): the frozen base's linear layers in 4-bit NF4 with double "
        "quantisation while the adapters train (bitsandbytes: pip install 'accord[qlora]'; needs r > 0); the trained "
        "model is saved in full precision, the adapter merged into the float base")

    @model_validator(mode="after")
    def _quantize_needs_lora(self) -> LoraConfig:
        if self.quantize and not self.r:
            raise ValueError(f"train.lora.quantize: {self.quantize} quantizes the frozen base of a LoRA run; set "
                             "train.lora.r (e.g. 32, QR-Distill's rank) or quantize: null")
        return self


class ReplayConfig(_Strict):
    path: str = Field(description="problem source (as problems.path) the student answers before training, e.g. "
                      "general problems it already solves; its own verified answers become replay rows")
    share: float = Field(0.3, gt=0, le=1, description="replay rows mixed into every corpus, as a share of its size")
    limit: int | None = Field(2000, ge=1, description="problems of the source the student answers")
    max_new_tokens: int = Field(512, ge=1, description="tokens per answer at most (the student answers greedily)")
    verifier: str = Field("math", description="checks the student's answers: math (math-verify), numeric, choice, "
                          "exact")


class TrainConfig(_Strict):
    method: str | list[str] = Field(
        "mot", description=f"{method_choices()} (std alone: every teacher in turn); a list runs several and "
        "compares them")
    rounds: int = Field(3, ge=1, description="MoT rounds T; std/mtd train T×S steps with a checkpoint every S")
    steps_per_round: int = Field(50, ge=1, description="S: optimizer steps per branch per round (MoT §4.2)")
    epochs: float | None = Field(
        None, gt=0, description="set S from the data instead: S = ⌈epochs × rows of the union corpus "
        "(corpora/all.jsonl: what MTD and COMPACT train on) / (batch_size × rounds)⌉, the same S for every method "
        "(matched budgets); the papers give epochs (COMPACT Table 8, QR-Distill §3.2)")
    batch_size: int = Field(16, ge=1, description="sequences per optimizer step")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (MoT App. G.1: 1e-5)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the cosine schedule's floor, as a share of lr "
                                "(1.0: constant after warmup)")
    warmup_ratio: float = Field(0.01, ge=0, lt=1, description="warmup share of each schedule (MoT App. G.1: 1%)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW's decoupled weight decay, on weight matrices only "
                                "(not norms or biases)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW's (β1, β2)")
    clip: float = Field(1.0, ge=0, description="gradient-norm clip; 0 disables")
    max_len: int = Field(4096, ge=8, description="tokens per example (longer ones are truncated)")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw (fused on CUDA) or plain SGD (no "
                                               "momentum, no weight decay: what MoT App. A's identity is checked "
                                               "with)")
    seed: int = Field(0, description="the data order and torch's seed for the run; a variant per seed: accord "
                      "run --seeds")
    bf16: bool | None = Field(None, description="bf16 mixed precision (default: when the device supports it)")
    gradient_checkpointing: bool = Field(False, description="recompute each layer's activations in the backward "
                                         "instead of keeping them: less memory, about a third more compute")
    chunked_loss: bool | None = Field(None, description="the LM head and cross-entropy in chunks from the hidden "
                                      "states, never the full [batch, length, vocabulary] logits (null: on CUDA)")
    lean_layers: bool | None = Field(None, description="RMSNorm and SwiGLU as autograd functions that keep only "
                                     "their inputs for the backward (same outputs, less activation memory; "
                                     "null: on CUDA; not with compile)")
    packing: bool | None = Field(None, description="padding-free batches: examples end to end in rows, position "
                                 "ids restarting per example, attention never crossing an example (null: on when a "
                                 "two-example probe shows the model keeps packed examples apart; true: required)")
    compile: bool = Field(False, description="torch.compile each decoder layer's MLP and norms, and the chunked "
                          "head's softmax, while training (attention stays eager; not under QLoRA); the first step "
                          "pays for compiling")
    master_weights: bool = Field(False, description="bf16 weights in the forward and backward, float32 master "
                                 "weights in the optimizer, rounded to bf16 after every step (all activations bf16: "
                                 "less memory and elementwise work than autocast over float32 weights; needs bf16 "
                                 "mixed precision; not with FSDP/DeepSpeed)")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    mot_schedule: Literal["per-round", "global"] = Field(
        "per-round", description="MoT learning rate: per-round = every branch is its own S-step run (warmup + "
        "cosine, as the paper trains each branch); global = one cosine over T×S steps (App. A's MoT = MTD identity)")
    select: Literal["last", "validation"] = Field(
        "last", description="MoT output: the last round, or the round best on a held-out 10% (MoT Table 10)")
    keep_checkpoints: int | None = Field(None, ge=1, description="keep only the newest N step checkpoints")
    replay: ReplayConfig | None = Field(None, description="self-generated replay against forgetting: the base "
                                        "student's own verified answers on general problems, mixed into every "
                                        "method's training rows (null: corpora only)")
    report_to: list[str] = Field(default_factory=list, description="trackers: tensorboard, wandb, mlflow")
    tag: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                            description="appended to the name of every model this run trains (train/<name>-<tag>/): "
                            "an ablation beside the default in one run_dir, corpora and table, e.g. "
                            "train.method=compact compact.scores=[ppl,cons] train.tag=no-mi")

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str | list[str]) -> str | list[str]:
        for m in [v] if isinstance(v, str) else v:
            if m.split(":", 1)[0] not in METHODS:
                raise ValueError(f"unknown train method {m!r}; choose {method_choices()}")
        return v


class EvalSplit(_Strict):
    path: str = Field(description="problem source (as problems.path)")
    split: Literal["all", "train", "validation", "test"] = Field("all", description="which deterministic split "
                                                                  "of the source (as problems.split)")
    limit: int | None = Field(None, ge=1, description="only the first N problems of this split")
    question_field: str = Field("question", description="column holding the question text (as problems.question_field)")
    answer_field: str = Field("answer", description="column holding the reference answer")


def _default_splits() -> dict[str, EvalSplit]:
    return {"target": EvalSplit(path="lab:arith:test"), "ood": EvalSplit(path="lab:arith-ood:test"),
            "general": EvalSplit(path="lab:last:test")}


def _scheme(path: str) -> str:
    return path.split(":", 1)[0] if ":" in path else ""


class EvalConfig(_Strict):
    splits: dict[str, EvalSplit] = Field(default_factory=_default_splits,
                                         description="name → problem source; by default the lab's target/ood/"
                                         "general for the lab's problems, and for your own problems their held-out "
                                         "split (test, else validation) when problems.split is train")
    k: int = Field(16, ge=0, description="samples per problem for pass@1 (0: greedy only)")
    repeats: int = Field(1, ge=1, description="independent runs of the k samples; the report adds the standard "
                         "deviation of pass@1 over runs (OpenThoughts reports mean ± std over 10)")
    temperature: float = Field(0.6, ge=0, description="sampling temperature of the k samples (greedy runs at 0)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of the k samples")
    greedy: bool = Field(True, description="also measure greedy accuracy")
    max_new_tokens: int = Field(32768, ge=1, description="tokens per answer at most; one cut here is verified as "
                                "it stands")
    backend: Literal["hf", "vllm"] = Field("hf", description="generation backend for evaluation")
    batch_size: int = Field(64, ge=1, description="sequences generated together (the student as a hf or vllm "
                            "generator, as teachers.batch_size)")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N problems of every split")
    every_checkpoint: bool = Field(True, description="evaluate every round / checkpoint (curves), not only finals")
    curve_splits: list[str] | None = Field(["target"], description="splits evaluated at intermediate checkpoints "
                                           "(null: all); finals get every split")
    verifier: str = Field("math", description="checks the answers: math (math-verify), numeric, choice, exact")
    seed: int = Field(0, description="base of the samples' seeds (mixed with each problem and sample index)")

    @model_validator(mode="after")
    def _measures(self) -> EvalConfig:
        if self.k == 0 and not self.greedy:
            raise ValueError("eval.k is 0 and eval.greedy is false: the evaluation would measure nothing "
                             "(set eval.k ≥ 1 for pass@1 over samples, or eval.greedy: true)")
        return self


class CordConfig(_Strict):
    beam: int = Field(4, ge=1, description="B: partial trajectories kept per step (1 = greedy); CoRD §4.3")
    segmentation: Literal["prompt", "line-break", "prefix"] = Field(
        "prompt", description="step unit: ### Step headers (§4.1), blank lines, or reflection markers (App. G.1)")
    selection: str = Field("predictive-perplexity", description="step score: " + "; ".join(
        f"{s.name} ({s.paper})" for s in STEP_SCORERS.values()))
    search: Literal["beam", "mcts"] = Field("beam", description="beam search (§4.3; beam=1 is greedy) or the MCTS "
                                            "baseline (§5.2.3) with UCB and `beam` roll-outs")
    meta_prover: str | None = Field(None, description="teacher name whose model scores steps (default: the best "
                                    "collected accuracy, else the first; the paper uses the strongest)")
    max_steps: int = Field(32, ge=1, description="steps per trajectory at most")
    step_tokens: int = Field(256, ge=1, description="tokens per proposed step at most")
    think_tokens: int = Field(4096, ge=1, description="reasoning budget; past it </think> is appended")
    answer_tokens: int = Field(256, ge=1, description="tokens for the final answer after </think>")
    temperature: float = Field(0.6, ge=0, description="sampling temperature of the proposed steps (a teacher's "
                               "own teachers.temperature overrides it)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of the proposed steps")
    judge_runs: int = Field(4, ge=1, description="binary-judgment: roll-outs averaged per candidate (paper: 10)")
    answer_template: str = Field("</think> The final answer is {answer}.",
                                 description="text after the reasoning whose {answer} tokens the meta-prover scores "
                                 "(App. A.1); match how your models close their reasoning")
    baselines: list[Literal["curation", "integration"]] = Field(
        default_factory=lambda: ["curation"], description="post-hoc baselines at the same trajectory budget (§5)")
    curation_rollouts: int | None = Field(None, ge=1, description="complete traces per teacher for curation "
                                          "(default: beam, the same trajectory budget; Curation×2 = 2·beam, "
                                          "Table 15)")
    integrator: GeneratorConfig | None = Field(
        None, description="integration: the merging LLM as its own model entry ({name, backend, model, ...}; "
        "GPT-5-mini in the paper); it merges the curation traces and never proposes steps")
    limit: int | None = Field(None, ge=1, description="only the first N problems")
    seed: int = Field(0, description="base of the steps' seeds (mixed with problem, teacher, beam and step) and "
                      "of the tie-breaking draws")

    @field_validator("selection")
    @classmethod
    def _selection(cls, v: str) -> str:
        return one_of(v, STEP_SCORERS, "step scorer")

    @field_validator("integrator", mode="before")
    @classmethod
    def _integrator(cls, v):
        if isinstance(v, str):
            raise ValueError(f"give the integrator as its own model entry, e.g. {{name: merger, backend: openai, "
                             f"model: gpt-5-mini}}, not a teacher name ({v!r}): a teacher would also propose steps")
        return v


# content words at MI peaks (Qian et al. 2025's released list, R1-Distill-Llama-8B), plus COMPACT's own examples
THINKING_WORDS = ("So", "Hmm", "Okay", "First", "Now", "Wait", "But", "Then", "Since", "Therefore", "Maybe",
                  "Let", "Because", "Thus", "Alternatively", "Actually")


class CompactConfig(_Strict):
    """COMPACT (paper 001): per-instance teacher weights from the student's own scores (Eq. 7)."""
    beta: tuple[float, float, float] = Field((1.0, 1.0, 1.0), description="β₁ (S_MI), β₂ (S_cons), β₃ (S_PPL) of "
                                             "Eq. 7; the paper gives none (1, 1, 1)")
    tau: float = Field(1.0, gt=0, description="softmax temperature τ of Eq. 7")
    mcon_weight: float = Field(0.1, ge=0, description="λ of Eq. 10: weight of the answer-span consistency loss "
                               "(MCC-KD's default 0.1)")
    epsilon: float = Field(0.1, ge=0, description="mask weight M_t away from thinking words (Eq. 3); 1 = uniform")
    thinking_words: list[str] = Field(
        default_factory=lambda: list(THINKING_WORDS),
        description="words whose emitting state gets M_t = 1 (whole words, case-sensitive)")
    scores: list[Literal["mi", "cons", "ppl"]] = Field(
        default_factory=lambda: ["mi", "cons", "ppl"], description="scores used (ablations of Fig. 5/6; [] = the "
        "paper's \"Direct Avg.\", α = 1/K′)")
    sft_norm: Literal["trace-mean", "token-sum"] = Field(
        "trace-mean", description="L_SFT per trace: mean NLL (default; α stays each teacher's share) or Eq. 8's sum")
    consensus_self: Literal["include", "exclude"] = Field(
        "include", description="S_cons softmax over all traces (the paper's form) or without the self loop")
    mi_reduce: Literal["sum", "mean"] = Field("sum", description="S_MI as Eq. 3's sum (favours long traces) or mean")


class QrStudent(_Strict):
    model: str = Field(description="HF id, local path or lab:<model> of this student")
    name: str | None = Field(None, description="its name in results (qr-<name>); default: from the model")
    lr: float | None = Field(None, gt=0, description="peak learning rate (default train.lr; the paper: 5e-6 "
                             "Mistral, 2e-4 Gemma)")
    trust_remote_code: bool = Field(False, description="allow model code from the checkpoint (off by default)")
    attention: Attention = Field("auto", description=ATTENTION_DOC)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError(f"student name {v!r} must match {NAME_RE.pattern}")
        return v

    def label(self) -> str:
        if self.name:
            return self.name
        base = self.model.rstrip("/").split("/")[-1].split(":")[-1]
        return re.sub(r"[^A-Za-z0-9_.-]", "-", base).lstrip("-._") or "student"


class QrConfig(_Strict):
    """QR-Distill (paper 003): a router sends each path to one, several or no students, which train jointly
    and pull their word-aligned hidden states towards a competence-weighted ensemble."""
    students: list[QrStudent] = Field(default_factory=list, description="S ≥ 2 students trained jointly, each "
                                      "with its own tokenizer and learning rate")
    encoder: str = Field("minilm", description="router encoder: minilm (all-MiniLM-L6-v2, offline package; the "
                         "paper uses RoBERTa-base), a local sentence-transformers path, or hashing (no model)")
    tau: float = Field(1.0, gt=0, description="binary-concrete temperature τ of the gates")
    tau_end: float | None = Field(None, gt=0, description="anneal τ exponentially to this by the last step")
    entropy_weight: float = Field(0.1, ge=0, description="λ₁: pull of the selection rate towards ½ (H maximised)")
    entropy: Literal["pooled", "per-student"] = Field("per-student", description="H per student (balanced use; "
                                                     "default) or pooled over students (Eq. 3, which \"all paths "
                                                     "to one student\" also maximises)")
    mutual_weight: float = Field(0.1, ge=0, description="λ₂ of the mutual-student loss (0: w/o Collab)")
    mutual_paths: Literal["all", "routed"] = Field("all", description="paths the mutual loss covers per student: "
                                                   "all (Eq. 8) or only those routed to it (the public code)")
    proj: Literal["fitted", "random"] = Field("fitted", description="fixed projections: Procrustes-fitted on the "
                                              "base students, or random orthonormal (the public code)")
    competence: Literal["nll-per-char", "uniform"] = Field("nll-per-char", description="ensemble weights γ")
    paths_per_question: int | None = Field(None, ge=1, description="paths sampled per question per epoch "
                                           "(null: all; the public code: 2)")
    router_baseline: Literal["none", "batch", "question"] = Field(
        "batch", description="the router's signal: CE minus the student's detached mean CE over the batch "
        "(default) or the question; none: the self-normalised form alone (collapses in the lab)")
    heads_lr: float = Field(1e-4, gt=0, description="learning rate of the router")
    freeze: list[str] = Field(default_factory=list, description="students kept frozen (Table 5 ablation)")
    route: Literal["learned", "frozen", "all", "none"] = Field("learned", description="learned router; frozen "
                                                               "(random, never trained); all or none (every path "
                                                               "to every student: w/o Route)")
    filter: Literal["on", "off"] = Field("on", description="off: train on every generated path, wrong ones too "
                                         "(w/o QF)")
    schedule: Literal["constant", "cosine"] = Field("constant", description="learning rate after warmup "
                                                    "(the paper names none: constant)")


class AccordConfig(_Strict):
    run_dir: str = Field("runs/default", description="where every stage writes its files")
    problems: ProblemsConfig
    teachers: list[TeacherConfig] = Field(min_length=1)
    collect: CollectConfig = Field(default_factory=CollectConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cord: CordConfig = Field(default_factory=CordConfig)
    compact: CompactConfig = Field(default_factory=CompactConfig)
    qr: QrConfig = Field(default_factory=QrConfig)

    @model_validator(mode="after")
    def _cross(self) -> AccordConfig:
        names = [t.name for t in self.teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teachers: duplicate names {dupes}")
        judge = self.collect.judge.teacher if self.collect.judge else None
        if judge is not None and judge not in names:
            raise ValueError(f"collect.judge.teacher {judge!r} is not one of the teachers {names}; a judge that "
                             "is not a teacher goes in collect.judge.model as its own model entry")
        for m in self.train.methods:
            if m.startswith("std:") and m[4:] not in names + ["cord", "cord-curation", "cord-integration"]:
                raise ValueError(f"train.method {m!r}: {m[4:]!r} is not one of the teachers {names}")
        if "qr" in self.train.methods:
            self._check_qr()
        if self.cord.meta_prover is not None and self.cord.meta_prover not in names:
            raise ValueError(f"cord.meta_prover {self.cord.meta_prover!r} is not one of the teachers {names}")
        if Path(self.run_dir).exists() and not Path(self.run_dir).is_dir():
            raise ValueError(f"run_dir {self.run_dir!r} is an existing file, not a directory")
        w = self.train.merge.weights
        if w is not None and len(w) != len(names):
            raise ValueError(f"train.merge.weights has {len(w)} value(s) for {len(names)} teacher(s)")
        self._own_eval_splits()
        return self

    def _own_eval_splits(self) -> None:
        """``eval.splits`` left unset while the problems come from another source than the default splits (the
        lab's): evaluating a student trained on your problems on the lab's tasks would say nothing of it.  The
        default is then the problems' own held-out split — ``test`` where ``problems.test_fraction`` > 0 (so
        ``train.select: validation`` does not pick on the problems it is scored on), else ``validation`` — when
        training keeps to ``problems.split: train``, and no split at all otherwise (nothing is held out: the
        evaluation stage then says what to set, :func:`accord.evaluate.check_eval_splits`)."""
        e, p = self.eval, self.problems
        if "splits" in e.model_fields_set or _scheme(p.path) in {_scheme(s.path) for s in _default_splits().values()}:
            return
        held = "test" if p.test_fraction > 0 else "validation" if p.validation_fraction > 0 else None
        e.splits = {held: EvalSplit(path=p.path, split=held)} if p.split == "train" and held else {}
        if "curve_splits" not in e.model_fields_set:
            e.curve_splits = list(e.splits)

    def _check_qr(self) -> None:
        labels = [s.label() for s in self.qr.students]
        if len(labels) < 2:
            raise ValueError(f"train.method qr needs at least two students in qr.students (got {len(labels)}); "
                             "with one student use train.method=std or mtd")
        if len(set(labels)) < len(labels):
            raise ValueError(f"qr.students: two students share a name ({labels}); give each a name")
        unknown = [f for f in self.qr.freeze if f not in labels]
        if unknown:
            raise ValueError(f"qr.freeze: {unknown} are not students ({labels})")
        if len(self.qr.freeze) >= len(labels):
            raise ValueError("qr.freeze: every student is frozen; nothing would train")

    def teacher(self, name: str) -> TeacherConfig:
        for t in self.teachers:
            if t.name == name:
                return t
        raise KeyError(name)


# --------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.0.c=value`` → (["a","b","0","c"], parsed YAML value)."""
    if "=" not in item:
        raise ConfigError("command line", [(item, "an override must look like key.sub=value")])
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError("command line", [(key, "empty key segment")])
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    """Set ``value`` at ``path``; list items may be named by index or by their ``name``."""
    node: Any = data
    for i, seg in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            idx = _list_index(node, seg, ".".join(path[: i + 1]))
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[seg] = value
            else:
                node = node.setdefault(seg, {})
                if node is None:
                    node = {}
        else:
            raise ConfigError("command line", [(".".join(path[: i + 1]), "cannot set a key inside a scalar")])


def _list_index(node: list, seg: str, where: str) -> int:
    if seg.lstrip("-").isdigit():
        idx = int(seg)
        if -len(node) <= idx < len(node):
            return idx
        raise ConfigError("command line", [(where, f"index out of range (list has {len(node)} items)")])
    for idx, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == seg:
            return idx
    raise ConfigError("command line", [(where, f"no list item named {seg!r}")])


def _nearby(p: Path) -> str:
    """``; did you mean …?`` naming YAML files whose names are close to ``p``'s, in its folder and in ``configs/``
    (where the README's commands keep theirs), or nothing."""
    import difflib

    seen = {q for d in {p.parent, Path("configs"), p.parent / "configs"} if d.is_dir()
            for q in (*d.glob("*.yaml"), *d.glob("*.yml"))}
    by_name = {}
    for q in sorted(seen):
        by_name.setdefault(q.stem, q)
    close = difflib.get_close_matches(p.stem, list(by_name), n=2, cutoff=0.75)
    return f"; did you mean {' or '.join(str(by_name[c]) for c in close)}?" if close else ""


def load_yaml(path: str | Path) -> dict:
    """A config file's mapping.  A run directory stands for the ``config.yaml`` its first stage wrote there, with
    ``run_dir`` that directory (where it is now, if it moved): ``accord report runs/lab-quickstart``."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(str(p), [("", f"file not found (looked for {p.absolute()}){_nearby(p)}")])
    if p.is_dir():
        if not (p / "config.yaml").is_file():
            raise ConfigError(str(p), [("", "a directory, not a config file (a run directory stands for its "
                                            "config.yaml, written there when a stage first runs; this one has none)")])
        return {**load_yaml(p / "config.yaml"), "run_dir": str(p)}
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(str(p), [(where, f"invalid YAML: {getattr(e, 'problem', e)}")]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(p), [("", "the top level must be a mapping")])
    return data


def validate(data: dict, source: str = "config", overridden: list[str] | None = None) -> AccordConfig:
    try:
        return AccordConfig.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field" + (" (put secrets in an environment variable named by api_key_env)"
                                         if loc.endswith("api_key") else _did_you_mean(err["loc"]))
            elif err["type"] in ("literal_error", "int_parsing", "float_parsing", "bool_parsing", "enum"):
                msg += f" (got {err.get('input')!r})"  # say what was given, not only what is allowed
            if overridden and any(loc == o or loc.startswith(o + ".") or o.startswith(loc + ".") for o in overridden):
                msg += " — from the command line"
            problems.append((loc, msg))
        raise ConfigError(source, problems) from None


def _did_you_mean(loc: tuple) -> str:
    """`` (did you mean collect?)`` for an unknown key close to a real field of the same section."""
    import difflib

    model: Any = AccordConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        ann = getattr(field, "annotation", None)
        nxt = next((a for a in (getattr(ann, "__args__", None) or (ann,)) if hasattr(a, "model_fields")), None)
        if nxt is None:
            args = getattr(ann, "__args__", ()) or ()
            nxt = next((b for a in args for b in (getattr(a, "__args__", None) or ()) if hasattr(b, "model_fields")),
                       None)
        if nxt is None:
            return ""
        model = nxt
    close = difflib.get_close_matches(str(loc[-1]), list(getattr(model, "model_fields", {})), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> AccordConfig:
    """Load YAML (or ``base``), apply overrides, validate; every problem reported at once; a problem that comes
    from an override says ``(from the command line)``."""
    data = load_yaml(path) if path is not None else dict(base or {})
    overridden = []
    for item in overrides or []:
        keys, value = parse_override(item)
        apply_override(data, keys, value)
        overridden.append(".".join(keys))
    return validate(data, str(path) if path else "config", overridden)


def dump_config(cfg: AccordConfig, run_dir: str | Path | None = None) -> Path:
    """Write the resolved config (env-var *names* only, never values) to ``<run_dir>/config.yaml``."""
    out = Path(run_dir or cfg.run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return out


def diff_settings(was: dict, now: dict) -> list[str]:
    """``key.sub: old → new`` for every leaf that differs between two nested settings dicts (a key on one side only
    reads ``None`` on the other), sorted by key."""
    a, b = _flat(was), _flat(now)
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
