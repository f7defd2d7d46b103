"""`accord cord`: CoRD — collaborative step-wise multi-teacher decoding (paper 002, §3–§5).

For every problem the teachers write one reasoning trajectory together, step by
step (``decode.beam_search``), scored by a meta-prover's predictive perplexity of
the gold answer (``score``).  Each trajectory is stored in the trace store as the
teacher ``cord`` (style ``cord``), and ``corpora/cord.jsonl`` holds the correct
ones, so ``train.method: std:cord`` trains on it like any teacher corpus.  The
curation baseline (``cord-curation``; each teacher writes B complete traces, the
same score picks one) and the optional integration baseline (``cord-integration``;
a separate LLM — ``cord.integrator``, its own model entry, never a proposer —
merges the curation traces with the paper's Table 17 prompt and its JSON answer
is read back into ``<think>`` steps and an answer) are stored beside it.

``<run_dir>/cord/summary.json`` holds answer accuracy and mean predictive
perplexity of CoRD vs the baselines (Table 2), teacher hit rates over
normalised reasoning progress (Fig. 2; ``hit_rates.png``) and the wall-clock
breakdown into step generation and meta-prover scoring (Table 14).  Problems
already stored are skipped on re-run; a problem without a parsable gold answer
is skipped and counted, and so is one whose gold answer the meta-prover's
tokenizer cannot write (a warning names it; the run goes on).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from accord.cord.decode import (
    CordSettings,
    Timing,
    beam_search,
    curate,
    finish,
    mcts_search,
)
from accord.cord.score import CordError, Scorer

BINS = 10
# CoRD Table 17, verbatim but for the two placeholders (the teachers' traces go in <reasoning_step_i> tags).
INTEGRATION_PROMPT = """Instruction

You are tasked with analyzing multiple reasoning solutions and integrating them into a single, structured JSON output.

1. Integrate All Reasoning
- The reasoning steps are provided inside XML tags such as:
<reasoning_step_1> ... </reasoning_step_1>
<reasoning_step_2> ... </reasoning_step_2>
- Merge the content inside all these XML tags into one unified reasoning flow.
- Combine them carefully while maintaining logical flow and context.

2. Assign IDs
- Each sub-thinking process should have its own unique ID.
- Use a hierarchy such as:
"integrated_step1", "integrated_step2" for overall stages of integrated reasoning.
"answer_part" for the final answer section and use `\\boxed{{ }}` format for the final answer.

3. Categorize Reasoning Patterns
Categorize the reasoning according to its type to ensure effective integration:
- Progressive Reasoning: Logical, forward-moving step-by-step problem solving.
Indicators: "Let's solve", "First", "Next", "Then", "Therefore", "We need to", "Given that".
- Verification: Returning to check previous steps for accuracy.
Indicators: "Wait", "Let me check", "Let me verify", "Double-check", "Going back to".
- Multi-method Validation: Using different methods or perspectives to confirm a conclusion.
Indicators: "Alternatively", "Another way", "Let's try a different approach", "Using another method".
- Error Correction Pattern: Identifying and fixing mistakes in reasoning.
Indicators: "This is wrong", "The mistake was", "This can't be right", "The error is", "This contradicts".

4. Return Your Integration in JSON Format
Provide your integrated reasoning in the following JSON structure:
{{
  "integrated_step1": {{"content": "### Step 1. <integrated reasoning text>", "category": "<reasoning pattern>"}},
  "integrated_step2": {{"content": "### Step 2. <integrated reasoning text>", "category": "<reasoning pattern>"}},
  ...
  "integrated_stepN": {{"content": "### Step N. <integrated reasoning text>", "category": "<reasoning pattern>"}},
  "answer_part": ["<final answer in boxed format>"]
}}

Question: {question}

