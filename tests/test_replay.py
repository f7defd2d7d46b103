"""Self-generated replay (train.replay) and the standard errors every rate carries."""

import json
import math
import random
import statistics

import pytest
from conftest import write_jsonl


def test_mean_se_matches_the_textbook_formula():
    from accord.evaluate import mean_se

    rng = random.Random(0)
    xs = [rng.random() for _ in range(37)]
    m, se = mean_se(xs)
    assert m == pytest.approx(statistics.fmean(xs)) and se == pytest.approx(statistics.stdev(xs) / math.sqrt(37))
    assert mean_se([1.0]) == (1.0, None) and mean_se([]) == (None, None)
    bits = [1.0] * 30 + [0.0] * 70  # a binary rate: sqrt(p(1-p)/(n-1))
    assert mean_se(bits)[1] == pytest.approx(math.sqrt(0.3 * 0.7 / 99))


def _cfg(tmp_path, student, problems, share=0.5):
    from accord.config import AccordConfig

    return AccordConfig(run_dir=str(tmp_path / "run"), problems={"path": str(problems)},
                        teachers=[{"name": "a", "model": str(student)}], student={"model": str(student)},
                        train={"replay": {"path": str(problems), "share": share, "max_new_tokens": 40}})


def test_replay_keeps_only_the_students_verified_answers_and_mixes_a_share(tmp_path, parrot7):
    from accord.train.common import load_corpus

    problems = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "question": f"What is {i}+0?", "answer": a}
                                                   for i, a in enumerate(["7", "3", "7", "5"])])
    cfg = _cfg(tmp_path, parrot7, problems)
    corpora = tmp_path / "run" / "corpora"
    corpora.mkdir(parents=True)
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\boxed{1}"}]}
    write_jsonl(corpora / "a.jsonl", [row] * 6)
    rows = load_corpus(cfg, "a")
    replay = [json.loads(x) for x in (tmp_path / "run" / "replay.jsonl").read_text().splitlines()]
    assert len(replay) == 2 and all("\\boxed{7}" in r["messages"][-1]["content"] for r in replay)  # the parrot's 7s
    assert len(rows) == 6 + 3 and rows[6:] == [replay[0], replay[1], replay[0]]
    assert len(load_corpus(cfg, "a", replay=False)) == 6


def test_replay_with_nothing_correct_is_a_clear_error(tmp_path, parrot7):
    from accord.train.common import TrainSetupError, replay_rows

    problems = write_jsonl(tmp_path / "p.jsonl", [{"id": "q", "question": "What is 1+0?", "answer": "1"}])
    with pytest.raises(TrainSetupError, match=r"train\.replay: the student answered none"):
        replay_rows(_cfg(tmp_path, parrot7, problems))


def test_pass_at_k_is_the_unbiased_estimator():
    """Against brute force: the share of k′-subsets of the n samples that hold a correct one."""
    from itertools import combinations

    from accord.evaluate import pass_at_k

    for n in (1, 4, 6):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(range(n), k))
                want = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
                assert abs(pass_at_k(n, c, k) - want) < 1e-12, (n, c, k)


def test_majority_vote():
    from accord.evaluate import majority_correct

    assert majority_correct(["4", "7", "4", None], [True, False, True, False])
    assert not majority_correct(["7", "7", "4", "4"], [False, False, True, True])  # tie → the first seen
    assert not majority_correct([None, None], [False, False])
    assert majority_correct(["4", None, None], [True, False, False])  # unparsed samples do not vote
    # one value written two ways is one answer: 1/2 twice beats 3 once (as strings: three votes of one each)
    assert majority_correct(["3", "0.5", "\\frac{1}{2}"], [False, True, True])
    assert not majority_correct(["3", "3.0", "0.5"], [False, False, True])
    assert not majority_correct(["x + 1", " x + 1", "\\frac{\\pi}{2}"], [False, False, True])  # text: stripped


def test_answer_key():
    from accord.verify import answer_key

    assert answer_key("0.5") == answer_key("\\frac{1}{2}") == answer_key(" 1/2 ") == "0.5"
    assert answer_key("1{,}000") == answer_key("1000") == "1000.0"
    assert answer_key("1,000") == "1000.0" and answer_key("2,3") == "2,3" and answer_key("2, 3") == "2, 3"
    assert answer_key("1/0") == "1/0" and answer_key("\\frac{\\pi}{2}") == "\\frac{\\pi}{2}"


