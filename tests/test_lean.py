"""accord.train.lean: RMSNorm and SwiGLU that keep only their inputs for the backward (train.lean_layers)."""

from __future__ import annotations

import pytest
import torch

from accord.train import lean


def _qwen3(layers: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=256, tie_word_embeddings=True))


def _kernel_bwd(gy, x, rstd, weight, mask):
    """What ``aten::_fused_rms_norm_backward`` computes (it has no CPU kernel): the RMSNorm gradient in float32
    from the saved 1/rms, written as n = x·rstd, gw = Σ gy·n, gx = rstd·(gy·w − n·mean(gy·w·n))."""
    assert gy.dtype == x.dtype and gy.shape == x.shape and rstd.dtype == torch.float32 and mask[0]
    n = x.float() * rstd
    gn = gy.float() * weight.float()
    gx = rstd * (gn - n * (gn * n).mean(-1, keepdim=True))
    gw = (gy.float() * n).reshape(-1, x.shape[-1]).sum(0) if mask[1] else None
    return gx.to(x.dtype), gw.to(weight.dtype) if gw is not None else None


def _fused_on_cpu(monkeypatch) -> list:
    """The lean RMSNorm's fused path on the CPU, as on CUDA, :func:`_kernel_bwd` standing in for the backward
    kernel; returns the list each backward call appends to."""
    calls: list = []
    monkeypatch.setattr(lean, "FUSED_ON", {"cpu"})
    monkeypatch.setattr(lean, "_BROKEN", set())
    monkeypatch.setattr(lean, "_fused_bwd", lambda *a: calls.append(1) or _kernel_bwd(*a))
    return calls


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("fused", [False, True])
def test_rmsnorm_fn_equals_transformers_rmsnorm(x_dtype, w_dtype, fused, monkeypatch):
    """Reference: transformers' Qwen3RMSNorm under autograd, on random inputs and a random weight — the residual
    stream (float32 in, float32 weight), a q/k norm under autocast (bf16 in, float32 weight), pure bf16.  The eager
    formula's forward is the same ops (bit-identical).  The fused path, as on CUDA (its forward a composite on the
    CPU, its backward kernel's arithmetic standing in: :func:`_kernel_bwd`), gives transformers' output dtype and
    its values to the output dtype's rounding (one rounding where the eager formula makes two).  The gradients of x
    and weight agree to the dtype's rounding either way."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    called = _fused_on_cpu(monkeypatch) if fused else []
    g = torch.Generator().manual_seed(0)
    ref = Qwen3RMSNorm(24, eps=1e-6).to(w_dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(24, generator=g))
    x = (3 * torch.randn(2, 5, 24, generator=g)).to(x_dtype).requires_grad_()
    w = torch.randn(2, 5, 24, generator=g)
    want = ref(x)
    got = lean.RMSNormFn.apply(x, ref.weight, ref.variance_epsilon)
    tol = 1e-5 if x_dtype == torch.float32 else 2e-2
    assert got.dtype == want.dtype
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol) if fused else torch.equal(got, want)
    gx_want, gw_want = torch.autograd.grad((want.float() * w).sum(), (x, ref.weight))
    gx, gw = torch.autograd.grad((got.float() * w).sum(), (x, ref.weight))
    assert gx.dtype == x_dtype and gw.dtype == w_dtype and bool(called) == fused and not lean._BROKEN
    assert torch.allclose(gx.float(), gx_want.float(), rtol=tol, atol=tol)
    assert torch.allclose(gw.float(), gw_want.float(), rtol=tol, atol=tol * 10)


def test_a_fused_kernel_that_refuses_falls_back_to_the_eager_formula_once(monkeypatch, capsys):
    """The real ops on the CPU: the fused forward runs (a composite), the fused backward has no CPU kernel — the
    backward says so once and computes the eager formula; later calls with these dtypes are eager from the start
    (bit-identical to transformers)."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from accord import ui

    ui._SAID.clear()
    monkeypatch.setattr(lean, "FUSED_ON", {"cpu"})
    monkeypatch.setattr(lean, "_BROKEN", set())
    g = torch.Generator().manual_seed(0)
    ref = Qwen3RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(16, generator=g))
    x = torch.randn(3, 16, generator=g, requires_grad=True)
    for _ in range(2):
        got = lean.RMSNormFn.apply(x, ref.weight, ref.variance_epsilon)
        gx, gw = torch.autograd.grad(got.square().sum(), (x, ref.weight))
        want_x, want_w = torch.autograd.grad(ref(x).square().sum(), (x, ref.weight))
        assert torch.allclose(gx, want_x, rtol=1e-5, atol=1e-6) and torch.allclose(gw, want_w, rtol=1e-5, atol=1e-5)
    assert {("cpu", torch.float32, torch.float32)} == lean._BROKEN
    assert torch.equal(lean.RMSNormFn.apply(x, ref.weight, ref.variance_epsilon), ref(x))  # eager again
    err = capsys.readouterr().err
    assert err.count("lean RMSNorm: PyTorch's fused kernel refused torch.float32 input") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16)])
