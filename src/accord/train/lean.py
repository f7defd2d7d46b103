"""Lean RMSNorm and SwiGLU for training (``train.lean_layers``): the same forward, less saved for the backward.

Why by hand: under bf16 autocast with float32 master weights, transformers' RMSNorm (Llama, Qwen2/3, Mistral…)
computes in float32 and autograd keeps, per norm, the float32 input (a new copy when the input is bf16, as for
Qwen3's q/k norms on ``[T, heads, d_head]``), the float32 normalised tensor, and its cast back; its MLP keeps
``silu(gate)`` beside ``gate`` and ``up``.  Profiled on an H200 (session 18, Qwen3-0.6B's shape, 4 × ≤ 4,096
tokens) the engine's peak was 52 GiB, most of it such activations, and most of its GPU time elementwise work.
Liger Kernel fuses these in Triton (CUDA only, an extra dependency); here they are autograd functions in plain
PyTorch that keep only their inputs (and RMSNorm's per-row ``1/rms``) and recompute the rest in the backward:

- :class:`RMSNormFn` runs transformers' exact forward ops (``x.float()``, ``pow(2).mean``, ``rsqrt``, the cast
  back to the input dtype, ``weight *``), so outputs are bit-identical; its backward is the RMSNorm gradient
  written out, with the same cast of the incoming gradient to the input dtype that autograd applies through
  ``.to(input_dtype)``.  On CUDA it runs PyTorch's own fused RMSNorm kernels instead (``aten::_fused_rms_norm``
  and ``_fused_rms_norm_backward``, PyTorch ≥ 2.9; what ``F.rms_norm`` calls there): one kernel each way where the
  eager formula launches about six forward and a dozen backward, each a pass over the activations — at Qwen3's
  four norms per layer, the largest share of a step's elementwise bytes (``bench/traffic.py``).  It computes
  x·rstd·weight in float32 and rounds once (the eager formula rounds x·rstd to the input dtype before the
  weight), so it equals transformers' to the output dtype's rounding, and returns transformers' output dtype (the
  promotion of input and weight).  A build or dtype pair whose kernel refuses a call says so once and runs the
  eager formula for that pair from then on.
- :class:`SwiGLUFn` is ``silu(gate) * up`` with ``aten::silu_backward`` in its backward, as autograd's.

Which modules: a module whose class name ends in ``RMSNorm`` with a 1-D ``weight`` and a ``variance_epsilon``,
and an MLP with ``gate_proj``/``up_proj``/``down_proj`` and a SiLU ``act_fn`` — each *class* is first checked on
a random input against its own forward (a Gemma-style ``1 + weight`` norm or another activation fails the check
and is left alone).  Instance ``forward`` attributes are set for the run and deleted after it; nothing is saved
in checkpoints.  ``None`` (the default): on CUDA only, like ``train.chunked_loss`` — on a CPU the lab's figures
are pinned by their recipes, and the CPU is not where activation memory runs out.  Not with ``train.compile``
(which fuses the same modules itself).
"""

from __future__ import annotations

import contextlib
import types

import torch

# devices whose RMSNorm runs PyTorch's fused kernels (``aten::_fused_rms_norm`` and its backward: CUDA, PyTorch
# ≥ 2.9); the tests add ``cpu``, where the forward is a composite and the backward has no kernel
FUSED_ON = {"cuda"}
_BROKEN: set[tuple] = set()  # (device type, x dtype, weight dtype) a fused call refused: the eager formula since


def _fused_fwd(x, weight, eps):
    return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)


def _fused_bwd(gy, x, rstd, weight, mask):
    return torch.ops.aten._fused_rms_norm_backward(gy, x, [x.shape[-1]], rstd, weight, mask)


def fused_on(device) -> bool:
    """Whether RMSNorm runs PyTorch's fused kernels on ``device`` (its type in :data:`FUSED_ON`, both ops in this
    build): what the first line and ``accord env`` say."""
    return torch.device(device).type in FUSED_ON and hasattr(torch.ops.aten, "_fused_rms_norm_backward")


def fused(x, weight) -> bool:
    """Whether this RMSNorm call runs PyTorch's fused kernels (:data:`FUSED_ON`, both ops in this build, and no
    earlier refusal for these dtypes)."""
    return fused_on(x.device) and (x.device.type, x.dtype, weight.dtype) not in _BROKEN


def _refused(x, weight, e: Exception) -> None:
    from accord.ui import say_once

    _BROKEN.add((x.device.type, x.dtype, weight.dtype))
    say_once(f"lean RMSNorm: PyTorch's fused kernel refused {x.dtype} input with a {weight.dtype} weight "
             f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); the eager formula for these from here on")


