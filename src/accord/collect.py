"""Multi-teacher trace collection, verification, filtering and corpus selection.

MoT §5 recipe: every teacher samples ``samples`` (16) completions per problem at
temperature 0.6; each final answer is verified against the reference; the corpus
for a teacher keeps one random correct trace per problem and drops a problem for
that teacher when none is correct (``random-correct``).  ``all-correct`` and
``first-correct`` are the obvious alternatives.

Filters applied before selection, in order: answer check (QR-Distill §2.3 step 1),
the optional LLM judge (§2.3 step 2, stored beside the answer check), and the
optional step-level confidence threshold (papers/004).

Imported corpora (``backend: column``, s1K-style tables with one column per
teacher) go through the same verification and store as sample 0 of style ``import``.

Choices where the papers are silent: seeds per sample are a hash of
(seed, teacher, style, problem, sample index), so on the per-request seeded
backends (``vllm``, ``openai`` where the server honours ``seed``) any subset
re-generates identically; the ``hf`` backend seeds each *batch* from its
requests' seeds (transformers has no per-row generator), so it reproduces the
same batches exactly but a subset batched differently draws other noise;
corpora do not train on the teacher's styled prompt (the student is asked with a simple instruction at test time,
QR-Distill §2.1): the user turn is the ``default`` style prompt — the one evaluation uses — and the teacher's styled
prompt is kept beside it.  Teachers behind servers (``backend: openai``) are collected at once, each from a thread of
its own, while the main thread verifies and stores what comes back (:func:`sample_at_once`); in-process teachers one
after another.

Under several processes (``accelerate launch -m accord.cli collect`` or ``run``; :class:`Share`) an ``hf``
teacher's batches (and an ``hf`` judge's) are dealt out in turn, each process generating on its own device into
the one store (SQLite in WAL mode takes writes from several processes); the batches are formed on every process
from the same stored state before any process writes, so they, their seeds and their samples are one process's.
Everything else — served teachers (their server spreads the load), ``vllm`` (it starts its own workers), imports,
any other judge, corpora and the summary — runs on process 0.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from rich.console import Console
from rich.table import Table

from accord.analysis.confidence import window_confidence
from accord.analysis.stats import mean_se
from accord.config import AccordConfig, TeacherConfig, dump_config
from accord.errors import RunFailure, UsageError
from accord.launch import Share, dealt
from accord.problems import Problem, load_problems
from accord.prompts import (
    REASONING_KEYS,
    THINK_CLOSE,
    THINK_OPEN,
    content_parts,
    normalize_thoughts,
    render_prompt,
    split_think,
    style_name,
)
from accord.rows import CorpusRow, StoredTrace, TraceRow
from accord.store import TraceStore
from accord.teachers.base import (
    Generation,
    Request,
    SamplingParams,
    TeacherUnavailable,
    load_generator,
    served,
)
from accord.ui import make_console, progress
from accord.verify import (
    CORRECT,
    FAILED,
    IMPORTED,
    INCORRECT,
    INVALID,
    VALID,
    check,
    gold_is_readable,
    judge_prompt,
    judge_stamp,
    parse_judgement,
    stamp,
)


class CollectIncomplete(RunFailure):
    """Some teachers could not be collected; everything else was stored."""


@dataclass
class CollectResult:
    run_dir: Path
    summary: list[dict]
    generated: int = 0
    failures: dict[str, str] = field(default_factory=dict)


def sample_seed(base: int, teacher: str, style: str, pid: str, idx: int) -> int:
    key = f"{base}|{teacher}|{style}|{pid}|{idx}".encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16)


def sampling_params(cfg: AccordConfig) -> SamplingParams:
    c = cfg.collect
    return SamplingParams(temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                          stop=tuple(c.stop), logprobs=c.confidence.enabled)


# ------------------------------------------------------------------ rows


def verdict_of(cfg: AccordConfig, p: Problem, text: str, style: str, finish_reason: str | None
               ) -> tuple[str, str | None, str]:
    """A stored trace's (verdict, parsed answer, stamp): the answer check, except that a sample cut off at the
    token limit (``finish_reason: length``: a generation that reached ``collect.max_new_tokens``, or an imported
    one its source marks so) is never correct — the teacher never finished, and its text ends mid-sentence where
    the student would learn to stop (verifier revision 6; before, only imported ones, so a cut generation whose
    last number or ``\\boxed{}`` matched was kept)."""
    c = cfg.collect
    res = check(c.verifier, p.answer, text, c.numeric_tolerance)
    cut = finish_reason == "length"
    return (INCORRECT if cut else res.verdict), res.parsed, stamp(c.verifier, p.answer, c.numeric_tolerance)


def make_row(cfg: AccordConfig, teacher: str, style: str, p: Problem, idx: int, prompt: str, g: Generation,
             params: str) -> TraceRow:
    parsed = split_think(g.text)
    verdict, answer, verified = (FAILED, None, None) if g.failed else verdict_of(cfg, p, g.text, style,
                                                                                 g.finish_reason)
    mean_lp, min_lp = (None, None)
    if g.token_logprobs:
        mean_lp, min_lp = window_confidence(g.token_logprobs, cfg.collect.confidence.window)
    return TraceRow(problem_id=p.id, teacher=teacher, style=style, sample_idx=idx, params=params, prompt=prompt,
                text=g.text, reasoning=parsed.reasoning, answer_text=parsed.answer, parsed_answer=answer,
                verdict=verdict, token_count=g.token_count, char_count=len(g.text), finish_reason=g.finish_reason,
                mean_logprob=mean_lp, min_window_logprob=min_lp, elapsed_s=g.elapsed_s, error=g.error,
                verified_with=verified)


def stale_verdicts(cfg: AccordConfig, store: TraceStore, problems: list[Problem]) -> list:
    """The stored verdicts of ``problems`` whose stamp is not today's (:func:`reverify`)."""
    c = cfg.collect
    now = {p.id: stamp(c.verifier, p.answer, c.numeric_tolerance) for p in problems}
    return [r for r in store.verification_stamps()
            if r["problem_id"] in now and r["verified_with"] != now[r["problem_id"]]]


