"""Evaluation: greedy accuracy and pass@1 averaged over k samples, per model and per split.

pass@1 over k samples is the mean, over problems, of the fraction of the k
samples that are correct (MoT §5 reports AIME as 16-run averages; the same
estimator); pass@k′ for k′ = 2, 4, … ≤ k by the unbiased estimator
1 − C(k−c, k′)/C(k, k′) is recorded beside it (``pass_at``), and maj@k (the
most frequent parsed answer of the k samples, a value written two ways counted as one, ties to the one seen first; rows
written before the answers were stored count as unparsed).  Generation goes through the
generation backends (``accord.teachers``), so a vLLM backend evaluates on GPU and an hf
backend on CPU.  Optionally every (problem, sample)
row is written to a JSONL file, and a re-run skips rows already there, so a
killed evaluation resumes — under the settings, weights and verifier it started with
(:func:`check_started`; other rows are set aside).  A summary records what its verdicts were reached with
(:func:`answers_stamp`); one from another verifier revision, or another reference
answer, has its rows checked again from the stored outputs (:func:`reverify_rows`),
and nothing is generated again.

``evaluate_models`` is the ``accord eval`` stage: the base student and every
model the training stage recorded (finals, and every round / checkpoint for the
curves of MoT Table 22 / Fig. 3) on every configured split, one summary file
per (model, split) so finished ones are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from accord.analysis.stats import mean_se
from accord.config import GeneratorConfig, ProblemsConfig
from accord.errors import UsageError
from accord.problems import Problem, load_problems
from accord.prompts import render_prompt
from accord.rows import EvalPoint, EvalRow, TrainRecord
from accord.teachers.base import Request, SamplingParams, load_generator
from accord.ui import progress
from accord.verify import CORRECT, FAILED, answer_key, check, stamp


@dataclass
class EvalResult:
    greedy: float | None
    pass1: float | None
    n: int
    k: int
    greedy_se: float | None = None  # standard errors over problems (the spread a reader needs to compare)
    pass1_se: float | None = None
    pass_at: dict | None = None  # {k': unbiased pass@k'} for k' = 1, 2, 4, … ≤ k (and k itself)
    maj: float | None = None  # maj@k: the majority parsed answer of the k samples is right
    maj_se: float | None = None
    repeats: int = 1  # independent runs of k samples each (eval.repeats)
    pass1_runs: list | None = None  # pass@1 of each run
    pass1_std: float | None = None  # their standard deviation (OpenThoughts' "mean ± std over runs")
    # how long the model writes: tokens per output and the share that reached max_new_tokens, means over problems
    # of the samples (the greedy outputs when k = 0) ± SE; None for rows stored before these were kept
    tokens: float | None = None
    tokens_se: float | None = None
    cut: float | None = None
    cut_se: float | None = None

    def as_dict(self) -> dict:
        return {"greedy": self.greedy, "pass1": self.pass1, "n": self.n, "k": self.k, "greedy_se": self.greedy_se,
                "pass1_se": self.pass1_se, "pass_at": self.pass_at, "maj": self.maj, "maj_se": self.maj_se,
                "repeats": self.repeats, "pass1_runs": self.pass1_runs, "pass1_std": self.pass1_std,
                "tokens": self.tokens, "tokens_se": self.tokens_se, "cut": self.cut, "cut_se": self.cut_se}


def _done(path: Path | None, answers: dict | None = None, lengths: dict | None = None
          ) -> dict[tuple[str, int, str], bool]:
    """Correctness of every row already on disk; ``answers`` receives each row's parsed answer, ``lengths`` its
    (tokens, reached max_new_tokens) where the row records them."""
    if path is None or not path.exists():
        return {}
    out = {}
    with path.open(encoding="utf-8") as fh:  # line by line: the rows hold every generated text
        for line in fh:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill; regenerated below
            key = (r["problem_id"], r["sample"], r["mode"])
            out[key] = r["verdict"] == CORRECT
            if answers is not None:
                answers[key] = r.get("parsed")
            if lengths is not None and r.get("tokens") is not None and r["verdict"] != FAILED:
                lengths[key] = (r["tokens"], r.get("finish") == "length")
    return out


def length_figures(lengths: dict, keys: list[tuple[str, int, str]]) -> dict:
    """``tokens``, ``cut`` (the share that reached max_new_tokens) and their SEs (:class:`EvalResult`'s fields)
    over the problems of ``keys``, each problem's outputs averaged first — the outputs whose length is recorded:
    not a failed generation's, nor a row stored before lengths were kept — or {} when there are none."""
    by: dict[str, list] = {}
    for k in keys:
        if k in lengths:
            by.setdefault(k[0], []).append(lengths[k])
    if not by:
        return {}
    tokens = mean_se([sum(t for t, _ in v) / len(v) for v in by.values()])
    cut = mean_se([sum(c for _, c in v) / len(v) for v in by.values()])
    return {"tokens": tokens[0], "tokens_se": tokens[1], "cut": cut[0], "cut_se": cut[1]}


def problem_scores(rows_path: Path) -> dict[str, float]:
    """Each problem's score in a finished evaluation's rows: pass@1 over its samples (every repeat), or its greedy
    verdict when no sample was drawn (``eval.k: 0``) — the per-problem values :func:`mean_se` averages."""
    done = _done(Path(rows_path))
    samples: dict[str, list[bool]] = {}
    greedy: dict[str, bool] = {}
    for (pid, _, mode), ok in done.items():
        if mode == "sample":
            samples.setdefault(pid, []).append(ok)
        else:
            greedy[pid] = ok
    if samples:
        return {pid: sum(v) / len(v) for pid, v in samples.items()}
    return {pid: float(ok) for pid, ok in greedy.items()}


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """maj@k for one problem: the most frequent parsed answer among the samples (ties: the one seen first;
    unparsed samples do not vote; one value written two ways is one answer, :func:`verify.answer_key`) is right
    iff a sample giving it was judged right."""
    keys = [None if a is None else answer_key(a) for a in answers]
    counts: dict[str, int] = {}
    for a in keys:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return False
    top = max(counts.values())
    pick = next(a for a in keys if a is not None and counts[a] == top)
    return any(c for a, c in zip(keys, correct) if a == pick)


def evaluate(generator, problems: Sequence[Problem], *, k: int = 16, temperature: float = 0.6, top_p: float = 1.0,
             greedy: bool = True,
             max_new_tokens: int = 1024, verifier: str = "math", style: str = "default", seed: int = 0,
             rows_path: str | Path | None = None, chunk: int = 256, repeats: int = 1) -> EvalResult:
    """Evaluate a generator on problems; ``rows_path`` makes it resumable.

    ``repeats`` runs the k samples that many times (samples r·k … (r+1)·k − 1 are run r, each with its own
    seeds): pass@1 and its SE over problems use every sample, ``pass1_runs`` / ``pass1_std`` give the spread
    between runs, pass@k′ uses all k·repeats samples per problem, maj@k is averaged over the runs."""
    n_s = k * max(1, repeats)
    path = Path(rows_path) if rows_path else None
    parsed: dict = {}
    lengths: dict = {}
    done = _done(path, parsed, lengths)
    todo = []
    if greedy:
        todo += [(p, 0, "greedy") for p in problems if (p.id, 0, "greedy") not in done]
    if k > 0:
        todo += [(p, i, "sample") for p in problems for i in range(n_s) if (p.id, i, "sample") not in done]
    fh = path.open("a", encoding="utf-8") if path else None
    try:
        for mode in ("greedy", "sample"):
            part = [t for t in todo if t[2] == mode]
            params = SamplingParams(temperature=0.0 if mode == "greedy" else temperature,
                                    top_p=1.0 if mode == "greedy" else top_p, max_new_tokens=max_new_tokens)
            for s in range(0, len(part), chunk):
                batch = part[s:s + chunk]
                reqs = [Request(render_prompt(style, p.question), seed=seed * 1_000_003 + hash_id(p.id) + i)
                        for p, i, _ in batch]
                for (p, i, m), g in zip(batch, generator.generate(reqs, params)):
                    res = check(verifier, p.answer, g.text) if not g.failed else None
                    verdict = res.verdict if res else "failed"
                    done[(p.id, i, m)] = verdict == CORRECT
                    parsed[(p.id, i, m)] = res.parsed if res else None
                    if not g.failed:
                        lengths[(p.id, i, m)] = (g.token_count, g.finish_reason == "length")
                    if fh:
                        fh.write(json.dumps({"problem_id": p.id, "sample": i, "mode": m, "output": g.text,
                                             "verdict": verdict, "parsed": parsed[(p.id, i, m)],
                                             "tokens": g.token_count, "finish": g.finish_reason}) + "\n")
                if fh:
                    fh.flush()
    finally:
        if fh:
            fh.close()
    ids = [p.id for p in problems]
    g, g_se = mean_se([float(done[(pid, 0, "greedy")]) for pid in ids]) if greedy else (None, None)
    if k <= 0:
        return EvalResult(g, None, len(ids), k, g_se, None, None, None, None,
                          **length_figures(lengths, [(pid, 0, "greedy") for pid in ids] if greedy else []))
    R = max(1, repeats)
    counts = [sum(done[(pid, i, "sample")] for i in range(n_s)) for pid in ids]
    p1, p1_se = mean_se([c / n_s for c in counts])
    ks = sorted({j for j in (2 ** e for e in range(k.bit_length())) if j <= k} | {k})
    pass_at = {j: sum(pass_at_k(n_s, c, j) for c in counts) / len(counts) for j in ks} if counts else None
    runs = [sum(done[(pid, i, "sample")] for pid in ids for i in range(r * k, (r + 1) * k)) / (k * len(ids))
            for r in range(R)]
    maj_runs = [mean_se([float(majority_correct([parsed.get((pid, i, "sample")) for i in range(r * k, (r + 1) * k)],
                                                [done[(pid, i, "sample")] for i in range(r * k, (r + 1) * k)]))
                         for pid in ids]) for r in range(R)]
    maj, maj_se = sum(m for m, _ in maj_runs) / R, maj_runs[0][1] if R == 1 else None
    sd = mean_se(runs)[1] * len(runs) ** 0.5 if R > 1 else None  # the runs' sample standard deviation
    return EvalResult(g, p1, len(ids), k, g_se, p1_se, pass_at, maj, maj_se, R, runs if R > 1 else None, sd,
                      **length_figures(lengths, [(pid, i, "sample") for pid in ids for i in range(n_s)]))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k) / C(n, k) (Chen et al. 2021)."""
    from math import comb

    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def hash_id(pid: str) -> int:
    import hashlib

    return int(hashlib.sha1(pid.encode()).hexdigest()[:6], 16)


# --------------------------------------------------------------------------- the eval stage


def eval_points(cfg, results: list[TrainRecord], cached_only: bool = False) -> list[EvalPoint]:
    """(key, label, path) of every checkpoint to evaluate: the base student, then each result's curve/final.
    ``cached_only``: a hub student is read from the local cache, never fetched (the plan)."""
    from accord.models import local_model_dir

    base = str(local_model_dir(cfg.student.model, "student", cached_only=cached_only))
    pts: list[EvalPoint] = [{"key": "base", "model": "base", "steps": 0, "path": base, "final": True}]
    for r in results:  # a result trained from another base (a QR student) brings its base along
        b = r.get("base_model")
        if b and all(p["path"] != b for p in pts):
            pts.append({"key": f"base-{r.get('student', r['name'])}", "model": f"base-{r.get('student', r['name'])}",
                        "steps": 0, "path": b, "final": True})
    for r in results:
        curve = r.get("curve") or []
        if not cfg.eval.every_checkpoint:
            curve = []
        seen = set()
        for c in curve:
            pts.append({"key": f"{r['name']}/step-{c['steps']}", "model": r["name"], "steps": c["steps"],
                        "round": c.get("round"), "path": c["path"]})
            seen.add(c["path"])
        if r["final"] not in seen:
            pts.append({"key": f"{r['name']}/final", "model": r["name"], "steps": None, "path": r["final"]})
        for p in pts:
            if p["model"] == r["name"] and p["path"] == r["final"]:
                p["final"] = True
    return pts


def split_problems(cfg, name: str) -> list[Problem]:
    """The problems of evaluation split ``name``.  A split of the training source itself (``problems.path``) is
    read as ``problems:`` reads it — the same ids, split seed and fractions, answer format and skipped answers — so
    its ``validation``/``test`` are the problems training held out; its own fields, where set, win."""
    sp = cfg.eval.splits[name]
    limit = sp.limit or cfg.eval.limit
    if sp.path == cfg.problems.path:
        own = {k: getattr(sp, k) for k in ("question_field", "answer_field") if k in sp.model_fields_set}
        return load_problems(cfg.problems.model_copy(update={"split": sp.split, "limit": limit, **own}))
    return load_problems(ProblemsConfig(path=sp.path, split=sp.split, limit=limit,
                                        question_field=sp.question_field, answer_field=sp.answer_field))


def check_eval_splits(cfg) -> None:
    """Stop before any work when there is nothing to evaluate on: ``eval.splits`` empty (by default when every one
    of your problems is trained on, ``AccordConfig._own_eval_splits``)."""
    if cfg.eval.splits:
        return
    p = cfg.problems
    if p.split == "train" and p.validation_fraction + p.test_fraction > 0:  # something is held out: emptied by hand
        raise UsageError("eval.splits is empty: name the problems to evaluate on, e.g. "
                         "eval.splits: {mine: {path: my-test.jsonl}}")
    train = 1 - p.validation_fraction - p.test_fraction
    raise UsageError(f"eval.splits: nothing to evaluate on. problems.split: {p.split} trains on every problem of "
                     f"{p.path}, so none is held out, and the default splits (the lab's tasks) would say nothing "
                     "of a student trained on them. Hold some out — problems.split: train trains on the id-hash "
                     f"{train:.0%} and evaluates on the validation {p.validation_fraction:.0%} "
                     "(problems.validation_fraction) — or name your benchmark: "
                     "eval.splits: {mine: {path: my-test.jsonl}}")


def student_config(cfg, path: str, name: str, **over) -> GeneratorConfig:
    """The generator settings of a student checkpoint: ``eval.backend`` and batch size, and what ``student:`` says
    (device, remote code, attention, chat-template variables); ``over`` replaces any (replay: the hf backend)."""
    s = cfg.student
    return GeneratorConfig(**{"name": name.replace("/", "_"), "backend": cfg.eval.backend, "model": path,
                              "batch_size": cfg.eval.batch_size, "device": s.device,
                              "trust_remote_code": s.trust_remote_code, "attention": s.attention,
                              "chat_template_kwargs": dict(s.chat_template_kwargs), **over})


def student_generator(cfg, path: str, name: str):
    """A checkpoint of the student behind ``eval.backend``, loaded as ``student:`` says (:func:`student_config`)."""
    return load_generator(student_config(cfg, path, name))


def answers_stamp(verifier: str, problems: Sequence[Problem]) -> str:
    """:func:`accord.verify.stamp` over a split's reference answers: the verifier and its revision, and every
    (id, answer) of the split."""
    return stamp(verifier, "\n".join(f"{p.id}\t{p.answer}" for p in problems))


def reverify_rows(rows_path: Path, problems: Sequence[Problem], verifier: str) -> int:
    """Check every stored row of an evaluation again with the current verifier, from its stored output (rewritten
    in place, atomically; a failed generation stays failed).  Returns how many verdicts changed."""
    gold = {p.id: p.answer for p in problems}
    out, changed = [], 0
    with rows_path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: dropped here, generated again
            if r["verdict"] != FAILED and r["problem_id"] in gold:
                res = check(verifier, gold[r["problem_id"]], r["output"])
                changed += res.verdict != r["verdict"]
                r["verdict"], r["parsed"] = res.verdict, res.parsed
            out.append(json.dumps(r) + "\n")
    tmp = rows_path.with_name(rows_path.name + ".tmp")
    tmp.write_text("".join(out), encoding="utf-8")
    tmp.replace(rows_path)
    return changed


class LazyGenerator:
    """A generator loaded on its first request: an evaluation whose rows are all stored (one checked again with
    the current verifier) loads no model."""

    def __init__(self, make):
        self.make, self.gen = make, None

    def generate(self, requests, params):
        self.gen = self.gen or self.make()
        return self.gen.generate(requests, params)

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()


def eval_summary(cfg, pt: dict, split: str) -> Path | None:
    """Where one point's evaluation on one split is kept, or None when that pair is not evaluated (a curve
    checkpoint on a split outside ``eval.curve_splits``)."""
    curve = cfg.eval.curve_splits
    if not pt.get("final") and curve is not None and split not in curve:
        return None
    return Path(cfg.run_dir) / "eval" / pt["key"] / f"{split}.json"


def made_with(cfg, stamp: str, weights: str | None) -> dict:
    """What an evaluation summary records beside its figures, to compare runs and to tell whether it still answers
    the config (:func:`eval_settings_change`): the decoding settings, the template's variables, the verifier's
    stamp over the split's answers (:func:`answers_stamp`) and the model's weights."""
    return {"temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p, "max_new_tokens": cfg.eval.max_new_tokens,
            "chat_template_kwargs": dict(cfg.student.chat_template_kwargs), "verified_with": stamp,
            "weights": weights}


def stored_answers(cfg, summary: Path, n_problems: int | None, weights: str | None, stamp: str) -> str:
    """Whether a stored summary still answers the config: ``"kept"``; ``"reverify"`` — reached by another verifier
    or reference answers, its rows to be checked again from their outputs; ``"stale"`` — made with other settings
    or weights (or missing)."""
    if not summary.exists():
        return "stale"
    res = json.loads(summary.read_text())
    if eval_settings_change(cfg, res, n_problems, weights):
        return "stale"
    return "kept" if res.get("verified_with") == stamp or not rows_file(summary).exists() else "reverify"


def eval_settings_change(cfg, stored: dict, n_problems: int | None, weights: str | None = None) -> list[str]:
    """``field: stored → now`` where a stored evaluation no longer answers what the config asks (other k,
    temperature, top-p, token budget, repeats, or another number of problems) or the model is not the one it
    evaluated (``weights``: :func:`accord.models.weights_digest` of the checkpoint now — trained again under the same
    name); a field an older summary did not record, or ``n_problems`` / ``weights`` None, is not compared."""
    e = cfg.eval
    now = {"k": e.k, "temperature": e.temperature, "top_p": e.top_p, "max_new_tokens": e.max_new_tokens,
           "repeats": e.repeats, **({"n": n_problems} if n_problems is not None else {})}
    changed = [f"{k}: {stored[k]!r} → {v!r}" for k, v in now.items() if k in stored and stored[k] != v]
    template = dict(cfg.student.chat_template_kwargs)  # a summary without it was made with the template's defaults
    if stored.get("chat_template_kwargs", {}) != template:
        changed.append(f"student.chat_template_kwargs: {stored.get('chat_template_kwargs', {})!r} → {template!r}")
    if weights is not None and stored.get("weights") not in (None, weights):
        changed.append(f"the model's weights: {stored['weights']} → {weights}, trained again or replaced since")
    return changed


def evaluate_models(cfg, results: list[TrainRecord], console, share: tuple[int, int] | None = None) -> list[EvalRow]:
    """Evaluate every point on every split; returns rows {key, model, steps, split, greedy, pass1, ...}.
    ``share`` (i, n): only every n-th point from the i-th, and no ``results.json`` — process i of n evaluating
    its part of a launch (:func:`accord.run.run`); each point's files are its own, so the parts never meet, and
    process 0's full pass afterwards reads them all."""
    from accord.models import provenance, weights_digest

    check_eval_splits(cfg)
    root = Path(cfg.run_dir) / "eval"
    problems = {s: split_problems(cfg, s) for s in cfg.eval.splits}
    rows: list[EvalRow] = []
    pts = eval_points(cfg, results)
    if share is not None:
        pts = pts[share[0]::share[1]]
    stamps = {s: answers_stamp(cfg.eval.verifier, probs) for s, probs in problems.items()}
    checked, flipped = 0, 0  # evaluations whose rows were verified again, and verdicts that changed
    with progress(console) as bar:
        task = bar.add_task("eval", total=len(pts) * len(problems))
        for pt in pts:
            gen = LazyGenerator(lambda pt=pt: student_generator(cfg, pt["path"], pt["key"]))
            weights = weights_digest(pt["path"])
            for split, probs in problems.items():
                summary = eval_summary(cfg, pt, split)
                if summary is None:
                    bar.update(task, advance=1)
                    continue
                res = json.loads(summary.read_text()) if summary.exists() else None
                made_by = res and res.get("provenance")  # what generated the rows, kept when they are re-verified
                if res is not None and (changed := eval_settings_change(cfg, res, len(probs), weights)):
                    kept = set_aside(summary)  # evaluated with other settings: kept, not reused, not reported
                    console.print(f"{pt['key']} {split}: evaluated earlier with other settings ({'; '.join(changed)})"
                                  f"; evaluating again (the old files are kept as {kept.name}*)")
                    res = made_by = None
                if res is not None and res.get("verified_with") != stamps[split] and rows_file(summary).exists():
                    flipped += reverify_rows(rows_file(summary), probs, cfg.eval.verifier)
                    checked, res = checked + 1, None  # the summary again from the rows, nothing generated
                if res is not None and weights and "weights" not in res:  # stored before weights were recorded
                    res["weights"] = weights
                    summary.write_text(json.dumps(res))
                if res is None:
                    if changed := check_started(cfg, summary, probs, weights, stamps[split]):
                        console.print(f"{pt['key']} {split}: a stopped evaluation's outputs were made with other "
                                      f"settings ({'; '.join(changed)}); evaluating again (they are kept as "
                                      f"{summary.stem}.stale-*)")
                    mark_started(cfg, summary, len(probs), made_with(cfg, stamps[split], weights))
                    bar.update(task, description=f"eval {pt['key']} {split}")
                    r = evaluate(gen, probs, k=cfg.eval.k, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                                 greedy=cfg.eval.greedy, max_new_tokens=cfg.eval.max_new_tokens,
                                 verifier=cfg.eval.verifier, seed=cfg.eval.seed,
                                 rows_path=rows_file(summary), repeats=cfg.eval.repeats)
                    res = {**r.as_dict(), **made_with(cfg, stamps[split], weights),
                           "provenance": made_by or provenance()}
                    summary.write_text(json.dumps(res))
                    started_file(summary).unlink()
                rows.append({**pt, "split": split, **res})
                bar.update(task, advance=1)
            gen.close()
    if checked:
        console.print(f"checked the stored outputs of {checked} evaluation(s) again (the verifier's revision or a "
                      f"reference answer changed since they were stored): {flipped} verdict(s) changed")
    if share is None:
        (root / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def set_aside(summary: Path) -> Path:
    """Rename a stale evaluation summary, its rows and its start record (those that exist) out of the way
    (``<split>.stale-<n>.json``); returns the new summary path."""
    kept, n = summary, 0
    while n == 0 or any(f.exists() for f in _files(kept)):
        n += 1
        kept = summary.with_name(f"{summary.stem}.stale-{n}{summary.suffix}")
    for a, b in zip(_files(summary), _files(kept)):
        if a.exists():
            a.rename(b)
    return kept


def _files(summary: Path) -> tuple[Path, Path, Path]:
    return summary, rows_file(summary), started_file(summary)


def started_file(summary: Path) -> Path:
    """What an evaluation not finished yet was started with (``<split>.started.json``, :func:`mark_started`)."""
    return summary.with_suffix(".started.json")


def mark_started(cfg, summary: Path, n_problems: int, recorded: dict) -> None:
    """Record, before generating, what this evaluation is made with (``recorded``: :func:`made_with`), so that a
    killed one resumes its rows only under the same settings, weights and verifier (:func:`check_started`)."""
    summary.parent.mkdir(parents=True, exist_ok=True)
    started_file(summary).write_text(json.dumps({"k": cfg.eval.k, "repeats": cfg.eval.repeats, "n": n_problems,
                                                 **recorded}))


def check_started(cfg, summary: Path, problems: Sequence[Problem], weights: str | None, stamp: str) -> list[str]:
    """The rows a killed evaluation left (no summary yet) resume only where they answer the config: rows started
    with other settings or weights are set aside, and what changed is returned; rows verified otherwise are
    checked again from their outputs.  Rows without a start record (written before it existed) resume as they
    are."""
    if not (stopped := stopped_evaluation(summary)):
        return []
    if changed := eval_settings_change(cfg, stopped, len(problems), weights):
        set_aside(summary)
        return changed
    if stopped.get("verified_with") != stamp:
        reverify_rows(rows_file(summary), problems, cfg.eval.verifier)
    return []


def stopped_evaluation(summary: Path) -> dict | None:
    """The start record of an evaluation that stopped before its summary was written, with rows to resume from
    (None when there is none)."""
    started = started_file(summary)
    if summary.exists() or not started.exists() or not rows_file(summary).exists():
        return None
    return json.loads(started.read_text())


def rows_file(summary: Path) -> Path:
    """The per-sample rows beside an evaluation's summary file (``<model>/<split>.json`` →
    ``<model>/<split>.rows.jsonl``): what a killed evaluation resumes from and the paired differences read."""
    return summary.with_suffix(".rows.jsonl")
