"""Merge-of-Thought (MoT §4, Algorithm 1): branch-per-teacher SFT with iterative weight merging.

    θ⁰ = the student
    for round t = 1..T:
        for each teacher k:   θₖᵗ = SFT(θᵗ⁻¹, corpus_k, S steps)        # a branch
        θᵗ = Merge(θ₁ᵗ … θ_Kᵗ)                                         # average in the paper
    evaluate θᵗ after every round; output the last (or the best on held-out data, Table 10)

Choices where the paper is silent, taken the cheap and correct way:
- every branch starts a fresh optimizer (no AdamW state crosses a merge);
- ``train.mot_schedule: per-round`` (default): every branch is its own S-step
  SFT run with the shared recipe (warmup + cosine over S steps), as the paper
  trains each branch (§4.1, App. G.1); ``global``: one cosine over T×S steps,
  round t's branches using steps [(t−1)S, tS) of it, so the learning-rate
  budget equals STD/MTD's and App. A's MoT = MTD identity holds at E = 1
  (with ``global`` and T = 5 the mean lr per round is 0.96 … 0.03 of peak:
  the last round barely trains);
- branch k of round t is seeded with ``seed + 1000·t + k``;
- linear operators (``average``, ``task_arithmetic``) merge with one running sum
  while branches finish one after another (base copy + sum = two model copies);
  TIES/DARE merge tensor by tensor from the branches saved on disk onto the
  float32 student in memory (never onto a bf16 checkpoint: rounding would eat
  small per-round updates), with the round folded into DARE's seed;
- inside MoT, ``task_arithmetic`` and ``dare_*`` default to weights 1/K (the
  merge replaces the average, App. A.2); explicit ``train.merge.weights`` win;
- each finished branch is saved (``round-t/branch-<teacher>``) so a killed run
  resumes mid-round; branch files are deleted once the round's merge is on disk,
  their step records (loss, lr) kept in ``mot/metrics.jsonl`` with round and
  teacher (a branch retrained after a kill appends again: readers keep the last
  record per (round, teacher, step));
- with several processes (``accelerate launch``) branches run in parallel, one
  per process in turn, and the running sums are all-reduced; under FSDP they run
  one after another, each sharded over every process, process 0 merging
  (:mod:`accord.train.sharded`: a student that needs FSDP fits no process whole);
- LoRA students train a fresh adapter per branch and merge the merged-in deltas.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from accord.config import AccordConfig
from accord.registry import LINEAR_METHODS
from accord.train.common import (
    engine_args,
    load_student,
    read_result,
    save_model,
    select_checkpoint,
    teacher_corpora,
    train_dir,
    work_dir,
    write_result,
)
from accord.train.engine import encode_example, get_accelerator, train
from accord.train.merge import (
    MergeSpec,
    RunningMerge,
    load_state,
    merge_onto,
    spec_from,
)
from accord.train.sharded import plain_model, will_shard
from accord.ui import progress


def plan(cfg: AccordConfig, _arg: str = "") -> list[tuple[str, str, str]]:
    T, S, K = cfg.train.rounds, cfg.train.steps_per_round, len(cfg.teachers)
    done = rounds_done(train_dir(cfg, "mot"), T)
    return [("mot", "mot", f"{T} rounds × {K} branches × {S} steps = {T * K * S} branch-steps, merged "
             f"({cfg.train.merge.method}) every round" + (f"; rounds 1–{done} merged on disk" if done else ""))]


def run(cfg: AccordConfig, console) -> list[dict]:
    if (done := read_result(cfg, "mot", console)) is not None:
        return [done]
    corpora = teacher_corpora(cfg, console)
    T, S, out = cfg.train.rounds, cfg.train.steps_per_round, work_dir(cfg, "mot", "mot", list(corpora))
    spec = _spec(cfg, list(corpora))
    model, tok = load_student(cfg)
    kw = cfg.student.chat_template_kwargs
    corpora = {t: (rows, [encode_example(tok, x, cfg.train.max_len, kw) for x in rows]) for t, rows in corpora.items()}
    start = _resume(out, model, T)
    with progress(console) as bar:
        task = bar.add_task("mot", total=T * len(corpora) * S, completed=start * len(corpora) * S)
        job = MotRun(cfg, tok, corpora, spec, out,
                     tick=lambda r, teacher, loss: bar.update(task, advance=1,
                                                              description=f"mot r{r} {teacher} loss {loss:.3f}"))
        for r in range(start + 1, T + 1):
            model = train_round(job, model, r)
            console.print(f"mot: round {r}/{T} merged ({spec.method}) → {out / f'round-{r}' / 'merged'}")
    timing = asdict(job.timing)
    rounds = [{"round": r, "steps": r * S, "path": str(out / f"round-{r}" / "merged")} for r in range(1, T + 1)]
    final, picked = rounds[-1]["path"], None
    if cfg.train.select == "validation":
        picked = rounds[select_checkpoint(cfg, rounds, "mot", console)]["round"]
        final = rounds[picked - 1]["path"]
    return [write_result(cfg, "mot", method="mot", final=final, last=rounds[-1]["path"], selected_round=picked,
                         curve=rounds,
                         branch_steps=T * S * len(corpora), teachers=list(corpora), merge=spec.method,
                         timing=timing, resumed_from_round=start)]


@dataclass
class MotTiming:
    """Seconds spent by the rounds; wall − branch_train = MoT's own overhead (``bench/mot.py``)."""
    branch_train_s: float = 0.0
    merge_s: float = 0.0
    wall_s: float = 0.0


