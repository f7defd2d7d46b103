"""`accord cord`, the stage: CoRD — collaborative step-wise multi-teacher decoding (paper 002, §3–§5).

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

Every row records what it was decoded with (``params.decoded_with``: the ``cord`` section but ``limit`` and
``baselines``, and each proposer's model).  A re-run with other settings keeps the problems already decoded,
says how many were decoded otherwise and which settings changed, and the summary says so too;
``accord cord --force`` decodes those problems again (their old rows saved to
``cord/replaced-<time>.jsonl``).  Rows stored before this record compare on the three settings they kept
(beam, segmentation, selection).

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

from accord.analysis.cord import hit_rates, plot_hit_rates
from accord.analysis.stats import mean_se
from accord.collect import _write_jsonl, corpus_row, make_row, open_store, reverify
from accord.cord.decode import THINK_PREFIX, CordSettings, Timing, Trajectory, beam_search, curate, finish, mcts_search
from accord.cord.integration import INTEGRATION_PROMPT, parse_integration
from accord.cord.score import CordError, Scorer
from accord.launch import Share, dealt, gather
from accord.problems import load_problems
from accord.prompts import THINK_CLOSE, render_prompt
from accord.registry import STEP_SCORERS
from accord.teachers.base import Generation, Request, SamplingParams, load_generator
from accord.ui import progress
from accord.verify import CORRECT, gold_is_readable


def settings(cfg) -> CordSettings:
    """The decoder's settings: the fields of ``CordSettings`` read from the ``cord`` config section."""
    from dataclasses import fields

    return CordSettings(**{f.name: getattr(cfg.cord, f.name) for f in fields(CordSettings)})


CORD_TEACHERS = ("cord", "cord-curation", "cord-integration")  # the rows the stage stores, per problem
NOT_DECODING = {"limit", "baselines"}  # which problems and which rows, not how a trajectory is decoded


def decoded_with(cfg) -> dict:
    """What a trajectory is decoded with: the ``cord`` section (but :data:`NOT_DECODING`) and each proposer's
    model; stored in every row's ``params``."""
    out = cfg.cord.model_dump(mode="json", exclude=NOT_DECODING)
    out["proposers"] = {t.name: t.model for t in cfg.teachers if t.backend != "column"}
    return out


def other_decodings(cfg, store, problems) -> tuple[set[str], str]:
    """The problems among ``problems`` whose stored rows were decoded with other settings than the config's, and
    what changed (``beam: 4 → 8; …``).  A row from before ``decoded_with`` was recorded compares on the settings
    it kept (beam, segmentation, selection)."""
    now, ids = decoded_with(cfg), {p.id for p in problems}
    stale, changes = set(), {}
    marks = ",".join("?" * len(CORD_TEACHERS))
    for r in store.traces(where=f"teacher IN ({marks})", args=CORD_TEACHERS):
        if r["problem_id"] not in ids:
            continue
        params = json.loads(r["params"] or "{}")
        was = params.get("decoded_with") or {k: params[k] for k in ("beam", "segmentation", "selection")
                                             if k in params}
        keys = sorted(set(was) | set(now)) if "decoded_with" in params else sorted(was)
        for k in keys:
            if was.get(k) != now.get(k):
                stale.add(r["problem_id"])
                changes.setdefault(f"{k}: {was.get(k)!r} → {now.get(k)!r}", None)
    return stale, "; ".join(changes)


def _decode_again(cfg, store, stale: set[str], console) -> Path:
    """``--force``: the rows of the ``stale`` problems out of the store, kept in ``cord/replaced-<time>.jsonl``."""
    marks = ",".join("?" * len(CORD_TEACHERS))
    ids = [r["row_id"] for r in store.traces(where=f"teacher IN ({marks})", args=CORD_TEACHERS)
           if r["problem_id"] in stale]
    out = Path(cfg.run_dir) / "cord" / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out, store.take_out(ids))
    console.print(f"--force: {len(stale):,} problem(s) decoded with other settings are decoded again; their "
                  f"{len(ids):,} stored row(s) are kept in {out}")
    return out