def test_the_fused_rmsnorm_kernels_on_cuda_equal_transformers_rmsnorm(x_dtype, w_dtype):
    """On CUDA, PyTorch's fused kernels themselves (no refusal) against transformers' RMSNorm."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(0)
    ref = Qwen3RMSNorm(128, eps=1e-6).to("cuda", w_dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(128, generator=g))
    x = (3 * torch.randn(4, 7, 128, generator=g)).to("cuda", x_dtype).requires_grad_()
    w = torch.randn(4, 7, 128, generator=g).cuda()
    assert lean.fused(x, ref.weight)
    want, got = ref(x), lean.RMSNormFn.apply(x, ref.weight, ref.variance_epsilon)
    tol = 1e-5 if x_dtype == torch.float32 else 2e-2
    assert got.dtype == want.dtype and torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
    gx_want, gw_want = torch.autograd.grad((want.float() * w).sum(), (x, ref.weight))
    gx, gw = torch.autograd.grad((got.float() * w).sum(), (x, ref.weight))
    assert not lean._BROKEN, lean._BROKEN
    assert torch.allclose(gx.float(), gx_want.float(), rtol=tol, atol=tol)
    assert torch.allclose(gw.float(), gw_want.float(), rtol=tol, atol=tol * 30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_fn_equals_silu_times_up(dtype):
    g = torch.Generator().manual_seed(1)
    gate, up = ((2 * torch.randn(3, 7, 16, generator=g)).to(dtype).requires_grad_() for _ in range(2))
    w = torch.randn(3, 7, 16, generator=g).to(dtype)
    want = torch.nn.functional.silu(gate) * up
    got = lean.SwiGLUFn.apply(gate, up)
    assert torch.equal(got, want)
    want_g = torch.autograd.grad((want * w).sum(), (gate, up))
    got_g = torch.autograd.grad((got * w).sum(), (gate, up))
    assert all(torch.equal(a, b) for a, b in zip(got_g, want_g))  # the same ops as autograd's, in the same order


def _saved_bytes(model, ids) -> tuple[int, torch.Tensor]:
    """Bytes kept for the backward of one forward under bf16 autocast, and its loss."""
    out = {}

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out["loss"] = model(input_ids=ids, labels=ids).loss

    return lean.saved_bytes(model, run), out["loss"]


def test_lean_layers_keep_less_for_the_backward_and_train_the_same():
    """A Qwen3 micro model under bf16 autocast (as on a GPU): every RMSNorm (input/post-attention, q/k, final) and
    MLP switched; the same loss bit for bit; at least a fifth fewer bytes kept for the backward; the same
    gradients (float32, no autocast) to rounding; the modules' own forwards again after the block."""
    model = _qwen3()
    ids = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(2))
    plain_bytes, plain_loss = _saved_bytes(model, ids)
    with lean.lean_layers(model, True) as n:
        assert n == 2 * 4 + 1 + 2 == lean.n_lean(model)  # per layer: 4 norms + the MLP, … ; the final norm
        lean_bytes, lean_loss = _saved_bytes(model, ids)
        assert torch.equal(lean_loss, plain_loss)
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        got = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert lean.n_lean(model) == 0 and not any("forward" in vars(m) for m in model.modules())
    assert lean_bytes < 0.8 * plain_bytes, (lean_bytes, plain_bytes)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for k, p in model.named_parameters():
        assert torch.allclose(got[k], p.grad, rtol=1e-4, atol=1e-6), k