def reverify(cfg: AccordConfig, store: TraceStore, problems: list[Problem], console: Console) -> int:
    """Check again, from the stored text, every verdict whose stamp is not today's (:func:`accord.verify.stamp`:
    another verifier, tolerance or verifier revision, or another reference answer for the problem — a store
    written before verdicts were stamped counts as another revision); nothing is generated.  Returns how many
    verdicts changed."""
    by_id = {p.id: p for p in problems}
    stale = stale_verdicts(cfg, store, problems)
    if not stale:
        return 0
    changed = 0
    with progress(console) as bar:
        task = bar.add_task("verify stored traces again", total=len(stale))
        for part in _chunks(stale, 1000):  # a chunk's texts at a time, written as checked: a killed run goes on
            texts, items = store.texts([r["row_id"] for r in part]), []
            for r in part:
                verdict, parsed, verified = verdict_of(cfg, by_id[r["problem_id"]], texts[r["row_id"]], r["style"],
                                                       r["finish_reason"])
                changed += verdict != r["verdict"]
                items.append((r["row_id"], verdict, parsed, verified))
            store.set_verdicts(items)
            bar.advance(task, len(part))
    console.print(f"checked {len(stale):,} stored verdict(s) again (the verifier, its settings or revision, or a "
                  f"reference answer changed since they were stored): {changed} changed"
                  + ("; the corpora are built from the new verdicts, and `accord train` stops at a finished model "
                     "trained on the old ones, naming the corpus that changed" if changed else ""))
    return changed


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class Prior(NamedTuple):
    """A stored sample cut at a smaller ``collect.max_new_tokens`` than the config now asks for, continued from its
    text rather than drawn again (:func:`regrowable`)."""
    text: str
    tokens: int
    elapsed_s: float


def only_budget_raised(was_json: str, now_json: str) -> bool:
    """Whether stored settings differ from today's only by a smaller ``max_new_tokens``: their finished samples are
    what today's would be (under a larger limit they end where they did), their cut ones :func:`regrowable`."""
    was, now = json.loads(was_json), json.loads(now_json)
    return (isinstance(was.get("max_new_tokens"), int) and was["max_new_tokens"] < now["max_new_tokens"]
            and {**was, "max_new_tokens": None} == {**now, "max_new_tokens": None})


def regrowable(cfg: AccordConfig, store: TraceStore | None, teacher: str, params_json: str
               ) -> dict[tuple[str, str, int], Prior]:
    """The teacher's stored samples cut at a token limit below today's, made with today's settings otherwise: each
    is continued from its text up to the new limit — a sample under that limit, as sampling draws one token
    after another (the stored text is tokenised again, as CoRD's prefixes are) — for the tokens it lacked.  Not
    with ``collect.confidence`` on: the stored text's token log-probs are not kept, so the scores could not cover
    the whole trace; those samples stay cut (``--force`` draws them again)."""
    if store is None or cfg.collect.confidence.enabled:
        return {}
    return {(r["problem_id"], r["style"], r["sample_idx"]):
            Prior(r["text"], r["token_count"] or 0, r["elapsed_s"] or 0.0)
            for r in store.cut_rows(teacher) if only_budget_raised(r["params"], params_json)}


def missing_generations(cfg: AccordConfig, problems: list[Problem], done: set) -> list[tuple]:
    """The (problem, style, sample index) triples of one teacher not among its ``done`` keys, in collection order."""
    c = cfg.collect
    return [(p, s, i) for s in c.styles for p in problems for i in range(c.samples)
            if (p.id, style_name(s), i) not in done]


def usable_problems(cfg: AccordConfig) -> tuple[list[Problem], int]:
    """The problems collection asks about, and how many were left out (a reference answer the verifier cannot
    read)."""
    problems = load_problems(cfg.problems)
    usable = [p for p in problems if gold_is_readable(cfg.collect.verifier, p.answer)]
    return usable, len(problems) - len(usable)


