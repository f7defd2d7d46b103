"""The RMSNorms of a training step, timed alone: one forward and backward of each of a Qwen3 layer's four norms
(input and post-attention over the residual stream, q and k over the heads), counted ``num_hidden_layers`` times —
transformers' module, the lean RMSNorm's eager formula (``train.lean_layers``), and the lean RMSNorm through
PyTorch's fused kernels (where :func:`accord.train.lean.fused_on`: CUDA) — with the dtypes a step has: under bf16
autocast with float32 weights (residual stream float32, q/k bf16) and with master weights (all bf16).

    python bench/norm.py [--device cuda] [--tokens 8192] [--shape qwen3-0.6b]

Prints ``fused/eager lean RMSNorm time ratio`` per case where the fused kernels run; a step of ``bench/gpu.sh``.
"""

from __future__ import annotations

import argparse
import contextlib

import torch


def step_ms(make, shapes, device: str, reps: int = 5) -> float:
    """Milliseconds of a forward and backward of each (shape, x dtype, weight dtype) of ``shapes`` through the norm
    ``make(w)`` gives — ``(norm, the weight tensor to differentiate)`` —, best of ``reps`` after an untimed pass."""
    from engine import timed  # bench/engine.py: best of n after an untimed call

    g = torch.Generator(device=device).manual_seed(0)
    args = []
    for shape, xd, wd in shapes:
        x = torch.randn(*shape, generator=g, device=device).to(xd).requires_grad_()
        w = (1 + 0.1 * torch.randn(shape[-1], generator=g, device=device)).to(wd).requires_grad_()
        args.append((x, *make(w), torch.randn(*shape, generator=g, device=device)))

    def run():
        for x, norm, leaf, gy in args:
            y = norm(x)
            torch.autograd.grad(y, (x, leaf), gy.to(y.dtype))

    return timed(run, device, reps) * 1e3


def main() -> None:
    from engine import SHAPES  # bench/engine.py's shapes
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from accord.train import lean

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=None, help="tokens a step (default 8192 on CUDA, 1024 on a CPU)")
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen3-0.6b")
    args = ap.parse_args()
    dev, c = args.device, SHAPES[args.shape]
    T = args.tokens or (8192 if dev == "cuda" else 1024)
    eps = c.get("rms_norm_eps", 1e-6)
    bf16, f32 = torch.bfloat16, torch.float32

    def transformers_norm(w):  # the module differentiates its own parameter
        m = Qwen3RMSNorm(w.shape[0], eps=eps).to(w.device, w.dtype)
        return m, m.weight

    @contextlib.contextmanager
    def eager():  # the lean RMSNorm's eager formula, wherever the fused kernels would run
        old, lean.FUSED_ON = lean.FUSED_ON, set()
        try:
            yield
        finally:
            lean.FUSED_ON = old

    def lean_norm(w):
        return (lambda x: lean.RMSNormFn.apply(x, w, eps)), w

    d, h, kv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    cases = {"bf16 autocast, float32 weights": (f32, f32), "master weights (bf16)": (bf16, bf16)}
    print(f"RMSNorms of {c['num_hidden_layers']} layers × 4, {T} tokens, on {dev} (ms a step, forward + backward)")
    for case, (resid, wd) in cases.items():
        shapes = [((T, d), resid, wd), ((T, d), resid, wd), ((T, h, hd), bf16, wd), ((T, kv, hd), bf16, wd)]
        ms = {}
        with eager():
            ms["transformers"] = step_ms(transformers_norm, shapes, dev) * c["num_hidden_layers"]
            ms["lean"] = step_ms(lean_norm, shapes, dev) * c["num_hidden_layers"]
        if lean.fused_on(dev):
            ms["lean fused"] = step_ms(lean_norm, shapes, dev) * c["num_hidden_layers"]
        print(f"{case}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)
        if "lean fused" in ms:
            print(f"fused/eager lean RMSNorm time ratio ({case}): {ms['lean fused'] / ms['lean']:.2f} "
                  f"(fused/transformers: {ms['lean fused'] / ms['transformers']:.2f})", flush=True)
    if lean._BROKEN:
        print(f"fused kernel refused: {sorted(map(str, lean._BROKEN))}")


if __name__ == "__main__":
    main()
