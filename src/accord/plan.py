"""``accord run --plan``: what a run would do, read from the config and ``run_dir``, doing none of it.

As ``make -n`` or ``terraform plan`` do: the models a scheme would build first, each teacher's generations
(stored and still to make: the number an API bill follows), each method's state (finished, resumes from a
checkpoint, to train) and budget, the evaluations stored and to run.  Loads no model, generates, trains and writes
nothing (the trace store is opened read-only); every count comes from the same function the stage itself uses
(``collect.missing_generations``, the recipes' ``plan`` entries, ``evaluate.eval_summary``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from accord.collect import (
    judge_stamps,
    missing_generations,
    other_settings,
    regrowable,
    stale_verdicts,
    teacher_params,
    to_judge,
    usable_problems,
)
from accord.config import AccordConfig
from accord.cord.stage import default_meta_prover, load_cord_problems, other_decodings
from accord.errors import UsageError
from accord.evaluate import (
    answers_stamp,
    check_eval_splits,
    eval_points,
    eval_settings_change,
    eval_summary,
    split_problems,
    stopped_evaluation,
    stored_answers,
)
from accord.models import local_model_dir, weights_digest
from accord.prompts import style_name
from accord.registry import METHODS, load
from accord.run import finished_results, model_specs
from accord.sources import missing, plugin
from accord.store import TraceStore
from accord.teachers.base import served
from accord.train.common import (
    TrainSetupError,
    replicas,
    resolve_budget,
    settings_change,
    started_change,
    tagged,
    train_dir,
)
from accord.train.engine import latest_checkpoint

STAGES = ("collect", "train", "eval", "report")


def plan(cfg: AccordConfig, stages: tuple[str, ...] = STAGES, seeds: list[int] | None = None) -> list[str]:
    todo = missing(model_specs(cfg))
    fetch = _not_here(cfg)
    said = ([f"{len(todo)} to build first: {', '.join(todo)}"] if todo else []) + \
        ([f"not on this machine, fetched from the hub first: {', '.join(fetch)}"] if fetch else [])
    lines = [f"plan for {cfg.run_dir} (nothing is built, generated, trained or written):",
             *_rows("models", said or ["every model loaded here is on this machine"])]
    if "collect" in stages:
        lines += _collect(cfg)
    budget_note = []
    if cfg.train.epochs is not None and {"train", "eval"} & set(stages):
        try:
            cfg = resolve_budget(cfg)
            budget_note = [f"train.epochs {cfg.train.epochs:g}: {cfg.train.rounds} round(s) × "
                           f"{cfg.train.steps_per_round} steps (from the union corpus)"]
        except TrainSetupError:
            budget_note = [f"train.epochs {cfg.train.epochs:g}: steps per round set from the union corpus once it is "
                           "collected (the budgets below use train.steps_per_round until then)"]
    states = ([st for c in replicas(cfg, seeds) for st in method_states(c)]  # read once, said by both stages
              if {"train", "eval"} & set(stages) else [])
    if "train" in stages:
        lines += _rows("train", budget_note + [f"{r}: {state} — {budget}" for r, state, budget in states])
    if "eval" in stages:
        lines += _eval(cfg, bool(todo), sum(state != "finished, skipped" for _, state, _ in states))
    if "report" in stages:
        lines.append(_row("report", f"{Path(cfg.run_dir) / 'report' / 'index.html'}, from whatever has finished"))
    return lines


def _not_here(cfg: AccordConfig) -> list[str]:
    """Hub ids among the models this machine loads (not served teachers, not scheme models) that the local cache
    lacks."""
    remote = {t.model for t in cfg.teachers if served(t) or t.backend == "column"}
    out = []
    for spec in dict.fromkeys(model_specs(cfg)):
        if spec in remote or plugin(spec) is not None:
            continue
        try:
            local_model_dir(spec, cached_only=True)
        except UsageError:
            out.append(spec)
    return out


def _row(stage: str, text: str, first: bool = True) -> str:
    return f"  {stage if first else '':<8} {text}"


def _rows(stage: str, texts: list[str]) -> list[str]:
    return [_row(stage, t, i == 0) for i, t in enumerate(texts)]


def _collect(cfg: AccordConfig) -> list[str]:
    c = cfg.collect
    try:
        usable, unreadable = usable_problems(cfg)
    except UsageError as e:
        return _rows("collect", [f"cannot read the problems — the run would stop here: {e}"])
    store = TraceStore.reader(Path(cfg.run_dir) / "traces.sqlite")
    out, to_make, again, judge_now = [], 0, 0, []
    try:
        again = len(stale_verdicts(cfg, store, usable)) if store else 0
        judge_now = to_judge(cfg, store, judge_stamps(cfg, usable)) if store else []
        for t in cfg.teachers:
            if t.backend == "column":
                rows = f", rows where {t.where}" if t.where else ""
                out.append(f"{t.name}: imported from column {t.column!r} of {cfg.problems.path}{rows} (no generation)")
                continue
            total = len(c.styles) * len(usable) * c.samples
            grow = regrowable(cfg, store, t.name, teacher_params(cfg, t))
            todo = len(missing_generations(cfg, usable, (store.done_keys(t.name) - set(grow)) if store else set()))
            to_make += todo
            out.append(f"{t.name} ({t.backend}): {total:,} generations = {len(usable):,} problems × "
                       f"{len(c.styles)} style(s) ({', '.join(style_name(s) for s in c.styles)}) × {c.samples} "
                       f"sample(s); {total - todo:,} stored, {todo:,} to generate"
                       + (f" ({len(grow):,} of them cut at a smaller max_new_tokens, continued from their text)"
                          if grow else ""))
            if stale := other_settings(store, t.name, teacher_params(cfg, t), c.confidence.enabled):
                out.append(f"  {stale}: kept and used (--force generates them again)")
    finally:
        if store is not None:
            store.close()
    if unreadable:
        out.append(f"{unreadable} problem(s) left out: the {c.verifier!r} verifier cannot read their answer")
    if again:
        out.append(f"{again:,} stored verdict(s) checked again from their text (the verifier, its settings or "
                   "revision, or a reference answer changed)")
    if c.judge is not None:
        rejudge = sum(r["judge"] is not None for r in judge_now)
        out.append(f"judge: {c.judge.name}{'' if c.judge.teacher else ' (judges only)'} grades each new verified "
                   f"trace, and {len(judge_now):,} stored now"
                   + (f" ({rejudge:,} of them again: another judge, other judge settings or revision, or a problem "
                      "since changed)" if rejudge else ""))
    out.append(f"in all: {to_make:,} generations to make; then corpora/ ({c.select}) and collect_summary.json")
    return _rows("collect", out)


def method_states(cfg: AccordConfig) -> list[tuple[str, str, str]]:
    """(result, state, budget) of every result ``train.method`` makes: finished, resumes from a checkpoint, or to
    train."""
    out = []
    for m in cfg.train.methods:
        name, _, arg = m.partition(":")
        for result, work, budget in load(METHODS[name].plan)(cfg, arg):
            done = train_dir(cfg, result) / "result.json"
            if done.exists():
                changed = settings_change(cfg, json.loads(done.read_text()))
                state = ("finished, skipped" if not changed else
                         "trained with other settings (" + "; ".join(changed) + ") — the run would stop here")
            elif changed := started_change(cfg, train_dir(cfg, work), name):
                state = "started with other settings or corpora (" + "; ".join(changed) + ") — the run would stop here"
            elif (ckpt := latest_checkpoint(train_dir(cfg, work))) is not None:
                state = f"resumes from {ckpt.name}"
            else:
                state = "to train"
            out.append((tagged(cfg, result), state, budget))
    return out


def _eval(cfg: AccordConfig, building: bool, pending: int) -> list[str]:
    """``pending``: the models still to train, whose evaluations come after."""
    splits = list(cfg.eval.splits)
    try:
        check_eval_splits(cfg)
    except UsageError as e:
        return _rows("eval", [f"stops before anything runs: {e}"])
    decoding = (f"k = {cfg.eval.k} samples at T = {cfg.eval.temperature}" + (" + greedy" if cfg.eval.greedy else "")
                if cfg.eval.k else "greedy only")
    head = f"{len(splits)} split(s) ({', '.join(splits)}), {decoding}"
    if building:
        return _rows("eval", [head, "the base student and each model once built and trained"])
    results = finished_results(cfg)
    try:
        points = eval_points(cfg, results, cached_only=True)
    except UsageError:
        return _rows("eval", [head, f"the student {cfg.student.model!r} is not in the local cache: it is fetched "
                                    "first, then every model is evaluated"])
    sizes, stamps = {}, {}
    for s in splits:
        try:
            probs = split_problems(cfg, s)
            sizes[s], stamps[s] = len(probs), answers_stamp(cfg.eval.verifier, probs)
        except UsageError:
            sizes[s] = stamps[s] = None  # the evaluation itself would stop on it
    jobs = [(j, s, pt) for pt in points for s in splits if (j := eval_summary(cfg, pt, s)) is not None]
    digests = {pt["path"]: weights_digest(pt["path"]) for pt in points}
    states = [stored_answers(cfg, j, sizes[s], digests[pt["path"]], stamps[s]) for j, s, pt in jobs if j.exists()]
    stored, stale, again = len(states), states.count("stale"), states.count("reverify")
    stopped = [eval_settings_change(cfg, was, sizes[s], digests[pt["path"]])
               for j, s, pt in jobs if (was := stopped_evaluation(j)) is not None]
    resumed = sum(not c for c in stopped)
    return _rows("eval", [head, f"the base student and {len(results)} finished model(s): {len(jobs)} evaluation(s), "
                                f"{stored - stale} stored, {len(jobs) - stored + stale} to run"
                                + (f" ({stale} stored with other settings or weights, run again)" if stale else "")
                                + (f" ({resumed} resume from a stopped evaluation's rows)" if resumed else "")
                                + (f" ({len(stopped) - resumed} stopped with other settings or weights: their rows "
                                   "set aside)" if len(stopped) > resumed else "")
                                + (f"; {again} stored evaluation(s) verified again from their outputs (the "
                                   "verifier's revision or a reference answer changed)" if again else "")
                                + (f"; the {pending} model(s) still to train add theirs" if pending else "")])


def cord_plan(cfg: AccordConfig) -> list[str]:
    """``accord cord --plan``: problems decoded and to decode (the stage's own skip: a problem stored as teacher
    ``cord``), who proposes and who scores, and the most step generations one problem can cost."""
    c = cfg.cord
    head = [f"plan for {cfg.run_dir} (nothing is built, generated or written):"]
    gen = [t.name for t in cfg.teachers if t.backend != "column"]
    try:
        problems = load_cord_problems(cfg)
    except UsageError as e:
        return head + _rows("cord", [f"cannot read the problems — the run would stop here: {e}"])
    store = TraceStore.reader(Path(cfg.run_dir) / "traces.sqlite")
    try:
        done = {k[0] for k in store.done_keys("cord")} if store else set()
        stale, what = other_decodings(cfg, store, problems) if store else (set(), "")
    finally:
        if store is not None:
            store.close()
    todo = sum(p.id not in done for p in problems)
    meta = c.meta_prover or default_meta_prover(cfg, gen, Console(file=io.StringIO())) if gen else "—"
    per = c.max_steps * c.beam * len(gen)
    return head + _rows("cord", [
        f"{len(problems):,} problems{f' (cord.limit {c.limit})' if c.limit else ''}: {len(problems) - todo:,} "
        f"decoded and stored, {todo:,} to decode",
        f"{len(gen)} teacher(s) propose each step ({', '.join(gen)}); {meta} scores them ({c.selection}), "
        f"{c.search} search keeping {c.beam}",
        f"at most {c.max_steps} steps × {c.beam} prefixes × {len(gen)} teachers = {per:,} step generations of ≤ "
        f"{c.step_tokens} tokens per problem ({per * todo:,} at most for the problems to decode)",
        *([f"{len(stale):,} of the decoded problems were decoded with other settings ({what}): kept (--force "
           "decodes them again)"] if stale else []),
        "baselines: " + (", ".join(c.baselines) or "none") + f"; then corpora/cord.jsonl and "
        f"{Path(cfg.run_dir) / 'cord' / 'summary.json'}"])
