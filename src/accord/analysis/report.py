"""Report v1: one static HTML page (tables + matplotlib PNGs) in ``<run_dir>/report/``.

- *at a glance* (:func:`findings`): a few sentences drawn only from the paired differences — the best model on
  the first split against MTD, every difference from the base and from MTD outside its 95% interval, and how
  many comparisons were made (about one in twenty crosses by chance);
- the method table of MoT Table 4: base, STD per teacher, MTD, post-hoc merge,
  MoT — target pass@1 / greedy, OOD, general (forgetting = change from base);
  with ``train.select=validation`` a method's row is its validation-selected
  checkpoint, labelled so, with its last checkpoint on the next row;
- the compute of each method in branch-steps (MoT Table 5);
- paired differences against MTD and the base student (:func:`paired_table`: per-problem pass@1 differences on
  the shared problems, ± their SE, the 95% flag), read from the evaluation's per-sample rows;
- replicas over training seeds (``accord run --seeds``, :func:`seed_table`): each method pooled over its seeds
  — the mean, ± over problems and seeds, the spread between seeds — and against MTD's own seed group, with a
  figure of each seed's rate beside the pooled interval (:func:`plot_seeds`);
- per-round / per-checkpoint curves (MoT Table 22, Fig. 3) as a PNG;
- MoT's per-teacher branch losses across rounds (MoT Fig. 3/4), COMPACT's weights (its Fig. 3) and QR's
  selection rates as PNGs: per-step values faint under a debiased moving average (:func:`smooth`);
- the teachers' collection table (MoT Table 21) and each model's answer to one target problem, under its
  question and reference answer; where the best model and MTD differ, problem by problem
  (:func:`_where_they_differ`).

Every piece of model or teacher text goes through ``html.escape``; the page has
no scripts.
"""

from __future__ import annotations

import functools
import html
import json
import math
from pathlib import Path
from typing import NamedTuple

from accord.analysis.stats import mean_se
from accord.card import md_cell, write_card
from accord.evaluate import problem_scores, rows_file

ORDER = ("base", "std", "mtd", "posthoc", "mot", "compact", "qr")


def final_rows(eval_rows: list[dict]) -> dict[str, dict[str, dict]]:
    """model → split → metrics, for final checkpoints only."""
    out: dict[str, dict[str, dict]] = {}
    for r in eval_rows:
        if r.get("final"):
            out.setdefault(r["model"], {})[r["split"]] = r
    return out


def _order_key(name: str) -> tuple:
    head = name.split("-", 1)[0]
    return (ORDER.index(head) if head in ORDER else len(ORDER), name)


def base_of(name: str, results: list[dict], known) -> str:
    """The base model a trained model is compared with: its own student's base for a QR student
    (``base-<student>``) when that was evaluated, else the run's base student."""
    student = next((r.get("student") for r in results if r["name"] == name), None)
    own = f"base-{student}" if student else None
    return own if own in known else "base"


def _variant_change(name: str, results: list[dict]) -> str:
    """The settings a tagged variant was trained with that its default was not (both recorded in ``result.json``)."""
    from accord.config import diff_settings

    by = {r["name"]: r for r in results}
    a, b = by.get(default_of(name, results) or ""), by.get(name)
    if not a or not b or "trained_with" not in a or "trained_with" not in b:
        return "–"
    return "; ".join(diff_settings(a["trained_with"], b["trained_with"])) or "nothing recorded"


def default_of(name: str, results: list[dict]) -> str | None:
    """The result a tagged variant (``train.tag``) is an ablation of: its name without ``-<tag>``."""
    tag = next((r.get("tag") for r in results if r["name"] == name), None)
    return name.removesuffix(f"-{tag}") if tag and name.endswith(f"-{tag}") else None


def method_table(eval_rows: list[dict], results: list[dict], splits: list[str]) -> tuple[list[str], list[list]]:
    finals = final_rows(eval_rows)
    compute = {r["name"]: r.get("branch_steps") for r in results}
    base = finals.get("base", {})
    head = ["model"] + [f"{s} {m}" for s in splits for m in ("pass@1", "greedy")] + ["Δ general", "branch-steps"]
    label = {r["name"]: f"{r['name']} (validation-selected)" for r in results
             if r.get("last") and r["last"] != r["final"]}
    lasts = _last_rows(eval_rows, results)
    body = []
    for name in sorted(finals, key=_order_key):
        shown = [(label.get(name, name), finals[name])] + ([(f"{name} (last)", lasts[name])] if name in lasts else [])
        for title, metrics in shown:
            row: list = [title]
            for s in splits:
                m = metrics.get(s, {})
                row += [_with_se(m, "pass1"), _with_se(m, "greedy")]
            ref = finals.get(name if name.startswith("base") else base_of(name, results, finals), base)
            g, g0 = metrics.get("general", {}).get("pass1"), ref.get("general", {}).get("pass1")
            row.append(None if g is None or g0 is None else g - g0)
            row.append(compute.get(name, 0 if name.startswith("base") else None))
            body.append(row)
    return head, body


Z95 = 1.959964  # two-sided 95% normal quantile


class Diff(NamedTuple):
    """A paired difference: mean over problems, its standard error, whether the 95% interval excludes 0."""
    mean: float
    se: float
    significant: bool


def paired_table(run_dir: Path, eval_rows: list[dict], results: list[dict], splits: list[str], ref: str
                 ) -> tuple[list[str], list[list]]:
    """Each final model against ``ref`` (``"mtd"``; ``"base"`` — a QR student against its own base; or
    ``"default"`` — a tagged variant against the result it varies, :func:`default_of`) on the *same* problems:
    the mean over problems of the per-problem difference in pass@1 (greedy when no samples
    were drawn), its standard error over problems, and whether the 95% normal interval excludes 0; on the
    first split also the problems where the model is better / worse.  Paired, because two models' errors on
    one problem set are correlated: the per-row ± of the method table overstate the uncertainty of a
    difference (Miller 2024, "Adding Error Bars to Evals", §4).  Empty when ``ref`` was not evaluated."""
    finals = final_rows(eval_rows)
    head = ["model"] + [h for i, s in enumerate(splits)
                        for h in [f"{s} Δ vs {'its default' if ref == 'default' else ref}"]
                        + ([f"{s} better / worse"] if i == 0 else [])]
    body = []
    for name in sorted(finals, key=_order_key):
        other = (base_of(name, results, finals) if ref == "base" else default_of(name, results) if ref == "default"
                 else ref)
        if name.startswith("base") or name == ref or other not in finals:
            continue
        row: list = [name]
        for i, s in enumerate(splits):
            a, b = (_scores(run_dir, finals[n].get(s)) for n in (name, other))
            common = sorted(set(a) & set(b))
            d = [a[p] - b[p] for p in common]
            m, se = mean_se(d)
            row.append(None if m is None else Diff(m, se or 0.0, bool(se) and abs(m) > Z95 * se))
            if i == 0:
                row.append(f"{sum(x > 0 for x in d)} / {sum(x < 0 for x in d)}" if d else None)
        body.append(row)
    return head, body


class SeedRate(NamedTuple):
    """A rate pooled over training seeds: the mean over seeds, its standard error over problems and seeds, the
    standard deviation between the seeds' rates, and how many seeds."""
    mean: float
    se: float
    sd: float
    n: int


