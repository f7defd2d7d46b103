"""accord.train.master: float32 master weights for bf16 training (``train.master_weights``)."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from accord.train.master import MasterWeights


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 40))


def _loss(net, x, y) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return nn.functional.cross_entropy(net(x).float().reshape(-1, 40), y.reshape(-1))


def test_master_weights_step_as_a_bf16_copy_of_the_float32_model_would():
    """Slow reference: each step, a bf16 copy of a float32 model computes the loss and gradients under autocast;
    the float32 model clips their float32 cast and takes the AdamW step.  The master weights give the same losses
    and the same float32 weights, bit for bit, and the model comes back as the very tensors it had."""
    net, x, y = _net(), torch.randint(0, 40, (4, 8)), torch.randint(0, 40, (4, 8))
    ref = copy.deepcopy(net)
    ptrs = [p.data_ptr() for p in net.parameters()]
    mw = MasterWeights([net], True)
    assert len(mw) == 5 and all(p.dtype == torch.bfloat16 for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for _ in range(3):
        loss = _loss(net, x, y)
        loss.backward()
        assert all(p.grad.dtype == torch.bfloat16 for p in net.parameters())
        with mw.full():
            assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
            opt.step()
            opt.zero_grad(set_to_none=True)
        low = copy.deepcopy(ref).to(torch.bfloat16)
        want = _loss(low, x, y)
        want.backward()
        for p, q in zip(ref.parameters(), low.parameters(), strict=True):
            p.grad = q.grad.float()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        assert torch.equal(loss, want)
        for p, q in zip(net.parameters(), ref.parameters(), strict=True):  # the bf16 copies: the masters rounded
            assert torch.equal(p, q.to(torch.bfloat16))
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    mw.close()
    mw.close()  # idempotent
    assert [p.data_ptr() for p in net.parameters()] == ptrs
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, q)


def test_a_small_update_moves_the_master_where_bf16_weights_would_not_move():
    """Why master weights: at lr 1e-5 an AdamW step is ~1e-5, far under bf16's spacing near 1 (2⁻⁷), so a bf16
    weight trained by a bf16 optimizer stays where it is; its float32 master moves."""
    net, x, y = _net(), torch.randint(0, 40, (4, 8)), torch.randint(0, 40, (4, 8))
    with torch.no_grad():
        net[1].weight.fill_(1.0)
    pure = copy.deepcopy(net).to(torch.bfloat16)
    before = net[1].weight.detach().clone()
    for model, masters in ((pure, None), (net, MasterWeights([net], True))):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        _loss(model, x, y).backward()
        with masters.full() if masters else contextlib.nullcontext():
            opt.step()
        if masters:
            masters.close()
    assert torch.equal(pure[1].weight.float(), before)  # bf16: not one weight moved
    moved = (net[1].weight != before).float().mean().item()
    assert moved > 0.9, moved


def test_frozen_float32_parameters_run_in_bf16_and_come_back_exactly():
    """A LoRA run's base: frozen, bf16 while training (its float32 original waits on the CPU), the same float32
    values afterwards; ``full()`` leaves it in bf16 (only trainable weights become masters there)."""
    net = _net()
    net[1].weight.requires_grad_(False)
    frozen = net[1].weight.detach().clone()
    mw = MasterWeights([net], True)
    assert net[1].weight.dtype == torch.bfloat16
    with mw.full():
        assert net[1].weight.dtype == torch.bfloat16 and net[3].weight.dtype == torch.float32
    mw.close()
    assert net[1].weight.dtype == torch.float32 and torch.equal(net[1].weight, frozen)


def test_off_and_non_float32_parameters_change_nothing():
    net = _net()
    net[3].to(torch.bfloat16)  # a parameter already bf16 (a student loaded in bf16) is not mastered
    mw = MasterWeights([net], True)
    assert len(mw) == 3 and net[3].weight.dtype == torch.bfloat16
    mw.close()
    off = MasterWeights([net], False)
    assert len(off) == 0 and net[1].weight.dtype == torch.float32
    with off.full():
        pass
    off.close()


def test_master_weights_without_bf16_mixed_precision_is_a_usage_error(micro):
    """This process's accelerator (CPU, no mixed precision) cannot run them: a clear error, the model untouched."""
    from conftest import bf16_process
    from test_engine import load, rows

    if bf16_process():
        pytest.skip("this process trains in bf16 (CUDA visible): master weights run here")

    from accord.errors import UsageError
    from accord.train.engine import TrainArgs, train

    model, tok = load(micro)
    with pytest.raises(UsageError, match=r"train\.master_weights: true needs bf16 mixed precision"):
        train(model, tok, rows(4), TrainArgs(steps=1, batch_size=2, master_weights=True))
    assert all(p.dtype == torch.float32 for p in model.parameters())


