"""accord.train.varlen: packed rows attended example by example with SDPA."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from accord.train import varlen


class _Attn(torch.nn.Module):
    """What transformers hands an attention function as ``module``."""

    is_causal = True


def _reference(q, k, v, pos, scale):
    """Slow and obvious: per row, per example (a run of positions from 0), per head, softmax(q·kᵀ·scale) over the
    example's keys up to the query."""
    B, H, N, d = q.shape
    rep = H // k.shape[1]
    out = torch.zeros(B, N, H, d, dtype=q.dtype)
    for b in range(B):
        starts = [t for t in range(N) if t == 0 or pos[b, t] == 0] + [N]
        for s, e in itertools.pairwise(starts):
            for h in range(H):
                for t in range(s, e):
                    w = torch.softmax(torch.stack([q[b, h, t] @ k[b, h // rep, u] * scale for u in range(s, t + 1)]), 0)
                    out[b, t, h] = sum(w[u - s] * v[b, h // rep, u] for u in range(s, t + 1))
    return out


@pytest.mark.parametrize("lens_rows", [[[5, 1, 9, 3, 7]], [[4, 4], [2, 6]], [[8]], [[8], [8]], [[3, 3, 3, 5, 5, 2]]])
def test_attention_matches_a_loop_over_examples_and_heads(lens_rows, monkeypatch):
    """Random q/k/v with GQA (4 query heads, 2 kv heads): one packed row, two packed rows, one unpacked example,
    runs of equal lengths; gathered in every bucket count the kernel may choose, and as views of the row."""
    g = torch.Generator().manual_seed(0)
    N = sum(lens_rows[0])
    pos = torch.tensor([[t for n in row for t in range(n)] for row in lens_rows])
    B = len(lens_rows)
    q = torch.randn(B, 4, N, 8, generator=g, requires_grad=True)
    k = torch.randn(B, 2, N, 8, generator=g, requires_grad=True)
    v = torch.randn(B, 2, N, 8, generator=g, requires_grad=True)
    ref = _reference(q, k, v, pos, 0.3)
    w = torch.randn(ref.shape, generator=g)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for parts, runs in ((1, 0), (2, 0), (4, 0), (4, 8)):  # gathered in 1, 2 or 4 buckets; runs of views
        monkeypatch.setattr(varlen, "PARTS", parts)
        monkeypatch.setattr(varlen, "MAX_RUNS", runs)
        varlen._layout_cache[:] = [None, None]
        out, _ = varlen.attention(_Attn(), q, k, v, None, scaling=0.3, position_ids=pos)
        assert out.shape == (B, N, 4, 8)
        assert torch.allclose(out, ref, atol=1e-5)
        got = torch.autograd.grad((out * w).sum(), (q, k, v))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))


@pytest.mark.parametrize("has_gqa", [True, False])
def test_pytorch_varlen_kernel_gets_each_examples_boundaries_once_per_call(has_gqa, monkeypatch):
    """The CUDA path (PyTorch's ``varlen_attn``, which cannot run here) with a reference kernel in its place that
    sees only ``cu_seqlens``: one call per layer, the boundaries as int32 offsets, the longest example, causal
    ``window_size=(-1, 0)``; key/value heads repeated where the installed PyTorch takes no ``enable_gqa``.
    Outputs and gradients equal the loop over examples, so a wrong boundary or a non-causal window fails."""
    calls = []

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append((cu_q.tolist(), max_q, window_size, enable_gqa, k.shape[1]))
        assert cu_q is cu_k and cu_q.dtype == torch.int32 and max_q == max_k
        outs = []
        for s, e in itertools.pairwise(cu_q.tolist()):
            x = [t[s:e].transpose(0, 1)[None] for t in (q, k, v)]
            causal = window_size == (-1, 0)
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                *x, is_causal=causal, scale=scale, enable_gqa=enable_gqa)[0].transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setattr(varlen, "_varlen_attn", lambda: (fake, has_gqa))
    monkeypatch.setattr(varlen, "native", lambda module, query, dropout: True)
    g = torch.Generator().manual_seed(3)
    lens_rows = [[5, 1, 9, 3], [4, 4, 2, 8]]
    N = sum(lens_rows[0])
    pos = torch.tensor([[t for n in row for t in range(n)] for row in lens_rows])
    q = torch.randn(2, 4, N, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, N, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, N, 8, generator=g, requires_grad=True)
    ref = _reference(q, k, v, pos, 0.3)
    w = torch.randn(ref.shape, generator=g)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    varlen._layout_cache[:] = [None, None]
    for _layer in range(2):  # a forward's layers share the boundaries (computed once)
        out, _ = varlen.attention(_Attn(), q, k, v, None, scaling=0.3, position_ids=pos)
    assert out.shape == (2, N, 4, 8) and torch.allclose(out, ref, atol=1e-5)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))
    cu = [0, 5, 6, 15, 18, 22, 26, 28, 36]
    assert calls == [(cu, 9, (-1, 0), has_gqa, 2 if has_gqa else 4)] * 2
    assert varlen.boundaries(None, 2, 3, "cpu")[0].tolist() == [0, 3, 6]  # no position ids: one example per row
    # under bf16 autocast with float32 weights, q and k arrive in float32 (Qwen3's q/k norms, rotary) and v in
    # bf16: the kernel gets all three in autocast's dtype, as SDPA casts them (on the H200 a float32 query had
    # kept the engine off this path)
    calls.clear()
    varlen._layout_cache[:] = [None, None]
    seen = []
    monkeypatch.setattr(varlen, "_varlen_attn", lambda: (lambda *a, **k: seen.append(a[:3]) or fake(*a, **k), has_gqa))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert varlen.attention_dtype(q) == torch.bfloat16
        out, _ = varlen.attention(_Attn(), q, k, v.bfloat16(), None, scaling=0.3, position_ids=pos)
    assert [t.dtype for t in seen[0]] == [torch.bfloat16] * 3 and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=5e-2)
    assert varlen.attention_dtype(q) is None  # float32 without autocast: SDPA's path


