"""Teacher diagnostics (`accord diagnose`): every score against a slow reference, the summary, the CLI."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import pipeline_cfg, run_cli, write_jsonl

from accord.analysis.diagnose import (
    head_scores,
    paired,
    score_traces,
    spearman,
    style,
    summarise,
    token_scores,
    trace_scores,
)


def test_token_scores_match_a_loop_over_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 13, generator=g)
    logits[2, 5] = logits[2, 7]  # a tie with the target is not counted as above it
    targets = torch.tensor([0, 3, 7, 12, 5, 5, 1, 9, 2])
    nll, rank = token_scores(logits, targets)
    for i in range(9):
        z = sum(math.exp(float(v)) for v in logits[i])
        assert float(nll[i]) == pytest.approx(math.log(z) - float(logits[i, targets[i]]), rel=1e-5)
        assert int(rank[i]) == 1 + sum(1 for v in logits[i] if float(v) > float(logits[i, targets[i]]))


def test_head_scores_in_chunks_match_the_full_logits():
    """From hidden states and the head's weight, a few rows at a time: the NLL and ranks of the full logits."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(11, 6, generator=g), torch.randn(40, 6, generator=g)
    targets = torch.randint(0, 40, (11,), generator=g)
    nll, rank = head_scores(h, w, targets, chunk=4)
    ref_nll, ref_rank = token_scores(h @ w.T, targets)
    assert torch.allclose(nll, ref_nll, atol=1e-5) and torch.equal(rank, ref_rank)
    assert head_scores(h @ w.T, None, targets)[1].tolist() == ref_rank.tolist()  # a head that is not h W^T


def test_trace_scores_surprise_clip_and_rsr():
    nll = torch.tensor([0.5, 6.0, 2.0, 7.5])
    rank = torch.tensor([1, 250, 3, 100])
    s = trace_scores(nll, rank, kappa=5.0, clip=100)
    assert s["nll"] == pytest.approx(4.0)
    assert s["surprise"] == pytest.approx(0.5)  # 6.0 and 7.5 exceed 5 nats
    assert s["rank"] == pytest.approx((1 + 100 + 3 + 100) / 4)  # 250 clipped to 100
    assert s["rsr"] == pytest.approx(204 / 16.0)