def _todo(cfg: AccordConfig, tcfg: TeacherConfig, problems: list[Problem], store: TraceStore,
          console: Console) -> tuple[list[tuple], str]:
    """One teacher's missing (problem, style, sample) triples and its settings' JSON (stored with each row); says
    when a collection resumes or stored rows were made with other settings."""
    c = cfg.collect
    params_json = teacher_params(cfg, tcfg)
    if stale := other_settings(store, tcfg.name, params_json, c.confidence.enabled):
        console.print(f"[yellow]warning[/]: teacher {tcfg.name!r}: {stale}; they are kept and used (use a new "
                      "run_dir or --force to generate them again)")
    prior = regrowable(cfg, store, tcfg.name, params_json)
    todo = [(p, s, i, prior.get((p.id, style_name(s), i)))
            for p, s, i in missing_generations(cfg, problems, store.done_keys(tcfg.name) - set(prior))]
    if not todo:
        return [], params_json
    total = len(c.styles) * len(problems) * c.samples
    if total > len(todo):  # a resumed collection says so
        console.print(f"collect {tcfg.name}: {total - len(todo)} of {total} generations already stored, "
                      f"{len(todo)} to go")
    if grow := sum(t[3] is not None for t in todo):
        console.print(f"collect {tcfg.name}: {grow} stored sample(s) cut at a smaller max_new_tokens continue from "
                      f"their text up to {c.max_new_tokens}")
    return todo, params_json


def teacher_params(cfg: AccordConfig, tcfg: TeacherConfig) -> str:
    """The settings a teacher's rows are generated with, as the JSON stored with each row."""
    c = cfg.collect
    prompt = {k: v for k, v in (("system_prompt", tcfg.system_prompt),
                                ("chat_template_kwargs", tcfg.chat_template_kwargs)) if v}  # only when set: rows
    # stored before these were recorded keep their settings' JSON
    return json.dumps({"temperature": c.temperature, "top_p": c.top_p, "max_new_tokens": c.max_new_tokens,
                       "stop": c.stop, "model": tcfg.model, "seed": c.seed, **prompt}, sort_keys=True)


def other_settings(store: TraceStore | None, teacher: str, params_json: str, confidence: bool = False) -> str:
    """``N stored rows were generated with other settings (model: 'a' → 'b')`` for a teacher's rows made with
    settings the config no longer asks for (every key that differs), or "" when there are none — rows whose only
    difference is a smaller ``max_new_tokens`` count only when cut and ``confidence`` keeps them from growing."""
    others = [(was, n) for was, n, cut in (store.other_params(teacher, params_json) if store is not None else [])
              if not (only_budget_raised(was, params_json) and (not cut or not confidence))]  # stand or continue
    if not others:
        return ""
    now, changes = json.loads(params_json), {}
    for was_json, _ in others:
        was = json.loads(was_json)
        for k in sorted(set(was) | set(now)):
            if was.get(k) != now.get(k):
                changes.setdefault(f"{k}: {was.get(k)!r} → {now.get(k)!r}", None)
    return (f"{sum(n for _, n in others):,} stored rows were generated with other settings "
            f"({'; '.join(changes)})")


def _parts(cfg: AccordConfig, tcfg: TeacherConfig, todo: list[tuple], params: SamplingParams):
    """The teacher's requests in chunks: ``(part, prompts, requests, sampling)`` (a chunk is one batch, or for a
    server four times its concurrency); samples continued from a :class:`Prior` come after the new ones, in
    chunks of one remaining budget each."""
    c = cfg.collect
    size = tcfg.batch_size if tcfg.backend != "openai" else tcfg.max_concurrency * 4
    groups = [([t for t in todo if t[3] is None], params)]
    for left in sorted({c.max_new_tokens - t[3].tokens for t in todo if t[3] is not None}):
        groups.append(([t for t in todo if t[3] is not None and c.max_new_tokens - t[3].tokens == left],
                       replace(params, max_new_tokens=left)))
    for items, sampling in groups:
        for part in _chunks(items, size):
            prompts = [render_prompt(s, p.question) for p, s, _, _ in part]
            yield part, prompts, [Request(pr, prefix=prior.text if prior else "",
                                          seed=sample_seed(c.seed, tcfg.name, style_name(s), p.id, i))
                                  for pr, (p, s, i, prior) in zip(prompts, part)], sampling


def _store(cfg, store: TraceStore, name: str, part, prompts, gens, params_json: str) -> None:
    """Store a chunk's samples; a continued one as its stored text and the continuation together (a continuation
    that failed stores nothing: the cut sample stays, and the next run continues it)."""
    rows = []
    for pr, (p, s, i, prior), g in zip(prompts, part, gens):
        if prior is not None:
            if g.failed:
                continue
            g = Generation(text=prior.text + g.text, token_count=prior.tokens + g.token_count,
                           finish_reason=g.finish_reason, elapsed_s=prior.elapsed_s + g.elapsed_s)
        rows.append(make_row(cfg, name, style_name(s), p, i, pr, g, params_json))
    store.put_traces(rows)


