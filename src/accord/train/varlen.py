"""Packed rows attended example by example with PyTorch's SDPA: the varlen attention of FlashAttention-2, for
models that run on SDPA (every CPU, and GPUs without ``flash-attn``).

Why by hand: transformers keeps packed examples apart in two ways only.  Its FlashAttention path reads the example
boundaries from ``position_ids`` (``cu_seqlens``) but needs the ``flash-attn`` package and a CUDA device; its SDPA
path builds a block-diagonal mask over the whole row, which costs W² cells per row of width W and turns SDPA's
fused causal kernels off.  So the engine packed SDPA models into rows no wider than the longest example, and cut
COMPACT's problem-grouped micro-batches into length buckets, one forward each (a fixed cost per forward that made
the grouped layout 1.18× MTD's at the lab shape, ``bench/compact.py``).  No library offers varlen SDPA.

Here a packed micro-batch is one forward in one row, and only attention is done per example:

- Examples are found as FlashAttention's path finds them: a token whose position id is 0 starts one (and so does
  every row).  The layout is computed once per forward and read by every layer (cached on the ``position_ids``
  tensor the model hands to each layer).
- The engine lays a micro-batch out for it with :func:`accord.train.engine.collate_bucketed`: the examples cut into
  at most four length buckets (:func:`split_by_length`), bucket by bucket, each example right-padded to its
  bucket's longest (the padding continues its positions).  A bucket is then a run of equal-length examples, and
  its attention one SDPA call on a *view* ``[n, heads, L, d]`` of the row with ``is_causal=True`` and no mask:
  under a causal mask a real query never sees the padded keys after it, so SDPA's fused kernels run (flash on
  CUDA, flash-for-CPU here).  The outputs are joined in row order by one ``cat``.
- Any other packed row (more than ``MAX_RUNS`` runs: FlashAttention's one-row layout, say) is gathered per length
  bucket (``index_select``) and scattered back; a batch of one example per row is SDPA as it is.  A first version
  that gathered every micro-batch cost plain length-grouped batches 5–12% on 2 threads; views cost nothing.
- On CUDA, in bf16/fp16, with PyTorch's own varlen FlashAttention (``torch.nn.attention.varlen.varlen_attn``,
  PyTorch ≥ 2.10), a forward attends every example of the row in **one call per layer** from the examples'
  boundaries (the bucket padding of ``collate_bucketed`` stays with its example, causal, so no real token sees
  it).  The collate computes them on the host and the model hands them to every layer (``cu_seq_lens_q``,
  ``max_length_q``, transformers' FlashAttention keywords); read from the device's ``position_ids`` instead
  (:func:`boundaries`, the fallback for a one-row batch without them) they cost the host a wait on the device
  per forward — a ``nonzero``, a host list copied up and an ``int`` of the longest.  Measured on an H200
  (session 18, ``bench/engine.py --device cuda``): SDPA on the bucket views picks cuDNN's attention there, which
  builds a plan for every new shape — 1.7–2.7 ms of CPU per call, 485 ms per step at Qwen3-0.6B × 4 examples of
  ≤ 4,096 tokens, more than the step's GPU time (once planned, though, cuDNN's kernel was ~1.8× faster per FLOP
  there: :data:`NATIVE` is the switch, and the bench times both on new shapes to settle the default).  Causal
  masking is ``window_size=(-1, 0)``: a PyTorch whose ``varlen_attn`` takes no ``window_size`` keeps SDPA.  GQA
  repeats the key/value heads where it takes no ``enable_gqa`` (2.11 does not, 2.13 does).  No dropout there:
  attention dropout in training keeps SDPA.  Under autocast q/k/v are cast to its dtype, as SDPA casts them.  A
  build whose kernel refuses the call says so once and attends with SDPA per bucket for the rest of the process.
- Anything else goes to transformers' own SDPA function unchanged: a padded batch (an attention mask), decoding
  with a KV cache (fewer queries than keys).
- :func:`segmented` switches a model from ``sdpa`` to this kernel for the length of a training run and back; the
  engine's packing probe (``engine.packing_works``) runs after the switch, so a model whose layers do not hand
  ``position_ids`` to attention is never packed.  Models with sliding-window layers, attention sinks or logit
  soft-capping keep ``sdpa``.  The switch is not saved: ``_attn_implementation`` is not in ``config.json``.

:func:`split_by_length` lives here too: the engine cuts padded problem-grouped micro-batches with it, and this
kernel its attention buckets.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Sequence

import torch

NAME = "accord_sdpa_varlen"
PARTS = 4  # length buckets of a gathered row; measured on the lab student: 1 → 38 ms, 2–3 → 32–34 ms per batch

MAX_RUNS = 8  # at most this many runs of equal-length examples: attended as views of the row, no gather
_layout_cache: list = [None, None]  # (position_ids tensor, its layout): one forward's layers share it
NATIVE = True  # use PyTorch's varlen_attn where :func:`native` allows (bench/engine.py switches it off to compare)


def split_by_length(lengths: Sequence[int], max_parts: int = 4, part_cost: int = 50) -> list[list[int]]:
    """A micro-batch's indices cut into at most ``max_parts`` length buckets, one forward each, with the fewest
    padded cells Σ rows × longest plus ``part_cost`` cells per forward (its fixed cost: masks, kernel launches,
    Python).  For problem-grouped batches, whose traces cannot be length-sorted across problems (a terse and a
    verbose trace of one problem share a micro-batch).  An optimal cut is a set of contiguous runs of the sorted
    lengths (exchange argument), found by dynamic programming over the runs' ends — O(parts · n²), ~0.1 ms at 16
    traces.  Measured on the lab student (loss + backward, process time): up to 4 buckets at 50 cells per forward
    bring COMPACT's grouped layout from 1.10× to 1.04–1.05× MTD's (two buckets, the earlier rule: 1.10×)."""
    idx = sorted(range(len(lengths)), key=lambda i: lengths[i])
    L, n = [lengths[i] for i in idx], len(lengths)
    if n < 2:
        return [list(range(n))]
    # best[k][j]: the fewest cells cutting L[:j] into k buckets, the last one L[i:j] costing (j − i)·L[j−1] + part_cost
    best = [[math.inf] * (n + 1) for _ in range(max_parts + 1)]
    start = [[0] * (n + 1) for _ in range(max_parts + 1)]
    best[0][0] = 0
    for k in range(1, max_parts + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                v = best[k - 1][i] + (j - i) * L[j - 1] + part_cost
                if v < best[k][j]:
                    best[k][j], start[k][j] = v, i
    k = min(range(1, max_parts + 1), key=lambda k: best[k][n])  # the fewest buckets among equal costs
    parts, j = [], n
    while k:
        i = start[k][j]
        parts.append(sorted(idx[i:j]))
        j, k = i, k - 1
    return parts[::-1]


def register() -> None:
    """Make :data:`NAME` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def mask(*args, attention_mask=None, **kwargs):
        # no 2-D padding mask: the examples come from position_ids, nothing to build (FlashAttention's way);
        # a padded batch gets SDPA's own mask and, below, SDPA's own function
        return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)


