"""COMPACT's step against MTD's at the same traces per step (issue 17: goal ≤ 1.15× time, ≤ 1.2× memory).

Same model (the lab student's shape, fresh weights), the same four lab styles
as four teachers on the same problems (so every problem has K′ = 4), the same
batch size in traces, the engine's defaults (packing included).  Each run trains two epochs over the
1,600 traces (4 teachers × 400 problems, 100 steps of 16 per epoch) and step time is read from the engine's
own step log over the *second epoch*: (elapsed at its last step − elapsed at the first epoch's last step) /
its steps.  So start-up (the packing probe) and teardown are not counted, and both methods are timed on
exactly the same traces — only their grouping into steps differs (a timing window of a few dozen random
steps drew ±5% more or fewer tokens for one method than the other).  Best of ``--repeats``, interleaved.
Memory is the peak of the autograd graph's saved tensors in one step, measured with ``torch.autograd.graph.
saved_tensors_hooks`` (CPU has no allocator high-water mark) plus the scores'
extra tensors.

    python bench/compact.py [--epochs 2] [--batch 16] [--repeats 3] [--shape lab|small]
"""

from __future__ import annotations

import argparse

import torch

SHAPES = {"lab": (None, None), "small": (256, 4)}  # (hidden size, layers); lab = the lab student's own


def setup(n_problems: int = 400, shape: str = "lab"):
    import random

    from accord.lab.recipe import PROFILES, _new_model, _trace_rows, lab_tokenizer
    from accord.lab.tasks import generate

    tok = lab_tokenizer()
    probs = generate("arith", "train")[4000:4000 + n_problems]
    rows = {}
    for st in ("terse", "verbose", "verify", "shifted"):
        rows[st] = [{**r, "problem_id": p["id"], "answer": p["answer"]}
                    for r, p in zip(_trace_rows(probs, st, random.Random(0)), probs)]
    d, layers = SHAPES[shape]
    return tok, rows, lambda: _new_model(tok, d or PROFILES["full"].d, layers or PROFILES["full"].layers, seed=0)


def run_mtd(tok, rows, new_model, args) -> float:
    from accord.train.engine import TrainArgs, encode_example, train

    model = new_model()
    flat = [r for rs in rows.values() for r in rs]
    ex = [encode_example(tok, r, 256) for r in flat]  # encoded outside the clock, as for COMPACT
    log = []
    train(model, tok, flat, TrainArgs(steps=args.steps, batch_size=args.batch, lr=1e-3, max_len=256, seed=0),
          examples=ex, log=log.append)
    return steady(log, args.epoch_steps)


def run_compact(tok, rows, new_model, args) -> float:
    from accord.config import CompactConfig
    from accord.train.compact import count_problems, encode_trace, make_loss_fn
    from accord.train.engine import TrainArgs, grouped_batches, train

    model = new_model()
    ex = [encode_trace(tok, r, 256, group=r["problem_id"], teacher=t, epsilon=1.0) for t, rs in rows.items()
          for r in rs]
    log = []
    train(model, tok, [], TrainArgs(steps=args.steps, batch_size=args.batch, lr=1e-3, max_len=256, seed=0),
          examples=ex, batcher=grouped_batches, loss_fn=make_loss_fn(CompactConfig(epsilon=1.0)),
          units_fn=count_problems, log=log.append)
    return steady(log, args.epoch_steps)


def run_grouped_sft(tok, rows, new_model, args) -> float:
    """The decomposition: plain SFT (the engine's own loss) on COMPACT's problem-grouped micro-batches — what the
    layout alone costs, before COMPACT's scores, weights and MCon."""
    from accord.train.compact import encode_trace
    from accord.train.engine import TrainArgs, grouped_batches, train

    model = new_model()
    ex = [encode_trace(tok, r, 256, group=r["problem_id"], teacher=t, epsilon=1.0) for t, rs in rows.items()
          for r in rs]
    log = []
    train(model, tok, [], TrainArgs(steps=args.steps, batch_size=args.batch, lr=1e-3, max_len=256, seed=0),
          examples=ex, batcher=grouped_batches, log=log.append)
    return steady(log, args.epoch_steps)


def steady(log: list[dict], window: int) -> float:
    """Seconds per optimizer step over the last ``window`` steps (one epoch: every method's timed window then
    holds the same traces), from the engine's step events."""
    return (log[-1]["elapsed_s"] - log[-window - 1]["elapsed_s"]) / window


def saved_bytes(tok, rows, new_model, args, compact: bool) -> int:
    """Bytes the autograd graph saves for one step of ``args.batch`` traces (4 problems × 4 teachers)."""
    from accord.config import CompactConfig
    from accord.train.compact import encode_trace, make_loss_fn
    from accord.train.engine import collate, encode_example, sft_loss

    model = new_model()
    picked = [(t, r) for i in range(args.batch // 4) for t, rs in rows.items() for r in [rs[i]]]
    if compact:
        ex = [encode_trace(tok, r, 256, group=r["problem_id"], teacher=t, epsilon=1.0) for t, r in picked]
        fn = make_loss_fn(CompactConfig(epsilon=1.0))
    else:
        ex, fn = [encode_example(tok, r, 256) for _, r in picked], sft_loss
    b = collate(ex, tok.pad_token_id)
    seen = {}

    def pack(t):
        seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = fn(model, b, 4)
    loss.backward()
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (≥ 2); the last one is timed")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", choices=list(SHAPES), default="lab",
                    help="lab: the lab student (d = 64, 2 layers); small: d = 256, 4 layers (same tokenizer)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok, rows, new_model = setup(shape=args.shape)
    n = sum(len(r) for r in rows.values())
    if n % args.batch or args.batch % 4:
        raise SystemExit(f"--batch must divide the {n} traces and hold whole problems (a multiple of 4)")
    args.epoch_steps = n // args.batch
    args.steps = max(2, args.epochs) * args.epoch_steps
    t_mtd, t_cmp, t_grp = [], [], []
    for _ in range(args.repeats):
        t_mtd.append(run_mtd(tok, rows, new_model, args))
        t_cmp.append(run_compact(tok, rows, new_model, args))
        t_grp.append(run_grouped_sft(tok, rows, new_model, args))
    print(f"shape {args.shape}: mtd {1e3 * min(t_mtd):.1f} ms/step, compact {1e3 * min(t_cmp):.1f} ms/step "
          f"(the last of {args.steps // args.epoch_steps} epochs of {args.epoch_steps} steps of {args.batch} traces); "
          f"plain SFT on COMPACT's problem-grouped batches {1e3 * min(t_grp):.1f} ms/step")
    print(f"compact/mtd step-time ratio: {min(t_cmp) / min(t_mtd):.2f}  (goal ≤ 1.15)")
    print(f"  of which the grouped layout: grouped-SFT/mtd {min(t_grp) / min(t_mtd):.2f}, "
          f"compact/grouped-SFT {min(t_cmp) / min(t_grp):.2f}")
    m_mtd, m_cmp = saved_bytes(tok, rows, new_model, args, False), saved_bytes(tok, rows, new_model, args, True)
    print(f"compact/mtd saved-activation memory ratio: {m_cmp / m_mtd:.2f}  (goal ≤ 1.2)")


if __name__ == "__main__":
    main()