def test_the_kernel_takes_the_collates_boundaries_and_reads_nothing_back(monkeypatch):
    """A one-row batch whose collate made ``cu_seq_lens``/``max_length`` on the host (handed to each layer as
    transformers' ``cu_seq_lens_q``/``max_length_q``): the kernel gets exactly those, never computes them from the
    device's position ids (:func:`varlen.boundaries`, a host sync per forward), and equals the loop over examples."""
    calls = []

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append((cu_q, max_q))
        outs = []
        for s, e in itertools.pairwise(cu_q.tolist()):
            x = [t[s:e].transpose(0, 1)[None] for t in (q, k, v)]
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                *x, is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa)[0].transpose(0, 1))
        return torch.cat(outs)

    def no_boundaries(*a, **k):
        raise AssertionError("boundaries read from the position ids")

    monkeypatch.setattr(varlen, "_varlen_attn", lambda: (fake, True))
    monkeypatch.setattr(varlen, "native", lambda module, query, dropout: True)
    monkeypatch.setattr(varlen, "boundaries", no_boundaries)
    g = torch.Generator().manual_seed(6)
    lens = [5, 1, 9, 3]
    pos = torch.tensor([[t for n in lens for t in range(n)]])
    q, k, v = (torch.randn(1, h, sum(lens), 8, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    varlen._layout_cache[:] = [None, None]
    out, _ = varlen.attention(_Attn(), q, k, v, None, scaling=0.3, position_ids=pos, cu_seq_lens_q=cu,
                              cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    assert calls == [(cu, 9)] and torch.allclose(out, _reference(q, k, v, pos, 0.3), atol=1e-5)
    with pytest.raises(AssertionError, match="boundaries read"):  # without them: read back from the position ids
        varlen.attention(_Attn(), q, k, v, None, scaling=0.3, position_ids=pos)


def test_a_pytorch_varlen_kernel_that_fails_falls_back_once_and_says_so(monkeypatch, capsys):
    """A PyTorch build whose varlen_attn refuses the call: the kernel says so once and attends with SDPA per
    bucket from then on — the same outputs as the loop over examples; the run goes on."""
    def refuse(*a, **k):
        raise RuntimeError("varlen_attn: no kernel for this build\nmore")

    monkeypatch.setattr(varlen, "NATIVE", True)
    monkeypatch.setattr(varlen, "_varlen_attn", lambda: (refuse, True))
    monkeypatch.setattr(varlen, "native", lambda module, query, dropout: varlen.NATIVE)
    g = torch.Generator().manual_seed(4)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    q, k, v = (torch.randn(1, h, 9, 8, generator=g) for h in (4, 2, 2))
    varlen._layout_cache[:] = [None, None]
    for _ in range(2):
        out, _ = varlen.attention(_Attn(), q, k, v, None, scaling=0.3, position_ids=pos)
        assert torch.allclose(out, _reference(q, k, v, pos, 0.3), atol=1e-5)
    err = capsys.readouterr().err
    assert err.count("PyTorch's varlen_attn failed (RuntimeError: varlen_attn: no kernel for this build)") == 1
    assert not varlen.NATIVE


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_on_cuda_matches_the_loop(dtype):
    """On a CUDA device (bfloat16: PyTorch's varlen FlashAttention where installed; float32: SDPA on views of the
    row): outputs and q/k/v gradients of a packed row equal the float32 loop over examples, to the dtype's
    tolerance."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(2)
    lens = [16, 16, 16, 24, 24, 7, 32]
    pos = torch.tensor([[t for n in lens for t in range(n)]])
    q, k, v = (torch.randn(1, h, sum(lens), 64, generator=g, requires_grad=True) for h in (4, 2, 2))
    ref = _reference(q, k, v, pos, 0.125)
    w = torch.randn(ref.shape, generator=g)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    ref = ref.detach()
    dev = [t.detach().to("cuda", dtype).requires_grad_() for t in (q, k, v)]
    varlen._layout_cache[:] = [None, None]
    out, _ = varlen.attention(_Attn(), *dev, None, scaling=0.125, position_ids=pos.cuda())
    got = torch.autograd.grad((out.float() * w.cuda()).sum(), dev)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert torch.allclose(out.float().cpu(), ref, atol=tol)
    assert all(torch.allclose(a.float().cpu(), b, atol=tol * 5) for a, b in zip(got, want))


def test_a_padded_batch_or_a_cache_goes_to_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[1, :, :, 3:] = False
    a, _ = varlen.attention(_Attn(), q, k, v, mask, scaling=0.5)
    b, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.5)
    assert torch.equal(a, b)
    a, _ = varlen.attention(_Attn(), q[:, :, -1:], k, v, None, scaling=0.5)  # one new token over a cache
    b, _ = sdpa_attention_forward(_Attn(), q[:, :, -1:], k, v, None, scaling=0.5)
    assert torch.equal(a, b)


def test_the_switch_is_scoped_unsaved_and_only_for_plain_sdpa(micro, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(micro)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(KeyError), varlen.segmented(model) as on:
        assert on and model.config._attn_implementation == varlen.NAME
        model.save_pretrained(tmp_path / "saved")
        raise KeyError  # restored on the way out of an error too
    assert model.config._attn_implementation == "sdpa"
    assert varlen.NAME not in json.dumps(json.loads((tmp_path / "saved" / "config.json").read_text()))
    with varlen.segmented(model, on=False) as on:
        assert not on and model.config._attn_implementation == "sdpa"
    eager = AutoModelForCausalLM.from_pretrained(micro, attn_implementation="eager")
    with varlen.segmented(eager) as on:  # eager is asked for on purpose: left alone
        assert not on and eager.config._attn_implementation == "eager"
    model.config.use_sliding_window = True
    assert not varlen.supported(model)