def plan(position_ids: torch.Tensor | None, batch: int, length: int, device) -> tuple[str, object]:
    """How to attend a ``[B, N]`` batch (flattened to ``B·N`` tokens; an example starts where a position id is 0
    and at every row): ``("rows", None)`` one example per row; ``("runs", [(start, n, L), …])`` at most
    :data:`MAX_RUNS` runs of n consecutive examples of equal length L (:func:`engine.collate_bucketed`'s row);
    else ``("gather", (parts, back))``: per length bucket the ``[n, L]`` flat index of token t of each of its
    examples (clamped to the example's last token past its end), and the permutation that puts the buckets' real
    tokens, laid end to end, back in flat order."""
    if position_ids is None or not bool((position_ids.expand(batch, length)[:, 1:] == 0).any()):
        return "rows", None
    n_tok = batch * length
    start = position_ids.expand(batch, length).reshape(-1) == 0
    start[::length] = True
    starts = start.nonzero().squeeze(1)
    lens = torch.diff(starts, append=torch.tensor([n_tok], device=device))
    lens_l, starts_l = lens.tolist(), starts.tolist()
    runs: list[list[int]] = []
    for s0, n in zip(starts_l, lens_l):
        if runs and runs[-1][2] == n:
            runs[-1][1] += 1
        else:
            runs.append([s0, 1, n])
    if len(runs) <= MAX_RUNS:
        return "runs", runs
    parts, order = [], []
    for part in split_by_length(lens_l, max_parts=PARTS):
        p = torch.tensor(part, device=device)
        L = max(lens_l[i] for i in part)
        t = torch.arange(L, device=device)
        idx = starts[p, None] + torch.minimum(t, lens[p, None] - 1)
        keep = (t < lens[p, None]).reshape(-1)
        parts.append((idx, keep.nonzero().squeeze(1)))
        order.append(idx.reshape(-1)[keep])
    return "gather", (parts, torch.argsort(torch.cat(order)))


