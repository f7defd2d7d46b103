"""Step-level vs global confidence of a trace (papers/004: step-level confidence
catches local breakdowns that a global mean hides; DeepConf-style "lowest group
confidence").

We use the log-probability of each *sampled* token (what every backend can
return) rather than a top-k mean: the global score is the mean token log-prob,
the step-level score the lowest mean over sliding windows of ``window`` tokens.
A trace shorter than the window has one window: the whole trace.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def window_confidence(logprobs: Sequence[float], window: int) -> tuple[float, float] | tuple[None, None]:
    """(global mean log-prob, lowest sliding-window mean log-prob); (None, None) for no tokens."""
    lp = np.asarray([x for x in logprobs if x is not None], dtype=np.float64)
    if lp.size == 0:
        return None, None
    w = min(window, lp.size)
    csum = np.concatenate([[0.0], np.cumsum(lp)])
    means = (csum[w:] - csum[:-w]) / w
    return float(lp.mean()), float(means.min())
