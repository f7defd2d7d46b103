"""CoRD: segmentation, the meta-prover score, beam search, budgets, failures, and `accord cord` end to end."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import run_cli, write_jsonl

from accord.analysis.cord import hit_rates
from accord.cord.decode import CordSettings, Timing, beam_search, finish
from accord.cord.score import (
    CordError,
    Scorer,
    full_sequence_score,
    predictive_perplexity_cached,
)
from accord.cord.segment import split_steps
from accord.teachers.base import Generation

# ------------------------------------------------------------------------------------ segmentation


def test_prompt_segmentation():
    t = "intro\n### Step 1\nread it\n\nthink\n### Step 2\nwait, check\n"
    assert split_steps(t, "prompt") == ["intro\n", "### Step 1\nread it\n\nthink\n", "### Step 2\nwait, check\n"]


def test_line_break_segmentation():
    t = "a b\n\nc\nd\n\n\ne"
    steps = split_steps(t, "line-break")
    assert steps == ["a b\n\n", "c\nd\n\n", "\ne"] and "".join(steps) == t


def test_prefix_segmentation():
    t = "x is 3. Wait, that is wrong.\nLet me check: 3+4=7.\nalternatively use y. Awaiting nothing."
    steps = split_steps(t, "prefix")
    assert steps == ["x is 3. ", "Wait, that is wrong.\n", "Let me check: 3+4=7.\n",
                     "alternatively use y. Awaiting nothing."]  # "Awaiting" is not the marker "wait"


# ------------------------------------------------------------------------------------ the score


def test_cached_score_equals_direct_logits(micro):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accord.teachers.hf import render_chat

    model, tok = AutoModelForCausalLM.from_pretrained(micro).eval(), AutoTokenizer.from_pretrained(micro)

    class Meta:
        name, cfg = "m", type("C", (), {"system_prompt": None})()

    Meta.model, Meta.tok = model, tok
    prefix = "<think>\n### Step 1\n(1) 3>4\n"
    cands = ["### Step 2\n(2) 4>9\n", "x", "### Step 2\nlonger candidate text here\n"]
    got = predictive_perplexity_cached(Meta, "Start at 3.", prefix, cands, "9")
    head = render_chat(tok, "Start at 3.", prefix)
    want = [full_sequence_score(model, tok, head, c, "9") for c in cands]
    assert all(0.0 <= g <= 1.0 for g in got)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_one_step_of_several_beams_is_scored_at_once_and_equals_direct_logits(micro):
    """Prefixes of different lengths (left-padded into one cache) and a beam with one candidate: every score
    equals the uncached full-sequence one, and the scorer runs once per step, not once per beam."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accord.teachers.hf import render_chat

    model, tok = AutoModelForCausalLM.from_pretrained(micro).eval(), AutoTokenizer.from_pretrained(micro)

    class Meta:
        name, cfg = "m", type("C", (), {"system_prompt": None})()

    Meta.model, Meta.tok = model, tok
    groups = [("<think>\n", ["(1) 3>4\n", "### Step 1\n(1) 3>4 4>9 9>2 2>6\n"]),
              ("<think>\n### Step 1\n(1) 3>4\n### Step 2\n(2) 4>9 and a much longer prefix\n", ["x"]),
              ("<think>\n(1)", ["", " 3>4\n", "\n\n"])]
    s = Scorer("predictive-perplexity", Meta)
    got = s.many("Start at 3.", groups, "9")
    want = [[full_sequence_score(model, tok, render_chat(tok, "Start at 3.", pre), c, "9") for c in cands]
            for pre, cands in groups]
    assert [len(g) for g in got] == [2, 1, 3]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-7)
    assert s.calls == 1
    assert s("Start at 3.", *groups[1], "9") == pytest.approx(want[1], rel=1e-4, abs=1e-7)


