"""`make demo` / `accord demo`: the main job on the embedded default (the lab).

Builds (or reuses) the lab zoo and student, then `accord run`'s stages on
``configs/lab-quickstart.yaml``: collect → ``accord diagnose`` (the teachers as the
untrained student sees them) → STD per teacher, MTD, post-hoc merge, MoT, COMPACT →
``accord drift`` (how far each model's states moved) → eval → report, printing the
method table (MoT Table 4) as text.  The two analyses add about 20 s on the lab.
``ACCORD_DEMO_PROFILE=quick`` uses the quick lab (``configs/lab-quick.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from accord.config import load_config
from accord.run import finished_results, run


def config_path(name: str) -> Path:
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = root / "configs" / name
        if p.exists():
            return p
    raise FileNotFoundError(f"configs/{name} not found (run from the accord checkout)")


def demo(console: Console, profile: str | None = None) -> int:
    profile = profile or os.environ.get("ACCORD_DEMO_PROFILE", "full")
    cfg = load_config(config_path("lab-quick.yaml" if profile == "quick" else "lab-quickstart.yaml"))
    from accord.analysis import diagnose, drift

    run(cfg, console, stages=("collect",))
    diagnose.run(cfg, console)
    run(cfg, console, stages=("train",))
    drift.run(cfg, console, finished_results(cfg))
    run(cfg, console, stages=("eval", "report"))
    return 0
