"""Base-to-checkpoint linear interpolation (MoT App. D, Fig. 6): how a trained student sits in weight space.

For λ on a grid from 0 to 1, θ(λ) = λ·θ_base + (1 − λ)·θ_ckpt — λ = 1 is the base student, λ = 0 the trained
checkpoint — and pass@1 on one evaluation split at every λ.  MoT reads a smooth curve that rises steadily
towards the checkpoint as a flat region (its students) and steep drops or bumps on the way as interference
between teachers' signals (MTD's).  ``accord interpolate CONFIG``; the report draws it when it exists.

Choices where the paper is silent:

1. The grid: ``points`` evenly spaced λ (default 11: 0, 0.1, …, 1); the paper says "a fixed grid".
2. θ(λ) is task arithmetic with weight 1 − λ (:func:`accord.train.merge.merge_state_dicts`: float32, cast back
   to the checkpoint's dtype) — the model ``accord merge --method task_arithmetic --weights 1−λ`` writes; the
   two ends are the checkpoints themselves, bit for bit, so they reproduce ``accord eval``'s numbers.
3. Evaluated with the hf backend, the weights replaced in memory (one model loaded, no checkpoint written per λ; the
   base's and the checkpoint's weights are held in CPU memory beside it — three copies in all), with the run's
   evaluation settings (k, temperature, top-p, seeds, token budget, verifier) on one split (default: the first of
   ``eval.splits``).  Per-sample rows are kept under ``<run_dir>/analysis/interpolation/<model>/lambda-<λ>/``, so a
   killed run resumes and a finished point is never generated again — while it answers the config: a point
   records what an evaluation does (:func:`accord.evaluate.made_with`, the weights being the checkpoint's and the
   base's; a point not finished yet in its start record), one made with other settings or weights is set aside
   and made again, and one reached by another verifier revision or reference answers is checked again from its
   stored outputs.
4. Which checkpoints: each named model's final (``train/<name>/result.json``); by default MTD and MoT, the
   paper's pair, where trained.  A QR student interpolates from its own base student.
5. Two numbers summarise a curve beside its points (each pass@1 ± its standard error over problems): the mean
   over the grid (the area under the curve) and the largest *dip* — the largest fall of pass@1 between
   neighbouring λ when walking from the base to the checkpoint (0 for a curve that never falls).  The paper
   reads smoothness by eye; a dip smaller than the points' standard errors is noise.
6. Under several processes (``accelerate launch -m accord.cli interpolate``) each model's unfinished points are
   dealt out in turn, each process evaluating on its own device; process 0 draws the curves from the points'
   files once every process is done.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from accord.errors import UsageError
from accord.evaluate import (
    answers_stamp,
    check_eval_splits,
    check_started,
    evaluate,
    made_with,
    mark_started,
    reverify_rows,
    rows_file,
    set_aside,
    split_problems,
    started_file,
    stored_answers,
    student_config,
)
from accord.launch import Share, dealt
from accord.models import load_model_and_tokenizer, local_model_dir, weights_digest
from accord.registry import BACKENDS, load
from accord.train.common import read_result, tagged
from accord.train.merge import MergeSpec, load_state, merge_state_dicts
from accord.ui import progress

DEFAULT_MODELS = ("mtd", "mot")


def grid(points: int) -> list[float]:
    """``points`` evenly spaced λ from 0 (the checkpoint) to 1 (the base)."""
    if points < 2:
        raise UsageError(f"--points must be at least 2 (the two ends), got {points}")
    return [round(i / (points - 1), 6) for i in range(points)]


def interpolated(base: dict, ckpt: dict, lam: float) -> dict:
    """θ(λ) = λ·θ_base + (1 − λ)·θ_ckpt as a state dict (the ends returned as they are)."""
    if lam == 0:
        return ckpt
    if lam == 1:
        return base
    return merge_state_dicts(base, [ckpt], MergeSpec(method="task_arithmetic", weights=[1.0 - lam]))


def value(point: dict) -> float:
    """A point's pass@1, or its greedy accuracy when the evaluation draws no samples (``eval.k: 0``)."""
    return point["pass1"] if point.get("pass1") is not None else point["greedy"]


def max_dip(curve: list[dict]) -> float:
    """The largest fall of pass@1 between neighbouring λ, walking from the base (λ = 1) to the checkpoint."""
    ys = [value(p) for p in sorted(curve, key=lambda p: -p["lambda"])]
    return max([0.0] + [a - b for a, b in itertools.pairwise(ys)])


