"""Memory held after N sequential ``engine.train`` calls against after one (issue 13: goal within 5%).

Each call trains a fresh model and the caller keeps only the latest (as ``accord train`` runs STD per teacher,
MTD and the rest one after another).  After each call the bench reads the memory in use while that call's
model is still held: on CUDA ``torch.cuda.memory_allocated`` (and the peak during the call), on CPU the
process's resident set after ``malloc_trim`` (glibc keeps freed pages otherwise, which is not what is measured
here).  A leak of one model + optimizer per call — what accelerate's process-wide references did before the
engine handed them back — shows as a ratio near N.

    python bench/memory.py [--calls 4] [--steps 3] [--device cpu|cuda] [--shape lab|qwen3-tiny|qwen3-0.6b]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
from types import SimpleNamespace

import torch


def in_use(device: str) -> float:
    """GiB in use now: CUDA allocated memory, or the CPU resident set once glibc has returned its free pages."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**30
    with contextlib.suppress(OSError):  # not glibc: the resident set as it is
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def job(args):
    """(new model, tokenizer, rows, examples) for one ``train`` call at ``--shape``."""
    from engine import new_qwen3, setup, synthetic  # bench/engine.py, beside this script

    if args.shape == "lab":  # the lab student's recipe, wide enough that one model + AdamW outweighs the libraries
        from accord.lab.recipe import _new_model

        tok, rows, _ = setup()
        return (lambda: _new_model(tok, args.width, 4, seed=0)), tok, rows, None
    from engine import SHAPES

    ex = synthetic(args.batch * args.steps, SHAPES[args.shape]["vocab_size"], args.max_len)
    return (lambda: new_qwen3(args.shape, args.device)), SimpleNamespace(pad_token_id=0), [], ex


def main() -> None:
    from engine import SHAPES

    from accord.train.engine import TrainArgs, train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per call")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=1024, help="longest synthetic sequence (Qwen3 shapes)")
    ap.add_argument("--shape", choices=["lab", *SHAPES], default="lab")
    ap.add_argument("--width", type=int, default=512, help="hidden size of the lab shape (4 layers)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    new_model, tok, rows, ex = job(args)
    targs = TrainArgs(steps=args.steps, batch_size=args.batch, lr=1e-4, max_len=args.max_len, seed=0)
    probe = new_model()
    unit = sum(p.numel() * p.element_size() for p in probe.parameters()) * 3 / 2**30  # weights + AdamW's two
    del probe
    base = in_use(args.device)
    held, peaks, res = [], [], None
    for i in range(args.calls):
        res = None  # the caller drops the previous call's result before the next one (as accord's recipes do)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res = train(new_model(), tok, rows, targs, examples=ex)
        held.append(in_use(args.device) - base)
        peaks.append(torch.cuda.max_memory_allocated() / 2**30 - base if args.device == "cuda" else None)
        print(f"after call {i + 1}: {held[-1]:.3f} GiB held"
              + (f", peak {peaks[-1]:.3f} GiB during the call" if peaks[-1] is not None else ""))
    del res
    what = "CUDA allocated" if args.device == "cuda" else "resident set after malloc_trim"
    print(f"shape {args.shape} on {args.device} ({what}, above the {base:.3f} GiB before the first call)")
    print(f"one model + AdamW state: {unit:.3f} GiB; growth per call after the first: "
          f"{(held[-1] - held[0]) / max(1, args.calls - 1) / unit:.2f} of that")
    print(f"memory after {args.calls} train() calls / after 1: {held[-1] / held[0]:.2f}  (goal ≤ 1.05)")
    if args.device == "cuda":
        print(f"peak during call {args.calls} / during call 1: {peaks[-1] / peaks[0]:.2f}")


if __name__ == "__main__":
    main()