@dataclass
class MotRun:
    """What every round of one MoT run shares: the settings, the student's tokenizer, the encoded corpora
    ``{teacher: (rows, examples)}``, the round merge, the output directory, a ``tick(round, teacher, loss)`` after
    every branch step, the timing it accumulates and the running sum's memory (reused by every round)."""
    cfg: AccordConfig
    tok: object
    corpora: dict
    spec: MergeSpec
    out: Path
    tick: Callable[[int, str, float], None] = lambda r, teacher, loss: None
    timing: MotTiming = field(default_factory=MotTiming)
    buffers: dict = field(default_factory=dict)


def train_round(job: MotRun, model, r: int):
    """Train every branch of round ``r`` from the current student, merge, save ``round-r/merged``; returns the
    merged student."""
    cfg, tok, corpora, spec, out, timing = job.cfg, job.tok, job.corpora, job.spec, job.out, job.timing
    T, S = cfg.train.rounds, cfg.train.steps_per_round
    acc = get_accelerator()
    together = will_shard(acc, True)  # FSDP: each branch sharded over every process, one after another
    rdir = out / f"round-{r}"
    t_round = time.perf_counter()
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    running = RunningMerge(base, spec, job.buffers) if spec.method in LINEAR_METHODS else None
    for k, (teacher, (rows, encoded)) in enumerate(corpora.items()):
        if not together and k % acc.num_processes != acc.process_index:
            continue  # another process trains this branch
        bdir = rdir / f"branch-{teacher}"
        branch = model
        if (bdir / "final" / "config.json").exists():
            if together and not acc.is_main_process:
                continue  # process 0 merges
            model.load_state_dict(load_state(bdir / "final"), strict=False)  # finished before a kill
        else:
            if together:  # FSDP shards the model it trains in place: a plain one per branch, from the base
                branch = plain_model(model, {n: t.clone() for n, t in base.items()})
            else:
                model.load_state_dict(base)  # every branch starts from the merged student
            sched = (dict(schedule_steps=T * S, schedule_offset=(r - 1) * S)
                     if cfg.train.mot_schedule == "global" else {})
            args = engine_args(cfg, S, seed_offset=1000 * r + k, **sched)
            t0 = time.perf_counter()
            res = train(branch, tok, rows, args, out_dir=bdir, shard=together, examples=encoded,
                        on_step=lambda s, loss, teacher=teacher: job.tick(r, teacher, loss))
            timing.branch_train_s += time.perf_counter() - t0
            if together and not acc.is_main_process:
                continue  # the trained branch is gathered on process 0 only
            branch = res.model
            keep_branch_metrics(bdir, out, r, teacher)
            save_model(branch, tok, bdir / "final", local=not together)
            if not together:
                model = branch
        t0 = time.perf_counter()
        if running is not None:
            running.add(branch.state_dict(), _weight(spec, list(corpora), teacher))
        timing.merge_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    merged_dir = rdir / "merged"
    if running is not None and together:  # process 0 holds the sum; everyone loads the merged student from disk
        if acc.is_main_process:
            model.load_state_dict(running.result())
            save_model(model, tok, merged_dir)
        acc.wait_for_everyone()
        model.load_state_dict(load_state(merged_dir), strict=False)
    elif running is not None:
        if acc.num_processes > 1:
            running.all_reduce()
        model.load_state_dict(running.result())
        if acc.is_main_process:
            save_model(model, tok, merged_dir)
    else:
        acc.wait_for_everyone()
        if acc.is_main_process:  # onto the float32 student in memory, never a rounded checkpoint
            model.load_state_dict(merge_onto(base, [rdir / f"branch-{t}" / "final" for t in corpora],
                                             round_spec(spec, r)), strict=False)
            save_model(model, tok, merged_dir)
        acc.wait_for_everyone()
        model.load_state_dict(load_state(merged_dir), strict=False)
    acc.wait_for_everyone()
    if acc.is_main_process:
        for t in corpora:
            shutil.rmtree(rdir / f"branch-{t}", ignore_errors=True)
    timing.merge_s += time.perf_counter() - t0
    timing.wall_s += time.perf_counter() - t_round
    return model