def boundaries(position_ids: torch.Tensor | None, batch: int, length: int, device) -> tuple[torch.Tensor, int]:
    """FlashAttention's varlen arguments for a ``[B, N]`` batch flattened to ``B·N`` tokens: the examples' start
    offsets and the end (``cu_seqlens``, int32) and the longest example (an example starts where a position id is
    0 and at every row)."""
    n_tok = batch * length
    start = (position_ids.expand(batch, length).reshape(-1) == 0) if position_ids is not None else \
        torch.zeros(n_tok, dtype=torch.bool, device=device)
    start[::length] = True
    cu = torch.cat([start.nonzero().squeeze(1), torch.tensor([n_tok], device=device)]).to(torch.int32)
    return cu, int(torch.diff(cu).max())


@functools.cache
def _varlen_attn():
    """PyTorch's varlen FlashAttention and whether it takes ``enable_gqa`` (None before PyTorch 2.10, and where it
    takes no ``window_size``, the causal mask used here)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return (varlen_attn, "enable_gqa" in params) if "window_size" in params else None


LOW = (torch.bfloat16, torch.float16)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype an op on ``t`` computes in: autocast's where it is on for ``t``'s device, else ``t``'s.  Under bf16
    autocast with float32 weights a model's activations often arrive in float32 (Qwen3's q/k norms and rotary, the
    final norm over the float32 residual stream), so ``t.dtype`` alone is not what autocast would run — the
    varlen kernel and the engine's chunked head (whose backward runs outside autocast) read it here."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


def attention_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The dtype this call attends in (:func:`compute_dtype`) when it is bf16/fp16, else None (float32: SDPA's
    path)."""
    dt = compute_dtype(query)
    return dt if dt in LOW else None


def native(module, query: torch.Tensor, dropout: float) -> bool:
    """Whether this call attends with PyTorch's varlen FlashAttention: CUDA, bf16/fp16 (the tensors' or autocast's),
    no dropout, PyTorch ≥ 2.10."""
    return (NATIVE and query.is_cuda and attention_dtype(query) is not None
            and not (dropout and module.training) and _varlen_attn() is not None)


