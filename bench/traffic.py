"""Where a training step's memory traffic goes outside its matrix products, counted on the CPU: the bytes every
other operator reads and writes (its tensor inputs and outputs, views aside) in one forward and backward of a
Qwen3 at a real shape's layer widths under bf16 autocast, per token per layer — with and without lean layers
(``train.lean_layers``: the eager formula, and the fused RMSNorm that runs on CUDA, modelled here by one operator
each way) and master weights (``train.master_weights``).

On a GPU such operators are bound by memory bandwidth, so these bytes over the device's bandwidth (4.8 TB/s on an
H200) bound their time from below; session 18's H200 profile found two thirds of the step's GPU time in them.
The figure is the slope between two sequence lengths, so per-forward costs (autocast's weight casts) drop out.
CPU autocast casts a few operators differently from CUDA's (softmax, pow); read it as where the bytes are, and
``bench/norm.py`` for the fused kernels' time.

    python bench/traffic.py [--shape qwen3-0.6b] [--tokens 128 384] [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# operators whose time is compute, not traffic: the matrix products and attention's fused kernels
COMPUTE = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product", "_flash_attention", "_efficient_attention")


NO_COPY = ("detach", "_unsafe_view", "alias")  # return their input's storage: no traffic


def part(parents: set[str]) -> str:
    """The part of a Qwen3 layer an operator runs in, from the modules it runs inside (``ModuleTracker``)."""
    inner = max(parents, key=len).split(".")
    last = inner[-1]
    if last.endswith("_proj"):
        return "linear layers: autocast's casts"
    if "norm" in last:
        return "RMSNorm (4 a layer)"
    if "mlp" in inner:
        return "MLP: SwiGLU"
    if last == "self_attn":
        return "attention: rotary, reshapes"
    if last.isdigit() and "layers" in inner:
        return "decoder layer: residual adds"
    return "embedding, head, loss, rotary tables"


class Traffic(TorchDispatchMode):
    """Bytes of the tensor inputs and outputs of every operator but views, :data:`NO_COPY` and :data:`COMPUTE`,
    by operator, and in the forward by the part of the layer it runs in (:func:`part`)."""

    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker
        self.by_op: collections.Counter = collections.Counter()
        self.by_part: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and not name.startswith(COMPUTE) and name not in NO_COPY:
            n = sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                    if isinstance(t, torch.Tensor))
            self.by_op[name] += n
            if not self.tracker.is_bw:  # the tracker's modules are not where a backward operator comes from
                self.by_part[part(self.tracker.parents)] += n
        return out


@torch.library.custom_op("accord_bench::rms_norm", mutates_args=())
def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for PyTorch's fused RMSNorm forward (CUDA only): one operator, so the count sees what one kernel
    reads and writes (x, w → y, 1/rms) and not the ops inside it."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * w.float()).to(x.dtype), rstd


@torch.library.custom_op("accord_bench::rms_norm_backward", mutates_args=())
def _rms_norm_backward(gy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor,
                       w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same for its backward (gy, x, 1/rms, w → gx, gw)."""
    n = x.float() * rstd
    gn = gy.float() * w.float()
    gx = rstd * (gn - n * (gn * n).mean(-1, keepdim=True))
    return gx.to(x.dtype), (gy.float() * n).reshape(-1, x.shape[-1]).sum(0).to(w.dtype)


@contextlib.contextmanager
def fused_norms(on: bool):
    """The lean RMSNorm's fused path on the CPU, through the stand-ins above (what it would move on CUDA)."""
    from accord.train import lean

    saved = lean.FUSED_ON, lean._fused_fwd, lean._fused_bwd
    if on:
        lean.FUSED_ON = {"cpu"}
        lean._fused_fwd = _rms_norm
        lean._fused_bwd = lambda gy, x, rstd, w, mask: _rms_norm_backward(gy, x, rstd, w)
    try:
        yield
    finally:
        lean.FUSED_ON, lean._fused_fwd, lean._fused_bwd = saved


def count(model, n: int) -> collections.Counter:
    """Bytes by operator of one forward and backward over ``n`` tokens under bf16 autocast."""
    from torch.utils.module_tracker import ModuleTracker

    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    tracker = ModuleTracker()
    mode = Traffic(tracker)
    with tracker, mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return mode.by_op + collections.Counter({("part", k): v for k, v in mode.by_part.items()})


def main() -> None:
    from engine import SHAPES  # bench/engine.py's shapes
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from accord.train import lean
    from accord.train.master import MasterWeights

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--tokens", type=int, nargs=2, default=[128, 384])
    ap.add_argument("--top", type=int, default=12, help="operators listed for the engine's CUDA configuration")
    ap.add_argument("--bandwidth", type=float, default=4.8, help="TB/s for the time bound (H200: 4.8)")
    args = ap.parse_args()
    layers, (t0, t1) = 2, args.tokens
    shape = {**SHAPES[args.shape], "vocab_size": 256, "num_hidden_layers": layers}
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**shape, max_position_embeddings=8192, tie_word_embeddings=True))
    full = SHAPES[args.shape]["num_hidden_layers"]
    per, ops = {}, {}
    for master in (False, True):
        for on in (False, True, "fused"):
            masters = MasterWeights([model], master)
            with lean.lean_layers(model, bool(on)), fused_norms(on == "fused"):
                a, b = count(model, t0), count(model, t1)
            masters.close()
            slope = {k: (b[k] - a.get(k, 0)) / (t1 - t0) / layers for k in b}
            per[master, on] = sum(v for k, v in slope.items() if not isinstance(k, tuple))
            ops[master, on] = slope
            print(f"master_weights {str(master).lower():5s} lean_layers {str(on).lower():5s}: "
                  f"{per[master, on] / 1024:7.1f} KiB per token per layer outside the products; at 8,192 tokens × "
                  f"{full} layers ≥ {per[master, on] * 8192 * full / args.bandwidth / 1e9:5.1f} ms at "
                  f"{args.bandwidth:g} TB/s", flush=True)
    for key, label in (((False, "fused"), "the engine's CUDA default (autocast, lean, fused RMSNorm)"),
                       ((True, "fused"), "with master weights (and lean, fused RMSNorm)")):
        total = per[key]
        fwd = {k[1]: v for k, v in ops[key].items() if isinstance(k, tuple)}
        print(f"forward by part of the layer ({sum(fwd.values()) / total:.0%} of the whole), {label}:")
        for name, v in sorted(fwd.items(), key=lambda kv: -kv[1]):
            print(f"  {name:36s} {v / 1024:7.1f} KiB  {v / sum(fwd.values()):5.1%}")
        print(f"by operator, {label}:")
        for name, v in sorted(((k, v) for k, v in ops[key].items() if not isinstance(k, tuple)),
                              key=lambda kv: -kv[1])[:args.top]:
            print(f"  {name:36s} {v / 1024:7.1f} KiB  {v / total:5.1%}")
    print(f"lean/plain traffic-per-token ratio: {per[False, True] / per[False, False]:.3f}")
    print(f"lean fused/plain traffic-per-token ratio: {per[False, 'fused'] / per[False, False]:.3f}")
    print(f"master+lean/plain traffic-per-token ratio: {per[True, True] / per[False, False]:.3f}")
    print(f"master+lean fused/plain traffic-per-token ratio: {per[True, 'fused'] / per[False, False]:.3f}")


if __name__ == "__main__":
    main()