def keep_branch_metrics(bdir: Path, out: Path, r: int, teacher: str) -> None:
    """Append a branch's step records (with its round and teacher) to ``mot/metrics.jsonl``; the branch
    directory is deleted after the merge, its loss curve is not (the report plots it, MoT Fig. 3/4)."""
    import json

    src = bdir / "metrics.jsonl"
    if not src.exists():
        return
    lines = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    with (out / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        for ev in lines:
            if ev.get("event") == "step":
                fh.write(json.dumps({**ev, "round": r, "teacher": teacher}) + "\n")


AVERAGING_DEFAULT = ("task_arithmetic", "dare_linear", "dare_ties")


def _spec(cfg: AccordConfig, teachers: list[str]) -> MergeSpec:
    """The round merge; inside MoT the merge replaces the average (App. A.2), so the methods whose mergekit
    default is Σ τₖ (task_arithmetic, dare_*) default to weights 1/K here: one averaged update, not K."""
    m = cfg.train.merge
    weights = None
    if m.weights is not None:
        by_name = dict(zip([t.name for t in cfg.teachers], m.weights))
        weights = [by_name[t] for t in teachers]
    elif m.method in AVERAGING_DEFAULT:
        weights = [1.0 / len(teachers)] * len(teachers)
    return spec_from(m, weights)


def round_spec(spec: MergeSpec, r: int) -> MergeSpec:
    """Round ``r``'s merge: the round folded into the seed, so DARE draws new masks every round."""
    return replace(spec, seed=spec.seed * 1_000_003 + r)


def _weight(spec: MergeSpec, teachers: list[str], teacher: str) -> float:
    return spec.weights_for(len(teachers))[teachers.index(teacher)]


def rounds_done(out: Path, T: int) -> int:
    """The last round merged on disk (0: none)."""
    return max((r for r in range(1, T + 1) if (out / f"round-{r}" / "merged" / "config.json").exists()), default=0)


def _resume(out: Path, model, T: int) -> int:
    """Rounds already merged on disk; the model is loaded from the last one."""
    done = rounds_done(out, T)
    if done:
        model.load_state_dict(load_state(out / f"round-{done}" / "merged"), strict=False)
    return done