def seed_groups(results: list[dict]) -> dict[str, list[str]]:
    """label → names (≥ 2) of the results trained with the same settings apart from ``train.seed`` (``--seeds``
    replicas: ``mtd``, ``mtd-seed1``, …; post-hoc merges record no seed and pool by their STD students'), keyed
    by the shortest name."""
    groups: dict[tuple, list[str]] = {}
    for r in results:
        if "trained_with" not in r:
            continue
        settings = json.loads(json.dumps(r["trained_with"]))
        settings.get("train", {}).pop("seed", None)
        key = (default_of(r["name"], results) or r["name"], r.get("student"), json.dumps(settings, sort_keys=True))
        groups.setdefault(key, []).append(r["name"])
    return {min(names, key=lambda n: (len(n), n)): sorted(names, key=_order_key)
            for names in groups.values() if len(names) > 1}


def _pooled(run_dir: Path, finals: dict, names: list[str], split: str) -> tuple[dict[str, float], float, int] | None:
    """Per-problem scores averaged over ``names`` (on the problems all of them were evaluated on), the standard
    deviation between their rates there, and how many; None when one of them has no rows on ``split``."""
    scores = [_scores(run_dir, finals.get(n, {}).get(split)) for n in names]
    common = sorted(set.intersection(*(set(x) for x in scores))) if scores else []  # sorted: one order of sums
    if not common:
        return None
    rates = [sum(x[p] for p in common) / len(common) for x in scores]
    m = sum(rates) / len(rates)
    sd = (sum((r - m) ** 2 for r in rates) / (len(rates) - 1)) ** 0.5 if len(rates) > 1 else 0.0
    return {p: sum(x[p] for x in scores) / len(scores) for p in common}, sd, len(names)


def seed_table(run_dir: Path, eval_rows: list[dict], results: list[dict], splits: list[str],
               refs: tuple[str, ...] = ("mtd", "base")) -> tuple[list[str], list[list]]:
    """Each :func:`seed_groups` group pooled over its seeds, and against each of ``refs`` that was evaluated:
    ``mtd`` (its own seed group when it has one) and ``base`` (each row's own base student, :func:`base_of`).

    Rate: the mean over problems of each problem's score averaged over the seeds; its SE² = SE²(over problems)
    + sd²/S, sd the standard deviation between the S seeds' rates — the problems' and the seeds' variation both,
    conservatively (the seed × problem part is counted twice).  Δ vs a reference: the mean over the shared
    problems of the difference of seed-averaged scores, SE² = SE²(paired, over problems) + sd²/S of each side (a
    reference with one seed — a base student, or an MTD trained once — adds no seed term); * = the 95% interval
    excludes 0."""
    groups = seed_groups(results)
    if not groups:
        return [], []
    finals = final_rows(eval_rows)

    def ref_of(ref: str, label: str) -> list[str]:
        if ref == "base":
            return [base_of(label, results, finals)] if "base" in finals else []
        return next((g for g in groups.values() if ref in g), [ref] if ref in finals else [])

    refs = tuple(r for r in refs if any(ref_of(r, label) for label in groups))
    head = ["model", "seeds"] + [f"{s} pass@1 over seeds" for s in splits]
    head += [f"{s} Δ vs {ref} over seeds" for ref in refs for s in splits]
    body = []
    by = {r["name"]: r for r in results}
    for label, names in sorted(groups.items(), key=lambda kv: _order_key(kv[0])):
        seeds = [str(by[n].get("seed", by[n].get("trained_with", {}).get("train", {}).get("seed", "?")))
                 for n in names]
        pooled = {s: _pooled(run_dir, finals, names, s) for s in splits}
        row: list = [label, ", ".join(seeds)]
        for s in splits:
            if pooled[s] is None:
                row.append(None)
                continue
            per, sd, n = pooled[s]
            m, se = mean_se(list(per.values()))
            row.append(SeedRate(m, ((se or 0.0) ** 2 + sd ** 2 / n) ** 0.5, sd, n))
        for ref in refs:
            other = ref_of(ref, label)
            row += [None if pooled[s] is None or not other or label in other
                    else _pooled_diff(pooled[s], _pooled(run_dir, finals, other, s)) for s in splits]
        body.append(row)
    return head, body


def _pooled_diff(a: tuple[dict[str, float], float, int], b: tuple[dict[str, float], float, int] | None
                 ) -> Diff | None:
    """:func:`seed_table`'s Δ between two :func:`_pooled` results (a − b)."""
    if b is None:
        return None
    (per, sd, n), (per_r, sd_r, n_r) = a, b
    dm, dse = mean_se([per[p] - per_r[p] for p in sorted(set(per) & set(per_r))])
    if dm is None:
        return None
    tot = ((dse or 0.0) ** 2 + (sd ** 2 / n if n > 1 else 0.0) + (sd_r ** 2 / n_r if n_r > 1 else 0.0)) ** 0.5
    return Diff(dm, tot, bool(tot) and abs(dm) > Z95 * tot)


def _scores(run_dir: Path, metrics: dict | None) -> dict[str, float]:
    path = _rows_file(run_dir, metrics["key"], metrics["split"]) if metrics else None
    if path is None or not path.exists():
        return {}
    st = path.stat()
    return _scores_of(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=128)
def _scores_of(path: str, mtime_ns: int, size: int) -> dict[str, float]:
    """A rows file read once (it holds every generated text — gigabytes for long traces — and the reference's is
    compared with every model, in the report and in the printed table); a file that changed is read again."""
    return problem_scores(Path(path))


def _rows_file(run_dir: Path, key: str, split: str) -> Path:
    """Where the evaluation keeps one model's rows on one split (one line per generation)."""
    return rows_file(run_dir / "eval" / key / f"{split}.json")


def _last_rows(eval_rows: list[dict], results: list[dict]) -> dict[str, dict[str, dict]]:
    """model → split → metrics of each result's *last* checkpoint, where validation picked another one."""
    last = {r["name"]: r["last"] for r in results if r.get("last") and r["last"] != r["final"]}
    out: dict[str, dict[str, dict]] = {}
    for r in eval_rows:
        if last.get(r["model"]) == r.get("path"):
            out.setdefault(r["model"], {})[r["split"]] = r
    return out


def _with_se(m: dict, key: str):
    """A rate with its standard error over problems, when the evaluation recorded one (and, for pass@1 over
    several runs, the standard deviation between runs)."""
    v, se, sd = m.get(key), m.get(f"{key}_se"), m.get(f"{key}_std")
    if v is None or se is None:
        return v
    return (v, se, sd, m.get("repeats")) if sd is not None else (v, se)


def text_table(head: list[str], body: list[list]) -> str:
    cells = [head] + [[_fmt(c) for c in r] for r in body]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def _fmt(c) -> str:
    if c is None:
        return "–"
    if isinstance(c, Diff):
        return f"{c.mean:+.3f} ± {c.se:.3f}" + (" *" if c.significant else "")
    if isinstance(c, SeedRate):
        return f"{c.mean:.3f} ± {c.se:.3f} (sd {c.sd:.3f}, {c.n} seeds)"
    if isinstance(c, tuple):
        return f"{c[0]:.3f} ± {c[1]:.3f}" + (f" (sd {c[2]:.3f}, {c[3]} runs)" if len(c) > 2 else "")
    if isinstance(c, float):  # rates and changes to three decimals; counts and scores (tokens, S_MI) to one
        return f"{c:.1f}" if abs(c) >= 10 else f"{c:.3f}"
    return str(c)


