"""Collection throughput: the hf backend's batched sampling vs one prompt at a time.

Same model, same prompts, same sampling settings, measured in this one process.
Also times a re-run of a finished collection (which must generate nothing).

    python bench/collect.py [--prompts 32] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers.utils import logging

    logging.disable_progress_bar()
    from accord.config import TeacherConfig, load_config
    from accord.lab.micro import build_micro
    from accord.teachers.base import Request, SamplingParams
    from accord.teachers.hf import HFGenerator

    tmp = Path(tempfile.mkdtemp())
    build_micro(tmp / "m", hidden=128, layers=4)  # the lab student's size class
    params = SamplingParams(temperature=0.6, max_new_tokens=args.tokens)
    reqs = [Request(f"What is {i} plus {2 * i + 1}? Think step by step.", seed=i) for i in range(args.prompts)]

    def tokens_per_s(batch_size: int) -> float:
        t = HFGenerator(TeacherConfig(name="m", model=str(tmp / "m"), batch_size=batch_size))
        t.generate(reqs[:2], params)  # warm-up
        t0 = time.perf_counter()
        gens = t.generate(reqs, params)
        return sum(g.token_count for g in gens) / (time.perf_counter() - t0)

    seq, bat = tokens_per_s(1), tokens_per_s(args.prompts)

    probs = tmp / "p.jsonl"
    probs.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(8)))
    cfg = load_config(None, base={"run_dir": str(tmp / "run"), "problems": {"path": str(probs)},
                                  "teachers": [{"name": "m", "model": str(tmp / "m")}],
                                  "collect": {"samples": 4, "max_new_tokens": 16}})
    from rich.console import Console

    from accord.collect import collect

    with open(os.devnull, "w") as null:
        quiet = Console(file=null)
        collect(cfg, quiet)
        t0 = time.perf_counter()
        res = collect(cfg, quiet)
        rerun = time.perf_counter() - t0
    print(f"sequential tokens/s: {seq:.1f}")
    print(f"batched tokens/s: {bat:.1f}")
    print(f"finished-collection rerun seconds: {rerun:.2f} (generated {res.generated})")
    print(f"batched/sequential throughput ratio: {bat / seq:.2f}")


if __name__ == "__main__":
    main()