def load_cord_problems(cfg) -> list:
    """The problems CoRD decodes: the config's, the first ``cord.limit`` of them."""
    problems = load_problems(cfg.problems)
    return problems[: cfg.cord.limit] if cfg.cord.limit else problems


def run(cfg, console, share: Share | None = None, force: bool = False) -> dict:
    """``share``: one of several processes (``accelerate launch -m accord.cli cord``): the problems are dealt out in
    turn, each process decoding with its own copies of the teachers on its own device into the one store; process
    0 writes the corpus and the summary (with every process's timings and counts) and returns it, the others {}.
    ``force``: problems decoded with other settings (:func:`other_decodings`) are decoded again."""
    c, cs = cfg.cord, settings(cfg)
    problems = load_cord_problems(cfg)
    run_dir = Path(cfg.run_dir)
    main = share is None or share.rank == 0
    store = open_store(run_dir, problems, share)
    if main and (found := other_decodings(cfg, store, problems))[0]:
        if force:
            _decode_again(cfg, store, found[0], console)
        else:
            console.print(f"[yellow]warning[/]: {len(found[0]):,} problem(s) were decoded with other settings "
                          f"({found[1]}): kept, and counted in the summary; `accord cord --force` decodes them again")
    if share is not None:
        share.wait()  # every process reads what is decoded after --force took the old rows out
    gen_cfgs = [t for t in cfg.teachers if t.backend != "column"]
    if not gen_cfgs:
        raise CordError("cord needs teachers that generate (not only `column` imports)")
    teachers = {t.name: load_generator(t) for t in gen_cfgs}
    integrator = load_generator(c.integrator) if c.integrator and "integration" in c.baselines else None
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
        mine = dealt(problems, share)
        task = bar.add_task("cord" + (f" ({len(mine)} of {len(problems)} problems here)" if share else ""),
                            total=len(mine))
        for p in mine:
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
    # how much each hf teacher's prefix cache saved (``Generator.cache_stats``; other backends have none)
    timing["prefix_cache"] = {n: st for n, t in teachers.items() if (st := getattr(t, "cache_stats", lambda: None)())}
    for t in [*teachers.values(), *([integrator] if integrator else [])]:
        t.close()
    if share is not None:  # every process's counts and timings (a collective: every process is done here)
        timing, skipped, failures, unscorable = _pooled(gather({share.rank: (timing, skipped, failures, unscorable)}))
    if not main:
        store.close()
        return {}
    reverify(cfg, store, [p for p in problems if _gold_ok(p.answer, cfg.collect.verifier)], console)
    summary = summarize(cfg, store, problems, list(teachers), timing, skipped, failures, unscorable)
    _write_corpus(cfg, store, problems)
    store.close()
    _print(summary, console)
    return summary


def _pooled(parts: dict) -> tuple[dict, int, dict, list]:
    """The processes' (timing, skipped, failures, unscorable) as one: times and counts summed (the prefix caches'
    too), failures merged, unscorable ids joined."""
    timing: dict = {}
    skipped, failures, unscorable = 0, {}, []
    for rank in sorted(parts):
        t, s, f, u = parts[rank]
        for k, v in t.items():
            if k == "prefix_cache":
                cache = timing.setdefault(k, {})
                for name, st in v.items():
                    cache[name] = {key: cache.get(name, {}).get(key, 0) + x for key, x in st.items()}
            else:
                timing[k] = timing.get(k, 0.0) + v
        skipped += s
        _merge_failures(failures, f)
        unscorable += u
    return timing, skipped, failures, unscorable


def _gold_ok(answer: str, verifier: str) -> bool:
    return bool(answer and str(answer).strip()) and gold_is_readable(verifier, answer)


def _one_problem(cfg, teachers, scorer, pp, prompt, p, cs, timing, failures, integrator=None) -> list[dict]:
    c = cfg.cord
    t0, tm = time.perf_counter(), Timing()
    s0 = scorer.seconds
    if STEP_SCORERS[c.selection].whole_trajectory:  # the paper's Random / Max-length: picked among finished traces
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
    body = traj.reasoning[len(THINK_PREFIX):-len(THINK_CLOSE)]
    if pp is scorer and traj.score != float("-inf"):
        return traj.score
    return pp(prompt, THINK_PREFIX, [body], answer)[0]


