"""QR-Distill's joint step against the students' plain SFT on the paths routed to them (issue 18: goal ≤ 1.3).

Two students with different tokenizers and architectures (the lab student's shape, Llama d=64 with the lab
tokenizer, and student-b's, Qwen2 d=48 with its digit-splitting tokenizer; fresh weights), the four lab styles
as four teachers on the same problems (every question has 4 paths: 1,200 paths), ``--batch`` paths per QR
step, the default settings (``hashing`` encoder: features are precomputed outside the clock either way).

Every run trains ``--epochs`` epochs and is timed over its last one, from the engine's own step log (so
start-up is not counted and every run is timed on exactly the same paths — a window of a few dozen random
steps drew ±5% more or fewer tokens for one run than for another).  QR's mean selection rate per student
r_s is read from its own metrics (a fresh router sits near ½; ``--rate`` starts it elsewhere); the reference
is each student's plain SFT (the engine's defaults) over r_s of the paths (a fixed random subset: the paths
routed to it) with batch round(r_s × batch), and the ratio is QR's epoch time over the sum of the two SFT
epoch times (best of ``--repeats``, interleaved).  A second ratio takes each student's SFT on every path
(the paper's Table 3: the students trained apart).

A third figure is the floor any QR step pays over that reference: each student's plain SFT on QR's own
question-grouped batches (Eq. 3's entropy is per question, so a question's paths share a batch), laid
out as QR's own forwards are (one packed row in length buckets under accord's varlen SDPA; padded and cut into
length buckets with ``--pack off``) — with ``mutual_paths: routed`` a random share r_s of
each batch's paths with gradient and a no-grad forward over the rest (the router's signal needs every
(path, student) CE as a value, spec Q7), with ``all`` every path with gradient (Eq. 8's mutual loss covers
every path).  floor/routed-SFT is what those requirements cost on this machine; qr/floor is what accord's
step adds on top (routing, the mutual loss, the router, two models in one step).  With ``routed`` the bench
also measures c, a no-grad forward's process time over a training step's on the same batches, and prints the
floor's arithmetic bound 1 + c·(1 − r)/r: the issue's goal is below it wherever c·(1 − r)/r > 0.3.

    python bench/qr.py [--epochs 2] [--batch 32] [--repeats 2] [--mutual-paths all|routed]
        [--pack auto|on|off]
        [--shape lab|small] [--rate R]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random

import torch

PACKING = {"auto": None, "on": True, "off": False}  # --pack → train.packing
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
    from accord.train.engine import TrainArgs, train

    names = list(toks)
    students = {n: new[n]() for n in names}
    ex = qr._encode(rows, names, toks, 256, True)
    feat = qr._hashing([r["messages"][-1]["content"] for r in rows])
    router = qr.Router(feat.shape[1], qr.fit_projections(students, ex, "fitted", 0))
    if args.rate is not None:  # start the router near selection rate r (the lab's router settles above ½)
        with torch.no_grad():
            router.mlp[-1].bias += math.log(args.rate / (1 - args.rate))
    q = QrConfig(encoder="hashing", mutual_paths=args.mutual_paths)
    batcher = qr.capped_batcher(None)
    first, last = epoch_steps([(e["group"], len(e["ids"])) for e in ex], args.batch, batcher, args.epochs)
    targs = TrainArgs(steps=first + last, batch_size=args.batch, lr=1e-3, max_len=256, seed=0, bf16=False)
    targs.packing = PACKING[args.pack]
    events = []
    with contextlib.ExitStack() as stack:  # as the recipe: varlen SDPA, paths packed
        pack = qr.packed_students(students, toks, targs, stack)
        train({**students, "heads": router}, {**toks, "heads": None}, [],
              targs, examples=ex, batcher=batcher, units_fn=len,
              loss_fn=qr.make_loss_fn(q, names, set(), pack=pack),
              collate_fn=qr.collate_paths(names, [t.pad_token_id for t in toks.values()], feat), log=events.append)
    return last_epoch(events, last), {n: sum(e[f"sel/{n}"] for e in events) / len(events) for n in names}


def epoch_steps(keys: list, batch: int, batcher, epochs: int) -> tuple[int, int]:
    """(steps before the last epoch, steps of the last epoch) of the engine's batch stream (seed 0)."""
    rng = random.Random(0)  # as engine.BatchStream
    sizes = [len(batcher(keys, batch, rng)) for _ in range(epochs)]
    return sum(sizes[:-1]), sizes[-1]


