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
    with pytest.raises(TrainSetupError, match="train.replay: the student answered none"):
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