def test_a_meta_prover_that_proposed_the_step_scores_from_its_own_prefix_cache(micro):
    """The meta-prover is a teacher: after it continued the beams' prefixes, scoring them starts from those
    cached states — and the scores still equal the uncached full-sequence ones."""
    from accord.config import TeacherConfig
    from accord.teachers.base import Request, SamplingParams
    from accord.teachers.hf import HFGenerator, render_chat

    meta = HFGenerator(TeacherConfig(name="m", model=str(micro)))
    prefixes = ["<think>\n### Step 1\n(1) 3>4\n", "<think>\n### Step 1\n(1) 3>4 4>9 9>2 and more words\n"]
    meta.generate([Request("Start at 3.", prefix=p + "### Step 2\n") for p in prefixes],
                  SamplingParams(temperature=0.0, max_new_tokens=6))
    hits = meta._prefix.hits
    groups = [(p, ["(2) 4>9\n", "x"]) for p in prefixes]
    got = Scorer("predictive-perplexity", meta).many("Start at 3.", groups, "9")
    assert meta._prefix.hits == hits + 2  # both prefixes came from the cache
    want = [[full_sequence_score(meta.model, meta.tok, render_chat(meta.tok, "Start at 3.", p), c, "9") for c in cs]
            for p, cs in groups]
    # bf16 weights (`dtype: auto` with CUDA visible): a cached prefix and the full sequence run products of other
    # shapes, so they round apart as padded and unpadded rows do (tests/test_teacher_hf.py's score test)
    tol = dict(rel=1e-4, abs=1e-7) if meta.model.dtype == torch.float32 else dict(rel=3e-2, abs=3e-2)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, **tol)