def last_epoch(log: list[dict], steps: int) -> float:
    """Seconds of the last ``steps`` optimizer steps, from the engine's step events."""
    return log[-1]["elapsed_s"] - log[-steps - 1]["elapsed_s"]


def run_sft(tok, rows, new_model, share: float, batch: int, args) -> float:
    """One epoch of plain SFT (the engine's defaults: length-grouped batches) over a fixed random ``share`` of
    the paths."""
    from accord.train.engine import TrainArgs, encode_example, length_grouped_batches, train

    model = new_model()
    picked = random.Random(1).sample(rows, round(share * len(rows)))
    ex = [encode_example(tok, r, 256) for r in picked]
    first, last = epoch_steps([len(x) for x, _ in ex], batch, length_grouped_batches, args.epochs)
    events = []
    train(model, tok, picked, TrainArgs(steps=first + last, batch_size=batch, lr=1e-3, max_len=256, seed=0,
                                        bf16=False, packing=PACKING[args.pack]), examples=ex, log=events.append)
    return last_epoch(events, last)


def run_floor(tok, rows, new_model, rate: float, args) -> float:
    """One epoch of plain SFT on question-grouped batches of ``args.batch`` paths: a random share ``rate`` of
    each batch with gradient, a no-grad forward over the rest (the engine's own collate and loss for both)."""
    from accord.train import qr
    from accord.train.engine import (
        TrainArgs,
        collate,
        collate_bucketed,
        collate_grouped,
        encode_example,
        grouped_batches,
        model_inputs,
        sft_loss,
        train,
    )

    model = new_model()
    ids = [encode_example(tok, r, 256) for r in rows]
    ex = [{"ids": x, "labels": y, "group": r["problem_id"]} for (x, y), r in zip(ids, rows)]
    first, last = epoch_steps([(e["group"], len(e["ids"])) for e in ex], args.batch, grouped_batches, args.epochs)
    targs = TrainArgs(steps=first + last, batch_size=args.batch, lr=1e-3, max_len=256, seed=0, bf16=False,
                      packing=PACKING[args.pack])
    rng = random.Random(1)

    stack = contextlib.ExitStack()
    packed = bool(qr.packed_students({"s": model}, {"s": tok}, targs, stack))

    def one(c):  # as QR's own forwards: packed in one row by length bucket, or padded and cut into buckets
        if packed:
            return collate_bucketed(c, tok.pad_token_id)
        return collate_grouped(c, lambda part: collate(part, tok.pad_token_id))

    def split(c):
        pick = set(rng.sample(range(len(c)), max(1, round(rate * len(c)))))
        rest = [e for i, e in enumerate(c) if i not in pick]
        return {"routed": one([e for i, e in enumerate(c) if i in pick]), "rest": one(rest) if rest else None}

    def loss_fn(m, b, n_units):
        if b["rest"] is not None:
            with torch.no_grad():
                for part in b["rest"].get("parts", [b["rest"]]):
                    m(**model_inputs(part))
        return sft_loss(m, b["routed"], n_units)

    events = []
    with stack:
        train(model, tok, [], targs, examples=ex, batcher=grouped_batches, loss_fn=loss_fn, collate_fn=split,
              log=events.append)
    return last_epoch(events, last)