def test_evaluate_records_majority_and_pass_at_k(tmp_path):
    """A generator that answers 4, 4, 4, 7 to everything: maj@4 is right only where the gold is 4, pass@4
    wherever any sample is; both survive a resume from the rows on disk."""
    from accord.evaluate import evaluate
    from accord.problems import Problem
    from accord.teachers.base import Generation

    class Fixed:
        def generate(self, reqs, params):
            return [Generation(text="\\boxed{%s}" % ("7" if (r.seed % 4) == 3 else "4")) for r in reqs]

    probs = [Problem("a", "q1", "4"), Problem("b", "q2", "7")]
    gen = Fixed()
    # seeds are seed·1000003 + hash(id) + i: make sample i's answer depend on i alone
    import accord.evaluate as E

    orig = E.hash_id
    E.hash_id = lambda pid: 0
    try:
        r = evaluate(gen, probs, k=4, greedy=False, rows_path=tmp_path / "rows.jsonl")
        again = evaluate(gen, probs, k=4, greedy=False, rows_path=tmp_path / "rows.jsonl")  # all from disk
    finally:
        E.hash_id = orig
    assert r.maj == 0.5 and r.pass1 == 0.5 and r.pass_at[4] == 1.0
    assert (again.maj, again.pass1, again.pass_at) == (r.maj, r.pass1, r.pass_at)


def test_evaluate_records_how_long_the_model_writes(tmp_path):
    """Tokens per output and the share cut at max_new_tokens: means over problems of each problem's samples, ± SE
    (against a slow reference); the same from the rows on disk; a failed generation and a row stored before
    lengths were kept leave them out, and an evaluation with none recorded has None."""
    import json
    import random

    from accord.evaluate import evaluate, mean_se
    from accord.problems import Problem
    from accord.teachers.base import Generation

    rng = random.Random(0)
    made: list = []

    class Random:
        def generate(self, reqs, params):
            out = []
            for _ in reqs:
                n, cut = rng.randint(5, 50), rng.random() < 0.3
                if rng.random() < 0.15:
                    out.append(Generation(text="", error="server down", finish_reason="error"))
                    continue
                made.append((n, cut))
                out.append(Generation(text="\\boxed{4}", token_count=n, finish_reason="length" if cut else "stop"))
            return out

    probs = [Problem(str(i), f"q{i}", "4") for i in range(5)]
    rows = tmp_path / "rows.jsonl"
    r = evaluate(Random(), probs, k=3, greedy=True, rows_path=rows)
    stored = [json.loads(x) for x in rows.read_text().splitlines()]
    by: dict = {}
    assert any(x["verdict"] == "failed" for x in stored)
    for x in stored:
        if x["mode"] == "sample" and x["verdict"] != "failed":
            by.setdefault(x["problem_id"], []).append((x["tokens"], x["finish"] == "length"))
    want_t = mean_se([sum(t for t, _ in v) / len(v) for v in by.values()])
    want_c = mean_se([sum(c for _, c in v) / len(v) for v in by.values()])
    assert (r.tokens, r.tokens_se) == pytest.approx(want_t) and (r.cut, r.cut_se) == pytest.approx(want_c)
    assert sorted(made) == sorted((x["tokens"], x["finish"] == "length") for x in stored if x["verdict"] != "failed")
    again = evaluate(Random(), probs, k=3, greedy=True, rows_path=rows)
    assert (again.tokens, again.tokens_se, again.cut, again.cut_se) == (r.tokens, r.tokens_se, r.cut, r.cut_se)
    for x in stored:  # rows from before lengths were kept
        x.pop("tokens"), x.pop("finish")
    rows.write_text("".join(json.dumps(x) + "\n" for x in stored))
    old = evaluate(Random(), probs, k=3, greedy=True, rows_path=rows)
    assert old.pass1 == r.pass1 and (old.tokens, old.cut) == (None, None)
    assert "tokens" in r.as_dict() and "cut_se" in r.as_dict()