def curve_series(eval_rows: list[dict], split: str, results: list[dict] = ()) -> dict[str, list[tuple[int, float]]]:
    """model → [(steps, pass@1 on ``split``)] at every evaluated checkpoint, starting from its own base at step 0
    (:func:`base_of`: a QR student's curve starts at its own base student)."""
    series: dict[str, list[tuple[int, float]]] = {}
    bases: dict[str, float] = {}
    for r in eval_rows:
        if r["split"] != split or r.get("pass1") is None:
            continue
        if r["model"].startswith("base"):
            bases[r["model"]] = r["pass1"]
        elif r.get("steps") is not None:
            series.setdefault(r["model"], []).append((r["steps"], r["pass1"]))
    for name, pts in series.items():
        b = bases.get(base_of(name, results, bases))
        series[name] = ([(0, b)] if b is not None else []) + sorted(pts)
    return series


def plot_curves(eval_rows: list[dict], split: str, path: Path, results: list[dict] = ()) -> Path | None:
    series = curve_series(eval_rows, split, results)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for name in sorted(series, key=_order_key):
        pts = series[name]
        style = dict(lw=2.4, marker="o") if name == "mot" else dict(lw=1.2, marker=".", alpha=0.85)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
    ax.set_xlabel("optimizer steps per branch (MoT: rounds × S)")
    ax.set_ylabel(f"{split} pass@1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def branch_losses(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """teacher → [(step across rounds, loss)] from MoT's kept branch records (last record per step wins)."""
    last: dict[tuple[str, int, int], float] = {}
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        ev = json.loads(line)
        if "teacher" in ev:
            last[(ev["teacher"], ev["round"], ev["step"])] = ev["loss"]
    S = max((k[2] for k in last), default=0)
    out: dict[str, list[tuple[int, float]]] = {}
    for (t, r, step), loss in sorted(last.items()):
        out.setdefault(t, []).append(((r - 1) * S + step, loss))
    return out


def plot_branch_losses(metrics: Path, path: Path) -> Path | None:
    """MoT Fig. 3/4: each teacher branch's training loss across rounds (a drop at a merge is the merge's effect)."""
    return _plot_smoothed(branch_losses(metrics), path, "branch step (rounds × S)", "training loss", log=True)


def plot_alpha(metrics: Path, path: Path) -> Path | None:
    """COMPACT Fig. 3: each teacher's mean weight α over training steps."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        ev = json.loads(line)
        for k, v in ev.items():
            if k.startswith("alpha/"):
                series.setdefault(k[6:], []).append((ev["step"], v))
    return _plot_smoothed(series, path, "step", "mean weight α (share)")


def smooth(ys: list[float], span: float) -> list[float]:
    """TensorBoard-style exponential moving average with bias correction: weight ``1 − 1/span`` on the past, the
    first point itself (not pulled towards 0).  ``span`` ≤ 1 returns the values as they are."""
    if span <= 1:
        return list(ys)
    keep, acc, norm, out = 1 - 1 / span, 0.0, 0.0, []
    for y in ys:
        acc, norm = keep * acc + (1 - keep) * y, keep * norm + (1 - keep)
        out.append(acc / norm)
    return out


def _plot_smoothed(series: dict[str, list[tuple[int, float]]], path: Path, xlabel: str, ylabel: str,
                   log: bool = False) -> Path | None:
    """One line per key: the per-step values faint, their moving average (span a twentieth of the run) bold — the
    per-step values of small batches are noisy.  A log axis starts below most of the averages, not at the
    lowest step's (a batch of short replay rows can have a loss 10⁴ below its neighbours'); the legend sits outside
    the axes."""
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.4, 3.6), dpi=110)
    low = []
    for name, pts in series.items():
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        sm = smooth(ys, len(ys) / 20)
        line, = ax.plot(xs, sm, lw=1.6, label=name)
        if sm != ys:
            ax.plot(xs, ys, lw=0.7, alpha=0.25, color=line.get_color())
        low += [v for v in sm if v > 0]
    if log:
        ax.set_yscale("log")
        if low:  # from the averages' 5th percentile: one tiny per-step value would otherwise set the axis
            top = max(v for pts in series.values() for _, v in pts)
            ax.set_ylim(sorted(low)[len(low) // 20] / 3, top * 1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def compact_scores(metrics: Path) -> tuple[list[str], list[list]]:
    """Mean of each score and of α per teacher over the whole COMPACT run (the report's table): over the weighted
    problems (K′ ≥ 2), as logged, so replay rows and single-trace problems are not in it."""
    sums: dict[tuple[str, str], list[float]] = {}
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        ev = json.loads(line)
        for k, v in ev.items():
            if "/" in k and k.split("/", 1)[0] in ("alpha", "s_mi", "s_cons", "s_ppl"):
                sums.setdefault(tuple(k.split("/", 1)), []).append(v)
    teachers = sorted({t for c, t in sums if c == "alpha"})  # an older run also logged groups of one's scores
    cols = ("alpha", "s_mi", "s_cons", "s_ppl")
    body = [[t] + [(sum(sums[(c, t)]) / len(sums[(c, t)])) if (c, t) in sums else None for c in cols]
            for t in teachers]
    return ["teacher", "mean α", "mean S_MI", "mean S_cons", "mean S_PPL"], body


def card_evaluations(cfg, eval_rows: list[dict], results: list[dict], splits: list[str]) -> dict[str, str]:
    """name → the evaluation section of that model's card (:mod:`accord.card`, Markdown): on each split its
    pass@1 and greedy ± their standard errors, its base student's pass@1, and the paired difference from it."""
    finals = final_rows(eval_rows)
    head, paired = paired_table(Path(cfg.run_dir), eval_rows, results, splits, "base")
    diffs = {row[0]: dict(zip(head, row)) for row in paired}  # name → {"<split> Δ vs base": Diff, …}
    e = cfg.eval
    out = {}
    for r in results:
        name = r["name"]
        if name not in finals:
            continue
        base = base_of(name, results, finals)
        rows = []
        for s in splits:
            m, b = finals[name].get(s), finals.get(base, {}).get(s, {})
            if m is None:
                continue
            d = diffs.get(name, {}).get(f"{s} Δ vs base")
            sp = cfg.eval.splits.get(s)
            src = "–" if sp is None else f"`{sp.path}`" + (f" ({sp.split})" if sp.split != "all" else "")
            rows.append(f"| {s} | {md_cell(src)} | {m.get('n', '–')} | "
                        f"{_fmt(_with_se(m, 'pass1'))} | {_fmt(_with_se(m, 'greedy'))} "
                        f"| {_fmt(_with_se(b, 'pass1'))} | {_fmt(d)} |")
        if rows:
            out[name] = "\n".join([
                f"pass@1 averaged over k = {e.k} samples at temperature {e.temperature}, top-p {e.top_p}, and greedy "
                "decoding, each ± its standard error over the problems; Δ is the mean per-problem difference in "
                f"pass@1 from the base student (`{base}`) on the same problems, ± its standard error, * where its "
                "95% interval excludes 0.", "",
                "| split | problems from | n | pass@1 | greedy | base pass@1 | Δ pass@1 vs base |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: |", *rows])
    return out


def _n_problems(eval_rows: list[dict]) -> str:
    """'target: 200 problems, general: 200 problems' from the base student's rows."""
    n = {r["split"]: r.get("n") for r in eval_rows if r.get("model") == "base" and r.get("n")}
    return ", ".join(f"{k}: {v} problems" for k, v in n.items()) or "n not recorded"


def _html_table(head: list[str], body: list[list], best_cols: set[int] = frozenset()) -> str:
    def val(c):
        return c[0] if isinstance(c, tuple) else c

    best = {i: max((val(r[i]) for r in body if isinstance(val(r[i]), float)), default=None) for i in best_cols}
    heads = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    out = [f"<div class='scroll'><table><thead><tr>{heads}</tr></thead><tbody>"]
    for r in body:
        tds = []
        for i, c in enumerate(r):
            cls = ("best" if i in best and c is not None and val(c) == best[i] else
                   ("up" if c.mean > 0 else "down") if isinstance(c, Diff) and c.significant else "")
            attr = f' class="{cls}"' if cls else ""
            tds.append(f"<td{attr}>{html.escape(_fmt(c))}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    return "\n".join(out + ["</tbody></table></div>"])


def _samples(run_dir: Path, eval_rows: list[dict], split: str, cfg=None) -> str:
    """Each final model's first row on ``split`` (the same problem for all: rows are written in problem order),
    under the problem's question and reference answer when the split can still be read."""
    firsts = []
    for r in eval_rows:
        if not r.get("final") or r["split"] != split:
            continue
        rows_file = _rows_file(run_dir, r["key"], split)
        if not rows_file.exists():
            continue
        with rows_file.open(encoding="utf-8") as fh:
            first = fh.readline()  # not the whole file: it holds every generated text
        if first.strip():
            firsts.append((r["model"], json.loads(first)))
    problems = _split_problems(cfg, split, {row.get("problem_id") for _, row in firsts})
    parts, shown = [], None
    for model, row in firsts:
        pid = row.get("problem_id")
        if pid != shown and pid in problems:
            p = problems[pid]
            parts.append(f"<h3>Problem <code>{html.escape(pid)}</code></h3><pre>{html.escape(p.question)}</pre>"
                         f"<p>reference answer: <code>{html.escape(p.answer)}</code></p>")
            shown = pid
        said = ", ".join(html.escape(str(x)) for x in (row.get("mode"), row["verdict"]) if x)
        if row.get("parsed") is not None:
            said += f", answered <code>{html.escape(str(row['parsed']))}</code>"
        parts.append(f"<h3>{html.escape(model)} <small>({said})</small></h3><pre>{html.escape(row['output'])}</pre>")
    return "\n".join(parts)


def _split_problems(cfg, split: str, ids: set) -> dict:
    """A split's problems among ``ids`` ({} when the config or its source is gone: the samples show without their
    question)."""
    if cfg is None or split not in getattr(cfg.eval, "splits", {}) or not ids:
        return {}
    from accord.evaluate import split_problems

    try:
        return {p.id: p for p in split_problems(cfg, split) if p.id in ids}
    except (OSError, ValueError):  # accord's UsageError (a source that cannot be read) is a ValueError
        return {}


def _rows_of(path: Path, pids: set, correct: frozenset = frozenset()) -> dict[str, dict]:
    """One row of each problem in ``pids`` from a rows file: its first, or for those in ``correct`` its first
    correct one when it has any.  Read line by line until all are settled; a line is parsed only when it names an
    unsettled problem."""
    first: dict[str, dict] = {}
    found: dict[str, dict] = {}
    if not path.exists():
        return first
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            open_ = [p for p in pids if p not in found]
            if not open_:
                break
            if any(p in line for p in open_):
                r = json.loads(line)
                pid = r.get("problem_id")
                if pid not in pids or pid in found:
                    continue
                first.setdefault(pid, r)
                if pid not in correct or r.get("verdict") == "correct":
                    found[pid] = r
    return {**first, **found}


def best_model(finals: dict, split: str | None, trained_only: bool = False) -> tuple[float, str] | None:
    """(rate, name) of the highest pass@1 (greedy when no samples) on ``split``; ties to the later name."""
    rated = [(m[split].get("pass1") if m[split].get("pass1") is not None else m[split].get("greedy"), name)
             for name, m in finals.items() if split in m and not (trained_only and name.startswith("base"))]
    return max(((v, k) for v, k in rated if v is not None), default=None)


def _where_they_differ(run_dir: Path, eval_rows: list[dict], splits: list[str], cfg=None, n: int = 2) -> list[str]:
    """The best model on the first split against MTD, problem by problem: up to ``n`` problems each way where one
    does better (per-problem pass@1), largest gaps first, each with its question, reference answer, a correct
    answer of the better model and the first answer of the other — what the paired difference is made of."""
    finals = final_rows(eval_rows)
    first = splits[0] if splits else None
    top = best_model(finals, first, trained_only=True)
    if top is None or "mtd" not in finals or first not in finals["mtd"]:
        return []
    best = top[1]
    if best == "mtd":
        return []
    a, b = (_scores(run_dir, finals[k][first]) for k in (best, "mtd"))
    gaps = sorted(((a[p] - b[p], p) for p in set(a) & set(b) if a[p] != b[p]), key=lambda g: (-abs(g[0]), g[1]))
    picked = [g for g in gaps if g[0] > 0][:n] + [g for g in gaps if g[0] < 0][:n]
    if not picked:
        return []
    pids = {p for _, p in picked}
    problems = _split_problems(cfg, first, pids)
    wins = {best: frozenset(p for g, p in picked if g > 0), "mtd": frozenset(p for g, p in picked if g < 0)}
    outs = {k: _rows_of(_rows_file(run_dir, finals[k][first]["key"], first), pids, wins[k]) for k in (best, "mtd")}
    parts = [f"<h2>Where {html.escape(best)} and mtd differ ({html.escape(first)})</h2>",
             f"<p>{len(gaps)} problems have different per-problem pass@1; the largest gaps each way, with a correct "
             "answer of the model that does better and the first answer (greedy where measured) of the other.</p>"]
    for gap, pid in picked:
        p = problems.get(pid)
        parts.append(f"<h3>Problem <code>{html.escape(pid)}</code> <small>({html.escape(best)} − mtd = {gap:+.2f} "
                     "pass@1)</small></h3>")
        if p is not None:
            parts.append(f"<pre>{html.escape(p.question)}</pre><p>reference answer: "
                         f"<code>{html.escape(p.answer)}</code></p>")
        for k in (best, "mtd"):
            row = outs[k].get(pid)
            if row is not None:
                parts.append(f"<p><b>{html.escape(k)}</b> <small>({html.escape(row['verdict'])}, pass@1 "
                             f"{(a if k == best else b)[pid]:.2f})</small></p><pre>{html.escape(row['output'])}</pre>")
    return parts


def _provenance_footer(results: list[dict], eval_rows: list[dict]) -> str:
    """What produced the numbers (``provenance`` in each ``result.json`` and evaluation summary): one line when
    everything ran on one stack, else each stack with what it produced — results from mixed versions are flagged."""
    seen: dict[str, list[int]] = {}
    for kind, records in ((0, results), (1, eval_rows)):
        for r in records:
            if p := r.get("provenance"):
                seen.setdefault(", ".join(f"{k} {v}" for k, v in p.items() if k != "device")
                                + f" on {p.get('device', '?')}", [0, 0])[kind] += 1
    if not seen:
        return ""
    lines = [f"{html.escape(k)} ({n_t} trained model(s), {n_e} evaluation(s))" for k, (n_t, n_e) in seen.items()]
    if len(lines) == 1:
        return f"<p><small>Made with {lines[0]}.</small></p>"
    return ("<p><small><b>Results from different software or hardware</b> — compare with care:</small></p><ul>"
            + "".join(f"<li><small>{x}</small></li>" for x in lines) + "</ul>")


CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{padding:.3em .7em;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}td{white-space:nowrap}td.best{font-weight:700;background:#eef7ee}
td.up{background:#e3f4e3}td.down{background:#fbe4e4}.scroll{overflow-x:auto}
pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap;max-height:14em;overflow:auto}small{color:#777}"""


def write_report(cfg, results: list[dict], eval_rows: list[dict]) -> Path:
    run_dir = Path(cfg.run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    splits = list(cfg.eval.splits)
    head, body = method_table(eval_rows, results, splits)
    pass_cols = {1 + 2 * i for i in range(len(splits))}
    curve_splits = cfg.eval.curve_splits or splits  # other splits are only measured on final models
    curves = [s for s in splits if s in curve_splits and plot_curves(eval_rows, s, out / f"curve-{s}.png", results)]
    collect = _collect_table(run_dir)
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>accord report — {html.escape(run_dir.name)}"
            f"</title><style>{CSS}</style></head><body>",
            f"<h1>accord report <small>{html.escape(str(run_dir))}</small></h1>",
            *_findings_section(run_dir, eval_rows, results, splits),
            "<h2>Methods (MoT Table 4)</h2>",
            "<p>pass@1 averaged over k samples at temperature "
            f"{cfg.eval.temperature}, top-p {cfg.eval.top_p} (k = {cfg.eval.k}), ± the standard error over "
            f"problems ({html.escape(_n_problems(eval_rows))})"
            + (f"; with {cfg.eval.repeats} independent runs of the k samples, sd = the standard deviation of "
               "pass@1 between runs" if cfg.eval.repeats > 1 else "")
            + "; Δ general = change of general-family pass@1 from the base student (forgetting is negative); "
            "branch-steps = optimizer steps summed over branches (MoT Table 5). "
            "Bold: the best pass@1 of each split. Each row is one training run: the ± measure the problems' "
            "sampling, not the training seed's, which can move a row by more (<code>accord run CONFIG --seeds "
            "0,1,2</code> trains replicas; the report then pools them).</p>",
            f"<div id='methods'>{_html_table(head, body, pass_cols)}</div>"]
    page += _paired_section(run_dir, eval_rows, results, splits)
    page += _seed_section(run_dir, eval_rows, results, splits, out)
    page += _length_section(eval_rows, splits, cfg.eval.max_new_tokens)
    if not results:
        page.append("<p><b>Only the base student is here</b>: no trained model was found in "
                    f"<code>{html.escape(str(run_dir / 'train'))}</code>. Run <code>accord train CONFIG</code> "
                    "(or <code>accord run CONFIG</code>, which also collects and evaluates), then "
                    "<code>accord eval CONFIG</code> and <code>accord report CONFIG</code>.</p>")
    for s in curves:
        page.append(f"<h2>{html.escape(s)} pass@1 by round / checkpoint (MoT Table 22, Fig. 3)</h2>"
                    f"<img src='curve-{html.escape(s)}.png' alt='{html.escape(s)} curve'>")
    later_seeds = {n: g[0] for g in seed_groups(results).values() for n in g[1:]}  # --seeds: collapsed below g[0]
    for name in _named(results, "compact"):  # the default and any tagged variant (train.tag)
        metrics, png = run_dir / "train" / name / "metrics.jsonl", f"{name}-alpha.png"
        if plot_alpha(metrics, out / png):
            head_c, body_c = compact_scores(metrics)
            page += _method_figure("COMPACT: each teacher's weight α over training (COMPACT Fig. 3)", name,
                                   f"<img src='{html.escape(png)}' alt='COMPACT weights'>"
                                   + _html_table(head_c, body_c), later_seeds)
    for name in _named(results, "mot"):
        png = f"{name}-branch-loss.png"
        if plot_branch_losses(run_dir / "train" / name / "metrics.jsonl", out / png):
            page += _method_figure("MoT branch losses by teacher across rounds (MoT Fig. 3/4)", name,
                                   f"<img src='{html.escape(png)}' alt='MoT branch losses'>", later_seeds)
    if collect:
        page += ["<h2>Teachers (collection, MoT Table 21)</h2>", collect]
    page += _interpolation_section(cfg, run_dir / "analysis" / "interpolation.json", out, results)
    page += _diagnose_section(run_dir / "analysis" / "teachers.json")
    page += _drift_section(cfg, run_dir / "analysis" / "drift.json", out, results)
    for qr_dir in sorted((run_dir / "train").glob("qr*/routing.jsonl")):  # QR's working dir(s): qr, qr-<tag>
        parts, suffix = _qr_section(qr_dir.parent, out), qr_dir.parent.name[2:]  # qr-seed1 trains qr-<student>-seed1
        if parts and suffix and any(n.startswith("qr-") and n.endswith(suffix) for n in later_seeds):
            parts = _folded(qr_dir.parent.name, "QR's routing", parts)
        page += parts
    page += _cord_section(run_dir, out)
    if splits:  # the first split's (the lab's: target)
        page += [f"<h2>One {html.escape(splits[0])} sample per model</h2>",
                 _samples(run_dir, eval_rows, splits[0], cfg)]
    page += _where_they_differ(run_dir, eval_rows, splits, cfg) + [_provenance_footer(results, eval_rows),
                                                                     "</body></html>"]
    (out / "index.html").write_text("\n".join(page), encoding="utf-8")
    evaluations = card_evaluations(cfg, eval_rows, results, splits)
    for r in results:  # each trained model's README.md, now with its evaluation
        write_card(cfg, r, evaluations.get(r["name"]))
    (out / "table.txt").write_text(summary_text(run_dir, eval_rows, results, splits) + "\n")  # what the CLI prints
    return out / "index.html"


SEED_NOTE = ("replicas trained with --seeds, pooled: the mean over seeds, ± over problems and seeds, sd = the "
             "spread between the seeds' rates; Δ paired over problems, its ± including each side's seed spread")
PAIRED_NOTE = ("mean over the same problems of (model − reference) per-problem pass@1, ± its standard error; "
               "* = the 95% interval excludes 0")


def summary_text(run_dir: Path, eval_rows: list[dict], results: list[dict], splits: list[str]) -> str:
    """What ``accord run``, ``eval`` and ``report`` print: the method table, each model paired against MTD, and the
    :func:`findings` in words."""
    head, body = method_table(eval_rows, results, splits)
    text = text_table(head, body)
    head, body = paired_table(run_dir, eval_rows, results, splits, "mtd")
    text += f"\n\npaired against mtd ({PAIRED_NOTE}):\n" + text_table(head, body) if body else ""
    head, body = seed_table(run_dir, eval_rows, results, splits)
    text += f"\n\nover training seeds ({SEED_NOTE}):\n" + text_table(head, body) if body else ""
    said = findings(run_dir, eval_rows, results, splits)
    return text + ("\n\n" + "\n".join(f"- {line}" + "".join(f"\n    {x}" for x in subs) for line, subs in said)
                   if said else "")


def split_diffs(body: list[list], splits: list[str]) -> dict[str, dict[str, Diff]]:
    """A :func:`paired_table` body as model → split → :class:`Diff` (its first split also has a better / worse
    column)."""
    out = {}
    for row in body:
        cells = [c for i, c in enumerate(row[1:]) if i != 1]  # drop the first split's better / worse
        out[row[0]] = {s: c for s, c in zip(splits, cells) if isinstance(c, Diff)}
    return out


def findings(run_dir: Path, eval_rows: list[dict], results: list[dict], splits: list[str]
             ) -> list[tuple[str, list[str]]]:
    """The report's first lines, in words and from the paired differences only, as (line, sub-lines): the best
    model on the first split and whether it is distinguishable from MTD, then every difference from the base
    student and from MTD whose 95% interval excludes 0, by direction and split (or that none does), with how many
    comparisons were made — at 95%, about one in twenty crosses by chance.  With seed replicas (``--seeds``) the
    same lines pooled over seeds come first, and a replica against its first seed is said apart from the
    ablations; the run-by-run lines against the base and MTD then leave the seeded methods' runs to the tables."""
    finals = final_rows(eval_rows)
    first = splits[0] if splits else None
    out: list[tuple[str, list[str]]] = []
    if not any(not n.startswith("base") for n in finals):
        return out  # only base students: nothing to compare yet

    def said(d: Diff) -> str:
        return f"{d.mean:+.3f} ± {d.se:.3f}"

    vs_mtd = split_diffs(paired_table(run_dir, eval_rows, results, splits, "mtd")[1], splits)
    vs_base = split_diffs(paired_table(run_dir, eval_rows, results, splits, "base")[1], splits)
    vs_default = split_diffs(paired_table(run_dir, eval_rows, results, splits, "default")[1], splits)
    head, body = seed_table(run_dir, eval_rows, results, splits)

    def pooled_vs(ref: str) -> dict[str, dict[str, Diff]]:
        cols = [head.index(f"{s} Δ vs {ref} over seeds") for s in splits if f"{s} Δ vs {ref} over seeds" in head]
        return {r[0]: {s: r[c] for s, c in zip(splits, cols) if isinstance(r[c], Diff)} for r in body}

    vs_seeds, vs_base_seeds = pooled_vs("mtd"), pooled_vs("base")
    if pooled := [(r[2].mean, r[0], r[2]) for r in body if isinstance(r[2], SeedRate)]:
        _, name, rate = max(pooled)
        line = f"Best on {first} pooled over training seeds: {name} ({_fmt(rate)})"
        d = vs_seeds.get(name, {}).get(first)
        if d is not None:
            line += f"; against mtd {said(d)}, " + ("outside" if d.significant else "within") + " its 95% interval"
        out.append((line + ".", []))
    if (top := best_model(finals, first)) is not None:  # with seeds: the best single run, after the pooled best
        best, name = top
        line = f"Best on {first}: {name} ({best:.3f}" + (", an untrained base" if name.startswith("base") else "") + ")"
        d = vs_mtd.get(name, {}).get(first)
        if d is not None:
            line += f"; against mtd {said(d)}, " + ("outside" if d.significant else "within") + " its 95% interval"
        out.append((line + ".", []))
    groups = seed_groups(results)
    replica = {n for g in groups.values() for n in g
               if default_of(n, results) in g}  # a seed against its first seed: not an ablation, the seed's own noise
    vs_first_seed = {n: d for n, d in vs_default.items() if n in replica}
    vs_default = {n: d for n, d in vs_default.items() if n not in replica}
    seeded = {n for label, g in groups.items() if label in vs_base_seeds or label in vs_seeds for n in g}
    if seeded:  # their pooled lines speak for them; one run at a time is the seed's noise again (paired tables below)
        vs_base = {n: d for n, d in vs_base.items() if n not in seeded}
        vs_mtd = {n: d for n, d in vs_mtd.items() if n not in seeded}
    for ref, diffs in (("the base student, pooled over training seeds (--seeds)", vs_base_seeds),  # seeds first
                       ("mtd, pooled over training seeds (--seeds)", vs_seeds),
                       ("the base student", vs_base), ("mtd", vs_mtd), ("their defaults (train.tag)", vs_default),
                       ("the first seed of the same method (only train.seed differs)", vs_first_seed)):
        n = sum(len(v) for v in diffs.values())
        if not n:
            continue
        chance = f"{n} paired comparisons; about {n / 20:.1f} would cross by chance if none differed"
        subs = []
        for sign, word in ((1, "above"), (-1, "below")):
            for s in splits:
                hits = [f"{m} {said(v[s])}" for m, v in diffs.items()
                        if s in v and v[s].significant and v[s].mean * sign > 0]
                if hits:
                    note = " (forgetting)" if s == "general" and sign < 0 else ""
                    subs.append(f"{word} on {s}{note}: " + ", ".join(hits))
        out.append((f"Against {ref} ({chance}):", subs) if subs
                   else (f"Against {ref}: no model differs beyond its 95% interval ({chance}).", []))
    if seeded:
        out.append((f"The {len(seeded)} single runs of methods trained over several seeds are compared one by one "
                    "in the paired tables below, not here: the pooled lines speak for them.", []))
    return out


def _findings_section(run_dir: Path, eval_rows: list[dict], results: list[dict], splits: list[str]) -> list[str]:
    said = findings(run_dir, eval_rows, results, splits)
    if not said:
        return []
    items = "".join(f"<li>{html.escape(line)}" + ("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in subs)
                                                  + "</ul>" if subs else "") + "</li>" for line, subs in said)
    return [f"<h2>At a glance</h2><ul class='findings'>{items}</ul><p><small>From the paired differences below; a "
            "difference inside its 95% interval is not a finding.</small></p>"]


def _seed_section(run_dir: Path, eval_rows: list[dict], results: list[dict], splits: list[str], out: Path
                  ) -> list[str]:
    head, body = seed_table(run_dir, eval_rows, results, splits)
    if not body:
        return []
    pngs = [s for s in splits[:1] if plot_seeds(eval_rows, results, body, s, 2, out / f"seeds-{s}.png")]  # the headline
    return ["<h2>Over training seeds</h2>",
            f"<p>{html.escape(SEED_NOTE[:1].upper() + SEED_NOTE[1:])}. A method's rows above are single training "
            "runs; two seeds of one method can differ by more than the ± over problems, which measures only the "
            "evaluation's sampling of problems (the <i>paired against each variant's default</i> table shows each "
            "seed against the first).</p>",
            _html_table(head, body, {2 + i for i in range(len(splits))})] + [
            f"<img src='seeds-{html.escape(s)}.png' alt='{html.escape(s)} pass@1 per seed'>" for s in pngs]


def _paired_section(run_dir: Path, eval_rows: list[dict], results: list[dict], splits: list[str]) -> list[str]:
    parts = []
    for ref, title in (("mtd", "mtd"), ("base", "base"), ("default", "each variant's default (train.tag)")):
        head, body = paired_table(run_dir, eval_rows, results, splits, ref)
        if body and ref == "default":  # what the variant changed: the ablation, in the table that measures it
            head, body = head + ["what differs"], [r + [_variant_change(r[0], results)] for r in body]
        if body:
            parts += [f"<h3>Paired against {html.escape(title)}</h3>", _html_table(head, body)]
    if not parts:
        return []
    return ["<h2>Paired differences</h2>",
            f"<p>{PAIRED_NOTE}; better / worse = problems where the model's pass@1 is higher / lower. A difference "
            "between two rows of the table above is read here: the problems are shared, so their errors are "
            "correlated and the rows' own ± overstate its uncertainty. Against base, a QR student is compared "
            "with its own base student.</p>"] + parts


def length_table(eval_rows: list[dict], splits: list[str]) -> tuple[list[str], list[list]]:
    """How long each evaluated model writes per split: mean tokens per output ± SE over problems, and the share of
    outputs that reached ``eval.max_new_tokens`` (a model that stopped stopping shows here before its accuracy
    says why).  Empty when no evaluation recorded lengths."""
    finals = final_rows(eval_rows)
    if not any(m.get("tokens") is not None for f in finals.values() for m in f.values()):
        return [], []
    head = ["model"] + [f"{s} {w}" for s in splits for w in ("tokens", "cut")]
    body = []
    for name in sorted(finals, key=_order_key):
        row: list = [name]
        for s in splits:
            m = finals[name].get(s, {})
            t, se = m.get("tokens"), m.get("tokens_se")
            row += [None if t is None else f"{t:.0f}" + ("" if se is None else f" ± {se:.0f}"), _with_se(m, "cut")]
        body.append(row)
    return head, body


def _length_section(eval_rows: list[dict], splits: list[str], max_new_tokens: int) -> list[str]:
    head, body = length_table(eval_rows, splits)
    if not body:
        return []
    return ["<h2>How long each model writes</h2>",
            "<p>Tokens per output (the k samples'; the greedy output's when k = 0), the mean over problems ± its "
            "standard error; cut = the share of outputs that reached <code>eval.max_new_tokens</code> "
            f"({max_new_tokens}) without finishing, ± SE. A cut output is graded on what it wrote so far.</p>",
            _html_table(head, body)]


def _interpolation_section(cfg, data_file: Path, out: Path, results: list[dict]) -> list[str]:
    """MoT Fig. 6 from ``accord interpolate``'s results, when it has been run — the curves of models trained
    since left out and named."""
    if not data_file.exists():
        return []
    from accord.analysis.interpolate import current_curves, plot

    data, gone = current_curves(cfg, json.loads(data_file.read_text()), results)
    note = ([f"<p>Left out of the interpolation figure: {html.escape(', '.join(gone))} — trained again (or no "
             "longer trained) since <code>accord interpolate</code> ran; run it again to draw their curves.</p>"]
            if gone else [])
    (out / "interpolation.png").unlink(missing_ok=True)  # never a figure of models that are not these
    if plot(data, out / "interpolation.png") is None:
        return (["<h2>Base-to-checkpoint interpolation (MoT App. D, Fig. 6)</h2>"] + note) if gone else []
    body = [[n, s["mean"], s["max_dip"]] for n, s in data["summary"].items()]
    return ["<h2>Base-to-checkpoint interpolation (MoT App. D, Fig. 6)</h2>", *note,
            f"<p>θ = λ·base + (1 − λ)·checkpoint, {html.escape(data['split'])} pass@1 ± SE at each λ "
            f"({data['n']} problems, k = {data['k']}). A smooth rise towards the checkpoint reads as a flat region, "
            "steep drops or bumps on the way as interference; a dip smaller than the points' standard errors is "
            "noise. From <code>accord interpolate CONFIG</code>.</p>",
            "<img src='interpolation.png' alt='interpolation'>",
            _html_table(["model", "mean pass@1 over λ", "largest dip base → checkpoint"], body)]


def _diagnose_section(data_file: Path) -> list[str]:
    """``accord diagnose``'s teacher table, when it has been run."""
    if not data_file.exists():
        return []
    data = json.loads(data_file.read_text())
    if "table" not in data:
        return []
    return ["<h2>Teachers as the student saw them before training (diagnostics)</h2>",
            f"<p>The base student's view of each teacher's verified traces on {data['problems']} "
            f"{'shared ' if data['shared'] else ''}problems: NLL per token (mean ± SE over problems, median and "
            f"IQR over traces), tokens more than {data['kappa']:g} nats surprising, mean rank clipped at "
            f"{data['rank_clip']} and the Rank-Surprisal Ratio (lower: informative yet aligned), then the "
            "teachers' style. From <code>accord diagnose CONFIG</code>.</p>",
            _html_table(data["table"]["head"], data["table"]["body"])] + [f"<p>{html.escape(n)}</p>"
                                                                           for n in data["table"]["notes"]] \
        + _diagnose_style(data) + _diagnose_verdicts(data)


def _diagnose_style(data: dict) -> list[str]:
    t = data["table"].get("style_js") or {}
    if len(t.get("body") or []) < 2:
        return []
    return ["<p>How far apart the teachers write: the Jensen–Shannon divergence between their word-bigram "
            "distributions (bits; 0 alike, 1 disjoint).</p>", _html_table(t["head"], t["body"])]


def _diagnose_verdicts(data: dict) -> list[str]:
    v, t = data.get("verdicts") or {}, data["table"].get("verdicts") or {}
    if not t.get("body"):
        return []
    r = data["table"].get("retention") or {}
    return [f"<p>Every sample, right or wrong, on {v['problems']} problems every teacher attempted: how well a "
            "confidence tells right from wrong (AUROC; 0.5 is chance) — the student's global mean log-prob and its "
            f"lowest {v['window']}-token window, the teacher's own where its backend returned log-probs — and "
            "length against difficulty (the failure rate over every teacher's samples).</p>",
            _html_table(t["head"], t["body"])] + ([
                "<p>Filtering by confidence: the accuracy of the samples kept when only the most confident share is "
                "kept, and the score that keeps them (for the teacher's own window score, the "
                "<code>collect.confidence.min_window_logprob</code> that would).</p>",
                _html_table(r["head"], r["body"])] if r.get("body") else [])


def _drift_section(cfg, data_file: Path, out: Path, results: list[dict]) -> list[str]:
    """``accord drift``'s figure and its last-layer shifts (as ``drift.json``'s table holds them), when it has run —
    models trained again since left out and named (the figure drawn again without them)."""
    png = data_file.with_suffix(".png")
    if not data_file.exists() or not png.exists():
        return []
    import shutil

    from accord.analysis.drift import plot
    from accord.analysis.interpolate import trained_since

    data = json.loads(data_file.read_text())
    if "table" not in data:
        return []
    weights = data.get("weights", {})
    gone = trained_since(cfg, {n: weights.get(n) for n in data["models"]}, {r["name"]: r for r in results})
    head = ["<h2>How far training moved the student's states (COMPACT §4.3, Fig. 4)</h2>"]
    if gone:
        head.append(f"<p>Left out: {html.escape(', '.join(gone))} — trained again (or no longer trained) since "
                    "<code>accord drift</code> ran; run it again to measure them.</p>")
        data["models"] = {n: v for n, v in data["models"].items() if n not in gone}
        data["table"]["body"] = [row for row in data["table"]["body"] if row[0] not in gone]
    (out / "drift.png").unlink(missing_ok=True)
    if not data["models"]:
        return head if gone else []
    if gone:
        plot(data, out / "drift.png")
    else:
        shutil.copyfile(png, out / "drift.png")
    return [*head,
            f"<p>The last prompt token's hidden state at every layer, on each split's first prompts; the shift of "
            f"each model's mean along the base student's top {data['rank']} principal directions, ± its standard "
            "error. COMPACT reads a small shift on general data as less forgetting. From "
            "<code>accord drift CONFIG</code>.</p>",
            "<img src='drift.png' alt='drift'>", _html_table(data["table"]["head"], data["table"]["body"])]


def _collect_table(run_dir: Path) -> str:
    p = run_dir / "collect_summary.json"
    if not p.exists():
        return ""
    rows = json.loads(p.read_text())
    rows = rows.get("teachers", rows) if isinstance(rows, dict) else rows
    if not rows:
        return ""
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list)) and not k.endswith("_se")
            and not (k in _COLLECT_OPTIONAL and not any(r.get(k) for r in rows))]
    return _html_table([_COLLECT_LABELS.get(k, k) for k in keys],
                       [[_with_se(r, k) for k in keys] for r in rows])  # a rate beside its SE


# The collection summary's fields as the CLI's table names them; the optional ones only when some teacher has any
# (a judge ran, an imported corpus carried its own verdicts).
_COLLECT_LABELS = {"unparseable": "unparsed", "cut": "cut at max_new_tokens", "judged_invalid": "judge-rejected",
                   "mean_tokens": "mean tokens",
                   "source_verdicts": "source verdicts", "source_disagree": "disagree with source",
                   "mean_chars": "mean chars"}
_COLLECT_OPTIONAL = {"cut", "judged_invalid", "source_verdicts", "source_disagree"}


def routing_table(path: Path, key: str = "type") -> tuple[list[str], list[list]]:
    """QR-Distill: the trained router's selection rate per ``key`` (path type or difficulty level) and
    student, ± its standard error over paths (from ``train/qr/routing.jsonl``)."""
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    if not rows:
        return [], []
    names = list(rows[0]["gate"])
    vals = sorted({r.get(key) for r in rows if r.get(key) is not None}, key=lambda v: (str(type(v)), v))
    body = []
    for v in vals:
        sub = [r for r in rows if r.get(key) == v]
        cells: list = [str(v), len(sub)]
        for n in names:
            p = sum(r["gate"][n] for r in sub) / len(sub)
            cells.append((p, math.sqrt(p * (1 - p) / len(sub))))
        body.append(cells)
    return [key, "paths"] + [f"selected by {n}" for n in names], body


def plot_routing(head: list[str], body: list[list], path: Path, xlabel: str) -> Path | None:
    """Grouped bars: selection rate per row value (x) and student (bars), with ± SE (QR-Distill Fig. 4/5)."""
    if not body:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [h.removeprefix("selected by ") for h in head[2:]]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    w = 0.8 / max(1, len(names))
    for k, n in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * w for i in range(len(body))]
        ax.bar(xs, [r[2 + k][0] for r in body], w, yerr=[r[2 + k][1] for r in body], label=n, capsize=2)
    ax.set_xticks(range(len(body)), [r[0] for r in body], rotation=20 if len(body) > 6 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("selection rate")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, -0.2))  # never over a bar
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_seeds(eval_rows: list[dict], results: list[dict], body: list[list], split: str, col: int, path: Path
               ) -> Path | None:
    """One column per :func:`seed_table` row: each seed's rate on ``split`` as a dot, the pooled mean as a bar
    with its 95% interval (± 1.96 · SE over problems and seeds) — the spread a single run hides."""
    rows = [r for r in body if isinstance(r[col], SeedRate)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals, groups = final_rows(eval_rows), seed_groups(results)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.6), dpi=110)
    for i, r in enumerate(rows):
        m = [finals.get(n, {}).get(split, {}) for n in groups.get(r[0], [])]
        ys = [x.get("pass1") if x.get("pass1") is not None else x.get("greedy") for x in m]
        ys = [y for y in ys if y is not None]
        ax.scatter([i + (k - (len(ys) - 1) / 2) * 0.08 for k in range(len(ys))], ys, s=18, color="tab:blue",
                   alpha=0.7, zorder=3, label="one seed" if i == 0 else None)
        ax.errorbar([i], [r[col].mean], yerr=[Z95 * r[col].se], fmt="_", color="black", markersize=18, capsize=4,
                    zorder=2, label="pooled, 95% interval" if i == 0 else None)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=20 if len(rows) > 5 else 0)
    ax.set_ylabel(f"{split} pass@1")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _named(results: list[dict], method: str) -> list[str]:
    """The result names of one method, the default first (``compact``, then ``compact-<tag>`` variants)."""
    return sorted({r["name"] for r in results if r.get("method", r["name"]) == method or r["name"] == method},
                  key=lambda n: (n != method, n))