def attend_native(query, key, value, cu: torch.Tensor, longest: int, scaling: float | None) -> torch.Tensor:
    """``[B, H, N, d]`` query (``[B, H_kv, N, d]`` key/value) attended example by example from ``cu``, in
    :func:`attention_dtype`: one call; returns ``[B, N, H, d]``."""
    fn, gqa = _varlen_attn()
    B, H, N, d = query.shape
    dt = attention_dtype(query) or query.dtype
    q, k, v = (x.transpose(1, 2).reshape(B * N, x.shape[1], d).to(dt) for x in (query, key, value))
    extra = {}
    if k.shape[1] != H:
        if gqa:
            extra["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
    out = fn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0), **extra)
    return out.reshape(B, N, H, -1)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              position_ids=None, **kwargs):
    """transformers' attention-function signature: ``query`` ``[B, H, N, d]``, ``key``/``value`` ``[B, H_kv, N, d]``;
    returns ``([B, N, H, d], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") or kwargs.get("s_aux") is not None or kwargs.get("softcap"):
        raise RuntimeError(f"{NAME} does not support sliding windows, attention sinks or soft-capping "
                           f"({type(module).__name__}); train this model with train.packing: false")
    B, H, N, _ = query.shape
    if native(module, query, dropout):
        given = kwargs.get("cu_seq_lens_q") if B == 1 else None  # the collate's, made on the host: no device sync
        if given is not None:
            layout = (given, int(kwargs["max_length_q"]))
        else:
            if _layout_cache[0] is not position_ids or position_ids is None or _layout_cache[1][0] != "native":
                _layout_cache[:] = [position_ids, ("native", boundaries(position_ids, B, N, query.device))]
            layout = _layout_cache[1][1]
        try:
            return attend_native(query, key, value, *layout, scaling), None
        except (RuntimeError, TypeError, ValueError) as e:  # a PyTorch build whose kernel refuses this call: say
            global NATIVE  # noqa: PLW0603 — once, then SDPA per bucket for the rest of the process
            NATIVE = False
            _layout_cache[:] = [None, None]
            import sys

            print(f"varlen: PyTorch's varlen_attn failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "attending with SDPA per length bucket from here on", file=sys.stderr)
    if _layout_cache[0] is not position_ids or position_ids is None or _layout_cache[1][0] == "native":
        _layout_cache[:] = [position_ids, plan(position_ids, B, N, query.device)]
    kind, how = _layout_cache[1]

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, dropout_p=dropout if module.training else 0.0,
            enable_gqa=k.shape[1] != q.shape[1])

    if kind == "rows":  # one example per row (right-padded): SDPA as it is, causal, no mask
        return sdpa(query, key, value).transpose(1, 2).contiguous(), None
    flat = [x.transpose(0, 1).reshape(x.shape[1], B * N, x.shape[-1]) for x in (query, key, value)]  # [h, B·N, d]
    outs = []
    if kind == "runs":  # each run a view [n, h, L, d] of the row
        for s0, n, L in how:
            q, k, v = (x[:, s0:s0 + n * L].view(x.shape[0], n, L, -1).transpose(0, 1) for x in flat)
            outs.append(sdpa(q, k, v).transpose(1, 2).reshape(n * L, H, -1))
        return torch.cat(outs).view(B, N, H, -1), None
    parts, back = how
    for idx, keep in parts:
        # index_select (backward: index_add) rather than x[:, idx] (backward: a sorting index_put)
        q, k, v = (x.index_select(1, idx.view(-1)).view(x.shape[0], *idx.shape, -1).transpose(0, 1) for x in flat)
        outs.append(sdpa(q, k, v).transpose(1, 2).reshape(-1, H, v.shape[-1]).index_select(0, keep))
    return torch.cat(outs).index_select(0, back).view(B, N, H, -1), None


def active(model) -> bool:
    """Whether ``model`` attends with :data:`NAME` now (inside :func:`segmented`)."""
    return getattr(getattr(getattr(model, "module", model), "config", None), "_attn_implementation", "") == NAME


def supported(model) -> bool:
    """A decoder on plain SDPA with full causal attention in every layer."""
    cfg = getattr(getattr(model, "module", model), "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    types = getattr(cfg, "layer_types", None) or ["full_attention"]
    return (all(t == "full_attention" for t in types) and not getattr(cfg, "attn_logit_softcapping", None)
            and not getattr(cfg, "use_sliding_window", False))


@contextlib.contextmanager
def segmented(model, on: bool = True):
    """``model`` attends with :data:`NAME` inside the block (when ``on`` and :func:`supported`), ``sdpa`` after."""
    cfg = getattr(getattr(model, "module", model), "config", None)
    if not (on and supported(model)):
        yield False
        return
    register()
    cfg._attn_implementation = NAME
    try:
        yield True
    finally:
        cfg._attn_implementation = "sdpa"
        _layout_cache[:] = [None, None]
