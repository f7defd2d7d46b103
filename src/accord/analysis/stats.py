"""The statistics every rate accord reports carries: a mean over problems and its standard error.

Problems are the unit: a rate over k samples per problem is the mean of the per-problem rates, and its
standard error the sample standard deviation of those over √n — samples of one problem are not independent
draws, so counting them as n·k would understate the uncertainty.  Differences between two models on the
same problems are paired (``analysis.report.paired_table``).
"""

from __future__ import annotations

from collections.abc import Sequence


def mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and its standard error over problems (sample std / √n; None for the SE of a single value)."""
    n = len(values)
    if not n:
        return None, None
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, (sum((v - m) ** 2 for v in values) / (n - 1) / n) ** 0.5