def sample_teacher(cfg: AccordConfig, tcfg: TeacherConfig, problems: list[Problem], store: TraceStore,
                   console: Console, share: Share | None = None) -> int:
    """Generate every missing (problem, style, sample) for one teacher; return how many were generated (``share``:
    this process generates every n-th batch, and the count is every process's)."""
    todo, params_json = _todo(cfg, tcfg, problems, store, console)
    if share is not None:
        share.wait()  # every process has read the store before any writes to it: the same batches everywhere
    parts = list(_parts(cfg, tcfg, todo, sampling_params(cfg)))
    mine = dealt(parts, share)
    if not mine:
        return len(todo)
    teacher = load_generator(tcfg)
    try:
        with progress(console) as bar:
            task = bar.add_task(tcfg.name + (f" ({len(mine)} of {len(parts)} batches here)" if share else ""),
                                total=sum(len(part) for part, _, _, _ in mine))
            for part, prompts, reqs, sampling in mine:
                _store(cfg, store, tcfg.name, part, prompts, teacher.generate(reqs, sampling), params_json)
                bar.advance(task, len(part))
    finally:
        teacher.close()
    return len(todo)


def sample_at_once(cfg: AccordConfig, tcfgs: list[TeacherConfig], problems: list[Problem], store: TraceStore,
                   console: Console) -> dict[str, int | TeacherUnavailable]:
    """:func:`sample_teacher` for several teachers behind servers at once: each teacher's requests go out from a
    thread of its own (each keeps its ``max_concurrency`` requests in flight), while this thread verifies and
    stores what comes back — collection then takes as long as the slowest teacher, not the sum of all.
    Returns, per teacher, how many were generated or the :class:`TeacherUnavailable` that stopped it (the
    others go on).  Generators are created here first, so a configuration error stops before any request."""
    import queue
    import threading

    plans = {t.name: (t, *_todo(cfg, t, problems, store, console)) for t in tcfgs}
    plans = {n: v for n, v in plans.items() if v[1]}
    out: dict[str, int | TeacherUnavailable] = {t.name: 0 for t in tcfgs}
    if not plans:
        return out
    params = sampling_params(cfg)
    teachers = {}
    try:
        for n, (t, _, _) in plans.items():
            teachers[n] = load_generator(t)
        results: queue.Queue = queue.Queue()
        stop = threading.Event()

        def ask(name: str) -> None:
            t, todo, _ = plans[name]
            try:
                for part, prompts, reqs, sampling in _parts(cfg, t, todo, params):
                    if stop.is_set():
                        break
                    results.put((name, part, prompts, teachers[name].generate(reqs, sampling)))
            except BaseException as e:  # noqa: BLE001 — handed to the main thread, which decides
                results.put((name, e, None, None))
                return
            results.put((name, None, None, None))

        threads = [threading.Thread(target=ask, args=(n,), name=f"collect-{n}", daemon=True) for n in plans]
        interrupted = False
        try:
            with progress(console) as bar:
                tasks = {n: bar.add_task(n, total=len(todo)) for n, (_, todo, _) in plans.items()}
                for th in threads:
                    th.start()
                running = len(threads)
                while running:
                    name, part, prompts, gens = results.get()
                    if gens is None:  # this teacher is done, or stopped
                        running -= 1
                        if isinstance(part, TeacherUnavailable):
                            out[name] = part
                        elif part is not None:
                            raise part
                        continue
                    _store(cfg, store, name, part, prompts, gens, plans[name][2])
                    out[name] += len(part)
                    bar.advance(tasks[name], len(part))
        except KeyboardInterrupt:
            interrupted = True  # leave at once: the threads are daemons, every stored row is kept
            raise
        finally:
            stop.set()  # on an error here, the other teachers stop after their request in flight
            for th in threads if not interrupted else []:
                th.join()
    finally:
        for t in teachers.values():
            t.close()
    return out


def import_column(cfg: AccordConfig, tcfg: TeacherConfig, problems: list[Problem], store: TraceStore) -> int:
    """Store an existing corpus column as this teacher's samples (style ``import``), verified like generations;
    the source's own verdicts are kept beside accord's, its grades become judge verdicts."""
    done = store.done_keys(tcfg.name)
    params = json.dumps({"source": "column", "column": tcfg.column, "answer_column": tcfg.answer_column,
                         "format": tcfg.format, **({"where": tcfg.where} if tcfg.where else {})})  # only when set:
    # rows imported before ``where`` existed keep their settings' JSON
    if tcfg.where and not any(selected_rows(tcfg, p) for p in problems):
        raise UsageError(f"teacher {tcfg.name!r}: where {tcfg.where} matches no row of {cfg.problems.path} "
                         f"({_values_seen(tcfg.where, problems)})")
    rows = []
    for p in problems:
        for i, (text, verdict, grade, finish) in enumerate(column_samples(tcfg, p)):
            if (p.id, "import", i) in done or not text:
                continue
            g = Generation(text=text, token_count=0, finish_reason=finish or "stop")
            row = make_row(cfg, tcfg.name, "import", p, i, p.question, g, params)
            row["token_count"] = None
            row["source_verdict"] = verdict
            if grade is not None:
                row["judge"], row["judge_text"], row["judged_with"] = grade, f"imported {tcfg.grade_column}", IMPORTED
            rows.append(row)
    if rows:
        store.put_traces(rows)
    return len(rows)