SCRIPT = r"""
import json, sys, torch
from test_engine import load, rows, _weights
from accord.train.engine import TrainArgs, train
from accord.train.merge import load_state

micro, tmp = sys.argv[1], sys.argv[2]
args = TrainArgs(steps=4, batch_size=4, lr=1e-2, checkpoint_every=2, seed=3, warmup_ratio=0.2, bf16=True,
                 master_weights=True)
model, tok = load(micro)
res = train(model, tok, rows(12), args, out_dir=f"{tmp}/ref")
want = _weights(res.model)
assert res.model is model and all(p.dtype == torch.float32 for p in model.parameters())
saved = load_state(f"{tmp}/ref/checkpoint-2")
fresh, _ = load(micro)  # the returned model runs as a float32 model again: no autocast left on its forward
fresh.load_state_dict(want)
dev = next(model.parameters()).device  # the CPU here; CUDA in bench/gpu.sh's CUDA-visible step
fresh.to(dev)
ids = torch.tensor([[5, 6, 7, 8, 9]], device=dev)
with torch.no_grad():
    assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    assert isinstance(model(input_ids=ids, return_dict=False), tuple)  # transformers' own decorators still on it
assert "forward" not in vars(model) and "_original_forward" not in vars(model)
assert all(v.dtype == torch.float32 for v in saved.values())

def kill(step, loss):
    if step == 2:  # after checkpoint-2 is on disk, mid-way to the end
        raise KeyboardInterrupt

model, tok = load(micro)
try:
    train(model, tok, rows(12), args, out_dir=f"{tmp}/run", on_step=kill)
    raise SystemExit("not killed")
except KeyboardInterrupt:
    pass
assert all(p.dtype == torch.float32 for p in model.parameters())  # given back in float32 even when killed
assert {k: torch.equal(v, load_state(f"{tmp}/run/checkpoint-2")[k]) for k, v in saved.items()} == \
    {k: True for k in saved}
model, tok = load(micro)
res = train(model, tok, rows(12), args, out_dir=f"{tmp}/run")
got = _weights(res.model)
# LoRA: the frozen float32 base runs in bf16 meanwhile and comes back exactly; the adapters merge into it
base, tok = load(micro)
before = _weights(base)
lora = train(base, tok, rows(8), TrainArgs(steps=2, batch_size=4, lr=1e-2, bf16=True, master_weights=True,
                                           lora_r=2)).model
after = _weights(lora)
untouched = [k for k in before if "proj" not in k]  # embeddings, norms: no adapter
assert untouched and all(torch.equal(after[k], before[k]) for k in untouched)
assert any(not torch.equal(after[k], before[k]) for k in before if "proj" in k)
assert all(v.dtype == torch.float32 for v in after.values())
print(json.dumps({"resumed": res.resumed_from, "same": all(torch.equal(got[k], want[k]) for k in want),
                  "losses": res.history}))
"""


def test_master_weights_train_checkpoint_float32_and_resume_to_the_same_weights(micro, tmp_path):
    """In a process of its own (its accelerator with bf16 mixed precision, on the CPU): the first line says so,
    checkpoints hold float32 weights, the model comes back float32 and without accelerate's autocast wrapper (its
    logits those of the same weights in a fresh float32 model), a run killed after a checkpoint leaves its model
    float32, and the resumed run ends on the uninterrupted run's weights bit for bit; under LoRA the frozen base
    comes back exactly where no adapter is, and moved where the adapters merged in."""
    import json

    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(micro), str(tmp_path)], capture_output=True, text=True,
                         timeout=600, env=env, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bf16 weights, float32 master weights in the optimizer" in out.stderr + out.stdout
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["resumed"] == 2 and res["same"], res
    assert all(x == x and abs(x) < 1e3 for x in res["losses"])


def test_master_weights_keep_fewer_activation_bytes_per_token():
    """A Qwen3 micro model under bf16 autocast: with its weights bf16 the residual stream is bf16, so autograd keeps
    fewer bytes per token for the backward than over float32 weights (measured as the slope between two lengths,
    which leaves out autocast's bf16 weight copies); the loss stays close."""
    from test_lean import _qwen3

    from accord.train.lean import saved_bytes

    model = _qwen3()
    slopes, losses = {}, {}
    for on in (False, True):
        masters, got = MasterWeights([model], on), []
        for n in (32, 96):
            ids = torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(n))

            def run(ids=ids, on=on):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    losses[on] = model(input_ids=ids, labels=ids).loss

            got.append(saved_bytes(model, run))
        masters.close()
        slopes[on] = (got[1] - got[0]) / 64
    assert slopes[True] < 0.92 * slopes[False], slopes
    assert abs(losses[True].item() - losses[False].item()) < 0.05


def test_the_fused_adamw_steps_as_the_default_one():
    """``make_optimizer(fused=True)`` (the engine's choice on CUDA): PyTorch's one-kernel AdamW, with the same
    groups (decay on matrices only) and the same update as the default implementation to float32 rounding."""
    from accord.train.engine import TrainArgs, make_optimizer

    nets = [_net(), _net()]
    opts = [make_optimizer(n, TrainArgs(lr=1e-2), fused=f) for n, f in zip(nets, (False, True), strict=True)]
    assert [g.get("fused") for g in opts[1].param_groups] == [True, True]
    assert [g["weight_decay"] for g in opts[1].param_groups] == [0.1, 0.0]
    x, y = torch.randint(0, 40, (4, 8)), torch.randint(0, 40, (4, 8))
    for _ in range(3):
        for n, o in zip(nets, opts, strict=True):
            nn.functional.cross_entropy(n(x).reshape(-1, 40), y.reshape(-1)).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(*(n.parameters() for n in nets), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["DistributedType.FSDP", "DistributedType.DEEPSPEED"])
def test_master_weights_under_fsdp_or_deepspeed_are_refused(kind):
    """FSDP and DeepSpeed keep float32 masters of their own: a second set would be stepped by no one."""
    from types import SimpleNamespace

    from accord.errors import UsageError
    from accord.train.engine import TrainArgs, master_weights

    acc = SimpleNamespace(mixed_precision="bf16", distributed_type=kind)
    with pytest.raises(UsageError, match=f"master_weights: true under {kind}, which keeps float32 master copies"):
        master_weights({}, None, TrainArgs(master_weights=True), acc)
    plain = SimpleNamespace(mixed_precision="bf16", distributed_type="DistributedType.MULTI_GPU", device="cpu")
    assert not master_weights({}, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), TrainArgs(master_weights=True),
                              plain)