class RMSNormFn(torch.autograd.Function):
    """transformers' RMSNorm, ``weight * (x.float() · rsqrt(mean(x²) + eps)).to(x.dtype)``, keeping ``x`` and
    the per-row ``rsqrt`` for the backward (not the float32 copies) — through PyTorch's fused kernels where
    :func:`fused` (one kernel each way; x·rstd·weight rounded once, so equal to the eager formula to the output
    dtype's rounding, not bit for bit), else the eager formula (bit-identical forward)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        ctx.fused = fused(x, weight)
        if ctx.fused:
            try:
                with torch.autocast(x.device.type, enabled=False):  # the dtypes as given, as the eager formula's
                    y, rstd = _fused_fwd(x, weight, eps)
                ctx.save_for_backward(x, weight, rstd)
                return y.to(torch.promote_types(x.dtype, weight.dtype))  # the eager formula's output dtype
            except (RuntimeError, NotImplementedError, TypeError) as e:
                _refused(x, weight, e)
                ctx.fused = False
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, weight, rstd = ctx.saved_tensors
        if ctx.fused:
            try:
                gx, gw = _fused_bwd(gy.to(x.dtype).contiguous(), x, rstd, weight, [True, ctx.needs_input_grad[1]])
                return gx.to(x.dtype), gw.to(weight.dtype) if ctx.needs_input_grad[1] else None, None
            except (RuntimeError, NotImplementedError, TypeError) as e:
                _refused(x, weight, e)
            rstd = rstd.float().reshape(*x.shape[:-1], 1)
        xf = x.to(torch.float32)
        n = (xf * rstd).to(x.dtype)
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (gy * n).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        # autograd casts the gradient reaching ``.to(x.dtype)`` to x.dtype, then back to float32
        gn = (gy * weight).to(x.dtype).to(torch.float32)
        # d/dx of x·rstd(x): rstd·g − x·rstd³·mean(g·x)
        gx = rstd * gn - xf * rstd.pow(3) * (gn * xf).mean(-1, keepdim=True)
        return gx.to(x.dtype), gw, None


class SwiGLUFn(torch.autograd.Function):
    """``silu(gate) * up``, keeping ``gate`` and ``up`` (``silu(gate)`` is recomputed in the backward)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, gy):
        gate, up = ctx.saved_tensors
        g_up = gy * torch.nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        g_gate = torch.ops.aten.silu_backward(gy * up, gate) if ctx.needs_input_grad[0] else None
        return g_gate, g_up


def _norm_forward(self, hidden_states):
    return RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(SwiGLUFn.apply(self.gate_proj(x), self.up_proj(x)))


def _is_norm(m) -> bool:
    w = getattr(m, "weight", None)
    return (type(m).__name__.endswith("RMSNorm") and isinstance(w, torch.nn.Parameter) and w.dim() == 1
            and isinstance(getattr(m, "variance_epsilon", None), float))


def _is_mlp(m) -> bool:
    act = getattr(m, "act_fn", None)
    return (all(isinstance(getattr(m, k, None), torch.nn.Module) for k in ("gate_proj", "up_proj", "down_proj"))
            and act is not None and "silu" in type(act).__name__.lower())


def _same(module, lean_forward, width: int) -> bool:
    """Whether ``lean_forward`` gives what the module's own forward gives on a random float32 input."""
    p = next(module.parameters())
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0)).to(p.device, torch.float32)
    with torch.no_grad(), torch.autocast(p.device.type, enabled=False):
        try:
            want, got = module.forward(x.to(p.dtype)), lean_forward(module, x.to(p.dtype))
        except Exception:  # noqa: BLE001 — a module that does not take this input is left alone
            return False
    return want.shape == got.shape and torch.allclose(want.float(), got.float(), rtol=1e-4, atol=1e-5)


def targets(model) -> list[tuple[torch.nn.Module, object]]:
    """(module, lean forward) for every RMSNorm and SwiGLU MLP of ``model`` whose class passes :func:`_same`."""
    ok: dict[type, bool] = {}
    out = []
    for m in getattr(model, "module", model).modules():
        kind = _norm_forward if _is_norm(m) else _mlp_forward if _is_mlp(m) else None
        if kind is None:
            continue
        if type(m) not in ok:
            width = m.weight.shape[0] if kind is _norm_forward else m.gate_proj.in_features
            ok[type(m)] = _same(m, kind, width)
        if ok[type(m)]:
            out.append((m, kind))
    return out


def saved_bytes(model, run) -> int:
    """Bytes autograd keeps for the backward while ``run()`` does a forward of ``model``: unique storages, the
    parameters excluded (what lean layers are measured by: ``bench/lean.py``, ``tests/test_lean.py``)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def use_lean(setting: bool | None, device: torch.device) -> bool:
    """``train.lean_layers``: ``None`` → on CUDA only."""
    return device.type == "cuda" if setting is None else setting


@contextlib.contextmanager
def lean_layers(model, on: bool):
    """``model`` (or each module of a dict) with its RMSNorms and SwiGLU MLPs lean inside the block; yields how
    many modules were switched.  Their own forwards after it."""
    tops = [m for m in (model.values() if isinstance(model, dict) else [model]) if isinstance(m, torch.nn.Module)]
    # transformers' hub kernels (`use_kernels`, on by default from 5.25 for a model loaded without accord's loader)
    # swap the forwards of the layers they decorate on every train()/eval(), taking lean ones back: off meanwhile
    kernelized = [m for m in tops if on and getattr(m, "use_kernels", False) is True]
    for m in kernelized:
        m.use_kernels = False
    parts = [t for m in tops for t in targets(m)] if on else []
    for m, fwd in parts:
        m.forward = types.MethodType(fwd, m)
    try:
        yield len(parts)
    finally:
        for m, _ in parts:  # a forward something else already took back stays gone
            m.__dict__.pop("forward", None)
        for m in kernelized:
            m.use_kernels = True


def n_lean(model) -> int:
    """How many modules of ``model`` run lean now (:func:`lean_layers`)."""
    return sum("forward" in vars(c) and getattr(c.forward, "__func__", None) in (_norm_forward, _mlp_forward)
               for c in getattr(model, "module", model).modules())
