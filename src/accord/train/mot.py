"""Merge-of-Thought (MoT §3, Algorithm 1): branch-per-teacher SFT with iterative weight merging.

    θ⁰ = the student
    for round t = 1..T:
        for each teacher k:   θₖᵗ = SFT(θᵗ⁻¹, corpus_k, S steps)        # a branch
        θᵗ = Merge(θ₁ᵗ … θ_Kᵗ)                                         # average in the paper
    evaluate θᵗ after every round; output the last (or the best on held-out data, Table 10)

Choices where the paper is silent, taken the cheap and correct way:
- every branch starts a fresh optimizer (no AdamW state crosses a merge);
- the learning rate follows one cosine schedule over T×S steps, round t's
  branches using steps [(t−1)S, tS) of it, so MoT and STD/MTD see the same
  learning-rate budget (and App. A's MoT = MTD identity holds at E = 1);
- branch k of round t is seeded with ``seed + 1000·t + k``;
- linear operators (``average``, ``task_arithmetic``) merge with one running sum
  while branches finish one after another (base copy + sum = two model copies);
  TIES/DARE merge tensor by tensor from the branches saved on disk;
- each finished branch is saved (``round-t/branch-<teacher>``) so a killed run
  resumes mid-round; branch files are deleted once the round's merge is on disk;
- with several processes (``accelerate launch``) branches run in parallel, one
  per process in turn, and the running sums are all-reduced;
- LoRA students train a fresh adapter per branch and merge the merged-in deltas.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from accord.config import AccordConfig
from accord.train.common import (
    engine_args,
    load_student,
    read_result,
    save_model,
    teacher_corpora,
    train_dir,
    write_result,
)
from accord.train.engine import encode_example, get_accelerator, train
from accord.train.merge import (
    LINEAR_METHODS,
    MergeSpec,
    RunningMerge,
    load_state,
    merge_checkpoints,
)
from accord.ui import progress


def run(cfg: AccordConfig, console) -> list[dict]:
    if (done := read_result(cfg, "mot")) is not None:
        console.print("mot: finished earlier, skipped")
        return [done]
    corpora = teacher_corpora(cfg, console)
    T, S, out = cfg.train.rounds, cfg.train.steps_per_round, train_dir(cfg, "mot")
    spec = _spec(cfg, list(corpora))
    model, tok = load_student(cfg)
    corpora = {t: (rows, [encode_example(tok, x, cfg.train.max_len) for x in rows]) for t, rows in corpora.items()}
    start = _resume(out, model, T)
    timing = {"branch_train_s": 0.0, "merge_s": 0.0, "wall_s": 0.0}  # wall − branch_train = MoT's overhead
    with progress(console) as bar:
        task = bar.add_task("mot", total=T * len(corpora) * S, completed=start * len(corpora) * S)
        for r in range(start + 1, T + 1):
            model = run_round(cfg, model, tok, corpora, r, spec, out, bar, task, timing)
            console.print(f"mot: round {r}/{T} merged ({spec.method}) → {out / f'round-{r}' / 'merged'}")
    rounds = [{"round": r, "steps": r * S, "path": str(out / f"round-{r}" / "merged")} for r in range(1, T + 1)]
    final, picked = rounds[-1]["path"], None
    if cfg.train.select == "validation":
        picked = select_round(cfg, rounds, console)
        final = rounds[picked - 1]["path"]
    return [write_result(cfg, "mot", method="mot", final=final, selected_round=picked, curve=rounds,
                         branch_steps=T * S * len(corpora), teachers=list(corpora), merge=spec.method,
                         timing=timing, resumed_from_round=start)]


def run_round(cfg, model, tok, corpora: dict, r: int, spec: MergeSpec, out: Path, bar, task, timing: dict):
    """Train every branch of round ``r`` from the current student, merge, save ``round-r/merged``."""
    T, S = cfg.train.rounds, cfg.train.steps_per_round
    acc = get_accelerator()
    rdir = out / f"round-{r}"
    t_round = time.perf_counter()
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    running = RunningMerge(base, spec) if spec.method in LINEAR_METHODS else None
    for k, (teacher, (rows, encoded)) in enumerate(corpora.items()):
        if k % acc.num_processes != acc.process_index:
            continue  # another process trains this branch
        bdir = rdir / f"branch-{teacher}"
        if (bdir / "final" / "config.json").exists():
            model.load_state_dict(load_state(bdir / "final"), strict=False)  # finished before a kill
        else:
            model.load_state_dict(base)  # every branch starts from the merged student
            args = engine_args(cfg, S, schedule_steps=T * S, schedule_offset=(r - 1) * S,
                               seed_offset=1000 * r + k)
            t0 = time.perf_counter()
            res = train(model, tok, rows, args, out_dir=bdir, shard=False, examples=encoded,
                        on_step=lambda s, loss: bar.update(task, advance=1,
                                                           description=f"mot r{r} {teacher} loss {loss:.3f}"))
            timing["branch_train_s"] += time.perf_counter() - t0
            model = res.model
            save_model(model, tok, bdir / "final", local=True)
        t0 = time.perf_counter()
        if running is not None:
            running.add(model.state_dict(), _weight(spec, list(corpora), teacher))
        timing["merge_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    merged_dir = rdir / "merged"
    if running is not None:
        if acc.num_processes > 1:
            running.all_reduce()
        model.load_state_dict(running.result())
        if acc.is_main_process:
            save_model(model, tok, merged_dir)
    else:
        acc.wait_for_everyone()
        prev = _prev_path(cfg, out, r)
        if acc.is_main_process:
            merge_checkpoints(prev, [rdir / f"branch-{t}" / "final" for t in corpora], spec, merged_dir)
        acc.wait_for_everyone()
        model.load_state_dict(load_state(merged_dir), strict=False)
    acc.wait_for_everyone()
    if acc.is_main_process:
        for t in corpora:
            shutil.rmtree(rdir / f"branch-{t}", ignore_errors=True)
    timing["merge_s"] += time.perf_counter() - t0
    timing["wall_s"] += time.perf_counter() - t_round
    return model


def select_round(cfg: AccordConfig, rounds: list[dict], console) -> int:
    """MoT Table 10: the round with the best greedy accuracy on the held-out ``validation`` split of ``problems``."""
    from accord.config import TeacherConfig
    from accord.evaluate import evaluate
    from accord.problems import load_problems
    from accord.teachers.base import load_teacher

    if cfg.problems.split == "all":
        console.print("[yellow]warning[/]: train.select=validation with problems.split=all: the held-out problems "
                      "were also collected for training; set problems.split=train")
    probs = load_problems(cfg.problems.model_copy(update={"split": "validation", "limit": cfg.eval.limit}))
    if not probs:
        console.print("[yellow]warning[/]: no validation problems; keeping the last round")
        return rounds[-1]["round"]
    scores = []
    for r in rounds:
        gen = load_teacher(TeacherConfig(name=f"mot-r{r['round']}", model=r["path"], batch_size=cfg.eval.batch_size))
        res = evaluate(gen, probs, k=0, greedy=True, max_new_tokens=cfg.eval.max_new_tokens,
                       verifier=cfg.eval.verifier)
        gen.close()
        scores.append((res.greedy, r["round"]))
        console.print(f"mot: round {r['round']} validation greedy {res.greedy:.3f}")
    best = max(scores, key=lambda x: (x[0], -x[1]))[1]  # ties → the earlier round
    console.print(f"mot: selected round {best} on {len(probs)} held-out problems")
    return best


def _spec(cfg: AccordConfig, teachers: list[str]) -> MergeSpec:
    m = cfg.train.merge
    weights = None
    if m.weights is not None:
        by_name = dict(zip([t.name for t in cfg.teachers], m.weights))
        weights = [by_name[t] for t in teachers]
    return MergeSpec(method=m.method, weights=weights, density=m.density, normalize=m.normalize, seed=m.seed)


def _weight(spec: MergeSpec, teachers: list[str], teacher: str) -> float:
    return spec.weights_for(len(teachers))[teachers.index(teacher)]


def _prev_path(cfg: AccordConfig, out: Path, r: int) -> Path:
    from accord.teachers.base import resolve_model

    return out / f"round-{r - 1}" / "merged" if r > 1 else Path(resolve_model(cfg.student.model, "student"))


def _resume(out: Path, model, T: int) -> int:
    """Rounds already merged on disk; the model is loaded from the last one."""
    done = 0
    for r in range(1, T + 1):
        if (out / f"round-{r}" / "merged" / "config.json").exists():
            done = r
    if done:
        model.load_state_dict(load_state(out / f"round-{done}" / "merged"), strict=False)
    return done
