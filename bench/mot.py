"""MoT's cost beyond branch training, merge bandwidth, and peak memory vs plain SFT.

1. Overhead: MoT with the lab quickstart's schedule (T=4 rounds, S=40 steps, 4
   teachers, batch 32) on a student of the lab student's shape and the lab's
   four trace styles; share of wall time outside the branches' ``train()``
   calls (merging, re-initialising, saving branch/round checkpoints).
2. Merge bandwidth: a running-sum merge of 4 branches of a 256 MB float32 state
   dict vs this machine's memory-copy bandwidth (``Tensor.copy_``), same run.
   Throughput = bytes of branch weights merged per second.
3. Peak memory (max RSS, each in a fresh process): MoT (sequential branches) vs
   plain SFT of the same number of steps on a ~40 MB student.

    python bench/mot.py [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_setup(root: Path, d: int, layers: int, n_rows: int) -> Path:
    from accord.lab.recipe import PROFILES, _new_model, lab_tokenizer, style_rows

    tok = lab_tokenizer()
    model = _new_model(tok, d, layers, seed=0)
    model.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    (root / "run" / "corpora").mkdir(parents=True, exist_ok=True)
    union = []
    for style in ("terse", "verbose", "verify", "shifted"):
        rows = style_rows(PROFILES["quick"], [style], seed=0)[:n_rows]
        union += rows
        (root / "run" / "corpora" / f"{style}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "run" / "corpora" / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in union))
    return root


def config(root: Path, method: str, rounds: int, steps: int, batch: int) -> dict:
    return {"run_dir": str(root / "run"), "problems": {"path": "lab:arith:train"},
            "teachers": [{"name": s, "backend": "column", "column": s}
                         for s in ("terse", "verbose", "verify", "shifted")],
            "student": {"model": str(root / "student")},
            "train": {"method": method, "rounds": rounds, "steps_per_round": steps, "batch_size": batch,
                      "lr": 1e-3, "max_len": 256}}


def overhead() -> float:
    from rich.console import Console

    from accord.config import validate
    from accord.train import train_methods

    with tempfile.TemporaryDirectory() as tmp:
        root = write_setup(Path(tmp), 64, 3, 400)
        cfg = validate(config(root, "mot", 4, 40, 32))
        t0 = time.perf_counter()
        res = train_methods(cfg, Console(stderr=True, quiet=True))[0]
        wall = time.perf_counter() - t0
    t = res["timing"]
    print(f"mot wall {wall:.1f}s, inside branch training {t['branch_train_s']:.1f}s, merge {t['merge_s']:.2f}s")
    return (wall - t["branch_train_s"]) / wall


def bandwidth(mb: int = 256, k: int = 4) -> float:
    from accord.train.merge import MergeSpec, RunningMerge

    n = mb * 2**20 // 4 // 16
    base = {f"w{i}": torch.randn(n) for i in range(16)}
    branches = [{name: t + 0.01 for name, t in base.items()} for _ in range(k)]
    dst = {name: torch.empty_like(t) for name, t in base.items()}
    best_copy, best_merge = 1e9, 1e9
    buffers: dict = {}  # kept across repeats as MoT keeps them across rounds
    for _ in range(3):
        t0 = time.perf_counter()
        for name, t in base.items():
            dst[name].copy_(t)
        best_copy = min(best_copy, time.perf_counter() - t0)
        t0 = time.perf_counter()
        run = RunningMerge(base, MergeSpec("average"), buffers)
        for b in branches:
            run.add(b)
        run.result()
        best_merge = min(best_merge, time.perf_counter() - t0)
    size = sum(t.numel() * 4 for t in base.values())
    copy_bw, merge_bw = size / best_copy, k * size / best_merge
    print(f"state dict {size / 2**20:.0f} MB; memcpy {copy_bw / 2**30:.2f} GB/s; "
          f"merge ({k} branches, running sum) {merge_bw / 2**30:.2f} GB/s")
    return merge_bw / copy_bw


def _peak_child(method: str, root: str) -> None:
    from rich.console import Console

    from accord.config import validate
    from accord.train import train_methods

    steps = 2 if method == "mot" else 8  # MoT: 1 round × 4 branches × 2 steps = 8 steps, as SFT
    cfg = validate(config(Path(root), method, 1, steps, 4))
    train_methods(cfg, Console(stderr=True, quiet=True))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_memory() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_setup(Path(tmp), 768, 2, 16)
        size = (Path(tmp) / "student" / "model.safetensors").stat().st_size
        peaks = {}
        for method in ("mtd", "mot"):
            out = subprocess.run([sys.executable, __file__, "--child", method, tmp], capture_output=True, text=True,
                                 check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            peaks[method] = int(out.stdout.strip().splitlines()[-1])
    extra = (peaks["mot"] - peaks["mtd"]) / size
    print(f"peak RSS: plain SFT {peaks['mtd'] / 2**20:.0f} MB, MoT {peaks['mot'] / 2**20:.0f} MB; "
          f"model copy {size / 2**20:.0f} MB; MoT − SFT = {extra:.2f} model copies (budget: 2)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return _peak_child(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if not args.skip_memory:
        peak_memory()
    share = bandwidth()
    over = overhead()
    print(f"mot overhead share: {over:.3f}")
    print(f"merge bandwidth share: {share:.2f}")


if __name__ == "__main__":
    main()
