"""The chunked head at a real vocabulary: the peak memory of one forward and backward of the LM head and
cross-entropy over ``--rows`` final hidden states at Qwen3-0.6B's widths (hidden 1,024, 151,936 words) — the plain
full-logits path, the chunked head with 4,096-row chunks (what it used until session 19), the chunked head as it
runs now (:func:`accord.train.engine.chunk_rows`) and the same with its per-chunk work compiled (``train.compile``)
— and, with ``--time``, the seconds of each.  On a GPU this transient sits on top of the step's activation peak
(the head runs at the end of the forward).

    python bench/head.py [--rows 4096]                                   # CPU, float32: memory
    python bench/head.py --rows 512 --time                               # CPU: time too (small: the CPU is slow)
    python bench/head.py --device cuda --rows 8192 --time                # a step of bench/gpu.sh: bf16 autocast

On the CPU the peak is read from ``VmHWM`` after resetting it (``/proc/self/clear_refs``), Linux only; tensors this
large are mapped and unmapped by the allocator, so the resident set follows them.  On CUDA it is the allocator's
peak above what was allocated before, and the head runs under bf16 autocast with float32 weights, as the engine's.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path

import torch


def peak(run, device: str) -> float:
    """GiB memory rose above where it stood (``bench/memory.py``'s reading) while ``run()`` ran."""
    from memory import in_use  # bench/memory.py: the resident set once glibc has returned its free pages

    base = in_use(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        run()
        return torch.cuda.max_memory_allocated() / 2**30 - base
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
    run()
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    return hwm / 2**30 - base


@contextlib.contextmanager
def rows_per_chunk(most: int | None):
    """The chunked head with chunks of ``most`` rows whatever the vocabulary (None: as it runs now)."""
    from accord.train import engine

    old = engine.LOGITS_PER_CHUNK
    if most is not None:
        engine.LOGITS_PER_CHUNK = 2**62
    try:
        yield
    finally:
        engine.LOGITS_PER_CHUNK = old


def main() -> None:
    from engine import timed  # bench/engine.py: best of n after an untimed call

    from accord.train import engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--time", action="store_true", help="also time each (one untimed run first, best of two)")
    args = ap.parse_args()
    dev = args.device
    g = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(args.rows, args.hidden, generator=g, device=dev) / 32).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=g, device=dev) / 32).requires_grad_()
    tgt = torch.randint(0, args.vocab, (args.rows,), generator=g, device=dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else contextlib.nullcontext()

    def plain():
        with amp:
            loss = torch.nn.functional.cross_entropy((h @ w.T).float(), tgt, reduction="sum")
        torch.autograd.grad(loss, (h, w))

    def chunked():
        with amp:
            loss = engine.LinearCrossEntropy.apply(h, w, tgt)
        torch.autograd.grad(loss, (h, w))

    def compiled():
        engine._CHUNK["ce"] = engine._compiled_chunk_ce()
        try:
            chunked()
        finally:
            engine._CHUNK["ce"] = engine.chunk_ce

    rows = engine.chunk_rows(args.vocab, engine.LinearCrossEntropy.CHUNK)
    runs = {"plain": (plain, None), "chunked, 4096 rows": (chunked, 4096), f"chunked, {rows} rows": (chunked, None),
            f"chunked, {rows} rows, compiled": (compiled, None)}
    fixed = 2 * w.numel() * 4 / 2**30  # the chunked head's W gradient: formed in the forward, scaled in the backward
    where = "bf16 autocast on CUDA" if dev == "cuda" else "float32 on the CPU"
    print(f"{args.rows} rows × hidden {args.hidden} × vocabulary {args.vocab:,}, {where}; two float32 copies of "
          f"W's gradient (the chunked head's floor): {fixed:.2f} GiB", flush=True)
    mem, took = {}, {}
    for name, (run, most) in runs.items():
        with rows_per_chunk(most):
            try:
                if args.time:  # first: its untimed run compiles, so the peak below is the steady one
                    took[name] = timed(run, dev, 2)
                mem[name] = peak(run, dev)
            except Exception as e:  # noqa: BLE001 — a bench reports what it could not measure (compiling, say)
                print(f"{name}: not measured ({type(e).__name__}: {e})", flush=True)
                continue
        print(f"{name:32s} peak above the inputs: {mem[name]:5.2f} GiB"
              + (f", {took[name] * 1e3:8.1f} ms" if name in took else ""), flush=True)
    now = f"chunked, {rows} rows"
    if {now, "plain", "chunked, 4096 rows"} <= mem.keys():
        print(f"chunked/plain head peak memory ratio: {mem[now] / mem['plain']:.2f} "
              f"(4,096-row chunks: {mem['chunked, 4096 rows'] / mem['plain']:.2f})")
    if {now, f"{now}, compiled", "plain"} <= took.keys():
        print(f"compiled/eager chunked head time ratio: {took[f'{now}, compiled'] / took[now]:.2f} "
              f"(eager chunked/plain: {took[now] / took['plain']:.2f})")


if __name__ == "__main__":
    main()
