"""CoRD vs curation wall time at equal trajectory budget, and the meta-prover's share (CoRD Table 14).

On the lab (full profile when built, else quick): the four lab teachers, beam
B = 4 with prompt-guided segmentation; curation lets each teacher write B
complete traces and picks one with the same score.  Both run in this process
on the same problems; wall times are the per-problem totals the store records.

    python bench/cord.py [--problems 20] [--profile quick] [--prefix-cache-mb 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--profile", choices=["full", "quick"])
    ap.add_argument("--prefix-cache-mb", type=int, default=1024, help="hf backend's prefix cache (0: off)")
    args = ap.parse_args()
    from rich.console import Console
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    from accord.config import validate
    from accord.cord import stage
    from accord.lab.build import build_lab
    from accord.lab.cache import valid_entry

    console = Console(stderr=True, quiet=True)
    profile = args.profile or ("full" if valid_entry("full", "terse") else "quick")
    build_lab(profile=profile, console=console)
    prefix = "" if profile == "full" else f"{profile}/"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = validate({
            "run_dir": tmp, "problems": {"path": "lab:arith:test", "limit": args.problems},
            "teachers": [{"name": t, "model": f"lab:{prefix}{t}", "prefix_cache_mb": args.prefix_cache_mb}
                         for t in ("terse", "verbose", "verify", "shifted")],
            "cord": {"beam": 4, "segmentation": "prompt", "step_tokens": 48, "think_tokens": 160, "answer_tokens": 16,
                     "baselines": ["curation"], "answer_template": "</think>\n\n\\boxed{{answer}}"}})
        s = stage.run(cfg, console)
        summary = json.loads((Path(tmp) / "cord" / "summary.json").read_text())
    for name in ("cord", "cord-curation"):
        r = summary[name]
        print(f"{name:14s} acc {r['accuracy']:.1%}  mean PP {r['mean_pp']:.3f}  wall {r['wall_s']:.1f}s")
    t = s["timing_this_run"]
    print(f"lab profile {profile}, {args.problems} problems; CoRD step generation {t['cord_generation_s']:.1f}s, "
          f"meta-prover {t['cord_meta_prover_s']:.1f}s")
    print(f"cord/curation wall-time ratio: {s['cord_curation_wall_ratio']:.2f}")
    print(f"meta-prover share: {s['meta_prover_share']:.3f}")


if __name__ == "__main__":
    main()
