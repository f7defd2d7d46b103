"""CoRD's teacher hit rates over normalised reasoning progress (paper 002, Fig. 2): which teacher's steps
the meta-prover selected, early and late in a trajectory, and their stacked-bar plot."""

from __future__ import annotations

from pathlib import Path

BINS = 10


def hit_rates(step_lists: list[list[tuple[tuple[str, ...], str]]], teachers: list[str], bins: int = BINS) -> dict:
    """Share of selected steps per teacher in each normalised-progress bin (credit split on merged steps)."""
    counts = [dict.fromkeys(teachers, 0.0) for _ in range(bins)]
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
