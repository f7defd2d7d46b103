import numpy as np

from accord.analysis.confidence import window_confidence


def slow_reference(lp, window):
    w = min(window, len(lp))
    means = [sum(lp[i:i + w]) / w for i in range(len(lp) - w + 1)]
    return sum(lp) / len(lp), min(means)


def test_window_confidence_matches_slow_reference():
    rng = np.random.default_rng(0)
    for n, w in [(1, 4), (5, 5), (50, 7), (300, 64), (10, 100)]:
        lp = list(-rng.exponential(1.0, size=n))
        got, ref = window_confidence(lp, w), slow_reference(lp, w)
        assert np.allclose(got, ref)


def test_local_breakdown_is_visible_only_in_window_score():
    steady = [-0.5] * 200
    dip = [-0.1] * 180 + [-5.0] * 20
    g1, w1 = window_confidence(steady, 20)
    g2, w2 = window_confidence(dip, 20)
    assert abs(g1 - g2) < 0.1 and w2 < w1 - 4
    assert window_confidence([], 8) == (None, None)