def run(cfg, console, models: list[str] | None = None, points: int = 11, split: str | None = None,
        share: Share | None = None) -> dict:
    """Interpolate every named model's final checkpoint with its base; writes and returns
    ``<run_dir>/analysis/interpolation.json`` (and ``interpolation.png`` beside it).  ``share``: one of several
    processes (choice 6); the others return {}."""
    check_eval_splits(cfg)
    split = split or next(iter(cfg.eval.splits))
    if split not in cfg.eval.splits:
        raise UsageError(f"--split {split!r}: not one of eval.splits ({', '.join(cfg.eval.splits)})")
    lams = grid(points)
    picked = _records(cfg, models)
    problems = split_problems(cfg, split)
    root = Path(cfg.run_dir) / "analysis"
    where = {name: root / "interpolation" / name for name in picked}
    stamp = answers_stamp(cfg.eval.verifier, problems)
    weights = {n: pair_weights(cfg, rec) for n, rec in picked.items()}
    if share is None or share.rank == 0:
        for name, lam in itertools.product(picked, lams):
            _check_point(cfg, _point(where[name], lam, split), problems, weights[name], stamp)
    if share is not None:
        share.wait()  # the stale points are set aside before any process looks
    todo = {name: [lam for lam in lams if not _point(where[name], lam, split).exists()] for name in picked}
    if share is not None:
        share.wait()  # every process has seen which points are done before any writes one
        todo = {name: dealt(t, share) for name, t in todo.items()}
    with progress(console) as bar:
        task = bar.add_task("interpolate", total=sum(map(len, todo.values())))
        for name, rec in picked.items():
            _evaluate_points(cfg, name, rec, todo[name], problems, split, where[name], bar, task,
                             made_with(cfg, stamp, weights[name]))
    if share is not None:
        share.wait()  # every point is written
        if share.rank > 0:
            return {}
    curves = {name: [json.loads(_point(where[name], lam, split).read_text()) for lam in lams] for name in picked}
    out = {"split": split, "k": cfg.eval.k, "temperature": cfg.eval.temperature, "n": len(problems),
           "curves": curves, "summary": {n: {"mean": sum(value(p) for p in c) / len(c), "max_dip": max_dip(c)}
                                         for n, c in curves.items()}}
    (root / "interpolation.json").write_text(json.dumps(out, indent=1))
    plot(out, root / "interpolation.png")
    for n, s in out["summary"].items():
        console.print(f"interpolate {n}: mean pass@1 over λ {s['mean']:.3f}, largest dip {s['max_dip']:.3f}")
    return out


def _records(cfg, models: list[str] | None) -> dict[str, dict]:
    names = list(models or DEFAULT_MODELS)
    found = {n: r for n in names if (r := read_result(cfg, n)) is not None}
    missing = [n for n in names if n not in found]
    if models and missing:
        raise UsageError(f"interpolate: no finished training for {', '.join(missing)} in "
                         f"{Path(cfg.run_dir) / 'train'} (run `accord train` first)")
    if not found:
        raise UsageError(f"interpolate: none of {', '.join(names)} is trained in {Path(cfg.run_dir) / 'train'}; "
                         "name the models with --models")
    return found


def _point(where: Path, lam: float, split: str) -> Path:
    return where / f"lambda-{lam:.3f}" / f"{split}.json"


def _base(cfg, rec: dict) -> str:
    """The base student a trained model is interpolated with: its own (a QR student's) or the run's."""
    return rec.get("base_model") or str(local_model_dir(cfg.student.model, "student"))


def pair_weights(cfg, rec: dict) -> str:
    """The weights a curve of ``rec`` is made from, as its points record them: the checkpoint's and its base's
    :func:`accord.models.weights_digest`."""
    return f"{weights_digest(rec['final'])}+{weights_digest(_base(cfg, rec))}"


def trained_since(cfg, recorded: dict[str, str | None], recs: dict[str, dict]) -> list[str]:
    """The names whose recorded :func:`pair_weights` are not those of their finished result in ``recs`` now —
    trained again, or no longer trained, since an analysis read them (None: recorded before weights were, kept)."""
    return [n for n, w in recorded.items() if n not in recs or w not in (None, pair_weights(cfg, recs[n]))]