def _method_figure(title: str, name: str, body: str, later_seeds: dict[str, str]) -> list[str]:
    """A method's own figure under its heading; a later seed of a ``--seeds`` group (``later_seeds``: name → the
    group's first) folded under the first seed's, so S seeds make one section, not S."""
    if name in later_seeds:
        return _folded(name, "the same", [body])
    return [f"<h2>{html.escape(title)}{_variant(name)}</h2>", body]


def _folded(name: str, what: str, parts: list[str]) -> list[str]:
    """A later training seed's section folded under one summary line, its headings one level down."""
    body = "".join(parts).replace("<h2>", "<h3>").replace("</h2>", "</h3>")
    return [f"<details><summary>{html.escape(name)}: {what} for this training seed</summary>{body}</details>"]


def _variant(name: str) -> str:
    """`` — <name>`` for a tagged variant's section heading, nothing for the default."""
    return f" — {html.escape(name)}" if "-" in name else ""


def _qr_section(qr_dir: Path, out: Path) -> list[str]:
    """QR-Distill's routing (§4.3): selection rates over training, per path type (Fig. 4) and per difficulty
    level (Fig. 5), from the run's metrics and the trained router's decisions."""
    parts, v, tag = [], _variant(qr_dir.name), qr_dir.name
    series: dict[str, list[tuple[int, float]]] = {}
    metrics = qr_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        ev = json.loads(line)
        for k, rate in ev.items():
            if k.startswith("sel/"):
                series.setdefault(k[4:], []).append((ev["step"], rate))
    if _plot_smoothed(series, out / f"{tag}-selection.png", "step", "share of the batch's paths selected"):
        parts += [f"<h2>QR-Distill: selection rate per student over training{v}</h2>",
                  f"<img src='{html.escape(tag)}-selection.png' alt='QR selection rates'>"]
    for key, fig, what in (("type", "Fig. 4", "path type (teacher / style)"), ("level", "Fig. 5", "difficulty level")):
        head, body = routing_table(qr_dir / "routing.jsonl", key)
        if body and plot_routing(head, body, out / f"{tag}-routing-{key}.png", what):
            parts += [f"<h2>QR-Distill: the trained router's selections by {html.escape(what)} ({fig}){v}</h2>",
                      f"<img src='{html.escape(tag)}-routing-{key}.png' alt='QR routing by {key}'>",
                      _html_table(head, body)]
    return parts