def forward_cost(tok, rows, new_model, batch: int, steps: int = 20, repeats: int = 3) -> float:
    """c = process time of a no-grad forward / a training step (forward + backward + AdamW) over the same
    question-grouped, packed batches (best of ``repeats``, interleaved): the routed floor is 1 + c·(1 − r)/r."""
    import time

    from accord.train import varlen
    from accord.train.engine import collate_bucketed, encode_example, grouped_batches, model_inputs, sft_loss

    model = new_model()
    ids = [encode_example(tok, r, 256) for r in rows]
    ex = [{"ids": x, "labels": y, "group": r["problem_id"]} for (x, y), r in zip(ids, rows)]
    keys = [(e["group"], len(e["ids"])) for e in ex]
    batches = grouped_batches(keys, batch, random.Random(0))[:steps]
    cs = [collate_bucketed([ex[i] for i in b], tok.pad_token_id) for b in batches]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        for c in cs:
            sft_loss(model, c, 1000)[0].backward()
            opt.step()
            opt.zero_grad()

    def forward():
        with torch.no_grad():
            for c in cs:
                model(**model_inputs(c))

    best = {step: float("inf"), forward: float("inf")}
    with varlen.segmented(model, True):
        for _ in range(repeats):
            for f in best:
                t = time.process_time()
                f()
                best[f] = min(best[f], time.process_time() - t)
    return best[forward] / best[step]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (≥ 2); the last one is timed")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mutual-paths", choices=["all", "routed"], default="all")
    ap.add_argument("--shape", choices=list(SHAPES), default="lab",
                    help="lab: the lab's students (d = 64 and 48, 2 layers); small: d = 256 and 192, 4 layers")
    ap.add_argument("--rate", type=float, default=None,
                    help="start the router at this selection rate (its output bias at logit(r)); a fresh router "
                         "sits near ½, the lab's (configs/lab-qr.yaml) averages 0.64 over its 400 steps")
    ap.add_argument("--pack", choices=["auto", "on", "off"], default="auto",
                    help="train.packing for every run: auto (the default: packed under varlen SDPA), on, off")
    args = ap.parse_args()
    args.epochs = max(2, args.epochs)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    toks, rows, new = setup(shape=args.shape)
    best = {"qr": float("inf"), "routed": float("inf"), "all": float("inf"), "floor": float("inf")}
    rates: dict = {}
    for _ in range(args.repeats):
        t, rates = run_qr(toks, rows, new, args)
        now = {"qr": t,
               "routed": sum(run_sft(toks[n], rows, new[n], rates[n], round(rates[n] * args.batch), args)
                             for n in toks),
               "all": sum(run_sft(toks[n], rows, new[n], 1.0, args.batch, args) for n in toks),
               "floor": sum(run_floor(toks[n], rows, new[n], 1.0 if args.mutual_paths == "all" else rates[n], args)
                            for n in toks)}
        best = {k: min(v, now[k]) for k, v in best.items()}
    print("selection rates: " + ", ".join(f"{n} {r:.2f}" for n, r in rates.items()))
    print(f"one epoch of {len(rows)} paths: qr {best['qr']:.2f} s; SFT summed over the students on their routed "
          f"paths {best['routed']:.2f} s, on every path {best['all']:.2f} s; the floor {best['floor']:.2f} s")
    print(f"qr/routed-SFT time ratio: {best['qr'] / best['routed']:.2f}  (mutual_paths={args.mutual_paths}; "
          "goal ≤ 1.3)")
    what = ("every path with gradient (Eq. 8's mutual loss on every path)" if args.mutual_paths == "all" else
            "the routed share with gradient and a no-grad forward over the rest")
    print(f"floor/routed-SFT time ratio: {best['floor'] / best['routed']:.2f}  (SFT on QR's question-grouped "
          f"batches, {what}); qr/floor: {best['qr'] / best['floor']:.2f}")
    if args.mutual_paths == "routed":
        cost = {n: forward_cost(toks[n], rows, new[n], args.batch) for n in toks}
        bound = 1 + sum(cost[n] * (1 - rates[n]) / rates[n] for n in toks) / len(toks)  # mean over the students
        print("no-grad forward / training step (process time, QR's packed question-grouped batches): "
              + ", ".join(f"{n} {c:.2f}" for n, c in cost.items())
              + f"; the routed floor's arithmetic bound 1 + c·(1 − r)/r ≈ {bound:.2f} at these rates")
    print(f"qr/every-path-SFT time ratio: {best['qr'] / best['all']:.2f}  (the paper's Table 3 comparison: "
          "students trained apart on all paths)")


if __name__ == "__main__":
    main()