def current_curves(cfg, data: dict, results: list[dict]) -> tuple[dict, list[str]]:
    """``interpolation.json``'s data kept to the curves whose points were made from the models ``results`` hold
    now (points from before weights were recorded are kept), and the names of those left out — trained again,
    or no longer trained, since ``accord interpolate`` ran."""
    by_name = {r["name"]: r for r in results}
    recs = {n: by_name[tagged(cfg, n)] for n in data["curves"] if tagged(cfg, n) in by_name}
    gone = trained_since(cfg, {n: next((p["weights"] for p in c if p.get("weights")), None)
                               for n, c in data["curves"].items()}, recs)
    kept = {**data, "curves": {n: c for n, c in data["curves"].items() if n not in gone},
            "summary": {n: s for n, s in data["summary"].items() if n not in gone}}
    return kept, gone


def _check_point(cfg, summary: Path, problems, weights: str, stamp: str) -> None:
    """Leave a stored point only where it answers the config (choice 3): one made with other settings or weights
    is set aside (``<split>.stale-<n>.json``), one verified otherwise has its rows checked again and its summary
    removed — the point is then made again from its rows, nothing generated; a killed point's rows likewise
    (:func:`accord.evaluate.check_started`)."""
    if not summary.exists():
        check_started(cfg, summary, problems, weights, stamp)  # a killed point's rows
        return
    state = stored_answers(cfg, summary, len(problems), weights, stamp)
    if state == "stale":
        set_aside(summary)
    elif state == "reverify":
        reverify_rows(rows_file(summary), problems, cfg.eval.verifier)
        summary.unlink()


def _evaluate_points(cfg, name: str, rec: dict, lams: list[float], problems, split: str, where: Path, bar,
                     task, recorded: dict) -> None:
    """Evaluate model ``name`` interpolated with its base at every λ of ``lams`` (one model loaded, its weights
    replaced in memory), each point's summary (with ``recorded``: :func:`accord.evaluate.made_with`) and rows
    written under ``where``."""
    if not lams:  # load only when something is left to generate
        return
    base_path = _base(cfg, rec)
    model, tok = load_model_and_tokenizer(rec["final"], cfg.student.device, "auto", cfg.student.trust_remote_code,
                                          who=f"{name} checkpoint", attention=cfg.student.attention)
    base, ckpt = load_state(base_path), load_state(rec["final"])
    tc = student_config(cfg, rec["final"], f"interpolate-{name}", backend="hf", prefix_cache_mb=0)
    gen = load(BACKENDS["hf"].impl)(tc, model=model, tokenizer=tok)
    try:
        for lam in lams:
            summary = _point(where, lam, split)
            bar.update(task, description=f"interpolate {name} λ={lam:.2f}")
            _load_weights(gen.model, interpolated(base, ckpt, lam))
            mark_started(cfg, summary, len(problems), recorded)
            r = evaluate(gen, problems, k=cfg.eval.k, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                         greedy=cfg.eval.greedy, max_new_tokens=cfg.eval.max_new_tokens, verifier=cfg.eval.verifier,
                         seed=cfg.eval.seed, rows_path=rows_file(summary), repeats=cfg.eval.repeats)
            summary.write_text(json.dumps({"lambda": lam, **r.as_dict(), **recorded}))
            started_file(summary).unlink()
            bar.update(task, advance=1)
    finally:
        gen.close()


def _load_weights(model, state: dict) -> None:
    """Copy ``state`` into ``model``; a checkpoint may leave out tied weights, nothing else."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise UsageError(f"interpolate: the base and the checkpoint do not match the model's weights "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")


def plot(data: dict, path: Path) -> Path | None:
    """MoT Fig. 6: pass@1 against λ per model, ± one standard error."""
    if not data.get("curves"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for name, curve in data["curves"].items():
        pts = sorted(curve, key=lambda p: p["lambda"])
        ax.errorbar([p["lambda"] for p in pts], [value(p) for p in pts],
                    yerr=[(p.get("pass1_se") if p.get("pass1") is not None else p.get("greedy_se")) or 0
                          for p in pts], marker="o", ms=4, capsize=2, lw=1.4, label=name)
    ax.set_xlabel("λ  (θ = λ·base + (1 − λ)·checkpoint; 0 = trained checkpoint, 1 = base)")
    ax.set_ylabel(f"{data['split']} pass@1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