def _cord_section(run_dir: Path, out: Path) -> list[str]:
    """CoRD vs its baselines (CoRD Table 2, Table 14) and teacher hit rates (Fig. 2), when `accord cord` ran."""
    import shutil

    p = run_dir / "cord" / "summary.json"
    if not p.exists():
        return []
    s = json.loads(p.read_text())
    body = [[name, s[name]["n"], _with_se(s[name], "accuracy"), _with_se(s[name], "mean_pp"), s[name]["mean_tokens"],
             s[name]["wall_s"]] for name in ("cord", "cord-curation", "cord-integration") if name in s]
    parts = ["<h2>CoRD: collaborative decoding vs baselines (CoRD Table 2)</h2>",
             "<p>± the standard error over problems.</p>",
             _html_table(["pipeline", "problems", "answer acc.", "mean PP", "mean tokens", "wall s"], body, {2, 3})]
    if s.get("meta_prover_share") is not None:
        parts.append(f"<p>meta-prover share of CoRD time: {s['meta_prover_share']:.1%}</p>")
    png = run_dir / "cord" / "hit_rates.png"
    if png.exists():
        shutil.copy2(png, out / "cord-hit-rates.png")
        parts.append("<h3>Teacher hit rates over reasoning progress (CoRD Fig. 2)</h3>"
                     "<img src='cord-hit-rates.png' alt='CoRD teacher hit rates'>")
    return parts