def test_spearman_and_paired_differences():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 1, 2, 3], [5, 6, 7, 8]) == pytest.approx(0.9486833, rel=1e-6)  # a tie: average ranks
    assert spearman([1, 2], [2, 1]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    d = paired({"a": {"p1": 1.0, "p2": 2.0, "p3": 4.0}, "b": {"p1": 0.5, "p2": 1.0, "p9": 9.0}})
    assert d["a"]["b"]["n"] == 2 and d["a"]["b"]["mean"] == pytest.approx(0.75)  # p9 and p3 are not shared
    assert d["a"]["b"]["se"] == pytest.approx(0.25)  # sd of (0.5, 1.0) over √2
    assert d["b"]["a"]["mean"] == pytest.approx(-0.75)


def test_novelty_against_counting_by_hand():
    from accord.analysis.diagnose import novelty

    got = novelty({"a": [[1, 2, 3, 4], [9, 9]], "b": [[2, 3, 4, 5]], "c": [[7, 7, 7, 7]]})
    # a: (1,2,3) only its own, (2,3,4) shared with b → 1 of 2; b: (2,3,4) shared, (3,4,5) own → 1 of 2;
    # c: (7,7,7) twice, nobody else's → 2 of 2
    assert got == {"a": 0.5, "b": 0.5, "c": 1.0}


def test_auroc_against_every_pair():
    from accord.analysis.diagnose import auroc

    rng = random.Random(1)
    scores = [rng.choice([0.1, 0.2, 0.3, 0.5, 0.9]) for _ in range(40)]  # many ties
    pos = [rng.random() < 0.4 for _ in range(40)]
    pairs = [(a, b) for a, pa in zip(scores, pos) if pa for b, pb in zip(scores, pos) if not pb]
    ref = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert auroc(scores, pos) == pytest.approx(ref)
    assert auroc([1, 2], [True, True]) is None and auroc([3, 1], [True, False]) == 1.0


def test_style_counts_words_per_hundred():
    s = style("Wait, maybe I should check.\nSo the answer is 4.\n\nI think we verify it, not sure.")
    words = 16
    assert s["lines"] == 3
    assert s["thinking"] == pytest.approx(100 * 2 / words)  # Wait, So
    assert s["hedging"] == pytest.approx(100 * 3 / words)  # maybe, I think, not sure
    assert s["checks"] == pytest.approx(100 * 2 / words)  # check, verify


def test_style_distance_against_a_sum_over_the_bigrams_by_hand():
    """Item 2: JS in bits between add-δ smoothed word-bigram distributions, against a loop over the union."""
    import math

    from accord.analysis.diagnose import JS_DELTA, style_distance

    texts = {"a": ["Add the numbers, then add them again.", "add the numbers"], "b": ["wait, add the sum"],
             "c": ["Add the numbers, then add them again.", "add the numbers"]}
    grams = {t: [tuple(w) for x in xs for w in zip(x.lower().replace(",", "").replace(".", "").split(),
                                                    x.lower().replace(",", "").replace(".", "").split()[1:])]
             for t, xs in texts.items()}
    union = sorted(set().union(*map(set, grams.values())))

    def p(t):
        return [(grams[t].count(g) + JS_DELTA) / (len(grams[t]) + JS_DELTA * len(union)) for g in union]

    def js(x, y):
        m = [(u + v) / 2 for u, v in zip(x, y)]
        return sum(0.5 * u * math.log2(u / w) + 0.5 * v * math.log2(v / w) for u, v, w in zip(x, y, m))

    got = style_distance(texts)
    assert got["a"]["b"] == pytest.approx(js(p("a"), p("b"))) == pytest.approx(got["b"]["a"])
    assert got["a"]["c"] == 0.0 and got["a"]["a"] == 0.0 and 0 < got["a"]["b"] < 1


def test_signature_strength_holds_out_problems_and_knows_chance():
    """Item 2: teachers with their own words are told apart on problems the classifier never saw; identical
    writers are at chance exactly (every held-out trace gets the same guess); one teacher has no signature."""
    from accord.analysis.diagnose import signature_strength

    pids = [f"p{i}" for i in range(10)]
    a = [f"first add the numbers for problem {i}" for i in range(10)]
    b = [f"wait let me think about problem {i}" for i in range(10)]
    sig = signature_strength({"a": a, "b": b}, {"a": pids, "b": pids})
    assert sig["accuracy"] == 1.0 and sig["chance"] == 0.5 and sig["folds"] == 5 and sig["traces"] == 20
    assert sig["recall"] == {"a": 1.0, "b": 1.0} and sig["most_confused"] is None
    same = signature_strength({"a": a, "b": a}, {"a": pids, "b": pids})
    assert same["accuracy"] == 0.5 and same["se"] == 0.0
    assert sorted(same["recall"].values()) == [0.0, 1.0] and same["most_confused"][2] == 10  # one name for both
    assert signature_strength({"a": a}, {"a": pids}) is None
    assert signature_strength({"a": a[:1], "b": b[:1]}, {"a": pids[:1], "b": pids[:1]}) is None  # one problem


def test_length_ratio_to_the_median_teacher_on_the_same_problem():
    """Item 3: r = L / median over teachers of L, per shared problem, mean ± SE; a lone problem is left out."""
    from accord.analysis.diagnose import length_ratios

    got = length_ratios({"a": {"p": 10, "q": 20, "only-a": 5}, "b": {"p": 20, "q": 20}, "c": {"p": 40, "q": 10}})
    assert got["a"][0] == pytest.approx((10 / 20 + 20 / 20) / 2) and got["c"][0] == pytest.approx((2 + 0.5) / 2)
    assert got["b"] == (1.0, 0.0) and length_ratios({"a": {"p": 3}}) == {"a": (None, None)}


def test_step_confidence_is_the_lowest_step_mean():
    """Item 4's per-step score: steps end at a line-ending token; the trailing piece is a step too."""
    from accord.analysis.diagnose import step_confidence

    lp = [-1.0, -3.0, -0.5, -0.5, -4.0, -2.0]
    assert step_confidence(lp, [False, True, False, True, False, False]) == min(-2.0, -0.5, -3.0)
    assert step_confidence(lp, [False] * 6) == pytest.approx(sum(lp) / 6) and step_confidence([], []) is None


def test_retention_keeps_the_most_confident_share():
    """Item 4's retention-vs-accuracy: the accuracy of the share kept by confidence and the score that keeps it."""
    from accord.analysis.diagnose import retention

    curve = retention([-3.0, -1.0, -4.0, -2.0, -5.0], [False, True, False, True, True])
    assert [(c["keep"], c["accuracy"], c["threshold"]) for c in curve] == [
        (1.0, 3 / 5, -5.0), (0.9, 2 / 4, -4.0), (0.8, 2 / 4, -4.0), (0.7, 2 / 4, -4.0), (0.5, 2 / 2, -2.0)]


def test_problems_are_the_shared_ones_else_each_teachers_own_first():
    from accord.analysis.diagnose import pick_problems

    a = [{"problem_id": f"p{i}"} for i in (3, 1, 2, 1)]
    b = [{"problem_id": f"p{i}"} for i in (2, 1, 9)]
    got, shared = pick_problems({"a": a, "b": b}, 5)
    assert shared and [r["problem_id"] for r in got["a"]] == ["p1", "p2", "p1"] and len(got["b"]) == 2
    got, shared = pick_problems({"a": a, "b": [{"problem_id": None}] * 7}, 2)  # nothing shared; no ids in b
    assert not shared and [r["problem_id"] for r in got["a"]] == ["p1", "p2", "p1"] and len(got["b"]) == 2


def _row(pid, text, level=None):
    return {"problem_id": pid, "level": level, "answer": "7",
            "messages": [{"role": "user", "content": f"Question {pid}?"}, {"role": "assistant", "content": text}]}


def test_summary_orders_teachers_and_flags_the_outlier_leave_one_out():
    rows, scores = {}, {}
    means = {"a": 1.0, "b": 1.1, "c": 0.95, "odd": 3.0}
    for t, m in means.items():
        rows[t] = [_row(f"p{i}", "x " * (i + 1), level=i) for i in range(6)]
        scores[t] = [{"nll": m + 0.01 * i, "surprise": 0.1, "rank": 2.0, "rsr": 2.0 / m, "tokens": 3 + i,
                      "window": -(m + 1.0)} for i in range(6)]
    out = summarise(rows, scores)
    assert out["order"] == ["c", "a", "b", "odd"] and out["flagged"] == ["odd"]
    # four teachers: a z over all four means could not exceed (4 − 1)/√4 = 1.5
    assert out["teachers"]["odd"]["z"] > 2 and all(out["teachers"][t]["z"] < 2 for t in "abc")
    assert out["teachers"]["a"]["length_vs_level"] == pytest.approx(1.0)
    assert out["paired_nll"]["odd"]["a"]["mean"] == pytest.approx(2.0)
    assert out["teachers"]["a"]["nll"] == pytest.approx(1.025)
    assert out["teachers"]["odd"]["worst"] == pytest.approx(4.0)  # the worst window's NLL: −(lowest window ℓ)


def test_scored_nll_is_the_sft_loss_the_student_starts_from(micro):
    """A trace's NLL × its tokens is the engine's summed token cross-entropy of that example at θ0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accord.train.engine import collate, encode_example, sft_loss

    model, tok = AutoModelForCausalLM.from_pretrained(micro), AutoTokenizer.from_pretrained(micro)
    rows = [_row(f"p{i}", f"<think>\n(1) {i} + 1 = {i + 1}\n</think>\n\n\\boxed{{{i + 1}}}") for i in range(5)]
    got = score_traces(model, tok, rows, 128, batch=2)
    for r, s in zip(rows, got):
        ex = encode_example(tok, r, 128)
        with torch.no_grad():
            loss, _ = sft_loss(model, collate([ex], tok.pad_token_id), 1)
        assert s["nll"] * s["tokens"] == pytest.approx(float(loss), rel=1e-4)
        assert s["tokens"] == sum(1 for y in ex[1][1:] if y != -100)


def test_accord_diagnose_end_to_end(tmp_path, problems_file, parrot7):
    """The student is parrot7 (it writes PARROT_7 whatever the question): three teachers write like it, one
    writes noise, which the student finds far less likely — flagged, last in the order, in the report."""
    teachers = [{"name": n, "model": str(parrot7)} for n in ("terse", "steady", "plain", "noisy")]
    cfg = pipeline_cfg(tmp_path, problems_file, teachers, parrot7, method=["mtd"])
    corpora = tmp_path / "run" / "corpora"
    corpora.mkdir(parents=True)
    rng = random.Random(0)
    for t, think in (("terse", "add the numbers"), ("steady", "add the numbers up"), ("plain", "add numbers")):
        write_jsonl(corpora / f"{t}.jsonl", [_row(f"p{i}", f"<think>\n{think}\n</think>\n\n\\boxed{{7}}",
                                                  level=2 + i % 3) for i in range(12)])
    noise = ["".join(rng.choice("qzxj#@~{}|^") for _ in range(60)) for _ in range(12)]
    write_jsonl(corpora / "noisy.jsonl", [_row(f"p{i}", noise[i]) for i in range(12)])
    # the store behind the corpora: terse is right on even problems (parrot-like text, its own log-prob −0.1)
    # and wrong on odd ones (noise, −2.0) — items 4 and 3 (a) read every sample, right or wrong
    from accord.problems import Problem
    from accord.store import TraceStore

    store = TraceStore(tmp_path / "run" / "traces.sqlite")
    store.put_problems([Problem(f"p{i}", f"Question p{i}?", "7", {"steps": 2, "split": "ood" if i > 5 else "target"})
                        for i in range(12)])
    base = {"style": "default", "sample_idx": 0, "params": "{}", "prompt": "", "reasoning": None,
            "answer_text": None, "parsed_answer": "7", "token_count": 5, "char_count": 20, "finish_reason": "stop",
            "min_window_logprob": None, "elapsed_s": 0.0, "error": None}
    good = "<think>\nadd the numbers\n</think>\n\n\\boxed{7}"
    store.put_traces([{**base, "problem_id": f"p{i}", "teacher": t, "text": good if i % 2 == 0 else noise[i],
                       "verdict": "correct" if i % 2 == 0 else "incorrect",
                       "mean_logprob": (-0.1 if i % 2 == 0 else -2.0) if t == "terse" else None}
                      for t in ("terse", "steady", "plain", "noisy") for i in range(12)])
    store.close()
    code, out = run_cli("diagnose", str(cfg), "--problems", "10")
    assert code == 0, out
    data = json.loads((tmp_path / "run" / "analysis" / "teachers.json").read_text())
    assert set(data["teachers"]) == {"terse", "steady", "plain", "noisy"} and data["shared"]
    assert all(r["problems"] == 10 for r in data["teachers"].values())  # --problems, shared across teachers
    assert data["order"][-1] == "noisy" and data["flagged"] == ["noisy"]
    assert "most compatible first" in out and "⚑ noisy" in out
    alpha = {t: r["compact"]["alpha"] for t, r in data["teachers"].items()}  # COMPACT's weights at θ0
    assert sum(alpha.values()) == pytest.approx(1.0) and min(alpha, key=alpha.get) == "noisy"
    assert all({"s_mi", "s_cons", "s_ppl"} <= set(r["compact"]) for r in data["teachers"].values())
    assert data["teachers"]["noisy"]["novelty"] > 0.9 > data["teachers"]["terse"]["novelty"]
    v = data["verdicts"]["teachers"]["terse"]
    assert data["verdicts"]["problems"] == 10 and v["samples"] == 10 and v["accuracy"] == pytest.approx(0.5)
    assert v["auroc_student_global"] == 1.0 and v["auroc_teacher_global"] == 1.0  # parrot-like text is the right one
    assert v["auroc_teacher_window"] is None and "AUROC student global" in out
    assert set(v["length_vs_difficulty_by_split"]) == {"ood", "target"}  # item 3, separately per split
    assert v["auroc_student_step"] is not None and v["auroc_student_tail"] is not None and "AUROC student tail" in out
    r = v["retention"]  # no teacher window score stored: the student's keeps the curve
    assert r["score"] == "student_window" and r["curve"][0] == {"keep": 1.0, "accuracy": 0.5,
                                                                 "threshold": r["curve"][0]["threshold"]}
    assert r["curve"][-1]["accuracy"] == 1.0 and "filtering by confidence" in out  # parrot-like text is right
    js = data["style_js"]  # item 2: the noisy teacher writes farthest from every other
    assert all(js["noisy"][t] > max(js["terse"]["steady"], js["terse"]["plain"]) for t in ("terse", "steady", "plain"))
    sig = data["signature"]  # the three parrot-like teachers differ by a word each: still told apart
    assert sig["chance"] == 0.25 and sig["accuracy"] > 0.5 and sig["problems"] == 10
    assert "style distance (Jensen–Shannon" in out and "signature strength" in out and "JS (bits)" in out
    from accord import api
    from accord.analysis.diagnose import STUDENT_ROW

    # the student's own outputs as a row of the style distances: parrot7 writes like the three parrot-like teachers
    again = api.diagnose(api.load_config(str(cfg)), problems=10, student_samples=3)  # the same from Python
    js = again["style_js"]
    assert STUDENT_ROW in js and STUDENT_ROW not in again["teachers"]
    assert min(js[STUDENT_ROW], key=lambda u: js[STUDENT_ROW][u] if u != STUDENT_ROW else 9) != "noisy"
    assert again["table"]["style_js"]["head"][-1] == STUDENT_ROW and "student's own outputs" in " ".join(
        again["table"]["notes"])
    assert again["order"] == data["order"] and again["teachers"]["noisy"]["nll"] == data["teachers"]["noisy"]["nll"]
    code, out = run_cli("report", str(cfg))
    assert code == 0, out
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "Teachers as the student saw them before training" in page and "noisy ⚑" in page
    assert "Every sample, right or wrong" in page and "Jensen–Shannon divergence between their word-bigram" in page
    assert "Filtering by confidence" in page


def test_accord_diagnose_without_corpora_says_what_to_run(tmp_path, problems_file, two_parrots, micro):
    cfg = pipeline_cfg(tmp_path, problems_file, two_parrots, micro)
    code, out = run_cli("diagnose", str(cfg))
    assert code != 0 and "accord collect" in out
