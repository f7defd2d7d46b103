"""`make demo` / `accord demo`: the main job on the embedded default (the lab).

Today: build (or reuse) the lab zoo, then collect verified traces from every lab
teacher and print the per-teacher table.  Training, evaluation and the report
join this chain as those stages land (`accord run`).
``ACCORD_DEMO_PROFILE=quick`` uses the quick lab for a smoke run.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console


def config_path(name: str) -> Path:
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = root / "configs" / name
        if p.exists():
            return p
    raise FileNotFoundError(f"configs/{name} not found (run from the accord checkout)")


def demo(console: Console, profile: str | None = None) -> int:
    from accord.collect import collect
    from accord.config import load_config
    from accord.lab.build import build_lab

    profile = profile or os.environ.get("ACCORD_DEMO_PROFILE", "full")
    build_lab(profile=profile, console=console)
    cfg = load_config(config_path("lab-quick.yaml" if profile == "quick" else "lab-quickstart.yaml"))
    res = collect(cfg, console)
    console.print(f"demo done: traces in {Path(cfg.run_dir) / 'traces.sqlite'}, corpora in "
                  f"{Path(cfg.run_dir) / 'corpora'} ({res.generated} new generations)")
    return 0