Reasoning Steps: {traces}"""


def parse_integration(text: str) -> tuple[str, str] | None:
    """(reasoning, answer) from the integrator's JSON (Table 17's shape): the ``integrated_step*`` contents in
    order, and ``answer_part``; None when no such JSON object can be read."""
    import re

    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    keys = sorted((k for k in obj if re.fullmatch(r"integrated_step\d+", k)), key=lambda k: int(k[15:]))
    steps = [v.get("content", "") if isinstance(v, dict) else str(v) for v in (obj[k] for k in keys)]
    ans = obj.get("answer_part", "")
    ans = " ".join(map(str, ans)) if isinstance(ans, list) else str(ans)
    return ("\n".join(s.strip() for s in steps if s), ans.strip()) if steps or ans else None


def settings(cfg) -> CordSettings:
    c = cfg.cord
    return CordSettings(beam=c.beam, segmentation=c.segmentation, max_steps=c.max_steps, step_tokens=c.step_tokens,
                        think_tokens=c.think_tokens, answer_tokens=c.answer_tokens, temperature=c.temperature,
                        top_p=c.top_p, seed=c.seed)


def hit_rates(step_lists: list[list[tuple[tuple[str, ...], str]]], teachers: list[str], bins: int = BINS) -> dict:
    """Share of selected steps per teacher in each normalised-progress bin (credit split on merged steps)."""
    counts = [{t: 0.0 for t in teachers} for _ in range(bins)]
    for steps in step_lists:
        n = len(steps)
        for i, (names, _) in enumerate(steps):
            b = min(bins - 1, int((i + 0.5) / n * bins))
            for name in names:
                counts[b][name] = counts[b].get(name, 0.0) + 1.0 / len(names)
    rates = {t: [] for t in teachers}
    for c in counts:
        tot = sum(c.values())
        for t in teachers:
            rates[t].append(c.get(t, 0.0) / tot if tot else None)
    return {"bins": [(i + 0.5) / bins for i in range(bins)], "teachers": rates}


def run_cord(cfg, console) -> dict:
    from accord.problems import load_problems
    from accord.prompts import render_prompt
    from accord.store import TraceStore
    from accord.teachers.base import load_teacher
    from accord.ui import progress

    c, cs = cfg.cord, settings(cfg)
    problems = load_problems(cfg.problems)[: c.limit] if c.limit else load_problems(cfg.problems)
    run_dir = Path(cfg.run_dir)
    store = TraceStore(run_dir / "traces.sqlite")
    store.put_problems(problems)
    gen_cfgs = [t for t in cfg.teachers if t.backend != "column"]
    if not gen_cfgs:
        raise CordError("cord needs teachers that generate (not only `column` imports)")
    teachers = {t.name: load_teacher(t) for t in gen_cfgs}
    integrator = load_teacher(c.integrator) if c.integrator and "integration" in c.baselines else None
    meta = teachers[c.meta_prover or default_meta_prover(cfg, [t.name for t in gen_cfgs], console)]
    scorer = Scorer(c.selection, meta, seed=c.seed, judge_runs=c.judge_runs, verifier=cfg.collect.verifier,
                    template=c.answer_template)
    pp = scorer if c.selection == "predictive-perplexity" else Scorer("predictive-perplexity", meta,
                                                                       template=c.answer_template)
    style = "steps" if c.segmentation == "prompt" else "default"
    done = {k[0] for k in store.done_keys("cord")}
    timing = {"cord_generation_s": 0.0, "cord_meta_prover_s": 0.0, "curation_generation_s": 0.0,
              "curation_meta_prover_s": 0.0}
    skipped, failures, unscorable = 0, {}, []
    with progress(console) as bar:
        task = bar.add_task("cord", total=len(problems))
        for p in problems:
            bar.update(task, advance=1)
            if p.id in done:
                continue
            if not _gold_ok(p.answer, cfg.collect.verifier):
                skipped += 1
                continue
            if (why := scorer.answer_problem(p.answer)) is not None:
                unscorable.append(p.id)  # skipped and counted; the rest of the run goes on
                console.print(f"[yellow]warning[/]: problem {p.id} skipped: {why}")
                continue
            rows = _one_problem(cfg, teachers, scorer, pp, render_prompt(style, p.question), p, cs, timing, failures,
                                integrator)
            store.put_traces(rows)
    summary = summarize(cfg, store, problems, list(teachers), timing, skipped, failures, unscorable)
    _write_corpus(cfg, store, problems)
    for t in [*teachers.values(), *([integrator] if integrator else [])]:
        t.close()
    store.close()
    _print(summary, console)
    return summary


def _gold_ok(answer: str, verifier: str) -> bool:
    from accord.verify import GoldAnswerError, check

    if not answer or not str(answer).strip():
        return False
    try:
        check(verifier, answer, f"\\boxed{{{answer}}}")
    except GoldAnswerError:
        return False
    return True


def _one_problem(cfg, teachers, scorer, pp, prompt, p, cs, timing, failures, integrator=None) -> list[dict]:
    c = cfg.cord
    t0, tm = time.perf_counter(), Timing()
    s0 = scorer.seconds
    if c.selection in WHOLE_TRAJECTORY:  # the paper's Random / Max-length: picked among finished traces
        traj, _ = curate(teachers, scorer, prompt, p.answer, cs, tm, rollouts=cs.beam)
        traj = traj or finish(teachers, prompt, beam_search(teachers, scorer, prompt, p.answer, cs, tm), cs, tm)
    else:
        search = mcts_search if c.search == "mcts" else beam_search
        traj = finish(teachers, prompt, search(teachers, scorer, prompt, p.answer, cs, tm), cs, tm)
    timing["cord_generation_s"] += tm.generation_s
    timing["cord_meta_prover_s"] += scorer.seconds - s0
    rows = [_row(cfg, p, "cord", prompt, traj, _pp(pp, scorer, prompt, traj, p.answer), time.perf_counter() - t0,
                 step_timings=tm.steps)]
    _merge_failures(failures, tm.failures)
    if "curation" in c.baselines or "integration" in c.baselines:
        t0, tm, s0 = time.perf_counter(), Timing(), pp.seconds
        picked, pool = curate(teachers, pp, prompt, p.answer, cs, tm, rollouts=c.curation_rollouts or cs.beam)
        timing["curation_generation_s"] += tm.generation_s
        timing["curation_meta_prover_s"] += pp.seconds - s0
        if picked is not None and "curation" in c.baselines:
            rows.append(_row(cfg, p, "cord-curation", prompt, picked, picked.score, time.perf_counter() - t0))
        if pool and integrator is not None:
            rows.append(_integrate(cfg, integrator, pp, prompt, p, pool, cs))
        _merge_failures(failures, tm.failures)
    return rows


def _pp(pp, scorer, prompt, traj, answer) -> float:
    from accord.cord.decode import THINK_PREFIX
    from accord.prompts import THINK_CLOSE

    body = traj.reasoning[len(THINK_PREFIX):-len(THINK_CLOSE)]
    if pp is scorer and traj.score != float("-inf"):
        return traj.score
    return pp(prompt, THINK_PREFIX, [body], answer)[0]


def _integrate(cfg, integrator, pp, prompt, p, pool, cs) -> dict:
    from accord.cord.decode import THINK_PREFIX, Trajectory
    from accord.prompts import THINK_CLOSE
    from accord.teachers.base import Request, SamplingParams

    traces = "\n".join(f"<reasoning_step_{i + 1}> {t.reasoning[len(THINK_PREFIX):-len(THINK_CLOSE)].strip()} "
                       f"</reasoning_step_{i + 1}>" for i, t in enumerate(pool))
    t0 = time.perf_counter()
    g = integrator.generate([Request(INTEGRATION_PROMPT.format(question=p.question, traces=traces))],
                            SamplingParams(temperature=0.0, max_new_tokens=cs.think_tokens + cs.answer_tokens))[0]
    parsed = parse_integration(g.text)
    if parsed is not None:
        think, ans = parsed[0] + "\n", "\n\n" + parsed[1]
    else:  # no JSON: the raw text, read as reasoning then answer (counted as integration_unparsed)
        think, _, ans = g.text.partition(THINK_CLOSE)
        think = think.split(THINK_PREFIX.strip(), 1)[-1].lstrip("\n")
    traj = Trajectory(THINK_PREFIX + think + THINK_CLOSE + ans, THINK_PREFIX + think + THINK_CLOSE, ans,
                      [((integrator.name,), think)], 0.0, integrator.name, False, g.token_count)
    score = pp(prompt, THINK_PREFIX, [think], p.answer)[0]
    return _row(cfg, p, "cord-integration", prompt, traj, score, time.perf_counter() - t0)


def _merge_failures(into: dict, new: dict) -> None:
    for k, v in new.items():
        if k == "_errors":
            into.setdefault("_errors", []).extend(v[:3])
        else:
            into[k] = into.get(k, 0) + v


def _row(cfg, p, teacher: str, prompt: str, traj, score: float, elapsed: float, step_timings=None) -> dict:
    from accord.prompts import last_boxed
    from accord.verify import check

    res = check(cfg.collect.verifier, p.answer, traj.answer_text or traj.text)
    params = {"pp": score, "steps": [list(n) for n, _ in traj.steps], "step_chars": [len(s) for _, s in traj.steps],
              "writer": traj.writer, "budget_hit": traj.budget_hit, "beam": cfg.cord.beam,
              "segmentation": cfg.cord.segmentation, "selection": cfg.cord.selection,
              "step_timings": step_timings or []}  # per step: [generation s, meta-prover s, candidates]
    return {"problem_id": p.id, "teacher": teacher, "style": "cord", "sample_idx": 0, "params": json.dumps(params),
            "prompt": prompt, "text": traj.text, "reasoning": traj.reasoning, "answer_text": traj.answer_text,
            "parsed_answer": last_boxed(traj.answer_text or traj.text), "verdict": res.verdict,
            "token_count": traj.tokens, "char_count": len(traj.text), "finish_reason": "stop",
            "elapsed_s": elapsed}


def summarize(cfg, store, problems, teachers: list[str], timing: dict, skipped: int, failures: dict,
              unscorable: list[str] = ()) -> dict:
    from accord.verify import CORRECT

    ids = {p.id for p in problems}
    out: dict = {"problems": len(problems), "skipped_no_gold": skipped, "failures": failures,
                 "skipped_unscorable": list(unscorable),  # gold answers the meta-prover's tokenizer cannot write
                 "settings": cfg.cord.model_dump(mode="json"), "timing_this_run": timing}
    steps = []
    for name in ("cord", "cord-curation", "cord-integration"):
        rows = [r for r in store.traces(name) if r["problem_id"] in ids]
        if not rows:
            continue
        params = [json.loads(r["params"] or "{}") for r in rows]
        out[name] = {"n": len(rows), "accuracy": sum(r["verdict"] == CORRECT for r in rows) / len(rows),
                     "mean_pp": sum(x.get("pp", 0.0) for x in params) / len(rows),
                     "mean_tokens": sum(r["token_count"] or 0 for r in rows) / len(rows),
                     "wall_s": sum(r["elapsed_s"] or 0 for r in rows)}
        if name == "cord":
            steps = [[(tuple(n), "") for n in x.get("steps", [])] for x in params if x.get("steps")]
    out["hit_rates"] = hit_rates(steps, teachers)
    gen, mp = timing["cord_generation_s"], timing["cord_meta_prover_s"]
    out["meta_prover_share"] = mp / (gen + mp) if gen + mp else None
    both = "cord" in out and "cord-curation" in out and out["cord-curation"]["wall_s"]
    out["cord_curation_wall_ratio"] = out["cord"]["wall_s"] / out["cord-curation"]["wall_s"] if both else None
    d = Path(cfg.run_dir) / "cord"
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps(out, indent=1))
    plot_hit_rates(out["hit_rates"], d / "hit_rates.png")
    return out


def plot_hit_rates(hr: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(v is not None for vals in hr["teachers"].values() for v in vals):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    bottom = [0.0] * len(hr["bins"])
    for name, vals in hr["teachers"].items():
        v = [x or 0.0 for x in vals]
        ax.bar(hr["bins"], v, width=0.09, bottom=bottom, label=name)
        bottom = [a + b for a, b in zip(bottom, v)]
    ax.set_xlabel("normalised reasoning progress")
    ax.set_ylabel("share of selected steps")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


PIPELINES = ("cord", "cord-curation", "cord-integration")
WHOLE_TRAJECTORY = ("random", "max-length")  # CoRD §5.2.2: these baselines choose among complete traces


def default_meta_prover(cfg, names: list[str], console) -> str:
    """The paper uses the strongest teacher as meta-prover: the best collected accuracy when a collection
    exists (``collect_summary.json``), else the first teacher — with a note saying which and why."""
    p = Path(cfg.run_dir) / "collect_summary.json"
    acc = {}
    if p.exists():
        try:  # a list of per-teacher records (MoT Table 21's columns)
            acc = {r["teacher"]: r["accuracy"] for r in json.loads(p.read_text())
                   if isinstance(r, dict) and r.get("teacher") in names and r.get("accuracy") is not None}
        except (json.JSONDecodeError, TypeError, KeyError):
            acc = {}
    if acc:
        best = max(names, key=lambda n: (acc.get(n, -1.0), -names.index(n)))
        console.print(f"note: meta-prover {best!r} (best collected accuracy, {acc[best]:.1%}); set cord.meta_prover "
                      "to choose")
        return best
    console.print(f"note: meta-prover {names[0]!r} (the first teacher; no collection to rank them); set "
                  "cord.meta_prover to choose — the paper uses the strongest")
    return names[0]


def _write_corpus(cfg, store, problems) -> int:
    """``corpora/<pipeline>.jsonl`` for CoRD and each baseline: ``std:cord-curation`` trains on curation (Table 3)."""
    from accord.collect import _write_jsonl, corpus_row
    from accord.verify import CORRECT

    by_id = {p.id: p for p in problems}
    out = Path(cfg.run_dir) / "corpora"
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in PIPELINES:
        rows = [corpus_row(r, by_id[r["problem_id"]]) for r in store.traces(name)
                if r["problem_id"] in by_id and r["verdict"] == CORRECT]
        if rows or name == "cord":
            _write_jsonl(out / f"{name}.jsonl", rows)
            n += len(rows) if name == "cord" else 0
    return n


def _print(s: dict, console) -> None:
    from rich.table import Table

    t = Table(title="CoRD vs baselines at the same trajectory budget (cf. CoRD Table 2)")
    for col in ("pipeline", "problems", "answer acc.", "mean PP", "mean tokens"):
        t.add_column(col)
    for name in ("cord", "cord-curation", "cord-integration"):
        if name in s:
            r = s[name]
            t.add_row(name, str(r["n"]), f"{r['accuracy']:.1%}", f"{r['mean_pp']:.3f}", f"{r['mean_tokens']:.0f}")
    console.print(t)
    if s.get("meta_prover_share") is not None:
        console.print(f"meta-prover share of CoRD time: {s['meta_prover_share']:.1%}; "
                      f"CoRD/curation wall-time: {s['cord_curation_wall_ratio'] or float('nan'):.2f}")
    if s["skipped_no_gold"]:
        console.print(f"[yellow]skipped[/] {s['skipped_no_gold']} problem(s) without a parsable gold answer")
    fails = {k: v for k, v in s["failures"].items() if k != "_errors"}
    if fails:
        console.print(f"[yellow]failed proposals[/] (dropped, the run went on): {fails}")