def test_cached_score_with_an_empty_suffix_and_an_empty_candidate(micro):
    """A template ``{answer}`` (no suffix) and an empty step: the head's own last logit predicts the answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accord.teachers.hf import render_chat

    model, tok = AutoModelForCausalLM.from_pretrained(micro).eval(), AutoTokenizer.from_pretrained(micro)

    class Meta:
        name, cfg = "m", type("C", (), {"system_prompt": None})()

    Meta.model, Meta.tok = model, tok
    cands = ["", "(2) 4>9\n"]
    got = predictive_perplexity_cached(Meta, "Start at 3.", "<think>\n", cands, "9", suffix="", lead="")
    head = render_chat(tok, "Start at 3.", "<think>\n")
    want = [full_sequence_score(model, tok, head, c, "9", suffix="", lead="") for c in cands]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_score_is_higher_when_the_prefix_makes_the_answer_likelier(tmp_path):
    from accord.config import TeacherConfig
    from accord.lab.micro import build_parrot
    from accord.teachers.hf import HFGenerator

    build_parrot(tmp_path / "p", "<think>\nfollow the links\n</think> The final answer is 7", seed=4, steps=200)
    meta = HFGenerator(TeacherConfig(name="mp", model=str(tmp_path / "p")))
    s = Scorer("predictive-perplexity", meta)
    good, bad = s("What is 3+4?", "<think>\n", ["follow the links\n", "zz qq xx\n"], "7")
    assert 0 <= bad < good <= 1 and good > 0.5


def test_meta_prover_that_cannot_encode_the_answer():
    class Tok:
        unk_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [0 if ch == "∮" else 5 for ch in text]}

        def decode(self, ids):
            return "".join("?" if i == 0 else " " for i in ids)

    class Meta:
        name, tok = "mp", Tok()

    why = Scorer("predictive-perplexity", Meta()).answer_problem("∮")
    assert "cannot encode the answer '∮'" in why and "'mp'" in why
    assert Scorer("random", Meta()).answer_problem("∮") is None  # only the perplexity score needs it


# ------------------------------------------------------------------------------------ search


class Scripted:
    """A fake teacher: at step n it proposes ``steps[n-1]``; after the last one it closes </think>."""

    def __init__(self, name, steps, fail_at=None, close=True):
        self.name, self.steps, self.fail_at, self.close = name, steps, fail_at, close
        self.calls = 0

    def generate(self, reqs, params):
        self.calls += 1
        out = []
        for r in reqs:
            if "</think>" in r.prefix:
                out.append(Generation(text=f"\n\\boxed{{{self.name}}}", token_count=3))
                continue
            n = r.prefix.count("### Step")
            if self.fail_at == n:
                out.append(Generation(text="", error="server error"))
            elif n <= len(self.steps):
                out.append(Generation(text=f"{self.steps[n - 1]}\n", token_count=4, stop_string="### Step"))
            elif self.close:
                out.append(Generation(text="done\n", token_count=2, stop_string="</think>"))
            else:
                out.append(Generation(text="more\n", token_count=4, stop_string="### Step"))
        return out


def by_text(pref: dict):
    """A scorer from a table: the extended prefix's score is the sum of its steps' preferences."""
    def score(prompt, prefix, cands, answer):
        return [sum(pref.get(line, 0.0) for line in (prefix + c).splitlines()) for c in cands]
    return score


def greedy_reference(teachers, score, max_steps):
    text, steps = "", []
    for n in range(1, max_steps + 1):
        props = []
        for name, t in teachers.items():
            g = t.generate([type("R", (), {"prefix": "<think>\n" + text + f"### Step {n}\n"})()], None)[0]
            props.append((f"### Step {n}\n" + g.text, name, g))
        s = score("", "<think>\n" + text, [p[0] for p in props], "")
        best = max(range(len(props)), key=lambda i: (s[i], -i))
        text += props[best][0]
        steps.append(props[best][1])
        if props[best][2].stop_string == "</think>":
            break
    return text, steps


def test_beam_of_one_is_greedy():
    teachers = {"a": Scripted("a", ["a1", "a2", "a3"]), "b": Scripted("b", ["b1", "b2"])}
    pref = {"a1": 1.0, "b1": 0.5, "b2": 2.0, "a2": 0.1, "a3": 0.3, "done": 0.2}
    cs = CordSettings(beam=1, max_steps=6)
    got = beam_search(teachers, by_text(pref), "q", "x", cs, Timing())
    text, steps = greedy_reference(teachers, by_text(pref), 6)
    assert got.text == text and [n[0] for n, _ in got.steps] == steps


def test_a_scorer_that_prefers_one_teacher_selects_only_its_steps():
    teachers = {"a": Scripted("a", ["a1", "a2", "a3"]), "b": Scripted("b", ["b1", "b2", "b3"]),
                "c": Scripted("c", ["c1", "c2", "c3"])}
    pref = {f"b{i}": 5.0 for i in range(1, 4)}
    best = beam_search(teachers, by_text(pref), "q", "x", CordSettings(beam=3, max_steps=8), Timing())
    assert best.done and all(names == ("b",) for names, _ in best.steps[:3])
    hr = hit_rates([best.steps], list(teachers))
    for i in range(len(hr["bins"])):
        vals = [hr["teachers"][t][i] for t in teachers]
        if vals[0] is not None:
            assert sum(vals) == pytest.approx(1.0)


def test_identical_proposals_are_merged_and_share_credit():
    teachers = {"a": Scripted("a", ["same"]), "b": Scripted("b", ["same"])}
    best = beam_search(teachers, by_text({"same": 1.0}), "q", "x", CordSettings(beam=4, max_steps=3), Timing())
    assert best.steps[0][0] == ("a", "b")
    hr = hit_rates([best.steps], ["a", "b"])
    b = int((0 + 0.5) / len(best.steps) * 10)  # the progress bin of the first step
    assert [hr["teachers"][t][b] for t in ("a", "b")] == [0.5, 0.5]


def test_budget_ends_with_think_closed_and_an_answer():
    teachers = {"a": Scripted("a", [], close=False)}
    cs = CordSettings(beam=2, max_steps=50, think_tokens=10)
    tm = Timing()
    best = beam_search(teachers, by_text({}), "q", "x", cs, tm)
    assert best.budget_hit and best.tokens >= 10 and len(best.steps) == 3
    traj = finish(teachers, "q", best, cs, tm)
    assert traj.reasoning.endswith("</think>") and traj.reasoning.count("</think>") == 1
    assert traj.answer_text == "\n\\boxed{a}" and traj.writer == "a"


def test_failing_teacher_is_dropped_and_counted():
    teachers = {"a": Scripted("a", ["a1", "a2"], fail_at=2), "b": Scripted("b", ["b1", "b2"])}
    tm = Timing()
    best = beam_search(teachers, by_text({"a1": 3.0, "a2": 9.0}), "q", "x", CordSettings(beam=1, max_steps=5), tm)
    assert tm.failures == {"a": 1}
    assert [n for n, _ in best.steps][:2] == [("a",), ("b",)]


class Recorder:
    """Proposes one fixed step and records every request's seed."""

    def __init__(self, name):
        self.name, self.seeds = name, []

    def generate(self, reqs, params):
        self.seeds += [(r.prompt, r.prefix.count("### Step"), r.seed) for r in reqs]
        return [Generation(text=f"{self.name} {len(self.seeds)} {i}\n", token_count=2, stop_string="### Step")
                for i, _ in enumerate(reqs)]


