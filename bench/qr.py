"""QR-Distill's joint step against the students' plain SFT on the paths routed to them (issue 18: goal ≤ 1.3).

Two students with different tokenizers and architectures (the lab student's shape, Llama d=64 with the lab
tokenizer, and student-b's, Qwen2 d=48 with its digit-splitting tokenizer; fresh weights), the four lab styles
as four teachers on the same problems (every question has 4 paths), ``--batch`` paths per step.  QR runs
``--steps`` steps with the default settings (``hashing`` encoder: features are precomputed outside the clock
either way); its mean selection rate per student r_s is read from its own metrics, and each student then
runs plain SFT (the engine's defaults) with batch round(r_s × batch) for the same steps.  The ratio is QR's
steady-state step time (from the engine's step log, after 5 steps: start-up is not counted) over the sum of
the two SFT step times (best of ``--repeats``, interleaved); a second ratio
takes each student's SFT on every path (the paper's Table 3: the students trained apart).

    python bench/qr.py [--steps 30] [--batch 32] [--repeats 2] [--mutual-paths all|routed] [--pack]
"""

from __future__ import annotations

import argparse
import random

import torch

SHAPES = {"lab": (None, None), "small": (256, 4)}  # (student a's hidden size, layers); student b is 0.75 × as wide


def setup(n_problems: int = 300, shape: str = "lab"):
    from accord.lab.recipe import (
        PROFILES,
        STUDENT_B_RECIPE,
        _new_model,
        _new_qwen2,
        _trace_rows,
        lab_tokenizer,
        lab_tokenizer_b,
    )
    from accord.lab.tasks import generate

    p = PROFILES["full"]
    d, layers = (SHAPES[shape][0] or p.d), (SHAPES[shape][1] or p.layers)
    toks = {"a": lab_tokenizer(), "b": lab_tokenizer_b()}
    probs = generate("arith", "train")[4000:4000 + n_problems]
    rows = []
    for st in ("terse", "verbose", "verify", "shifted"):
        for r, q in zip(_trace_rows(probs, st, random.Random(0)), probs):
            rows.append({**r, "problem_id": q["id"], "teacher": st, "type": st, "answer": q["answer"]})
    new = {"a": lambda: _new_model(toks["a"], d, layers, seed=0),
           "b": lambda: _new_qwen2(toks["b"], round(d * STUDENT_B_RECIPE["width"]), layers, seed=0)}
    return toks, rows, new


def run_qr(toks, rows, new, args) -> tuple[float, dict]:
    from accord.config import QrConfig
    from accord.train import qr
    from accord.train.engine import TrainArgs, train, use_packing, varlen_attention

    names = list(toks)
    students = {n: new[n]() for n in names}
    ex = qr._encode(rows, names, toks, 256, True)
    feat = qr._hashing([r["messages"][-1]["content"] for r in rows])
    router = qr.Router(feat.shape[1], qr.fit_projections(students, ex, "fitted", 0))
    q = QrConfig(encoder="hashing", mutual_paths=args.mutual_paths)
    targs = TrainArgs(steps=args.steps, batch_size=args.batch, lr=1e-3, max_len=256, seed=0, bf16=False)
    pack = {n: toks[n].pad_token_id for n in names  # as the recipe: packed under varlen kernels (or --pack)
            if (args.pack or varlen_attention(students[n])) and use_packing(students[n], targs, "cpu")}
    events = []
    train({**students, "heads": router}, {**toks, "heads": None}, [],
          targs, examples=ex, batcher=qr.capped_batcher(None), units_fn=len,
          loss_fn=qr.make_loss_fn(q, names, set(), pack=pack),
          collate_fn=qr.collate_paths(names, [t.pad_token_id for t in toks.values()], feat), log=events.append)
    return steady(events) * args.steps, {n: sum(e[f"sel/{n}"] for e in events) / len(events) for n in names}


def steady(log: list[dict], skip: int = 5) -> float:
    """Seconds per optimizer step after the first ``skip`` steps, from the engine's step events."""
    return (log[-1]["elapsed_s"] - log[skip - 1]["elapsed_s"]) / (len(log) - skip)


def run_sft(tok, rows, new_model, batch: int, args) -> float:
    from accord.train.engine import TrainArgs, encode_example, train

    model = new_model()
    ex = [encode_example(tok, r, 256) for r in rows]
    events = []
    train(model, tok, rows, TrainArgs(steps=args.steps, batch_size=max(1, batch), lr=1e-3, max_len=256, seed=0,
                                      bf16=False), examples=ex, log=events.append)
    return steady(events) * args.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mutual-paths", choices=["all", "routed"], default="all")
    ap.add_argument("--shape", choices=list(SHAPES), default="lab",
                    help="lab: the lab's students (d = 64 and 48, 2 layers); small: d = 256 and 192, 4 layers")
    ap.add_argument("--pack", action="store_true", help="pack each student's paths (one row per forward)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    toks, rows, new = setup(shape=args.shape)
    best_qr, best_ref, best_all, rates = float("inf"), float("inf"), float("inf"), {}
    for _ in range(args.repeats):
        t, rates = run_qr(toks, rows, new, args)
        best_qr = min(best_qr, t)
        best_ref = min(best_ref, sum(run_sft(toks[n], rows, new[n], round(rates[n] * args.batch), args)
                                     for n in toks))
        best_all = min(best_all, sum(run_sft(toks[n], rows, new[n], args.batch, args) for n in toks))
    print("selection rates: " + ", ".join(f"{n} {r:.2f}" for n, r in rates.items()))
    print(f"qr step time: {best_qr / args.steps * 1e3:.1f} ms; SFT summed over the students on their routed "
          f"paths: {best_ref / args.steps * 1e3:.1f} ms, on every path: {best_all / args.steps * 1e3:.1f} ms")
    print(f"qr/routed-SFT step-time ratio: {best_qr / best_ref:.2f}  (mutual_paths={args.mutual_paths}; goal ≤ 1.3)")
    print(f"qr/every-path-SFT step-time ratio: {best_qr / best_all:.2f}  (the paper's Table 3 comparison: "
          "students trained apart on all paths)")


if __name__ == "__main__":
    main()