def column_samples(tcfg: TeacherConfig, p: Problem) -> list[tuple[str | None, str | None, str | None, str | None]]:
    """(trace, source verdict, imported grade, finish reason) for each sample a problem's column holds: over the
    problem's rows that ``where`` selects (every row of a long-format corpus, ``problems.on_duplicate: samples``),
    in file order."""
    return [s for row in selected_rows(tcfg, p) for s in _row_samples(tcfg, row)]


def _values_seen(where: dict, problems: list[Problem], most: int = 8) -> str:
    """What the rows hold in ``where``'s fields, for the error that says it matched none."""
    from accord.problems import field

    said = []
    for k in where:
        seen = list(dict.fromkeys(repr(field(r, k)) for p in problems for r in p.rows or [p.meta]))
        said.append(f"{k}: " + ", ".join(seen[:most]) + (f" and {len(seen) - most} more" if len(seen) > most else ""))
    return "values there: " + "; ".join(said)


def selected_rows(tcfg: TeacherConfig, p: Problem) -> list[dict]:
    """The problem's source rows whose fields equal ``tcfg.where``'s values (a list: any of them; compared as
    written, or as text, so ``{level: 3}`` matches ``"3"``)."""
    from accord.problems import field

    def same(value, want) -> bool:
        return value == want or (value is not None and str(value) == str(want))

    return [row for row in p.rows or [p.meta]
            if all(any(same(field(row, k), w) for w in (v if isinstance(v, list) else [v]))
                   for k, v in tcfg.where.items())]


def _row_samples(tcfg: TeacherConfig, row: dict) -> list[tuple[str | None, str | None, str | None, str | None]]:
    from accord.problems import field

    raw = field(row, tcfg.column)
    if raw is None or (isinstance(raw, (str, list)) and not raw):
        return []
    if tcfg.format == "list":
        traces = [None if t is None else str(t) for t in raw] if isinstance(raw, (list, tuple)) else [str(raw)]
    elif tcfg.format in ("sharegpt", "messages"):
        traces = [_assistant_turn(raw, tcfg.format)]
    else:
        traces = [str(raw)]
    attempt = field(row, tcfg.answer_column) if tcfg.answer_column else None
    out = []
    for i, text in enumerate(traces):
        if text is not None:
            text = normalize_thoughts(text)
            if attempt and THINK_CLOSE not in text:
                text = f"{THINK_OPEN}\n{text.strip()}\n{THINK_CLOSE}\n\n{str(attempt).strip()}"
        out.append((text, _verdict(_nth(field(row, tcfg.verdict_column), i)) if tcfg.verdict_column else None,
                    _grade(_nth(field(row, tcfg.grade_column), i)) if tcfg.grade_column else None,
                    _nth(field(row, tcfg.finish_column), i) if tcfg.finish_column else None))
    return out


def _assistant_turn(turns, fmt: str) -> str | None:
    """The last assistant turn of a conversation: sharegpt ``{from: gpt|assistant, value}``, messages
    ``{role: assistant, content}``; a reasoning field beside the content (:data:`REASONING_KEYS`) becomes its
    ``<think>`` block, unless the content already has one."""
    key, who, roles = (("value", "from", ("gpt", "assistant")) if fmt == "sharegpt"
                       else ("content", "role", ("assistant",)))
    said = [t for t in turns or [] if isinstance(t, dict) and t.get(who) in roles]
    if not said:
        return None
    turn = said[-1]
    text, thought = content_parts(turn.get(key))
    thought = next((turn[k] for k in REASONING_KEYS if isinstance(turn.get(k), str) and turn[k].strip()), thought)
    if thought is None or (isinstance(text, str) and THINK_CLOSE in text):
        return text
    return f"{THINK_OPEN}\n{thought.strip()}\n{THINK_CLOSE}\n\n{str(text or '').strip()}"


def _nth(value, i: int):
    """Sample i's entry of a per-sample list column, or the one value of a scalar column."""
    if isinstance(value, (list, tuple)):
        return value[i] if i < len(value) else None
    return value