def test_proposal_seeds_differ_across_beams_and_problems():
    a, b = Recorder("a"), Recorder("b")
    for prompt in ("problem one", "problem two"):
        beam_search({"a": a, "b": b}, by_text({}), prompt, "x", CordSettings(beam=2, max_steps=3), Timing())
    step2 = [(p, s) for p, n, s in a.seeds if n == 2]
    assert len(step2) == 4 and len({s for _, s in step2}) == 4  # 2 beams × 2 problems, all different
    assert not {s for _, s in step2} & {s for _, n, s in b.seeds if n == 2}  # teachers differ too
    again = Recorder("a")
    for prompt in ("problem one", "problem two"):
        beam_search({"a": again, "b": Recorder("b")}, by_text({}), prompt, "x", CordSettings(beam=2, max_steps=3),
                    Timing())
    assert again.seeds == a.seeds  # and a fixed seed reproduces them


def test_equal_scores_are_not_always_won_by_the_first_teacher():
    wins = []
    for i in range(24):
        teachers = {"a": Scripted("a", ["a1"]), "b": Scripted("b", ["b1"])}
        best = beam_search(teachers, lambda p, pre, c, a: [0.0] * len(c), f"q{i}", "x",
                           CordSettings(beam=1, max_steps=1), Timing())
        wins.append(best.steps[0][0][0])
    assert 4 <= wins.count("b") <= 20  # a seeded draw, not list order


def test_curation_is_held_to_cords_budget():
    """A roll-out that never closes its reasoning is force-closed at think_tokens and still answers."""
    from accord.cord.decode import curate

    class Rambler:
        name = "r"

        def __init__(self):
            self.params = []

        def generate(self, reqs, params):
            self.params.append(params)
            if "</think>" in reqs[0].prefix:
                return [Generation(text="\n\\boxed{7}", token_count=3) for _ in reqs]
            return [Generation(text="and so on " * 5, token_count=params.max_new_tokens, finish_reason="length")
                    for _ in reqs]

    t = Rambler()
    cs = CordSettings(beam=2, think_tokens=10, answer_tokens=5)
    picked, pool = curate({"r": t}, lambda p, pre, c, a: [0.5] * len(c), "q", "7", cs, Timing(), rollouts=2)
    assert len(pool) == 2 and t.params[0].max_new_tokens == 10 and "</think>" in t.params[0].stop
    assert t.params[1].max_new_tokens == 5 and t.params[1].temperature == 0.0
    assert picked.reasoning.endswith("</think>") and picked.answer_text == "\n\\boxed{7}" and picked.budget_hit


# ------------------------------------------------------------------------------------ end to end


