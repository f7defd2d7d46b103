"""Memory of the chunked head at a real vocabulary, on the CPU: the resident-set peak of one forward and backward
of the LM head and cross-entropy over ``--rows`` final hidden states at Qwen3-0.6B's widths (hidden 1,024,
151,936 words) — the plain full-logits path, the chunked head with 4,096-row chunks (what it used until session
19), and the chunked head as it runs now (:func:`accord.train.engine.chunk_rows`).  On a GPU this transient sits
on top of the step's activation peak (the head runs at the end of the forward).

    python bench/head.py [--rows 4096]

The peak is read from ``VmHWM`` after resetting it (``/proc/self/clear_refs``), Linux only; tensors this large
are mapped and unmapped by the allocator, so the resident set follows them.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch


def peak(run) -> float:
    """GiB the resident set rose above where it stood (``bench/memory.py``'s reading) while ``run()`` ran."""
    from memory import in_use  # bench/memory.py: the resident set once glibc has returned its free pages

    base = in_use("cpu")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
    run()
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    return hwm / 2**30 - base


def main() -> None:
    from accord.train import engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151_936)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(args.rows, args.hidden, generator=g) / 32).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=g) / 32).requires_grad_()
    tgt = torch.randint(0, args.vocab, (args.rows,), generator=g)

    def plain():
        loss = torch.nn.functional.cross_entropy(h @ w.T, tgt, reduction="sum")
        torch.autograd.grad(loss, (h, w))

    def chunked():
        torch.autograd.grad(engine.LinearCrossEntropy.apply(h, w, tgt), (h, w))

    fixed = 2 * w.numel() * 4 / 2**30  # the chunked head's W gradient: formed in the forward, scaled in the backward
    res = {"plain": peak(plain)}
    old = engine.LOGITS_PER_CHUNK
    engine.LOGITS_PER_CHUNK = 2**62  # 4,096 rows a chunk whatever the vocabulary, as before
    res["chunked, 4096 rows"] = peak(chunked)
    engine.LOGITS_PER_CHUNK = old
    rows = engine.chunk_rows(args.vocab, engine.LinearCrossEntropy.CHUNK)
    res[f"chunked, {rows} rows"] = peak(chunked)
    print(f"{args.rows} rows × hidden {args.hidden} × vocabulary {args.vocab:,}, float32 on the CPU; "
          f"two float32 copies of W's gradient (the chunked head's floor): {fixed:.2f} GiB")
    for name, v in res.items():
        print(f"{name:22s} peak above the inputs: {v:5.2f} GiB")
    print(f"chunked/plain head peak memory ratio: {res[f'chunked, {rows} rows'] / res['plain']:.2f} "
          f"(4,096-row chunks: {res['chunked, 4096 rows'] / res['plain']:.2f})")


if __name__ == "__main__":
    main()