def _integrate(cfg, integrator, pp, prompt, p, pool, cs) -> dict:
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
    """A trajectory as a trace-store row — the same row ``collect`` writes (``collect.make_row``), with
    CoRD's own record in ``params``."""
    params = {"pp": score, "steps": [list(n) for n, _ in traj.steps], "step_chars": [len(s) for _, s in traj.steps],
              "writer": traj.writer, "budget_hit": traj.budget_hit, "beam": cfg.cord.beam,
              "segmentation": cfg.cord.segmentation, "selection": cfg.cord.selection,
              "step_timings": step_timings or [],  # per step: [generation s, meta-prover s, candidates]
              "decoded_with": decoded_with(cfg)}
    g = Generation(text=traj.text, token_count=traj.tokens, finish_reason="stop", elapsed_s=elapsed)
    return make_row(cfg, teacher, "cord", p, 0, prompt, g, json.dumps(params))


def summarize(cfg, store, problems, teachers: list[str], timing: dict, skipped: int, failures: dict,
              unscorable: list[str] = ()) -> dict:
    ids = {p.id for p in problems}
    out: dict = {"problems": len(problems), "skipped_no_gold": skipped, "failures": failures,
                 "skipped_unscorable": list(unscorable),  # gold answers the meta-prover's tokenizer cannot write
                 "settings": cfg.cord.model_dump(mode="json"), "timing_this_run": timing}
    stale, what = other_decodings(cfg, store, problems)  # rows counted below that ``settings`` did not decode
    out["decoded_otherwise"] = {"problems": len(stale), "changes": what} if stale else None
    steps = []
    for name in ("cord", "cord-curation", "cord-integration"):
        rows = [r for r in store.traces(name) if r["problem_id"] in ids]
        if not rows:
            continue
        params = [json.loads(r["params"] or "{}") for r in rows]
        acc, acc_se = mean_se([float(r["verdict"] == CORRECT) for r in rows])
        pp, pp_se = mean_se([x.get("pp", 0.0) for x in params])
        out[name] = {"n": len(rows), "accuracy": acc, "accuracy_se": acc_se, "mean_pp": pp, "mean_pp_se": pp_se,
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


PIPELINES = ("cord", "cord-curation", "cord-integration")


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
    for col in ("pipeline", "problems", "answer acc. ± SE", "mean PP ± SE", "mean tokens"):
        t.add_column(col)
    for name in ("cord", "cord-curation", "cord-integration"):
        if name in s:
            r = s[name]
            t.add_row(name, str(r["n"]), f"{r['accuracy']:.1%} ± {(r.get('accuracy_se') or 0):.1%}",
                      f"{r['mean_pp']:.3f} ± {(r.get('mean_pp_se') or 0):.3f}", f"{r['mean_tokens']:.0f}")
    console.print(t)
    if s.get("meta_prover_share") is not None:
        console.print(f"meta-prover share of CoRD time: {s['meta_prover_share']:.1%}; "
                      f"CoRD/curation wall-time: {s['cord_curation_wall_ratio'] or float('nan'):.2f}")
    if pc := s["timing_this_run"].get("prefix_cache"):
        console.print("prefix cache (prompt tokens not re-encoded): "
                      + ", ".join(f"{n} {v['tokens_reused']:,} over {v['rows']:,} rows" for n, v in pc.items()))
    if s.get("decoded_otherwise"):
        console.print(f"[yellow]note[/]: {s['decoded_otherwise']['problems']:,} problem(s) in this table were decoded "
                      f"with other settings ({s['decoded_otherwise']['changes']}); `accord cord --force` decodes "
                      "them again")
    if s["skipped_no_gold"]:
        console.print(f"[yellow]skipped[/] {s['skipped_no_gold']} problem(s) without a parsable gold answer")
    fails = {k: v for k, v in s["failures"].items() if k != "_errors"}
    if fails:
        console.print(f"[yellow]failed proposals[/] (dropped, the run went on): {fails}")