def test_accord_cord_end_to_end(tmp_path, problems_file, parrot7, parrot8):
    rows = [json.loads(x) for x in problems_file.read_text().splitlines()] + [{"question": "no gold", "answer": ""}]
    probs = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = {"run_dir": str(tmp_path / "run"), "problems": {"path": str(probs)},
           "teachers": [{"name": "seven", "model": str(parrot7)}, {"name": "eight", "model": str(parrot8)}],
           "cord": {"beam": 2, "max_steps": 4, "step_tokens": 24, "think_tokens": 48, "answer_tokens": 16,
                    "meta_prover": "eight", "segmentation": "line-break",
                    "baselines": ["curation", "integration"], "integrator": {"name": "merger", "model": str(parrot7)}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out = run_cli("cord", str(path))
    assert code == 0, out
    run = tmp_path / "run"
    s = json.loads((run / "cord" / "summary.json").read_text())
    assert s["cord"]["n"] == 10 and s["cord-curation"]["n"] == 10 and s["skipped_no_gold"] == 1
    assert s["cord-integration"]["n"] == 10  # the integrator (a parrot here) merged the teachers' traces
    import sqlite3

    params = json.loads(sqlite3.connect(run / "traces.sqlite").execute(
        "select params from traces where teacher='cord' limit 1").fetchone()[0])
    assert params["step_timings"] and all(len(t) == 3 for t in params["step_timings"])
    assert 0 <= s["cord"]["mean_pp"] <= 1 and 0 <= s["meta_prover_share"] <= 1
    acc, n = s["cord"]["accuracy"], s["cord"]["n"]  # every rate with its standard error over problems
    assert s["cord"]["accuracy_se"] == pytest.approx((acc * (1 - acc) / (n - 1)) ** 0.5)
    assert s["cord"]["mean_pp_se"] is not None and "answer acc. ± SE" in out
    pc = s["timing_this_run"]["prefix_cache"]  # the hf teachers' continuations started from cached states
    assert set(pc) == {"seven", "eight"} and all(v["rows"] > 0 and v["tokens_reused"] > 0 for v in pc.values()), pc
    assert "prefix cache (prompt tokens not re-encoded)" in out
    corpus = [json.loads(x) for x in (run / "corpora" / "cord.jsonl").read_text().splitlines()]
    assert corpus and all(r["teacher"] == "cord" for r in corpus)
    assert all(r["completion"].count("</think>") == 1 for r in corpus)
    cur = [json.loads(x) for x in (run / "corpora" / "cord-curation.jsonl").read_text().splitlines()]
    assert cur and all(r["teacher"] == "cord-curation" for r in cur)  # std:cord-curation can train on it
    # Random selection picks among whole trajectories (curation-style), not step by step
    code, out = run_cli("cord", str(path), "cord.selection=random", f"run_dir={tmp_path / 'rand'}", "cord.limit=2")
    assert code == 0, out
    rows = sqlite3.connect(tmp_path / "rand" / "traces.sqlite").execute(
        "select params from traces where teacher='cord'").fetchall()
    assert len(rows) == 2 and all(len(json.loads(r[0])["steps"]) == 1 for r in rows)  # one writer, one piece
    code, out = run_cli("cord", str(path))
    assert code == 0 and "other settings" not in out
    assert json.loads((run / "cord" / "summary.json").read_text())["cord"]["n"] == 10  # nothing redone
    # other settings: what is stored is kept, and said so (the plan, the run, the summary); --force decodes again
    db = sqlite3.connect(run / "traces.sqlite")
    stamps = lambda: {(r[0], r[1]): json.loads(r[2])["decoded_with"]["step_tokens"]
                      for r in db.execute("select problem_id, teacher, params from traces where teacher like 'cord%'")}
    assert len(stamps()) == 30 and set(stamps().values()) == {24}  # cord, curation, integration × 10 problems
    code, out = run_cli("cord", str(path), "cord.step_tokens=20", "--plan")
    assert code == 0 and "10 of the decoded problems were decoded with other settings (step_tokens: 24 → 20)" in out
    code, out = run_cli("cord", str(path), "cord.step_tokens=20")
    assert code == 0 and "10 problem(s) were decoded with other settings (step_tokens: 24 → 20): kept" in out, out
    s = json.loads((run / "cord" / "summary.json").read_text())
    assert s["cord"]["n"] == 10 and s["decoded_otherwise"] == {"problems": 10, "changes": "step_tokens: 24 → 20"}
    code, out = run_cli("cord", str(path), "cord.step_tokens=20", "cord.limit=2", "--force")
    assert code == 0 and "2 problem(s) decoded with other settings are decoded again" in out, out
    again = [pid for (pid, _), v in stamps().items() if v == 20]
    assert len(again) == 6 and len(set(again)) == 2 and len(stamps()) == 30  # the other 8 problems' rows untouched
    replaced = [json.loads(x) for f in (run / "cord").glob("replaced-*.jsonl") for x in f.read_text().splitlines()]
    assert len(replaced) == 6 and all(json.loads(r["params"])["decoded_with"]["step_tokens"] == 24 for r in replaced)
    from accord.analysis.report import write_report
    from accord.config import load_config

    html = write_report(load_config(path), [], []).read_text()
    assert "CoRD Table 2" in html and "<td>cord-curation</td>" in html
    assert (run / "report" / "cord-hit-rates.png").exists()


def test_answer_templates():
    from accord.cord.score import split_template

    assert split_template("</think> The final answer is {answer}.") == ("</think> The final answer is", " ")
    assert split_template("</think>\n\n\\boxed{{answer}}") == ("</think>\n\n\\boxed{", "")
    with pytest.raises(CordError, match="placeholder"):
        split_template("</think> no slot")


def test_mcts_baseline_spends_the_trajectory_budget_and_follows_the_score():
    from accord.cord.decode import mcts_search

    teachers = {"a": Scripted("a", ["a1", "a2", "a3"]), "b": Scripted("b", ["b1", "b2", "b3"])}
    calls = []

    def score(prompt, prefix, cands, answer):
        calls.append(len(cands))
        return [min(1.0, 0.1 + 0.3 * (prefix + c).count("b")) for c in cands]

    best = mcts_search(teachers, score, "q", "x", CordSettings(beam=3, max_steps=8), Timing())
    assert best.done and best.steps[0][0] == ("b",)  # the first step the score prefers
    assert calls.count(1) == 3  # three complete trajectories scored: the budget


def test_integration_json_is_read_back_and_a_teacher_name_is_refused(tmp_path):
    from accord.config import AccordConfig
    from accord.cord.integration import INTEGRATION_PROMPT, parse_integration

    text = ('Sure.\n{"integrated_step2": {"content": "### Step 2. 7 * 2 = 4", "category": "Progressive"},\n'
            '"integrated_step1": {"content": "### Step 1. 3 + 4 = 7", "category": "Progressive"},\n'
            '"answer_part": ["\\\\boxed{4}"]}')
    assert parse_integration(text) == ("### Step 1. 3 + 4 = 7\n### Step 2. 7 * 2 = 4", "\\boxed{4}")
    assert parse_integration("no json here") is None
    prompt = INTEGRATION_PROMPT.format(question="Start at 3.", traces="<reasoning_step_1> a </reasoning_step_1>")
    assert "Question: Start at 3." in prompt and '"answer_part"' in prompt and "Error Correction Pattern" in prompt
    base = {"problems": {"path": "p.jsonl"}, "teachers": [{"name": "a", "model": "m"}]}
    with pytest.raises(Exception, match="its own model entry"):
        AccordConfig.model_validate({**base, "cord": {"integrator": "a"}})
    cfg = AccordConfig.model_validate({**base, "cord": {"integrator": {"name": "merger", "backend": "openai",
                                                                        "model": "gpt-5-mini", "base_url": "https://api.openai.com/v1"}}})
    assert cfg.cord.integrator.name == "merger" and [t.name for t in cfg.teachers] == ["a"]


def test_meta_prover_defaults_to_the_best_collected_teacher(tmp_path):
    from accord.cord.stage import default_meta_prover

    class Cfg:
        run_dir = str(tmp_path)

    notes = []
    con = type("C", (), {"print": lambda self, m: notes.append(m)})()
    assert default_meta_prover(Cfg, ["a", "b"], con) == "a" and "first teacher" in notes[-1]
    (tmp_path / "collect_summary.json").write_text(json.dumps([{"teacher": "a", "accuracy": 0.5},
                                                               {"teacher": "b", "accuracy": 0.8}]))
    assert default_meta_prover(Cfg, ["a", "b"], con) == "b" and "80.0%" in notes[-1]


def test_per_teacher_temperature_and_whole_trajectory_selection():
    """CoRD's homogeneous setup samples one model at several temperatures; Random / Max-length pick among
    complete trajectories (curation-style), not step by step."""
    from accord.cord.decode import _propose

    class T:
        def __init__(self, name, temperature):
            self.name, self.cfg, self.params = name, type("C", (), {"temperature": temperature})(), []

        def generate(self, reqs, params):
            self.params.append(params)
            return [Generation(text="x\n", token_count=1, stop_string="### Step") for _ in reqs]

    from accord.cord.decode import Beam

    ts = {"cold": T("cold", 0.5), "default": T("default", None)}
    _propose(ts, "q", [Beam()], CordSettings(temperature=0.6), 1, Timing(), 0)
    assert ts["cold"].params[0].temperature == 0.5 and ts["default"].params[0].temperature == 0.6


def test_teachers_behind_servers_are_asked_at_once_with_the_same_result():
    """``openai``-backend teachers propose from threads (a step waits for the slowest, not the sum); hf-backend
    ones stay in this thread; the search's result is the same either way."""
    import threading
    import time as _time

    class Served(Scripted):
        def __init__(self, name, steps, backend):
            super().__init__(name, steps)
            self.cfg = type("C", (), {"backend": backend, "temperature": None})()
            self.threads = set()

        def generate(self, reqs, params):
            self.threads.add(threading.get_ident())
            _time.sleep(0.15)  # a server's latency
            return super().generate(reqs, params)

    def run(backend):
        teachers = {n: Served(n, [f"{n}1", f"{n}2"], backend) for n in "abcd"}
        t0 = _time.perf_counter()
        best = beam_search(teachers, by_text({"c1": 2.0, "a2": 1.0}), "q", "x", CordSettings(beam=2, max_steps=3),
                           Timing())
        return best, _time.perf_counter() - t0, teachers

    served, t_served, ts = run("openai")
    local, t_local, tl = run("hf")
    assert served.text == local.text and served.steps == local.steps
    steps = len(served.steps)
    assert t_served < 0.6 * t_local and t_local >= 4 * 0.15 * steps  # 4 teachers: the sum vs about the slowest
    main = threading.get_ident()
    assert all(t.threads == {main} for t in tl.values())
    assert any(t.threads != {main} for t in ts.values())


def test_rows_from_before_the_decoding_record_compare_on_the_settings_they_kept(tmp_path):
    """A CoRD row stored before ``decoded_with`` existed kept beam, segmentation and selection in its params: a
    change there is found, a change elsewhere cannot be (and is not made up); a recorded row compares on all."""
    from accord.config import AccordConfig
    from accord.cord.stage import decoded_with, other_decodings
    from accord.problems import Problem
    from accord.store import TraceStore

    def cfg(**cord):
        return AccordConfig.model_validate({"problems": {"path": "p.jsonl"}, "run_dir": str(tmp_path),
                                            "teachers": [{"name": "a", "model": "m"}], "cord": cord})

    old = {"pp": 0.5, "steps": [], "beam": 4, "segmentation": "line-break", "selection": "predictive-perplexity"}
    store = TraceStore(tmp_path / "traces.sqlite")
    store.put_traces([{"problem_id": pid, "teacher": "cord", "style": "cord", "sample_idx": 0, "params": json.dumps(p),
                       "text": "t", "verdict": "correct"}
                      for pid, p in (("p0", old), ("p1", {**old, "decoded_with": decoded_with(cfg(beam=4))}))])
    problems = [Problem("p0", "q", "1"), Problem("p1", "q", "1")]
    found = other_decodings(cfg(beam=4, segmentation="line-break"), store, problems)
    assert found == ({"p1"}, "segmentation: 'prompt' → 'line-break'")  # p0 kept only what matches
    assert other_decodings(cfg(beam=8, segmentation="line-break"), store, problems)[0] == {"p0", "p1"}
    assert other_decodings(cfg(beam=4, segmentation="line-break"), store, problems[:1]) == (set(), "")
    assert other_decodings(cfg(), store, problems)[0] == {"p0"}  # the default segmentation is not line-break
    store.close()