def test_a_norm_or_mlp_of_another_kind_is_left_alone():
    """A Gemma-style norm (``1 + weight``) and a GELU MLP have the attributes but not the arithmetic: the check
    on a random input leaves them alone."""

    class GemmaLikeRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.randn(8)), 1e-6

        def forward(self, x):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)) * (1 + self.weight)

    class GeluMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(8, 8) for _ in range(3))
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):  # says SiLU, computes GELU
            return self.down_proj(torch.nn.functional.gelu(self.gate_proj(x)) * self.up_proj(x))

    box = torch.nn.ModuleList([GemmaLikeRMSNorm(), GeluMLP()])
    assert lean.targets(box) == []
    assert len(lean.targets(_qwen3(1))) == 4 + 1 + 1


@pytest.mark.parametrize("lora_r, checkpointing, fused", [(0, False, False), (4, False, False), (0, True, False),
                                                         (0, True, True)])
def test_the_engine_trains_lean_to_the_same_weights(micro, capsys, monkeypatch, lora_r, checkpointing, fused):
    """``train.lean_layers: true`` on the engine (CPU, float32), full, LoRA (peft swaps the projections the lean
    MLP calls) and with gradient checkpointing (the forwards run again inside the backward), and the fused
    RMSNorm path as on CUDA (its backward kernel's arithmetic standing in, :func:`_kernel_bwd`): the first line
    says how many modules, and three steps give the weights the plain modules give."""
    from test_engine import assert_same_run, rows

    from accord import ui
    from accord.models import load_model_and_tokenizer
    from accord.train.engine import TrainArgs, train

    calls = _fused_on_cpu(monkeypatch) if fused else []
    out = {}
    for on in (False, True):
        ui._SAID.clear()
        model, tok = load_model_and_tokenizer(str(micro), "cpu", "float32")
        tok.padding_side = "right"
        out[on] = train(model, tok, rows(12), TrainArgs(steps=3, batch_size=4, lr=1e-3, max_len=128, lean_layers=on,
                                                        lora_r=lora_r, gradient_checkpointing=checkpointing))
        said = capsys.readouterr().err
        assert ("lean RMSNorm/SwiGLU: " in said) == on, said
        assert ("(RMSNorm in PyTorch fused kernels)" in said) == (on and fused), said
        assert not any("forward" in vars(m) for m in model.modules())
    assert bool(calls) == fused and not lean._BROKEN
    assert_same_run(out[True], out[False])  # float32: the same weights to rounding; a bf16 process: losses


def test_a_forward_taken_back_inside_the_block_is_no_error(micro):
    """transformers ≥ 5.25 with hub kernels on swaps decorated layers' forwards on every train()/eval(), popping
    the instance forwards lean layers set; leaving the block then must not fail, and leaves no instance forward.
    accord's loader turns hub kernels off, so its models keep the lean forwards for the whole run."""
    from accord.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(micro), "cpu", "float32")
    assert not getattr(model, "use_kernels", False)  # the stack's own forwards, nothing fetched from the Hub
    with lean.lean_layers(model, True) as n:
        assert n > 0 and lean.n_lean(model) == n
        model.train()
        model.eval()
        assert lean.n_lean(model) == n  # no mode switch takes them back
        taken = next(m for m, _ in lean.targets(model))
        taken.__dict__.pop("forward")  # what kernels' kernelize does on a mode switch
    assert not any("forward" in vars(m) for m in model.modules())
    pytest.importorskip("kernels")  # a model loaded with hub kernels on (transformers ≥ 5.25's default): off
    model.use_kernels = True  # while lean, every lean forward kept through mode switches, on again after
    with lean.lean_layers(model, True) as n:
        model.train()
        model.eval()
        assert lean.n_lean(model) == n and not model.use_kernels
    assert model.use_kernels and lean.n_lean(model) == 0