def _verdict(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = v.strip().lower() in ("true", "yes", "correct", "1")
    return CORRECT if v else INCORRECT


def _grade(v) -> str | None:
    return None if v is None else (VALID if _verdict(v) == CORRECT else INVALID)


# ------------------------------------------------------------------ judge


def judge_stamps(cfg: AccordConfig, problems: list[Problem]) -> dict[str, str] | None:
    """Each problem's :func:`accord.verify.judge_stamp` under the configured judge (None: no judge): who judges
    (backend, model, what renders its prompt), the settings that shape its reply, and the problem it is shown."""
    j = cfg.collect.judge
    if j is None:
        return None
    g = judge_config(cfg)
    who = {"backend": g.backend, "model": g.model, "endpoint": g.endpoint, "tokenizer": g.tokenizer,
           "system_prompt": g.system_prompt, "chat_template_kwargs": g.chat_template_kwargs,
           "max_new_tokens": j.max_new_tokens}
    return {p.id: judge_stamp(who, p.question, p.answer) for p in problems}


def imported_grade(row: dict) -> bool:
    """Whether a stored trace's judge verdict is a grade imported with its corpus (a store from before judge
    verdicts were stamped says so only in ``judge_text``; :meth:`TraceStore.judgement_stamps` reads that as
    ``imported_text``)."""
    if row["judged_with"] is not None or row["judge"] is None:
        return row["judged_with"] == IMPORTED
    return bool(row["imported_text"]) if "imported_text" in row else (row["judge_text"] or "").startswith("imported ")


def judge_verdict(row: dict, stamps: dict[str, str] | None) -> str | None:
    """The judge verdict that counts for a stored trace: an imported grade, or the configured judge's verdict
    reached under today's stamp (:func:`judge_stamps`); None when none counts — a verdict of another judge, of
    other judge settings or revision, or of a problem since changed, and every LLM verdict once the config has
    no judge."""
    if imported_grade(row):
        return row["judge"]
    if stamps is None or row["judged_with"] != stamps.get(row["problem_id"]):
        return None
    return row["judge"]


def to_judge(cfg: AccordConfig, store: TraceStore, stamps: dict[str, str] | None) -> list[dict]:
    """The stored traces the configured judge is to grade (their :meth:`TraceStore.judgement_stamps`, no text):
    those of the problems ``stamps`` (:func:`judge_stamps`) holds, in ``apply_to``, with no verdict of today's
    judge (:func:`judge_verdict`), imported grades aside."""
    j = cfg.collect.judge
    if j is None or stamps is None:
        return []
    verdicts = "verdict='correct'" if j.apply_to == "correct" else "verdict!='failed'"
    return [r for r in store.judgement_stamps(verdicts) if r["problem_id"] in stamps and not imported_grade(r)
            and r["judged_with"] != stamps[r["problem_id"]]]


def judge_traces(cfg: AccordConfig, store: TraceStore, problems: list[Problem], console: Console,
                 share: Share | None = None) -> int:
    """Ask the judge about every stored trace without a verdict of today's judge (:func:`to_judge`: never judged,
    or judged by another judge, other settings or revision, or about a problem since changed); ``share``: this
    process judges every n-th batch of 32 (as :func:`sample_teacher` deals out batches)."""
    j = cfg.collect.judge
    assert j is not None
    by_id = {p.id: p for p in problems}
    stamps = judge_stamps(cfg, problems)
    todo = to_judge(cfg, store, stamps)
    again = sum(r["judge"] is not None for r in todo)
    if again and (share is None or share.rank == 0):
        console.print(f"judge: {again:,} stored verdict(s) reached by another judge, other judge settings or "
                      f"revision, or about a problem since changed: asked again")
    if share is not None:
        share.wait()  # every process has read the store before any verdict is written
    parts = list(_chunks(todo, 32))
    mine = dealt(parts, share)
    if not mine:
        return len(todo)
    judge = load_generator(judge_config(cfg))
    params = SamplingParams(temperature=0.0, max_new_tokens=j.max_new_tokens)
    try:
        with progress(console) as bar:
            task = bar.add_task(f"judge ({j.name})", total=sum(map(len, mine)))
            for part in mine:
                texts = store.texts([r["row_id"] for r in part])  # a batch's texts at a time, never the store's
                reqs = [Request(judge_prompt(by_id[r["problem_id"]].question, by_id[r["problem_id"]].answer,
                                             texts[r["row_id"]])) for r in part]
                gens = judge.generate(reqs, params)
                store.set_judgements([(r["row_id"], "error" if g.failed else parse_judgement(g.text, g.finish_reason),
                                       g.text, stamps[r["problem_id"]]) for r, g in zip(part, gens)])
                bar.advance(task, len(part))
    finally:
        judge.close()
    return len(todo)


# ------------------------------------------------------------------ selection → corpora


def dealt_out(gen) -> bool:
    """Whether a generator's batches are dealt out among the processes of a launch: in-process transformers
    models; a server spreads its own load, and vLLM starts its own workers."""
    return gen.backend == "hf"


def judge_config(cfg: AccordConfig):
    """The judge's generator settings: its own model entry, or the teacher it names."""
    j = cfg.collect.judge
    return j.model or cfg.teacher(j.teacher)


def keep(cfg: AccordConfig, row: dict, stamps: dict[str, str] | None = None) -> bool:
    """Filters before selection: answer check, judge (``stamps``: :func:`judge_stamps`), step-level confidence."""
    if row["verdict"] != CORRECT:
        return False
    said = judge_verdict(row, stamps)
    if said is not None and said != VALID:  # today's judge, or an imported grade, says invalid
        return False
    if stamps is not None and said is None:  # a judge is configured but has not spoken
        return False
    thr = cfg.collect.confidence.min_window_logprob
    return thr is None or row["min_window_logprob"] is None or row["min_window_logprob"] >= thr


def select(rows: list[dict], policy: str, seed: int, teacher: str) -> list[dict]:
    """Choose traces among one teacher's kept rows of one problem."""
    rows = sorted(rows, key=lambda r: (r["style"], r["sample_idx"]))
    if not rows:
        return []
    if policy == "all-correct":
        return rows
    if policy == "first-correct":
        return rows[:1]
    rng = random.Random(f"{seed}|{teacher}|{rows[0]['problem_id']}")
    return [rng.choice(rows)]


def corpus_row(row: StoredTrace, p: Problem) -> CorpusRow:
    return {"problem_id": p.id, "teacher": row["teacher"], "style": row["style"], "sample_idx": row["sample_idx"],
            "split": p.meta.get("split"), "level": _level(p), "question": p.question, "answer": p.answer,
            "prompt": row["prompt"],
            "completion": row["text"], "reasoning": row["reasoning"], "final": row["answer_text"],
            "token_count": row["token_count"],
            "messages": [{"role": "user", "content": render_prompt("default", p.question)},
                         {"role": "assistant", "content": row["text"]}]}


def _level(p: Problem):
    """A problem's difficulty as its source gives it (MATH's ``level``, a ``difficulty``, the lab's ``steps``)."""
    return next((p.meta[k] for k in ("level", "difficulty", "steps") if p.meta.get(k) is not None), None)


def build_corpora(cfg: AccordConfig, store: TraceStore, problems: list[Problem]) -> dict[str, int]:
    out_dir = Path(cfg.run_dir) / "corpora"
    out_dir.mkdir(parents=True, exist_ok=True)
    by_id = {p.id: p for p in problems}
    stamps = judge_stamps(cfg, problems)
    sizes, union = {}, []
    for t in cfg.teachers:
        grouped: dict[str, list[dict]] = {}
        for r in store.traces(t.name):
            if r["problem_id"] in by_id and keep(cfg, r, stamps):
                grouped.setdefault(r["problem_id"], []).append(r)
        rows = [corpus_row(r, by_id[pid]) for pid in sorted(grouped)
                for r in select(grouped[pid], cfg.collect.select, cfg.collect.seed, t.name)]
        _write_jsonl(out_dir / f"{t.name}.jsonl", rows)
        sizes[t.name] = len(rows)
        union += rows
    _write_jsonl(out_dir / "all.jsonl", union)
    sizes["all"] = len(union)
    return sizes


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a corpus


# ------------------------------------------------------------------ summary (MoT Table 21)


def summarize(cfg: AccordConfig, store: TraceStore, problems: list[Problem], sizes: dict[str, int]) -> list[dict]:
    ids = {p.id for p in problems}
    stamps = judge_stamps(cfg, problems)
    out = []
    for t in cfg.teachers:
        rows = [r for r in store.traces(t.name) if r["problem_id"] in ids]
        ok = [r for r in rows if r["verdict"] != FAILED]
        toks = [r["token_count"] for r in ok if r["token_count"]]
        out.append({
            "teacher": t.name, "problems": len({r["problem_id"] for r in rows}), "samples": len(rows),
            "accuracy": (sum(r["verdict"] == CORRECT for r in ok) / len(ok)) if ok else 0.0,
            "accuracy_se": _problem_se(ok),
            "unparseable": sum(r["verdict"] == "unparseable" for r in ok), "failed": len(rows) - len(ok),
            "cut": sum(r["finish_reason"] == "length" for r in ok),
            "judged_invalid": sum(judge_verdict(r, stamps) not in (None, VALID) for r in rows
                                  if r["verdict"] == CORRECT),
            "mean_tokens": (sum(toks) / len(toks)) if toks else None,
            "source_verdicts": sum(r["source_verdict"] is not None for r in ok),
            "source_disagree": sum(r["source_verdict"] is not None and (r["source_verdict"] == CORRECT)
                                   != (r["verdict"] == CORRECT) for r in ok),
            "mean_chars": (sum(r["char_count"] or 0 for r in ok) / len(ok)) if ok else None,
            "kept": sizes.get(t.name, 0)})
    return out


def _problem_se(rows: list) -> float | None:
    """The standard error of a teacher's accuracy over problems (its samples of one problem averaged first)."""
    by: dict[str, list[bool]] = {}
    for r in rows:
        by.setdefault(r["problem_id"], []).append(r["verdict"] == CORRECT)
    return mean_se([sum(v) / len(v) for v in by.values()])[1]


def summary_table(summary: list[dict], total: int) -> Table:
    """The summary as the CLI prints it; the ``cut`` column (samples that reached ``collect.max_new_tokens``) only
    when some teacher has any."""
    cut = any(s.get("cut") for s in summary)
    tab = Table(title="Collected traces per teacher (cf. MoT Table 21)")
    tab.add_column("teacher", no_wrap=True)
    for col in ("problems", "samples", "accuracy", "unparsed", "failed", *(["cut"] if cut else []), "judge-rejected",
                "mean tokens", "kept"):
        tab.add_column(col, justify="right")
    for s in summary:
        se = s.get("accuracy_se")
        tab.add_row(s["teacher"], str(s["problems"]), str(s["samples"]),
                    f"{s['accuracy']:.1%}" + (f" ± {se:.1%}" if se is not None else ""),
                    str(s["unparseable"]), str(s["failed"]), *([str(s.get("cut", 0))] if cut else []),
                    str(s["judged_invalid"]), "-" if s["mean_tokens"] is None else f"{s['mean_tokens']:.0f}",
                    str(s["kept"]))
    tab.add_row("ALL TEACHERS", *[""] * (7 + cut), str(total), style="bold")
    return tab


CUT_WARN = 0.05  # a teacher with more of its samples cut at the token limit is warned about


def cut_warnings(cfg: AccordConfig, summary: list[dict]) -> list[str]:
    """One line per teacher of which more than :data:`CUT_WARN` of the samples reached the token limit: they count
    as incorrect, so its accuracy and corpus are smaller than its answers deserve."""
    out = []
    for s in summary:
        n = s["samples"] - s["failed"]
        if n and s.get("cut", 0) / n > CUT_WARN:
            out.append(f"teacher {s['teacher']!r}: {s['cut']} of {n} sample(s) ({s['cut'] / n:.0%}) reached "
                       f"collect.max_new_tokens={cfg.collect.max_new_tokens} and count as incorrect; a reasoning model "
                       "often needs 8,192–32,768 (raise it: the next `accord collect` continues each cut sample "
                       "from its text" + (", or with collect.confidence on, --force draws them again)"
                                          if cfg.collect.confidence.enabled else ")"))
    return out


def open_store(run_dir: Path, problems: list[Problem], share: Share | None) -> TraceStore:
    """The run's trace store with ``problems`` in it; under several processes process 0 makes it and puts them,
    and the others open it once that is done (every process must call it)."""
    main = share is None or share.rank == 0
    store = TraceStore(run_dir / "traces.sqlite") if main else None
    if main:
        store.put_problems(problems)
    if share is not None:
        share.wait()
    return store or TraceStore(run_dir / "traces.sqlite")


def collect(cfg: AccordConfig, console: Console | None = None, share: Share | None = None) -> CollectResult:
    """The ``accord collect`` stage: sample → verify → store → judge → select → corpora + summary.  ``share``: one
    of several processes (the module's docstring); every process must call it, and only process 0's result counts."""
    console = console or make_console()
    run_dir = Path(cfg.run_dir)
    main = share is None or share.rank == 0
    if main:
        dump_config(cfg)
    usable, unreadable = usable_problems(cfg)
    if unreadable and main:
        console.print(f"[yellow]warning[/]: skipped {unreadable} problem(s) whose reference answer "
                      f"the {cfg.collect.verifier!r} verifier cannot read")
    store = open_store(run_dir, usable, share)
    result = CollectResult(run_dir, [])
    try:
        remote = [t for t in cfg.teachers if served(t)] if main else []
        at_once = sample_at_once(cfg, remote, usable, store, console) if len(remote) > 1 else {}
        for t in cfg.teachers:
            shared = share is not None and dealt_out(t)
            if not (main or shared):
                continue
            try:
                if t.name in at_once:
                    if isinstance(at_once[t.name], TeacherUnavailable):
                        raise at_once[t.name]
                    result.generated += at_once[t.name]
                elif t.backend == "column":
                    result.generated += import_column(cfg, t, usable, store)
                else:
                    result.generated += sample_teacher(cfg, t, usable, store, console, share if shared else None)
            except TeacherUnavailable as e:
                result.failures[t.name] = str(e)
                console.print(f"[red]error[/]: {e}\n  everything collected so far is kept in {store.path}; "
                              f"re-run to resume")
        if main:
            reverify(cfg, store, usable, console)
        if share is not None:
            share.wait()  # every process's batches are stored, every stale verdict checked again
        j = cfg.collect.judge  # an hf judge's batches are dealt out too; the others judge on process 0
        judge_share = share if j is not None and dealt_out(judge_config(cfg)) else None
        if j is not None and j.name not in result.failures and (main or judge_share):
            judge_traces(cfg, store, usable, console, judge_share)
        if judge_share is not None:
            share.wait()  # every process's verdicts are stored
        if not main:
            return result
        sizes = build_corpora(cfg, store, usable)
        result.summary = summarize(cfg, store, usable, sizes)
    finally:
        store.close()
    (run_dir / "collect_summary.json").write_text(json.dumps(result.summary, indent=2))
    console.print(summary_table(result.summary, sizes["all"]))
    for s in result.summary:
        if s["source_verdicts"]:
            console.print(f"{s['teacher']}: accord's verdict and the source's disagree on {s['source_disagree']} of "
                          f"{s['source_verdicts']} imported sample(s)")
    for line in cut_warnings(cfg, result.summary):
        console.print(f"[yellow]warning[/]: {line}")
    for t, n in sizes.items():
        if t != "all" and n <= 1 and t not in result.failures:
            console.print(f"[yellow]warning[/]: teacher {t!r} kept {n} verified trace(s): too few to train on "
                          f"(corpora/{t}.jsonl); check its accuracy above, or the problems it was asked")
    if result.failures:
        raise CollectIncomplete("could not collect from: " + "; ".join(result.failures.values()))
    return result
