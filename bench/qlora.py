"""QLoRA against LoRA and full fine-tuning through accord's engine: throughput and peak memory.

Same model (random init at a Qwen3 shape, nothing downloaded; created in float32 on the CPU, as a student is
loaded), same synthetic batches, the engine's defaults for the device (bf16 autocast, packing and the chunked
loss on CUDA).  LoRA rank ``--r`` on every linear layer; QLoRA adds ``lora_quantize: nf4`` (4-bit base).
Steady-state tokens/s after 2 warm steps; peak accelerator memory on CUDA (the CPU has no allocator
high-water mark: n/a).  Needs bitsandbytes (``pip install 'accord[qlora]'``).

    python bench/qlora.py                                              # CPU, qwen3-tiny
    python bench/qlora.py --device cuda --shape qwen3-0.6b --batch 8 --steps 12 --max-len 2048
"""

from __future__ import annotations

import argparse
import logging

import torch
from engine import SHAPES, _Clock, _peak, _peak_reset, new_qwen3, synthetic


def run(mode: str, args) -> tuple[float, float | None]:
    from types import SimpleNamespace

    from accord.train.engine import BatchStream, TrainArgs, train

    ex = synthetic(args.batch * args.steps, SHAPES[args.shape]["vocab_size"], args.max_len)
    stream = BatchStream(ex, args.batch, 0)
    tokens = [sum(len(ex[i][0]) for i in stream.next()) for _ in range(args.steps)]
    lora = {} if mode == "full" else {"lora_r": args.r, "lora_alpha": 2 * args.r}
    targs = TrainArgs(steps=args.steps, batch_size=args.batch, lr=1e-4, max_len=args.max_len, seed=0,
                      warmup_ratio=0.1, **lora, **({"lora_quantize": "nf4"} if mode == "qlora" else {}))
    model = new_qwen3(args.shape, "cpu")
    _peak_reset(args.device)
    clock = _Clock(args.device, warm=2)
    train(model, SimpleNamespace(pad_token_id=0), [], targs, examples=ex, on_step=clock.tick)
    return clock.rate(tokens), _peak(args.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen3-tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--r", type=int, default=32, help="LoRA rank (QR-Distill's 32)")
    args = ap.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional hub kernel it cannot fetch offline
    try:
        from accord.train.qlora import bitsandbytes

        bitsandbytes()
    except Exception as e:  # noqa: BLE001 — the bench says why it cannot run and exits cleanly
        print(f"skipped: {e}")
        return
    res = {m: run(m, args) for m in ("full", "lora", "qlora")}
    for m, (rate, peak) in res.items():
        print(f"{m:6s} {rate:10.0f} tokens/s   peak {f'{peak:.2f} GiB' if peak is not None else 'n/a'}")
    (lr, lp), (qr, qp) = res["lora"], res["qlora"]
    print(f"qlora/lora throughput ratio: {qr / lr:.2f}")
    if qp is not None:
        print(f"qlora/lora peak memory ratio: {qp / lp:.2f}  (full fine-tuning: {res['full'][1]:.2f} GiB)")


if __name__ == "__main__":
    main()
