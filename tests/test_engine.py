"""The training engine: loss normalisation, resume after a kill, NaN stop, LoRA, padding waste, packing."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil

import pytest
import torch
from conftest import bf16_process

from accord.train.engine import (
    IGNORE,
    TrainArgs,
    TrainingDiverged,
    collate,
    encode_example,
    length_grouped_batches,
    padding_waste,
    sft_step,
    step_chunks,
    train,
)


def rows(n: int, offset: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Start at {i + offset} and follow 2 links."},
                          {"role": "assistant",
                           "content": f"<think>\n(1) {i}>{i + 1}\n</think>\n\n\\boxed{{{i % 10}}}"}]}
            for i in range(n)]


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("grouped", [False, True])
def test_every_process_runs_as_many_micro_batches_and_each_row_once(grouped):
    """A step whose batch has fewer rows (or whole problems) than processes used to leave a process with no
    micro-batch, and the others waiting for ever in DDP's all-reduce or FSDP's gather (a two-process run hung at
    its one-row batch): every process now runs as many micro-batches, the missing ones fillers."""
    sizes = [3, 1, 4, 1, 1] if grouped else [1] * 7  # rows per problem; plain: one row each
    examples = [{"ids": [1, 2], "labels": [1, 2], "group": g} if grouped else ([1, 2], [1, 2])
                for g, n in enumerate(sizes) for _ in range(n)]
    for idx, world, micro in (([0], 2, 4), ([3], 3, 1), (list(range(len(examples))), 2, 2),
                              (list(range(len(examples))), 4, 3), (list(range(len(examples))), 1, 2)):
        shares = [step_chunks(idx, examples, r, world, micro) for r in range(world)]
        assert len({len(c) for c, _ in shares}) == 1, (idx, world, micro)  # the same count everywhere
        real = [e for c, fill in shares for chunk in c[:len(c) - fill] for e in chunk]
        assert sorted(map(id, real)) == sorted(id(examples[i]) for i in idx)  # each row of the batch once
        most = max(len(c) - f for c, f in shares)
        assert all(len(c) == most and c[len(c) - f:] == [shares[0][0][0]] * f for c, f in shares)
        if grouped:  # a problem's rows are in one micro-batch
            homes = {}
            for c, f in shares:
                for chunk in c[:len(c) - f]:
                    for e in chunk:
                        homes.setdefault(e["group"], set()).add(id(chunk))
            assert all(len(h) == 1 for h in homes.values())
    assert [f for _, f in (step_chunks([0], examples, r, 2, 4) for r in range(2))] == [0, 1]


def test_filler_micro_batches_change_neither_loss_nor_gradients(micro):
    """A filler micro-batch (:func:`step_chunks`) runs forward and backward with its loss counted zero times."""
    model, tok = load(micro)
    ex = [encode_example(tok, r, 128) for r in rows(4)]
    parts = [collate(ex[:2], tok.pad_token_id), collate(ex[2:], tok.pad_token_id)]
    n_tok = sum(sum(t != IGNORE for t in e[1][1:]) for e in ex)
    model.zero_grad()
    ref, ref_m = sft_step(model, parts, "cpu", n_tok)
    g_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, m = sft_step(model, parts + [parts[0]], "cpu", n_tok, fill=1)
    assert torch.equal(loss, ref) and m == ref_m
    for a, p in zip(g_ref, model.parameters()):
        assert torch.equal(a, p.grad)
    model.zero_grad()
    loss, m = sft_step(model, [parts[0]], "cpu", n_tok, fill=1)  # a process with fillers only
    assert float(loss) == 0.0 and m == {}
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_loss_is_token_normalised_over_the_whole_step(micro):
    """Splitting a step into micro-batches gives the same loss and gradient as one batch (slow reference)."""
    model, tok = load(micro)
    ex = [encode_example(tok, r, 128) for r in rows(6)]
    whole = collate(ex, tok.pad_token_id)
    logits = model(**{k: whole[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1]
    tgt = whole["labels"][:, 1:]
    ref_terms = [torch.nn.functional.cross_entropy(logits[b, t][None], tgt[b, t][None])
                 for b in range(tgt.shape[0]) for t in range(tgt.shape[1]) if tgt[b, t] != IGNORE]
    ref = torch.stack(ref_terms).mean()
    n_tok = len(ref_terms)
    model.zero_grad()
    loss, _ = sft_step(model, [collate(ex[:2], tok.pad_token_id), collate(ex[2:], tok.pad_token_id)], "cpu", n_tok)
    g_split = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref.backward()
    assert torch.allclose(loss, ref.detach(), atol=1e-5)
    for a, p in zip(g_split, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_padding_waste_is_small_on_lab_corpora():
    import random

    from accord.lab.recipe import PROFILES, lab_tokenizer, style_rows

    tok = lab_tokenizer()
    data = style_rows(PROFILES["quick"], ["terse", "verbose", "verify", "shifted"], seed=0)
    lengths = [len(encode_example(tok, r, 4096)[0]) for r in data]
    batches = length_grouped_batches(lengths, 32, random.Random(0))
    assert padding_waste(batches, lengths) < 0.10
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def _weights(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # device-agnostic (CUDA too)


def assert_same_run(x, y) -> None:
    """Two paths to the same model (packed, chunked, compiled): the same losses and weights to float32 rounding.
    In a process that trains under bf16 autocast (CUDA visible): the same losses to bf16 rounding, and the weights
    are not compared — AdamW's normalised step turns a rounding-sized gradient difference into a full-size one for
    a weight whose gradient is near zero."""
    if bf16_process():
        assert x.history == pytest.approx(y.history, rel=3e-2)
        return
    assert x.history == pytest.approx(y.history, rel=1e-5)
    a, b = _weights(x.model), _weights(y.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_killed_run_resumes_to_the_same_weights(micro, tmp_path):
    model, tok = load(micro)
    args = TrainArgs(steps=6, batch_size=4, lr=1e-2, checkpoint_every=2, seed=3, warmup_ratio=0.2)
    train(model, tok, rows(12), args, out_dir=tmp_path / "ref")
    want = _weights(model)

    model, tok = load(micro)

    def kill(step, loss):
        if step == 2:  # after checkpoint-2 is on disk, mid-way to checkpoint-4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, tok, rows(12), args, out_dir=tmp_path / "run", on_step=kill)
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "checkpoint-4").exists()
    model, tok = load(micro)  # a fresh process: weights come from the checkpoint
    res = train(model, tok, rows(12), args, out_dir=tmp_path / "run")
    assert res.resumed_from == 2
    got = _weights(res.model)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(micro, tmp_path):
    model, tok = load(micro)

    def poison(step, loss):
        if step == 2:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))

    args = TrainArgs(steps=8, batch_size=4, lr=1e-3, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match=r"at step 4; the last good checkpoint .*checkpoint-2 is kept"):
        train(model, tok, rows(8), args, out_dir=tmp_path, on_step=poison)
    from safetensors.torch import load_file

    kept = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert not (tmp_path / "checkpoint-4").exists()


def test_lora_trains_adapters_checkpoints_and_merges(micro, tmp_path):
    model, tok = load(micro)
    before = _weights(model)
    args = TrainArgs(steps=4, batch_size=4, lr=5e-2, lora_r=4, lora_alpha=8, checkpoint_every=2)
    res = train(model, tok, rows(8), args, out_dir=tmp_path)
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").exists()
    after = _weights(res.model)
    assert set(after) == set(before)  # a plain model again, adapters merged in
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("proj" in k for k in changed)  # only the LoRA-targeted linear layers move
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    # trainable again as it came: MoT trains the merged student in its next round (it stopped with "optimizer got
    # an empty parameter list": LoRA had frozen the base, and a model with nothing trainable gets no adapters)
    assert all(p.requires_grad for p in res.model.parameters())
    again = train(res.model, tok, rows(8), TrainArgs(steps=2, batch_size=4, lr=5e-2, lora_r=4, lora_alpha=8))
    assert any(not torch.equal(after[k], v) for k, v in _weights(again.model).items())


def test_qlora_trains_on_a_4bit_base_and_merges_into_the_float_one(micro, tmp_path):
    """``lora_quantize: nf4``: while training, the base's linear layers are 4-bit and frozen; the result is the
    float base plus a rank-r delta per layer (never a requantized matrix, whose error would be full rank), in
    float32 on the CPU, with the head and embeddings untouched.  A killed run resumes to the same weights."""
    pytest.importorskip("bitsandbytes")
    model, tok = load(micro)
    before = _weights(model)
    seen = []

    def look(step, loss):
        layer = model.model.layers[0].self_attn.q_proj
        ab = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        seen.append((type(layer.get_base_layer()).__name__, layer.get_base_layer().weight.dtype, ab.detach().cpu()))

    args = TrainArgs(steps=4, batch_size=4, lr=5e-2, lora_r=2, lora_alpha=4, lora_quantize="nf4", checkpoint_every=2)
    res = train(model, tok, rows(8), args, out_dir=tmp_path / "a", on_step=look)
    assert seen[0][:2] == ("Linear4bit", torch.uint8)
    assert (tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors").exists()
    after = _weights(res.model)
    assert set(after) == set(before)
    assert all(type(m) is torch.nn.Linear for n, m in res.model.named_modules() if n.endswith("proj"))
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in after.values())
    for k in before:
        delta = after[k] - before[k]
        if k.endswith("proj.weight"):
            assert 0 < torch.linalg.matrix_rank(delta) <= 2, k  # float base + B·A, nothing requantized
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), k  # embeddings, norms, head: frozen, not quantized
    k = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(after[k] - before[k], seen[-1][2], atol=1e-6)  # exactly the adapter's B·A·α/r
    assert not getattr(res.model, "is_loaded_in_4bit", False)

    def kill(step, loss):
        if step == 2:  # after checkpoint-2 (an adapter) is on disk
            raise KeyboardInterrupt

    model, tok = load(micro)
    with pytest.raises(KeyboardInterrupt):
        train(model, tok, rows(8), args, out_dir=tmp_path / "b", on_step=kill)
    model, tok = load(micro)  # a fresh process: the same float base quantized again, the adapter from disk
    res = train(model, tok, rows(8), args, out_dir=tmp_path / "b")
    assert res.resumed_from == 2
    got = _weights(res.model)
    for k in after:
        assert torch.equal(got[k], after[k]), k


def test_in_memory_quantization_equals_transformers_loader(micro):
    """``quantize_base`` (from a model in memory, as MoT's merged students need) gives bit for bit the 4-bit weights
    and logits of transformers' own bitsandbytes loader (NF4, double quantisation), the head left in float."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from accord.train.qlora import quantize_base

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(micro, quantization_config=q, device_map="cpu", dtype=torch.float32)
    ours, _tok = load(micro)
    kept = quantize_base(ours, "nf4", torch.float32, torch.device("cpu"))
    layers = [n for n, m in ref.named_modules() if type(m).__name__ == "Linear4bit"]
    assert sorted(kept) == sorted(layers) and "lm_head" not in kept
    for n in layers:
        a, b = ref.get_submodule(n), ours.get_submodule(n)
        a.support_avx512bf16_for_cpu = False  # compare the training path, not bitsandbytes' CPU inference repack
        assert torch.equal(F.dequantize_4bit(a.weight.data, a.weight.quant_state),
                           F.dequantize_4bit(b.weight.data, b.weight.quant_state)), n
    ids = torch.randint(3, 60, (2, 12))
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_qlora_without_bitsandbytes_says_what_to_install(micro, monkeypatch):
    import sys

    from accord.errors import UsageError

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    model, tok = load(micro)
    with pytest.raises(UsageError, match=r"pip install 'accord\[qlora\]'"):
        train(model, tok, rows(4), TrainArgs(steps=1, batch_size=2, lora_r=2, lora_quantize="nf4"))


@pytest.mark.parametrize("seed", range(6))
def test_length_buckets_are_the_cheapest_cut(seed):
    """``split_by_length`` against a slow reference: every assignment of the examples to ≤ 4 buckets (not only
    contiguous runs of the sorted lengths), cost Σ rows × longest + 50 per bucket — the DP finds the minimum, covers
    every index once, and keeps a batch of equal lengths whole."""
    import itertools
    import random

    from accord.train.varlen import split_by_length

    rng = random.Random(seed)
    lengths = [rng.choice([20, 21, 40, 41, 90, 130, rng.randint(10, 150)]) for _ in range(7)]

    def cost(parts):
        return sum(len(p) * max(lengths[i] for i in p) + 50 for p in parts if p)

    ref = min(cost([[i for i in range(7) if a[i] == b] for b in range(4)]) for a in itertools.product(range(4),
                                                                                                     repeat=7))
    parts = split_by_length(lengths)
    assert sorted(i for p in parts for i in p) == list(range(7)) and all(parts)
    assert cost(parts) == ref
    assert split_by_length([64] * 9) == [list(range(9))]


def test_on_step_returning_true_stops_training(micro):
    model, tok = load(micro)
    seen = []
    res = train(model, tok, rows(16), TrainArgs(steps=10, batch_size=4, lr=1e-3),
                on_step=lambda s, loss: seen.append(s) or s + 1 == 3)
    assert seen == [0, 1, 2] and len(res.history) == 3


def test_train_gives_its_model_and_optimizer_back(micro):
    """Nothing inside accord or accelerate keeps a trained model alive once the caller drops it, so STD per
    teacher, MTD and the lab build run at the memory of one model (issue 13, item 1)."""
    import gc
    import weakref

    from accord.train.engine import TrainArgs, get_accelerator, train

    model, tok = load(micro)
    ref = weakref.ref(model)
    res = train(model, tok, rows(6), TrainArgs(steps=2, batch_size=2, lr=1e-3, max_len=128))
    assert res.model is model
    del model, res
    gc.collect()
    assert ref() is None
    assert not get_accelerator()._models and not get_accelerator()._optimizers


def test_student_device_is_where_the_process_trains(micro, monkeypatch):
    """``student.device`` reaches the engine (``engine_args``) and makes the process's accelerator: ``cpu`` trains
    on the CPU with no bf16 even where a GPU is visible; a CUDA device that is not visible, a set device under a
    multi-process launch, and a device other than the one this process already trains on are errors naming the
    setting — raised before any model moves."""
    from accord.config import load_config
    from accord.errors import UsageError
    from accord.train import engine
    from accord.train.common import engine_args
    from accord.train.engine import TrainArgs, get_accelerator, train

    base = {"problems": {"path": "p.jsonl"}, "teachers": [{"name": "t", "model": "m"}]}
    assert engine_args(load_config(None, base={**base, "student": {"device": "cpu"}}), 3).device == "cpu"
    assert engine_args(load_config(None, base=base), 3).device == "auto"

    made = {}

    class Spy:  # what the engine asks accelerate for, without touching accelerate's process-wide state
        def __init__(self, **kw):
            made.update(kw)
            self.device = torch.device("cpu")

    monkeypatch.setattr("accelerate.Accelerator", Spy)
    monkeypatch.setattr(engine, "_ACCELERATOR", None)
    monkeypatch.setattr(engine, "_bf16_supported", lambda: True)  # as on a GPU machine
    get_accelerator(TrainArgs(device="cpu"))
    ddp = made.pop("kwargs_handlers")[0].to_kwargs()
    assert made == {"mixed_precision": "no", "cpu": True} and ddp == {"broadcast_buffers": False}

    monkeypatch.setattr(engine, "_ACCELERATOR", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=r"student\.device: cpu is set, but this run is launched on 2 processes"):
        get_accelerator(TrainArgs(device="cpu"))
    monkeypatch.delenv("WORLD_SIZE")
    assert engine._ACCELERATOR is None

    model, tok = load(micro)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing = "cuda:7" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for accel in (None, Spy()):  # no accelerator yet, and one already made on the CPU
        monkeypatch.setattr(engine, "_ACCELERATOR", accel)
        with pytest.raises(UsageError, match=rf"student\.device: {missing}, but no such CUDA device is visible"):
            train(model, tok, rows(4), TrainArgs(steps=1, batch_size=2, lr=1e-3, max_len=128, device=missing))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    monkeypatch.setattr(engine, "_ACCELERATOR", Spy())
    assert get_accelerator(TrainArgs(device="cpu")).device.type == "cpu"  # the same device: fine
    if torch.cuda.is_available():
        with pytest.raises(UsageError, match="but this process already trains on cpu"):
            get_accelerator(TrainArgs(device="cuda"))


def test_a_second_precision_in_one_process_is_a_usage_error(micro):
    """accelerate fixes mixed precision for the process: a later run asking for another ``train.bf16`` is told so
    (before any model moves) rather than trained in the first run's precision; unset or the same is fine."""
    from accord.errors import UsageError
    from accord.train.engine import TrainArgs, get_accelerator, train

    acc = get_accelerator(TrainArgs())
    same = acc.mixed_precision == "bf16"
    assert get_accelerator(TrainArgs(bf16=same)) is acc
    model, tok = load(micro)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=rf"train\.bf16: {str(not same).lower()}, but this process already trains"):
        train(model, tok, rows(4), TrainArgs(steps=1, batch_size=2, lr=1e-3, max_len=128, bf16=not same))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.gpu
def test_engine_trains_in_bf16_on_cuda(micro):
    """On a CUDA device: bf16 autocast, the loss falls, the weights stay finite and fp32 (issue 13, item 4)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, tok = load(micro)
    res = train(model, tok, rows(32), TrainArgs(steps=20, batch_size=8, lr=5e-3, bf16=True))
    assert next(res.model.parameters()).device.type == "cuda"
    assert next(res.model.parameters()).dtype == torch.float32
    assert res.history[-1] < res.history[0]
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


@pytest.mark.gpu
def test_chunked_head_and_compile_on_cuda_train_as_the_plain_step(micro):
    """On a CUDA device in bf16: the chunked head (its products in bf16, as the plain head's backward) and
    ``train.compile`` follow the plain step's losses to bf16 tolerance."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, tok = load(micro)
    runs = {}
    for name, over in (("plain", {"chunked_loss": False}), ("chunked", {"chunked_loss": True}),
                       ("compiled", {"chunked_loss": True, "compile": True})):
        res = train(load(micro)[0], tok, rows(32), TrainArgs(steps=6, batch_size=8, lr=5e-3, bf16=True, **over))
        runs[name] = res.history
    assert runs["plain"][-1] < runs["plain"][0]
    for name in ("chunked", "compiled"):
        assert runs[name] == pytest.approx(runs["plain"], rel=3e-2), name


def test_accord_tests_bf16_makes_the_process_train_in_bf16():
    """``make test-bf16`` (``ACCORD_TESTS_BF16=1``): the process's accelerator trains under bf16 autocast."""
    import os

    if os.environ.get("ACCORD_TESTS_BF16") != "1":
        pytest.skip("only under make test-bf16")
    assert bf16_process()


def test_the_cpu_suite_hides_cuda(request):
    """``make test`` deselects the gpu tests, so conftest hides CUDA from it: on a GPU machine it runs as CI does."""
    import os

    if "not gpu" not in (request.config.getoption("markexpr") or "") or os.environ.get("ACCORD_TESTS_SEE_CUDA"):
        pytest.skip("only the CPU suite (-m 'not gpu') hides CUDA")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()


def test_the_first_line_says_what_runs(micro, capsys):
    from accord import ui

    ui._SAID.clear()
    model, tok = load(micro)
    train(model, tok, rows(8), TrainArgs(steps=1, batch_size=4, lr=1e-3))
    err = capsys.readouterr().err
    from accord.train.engine import chunks_asked, get_accelerator
    from accord.train.lean import fused_on, use_lean

    # the defaults as resolved here: on a CPU (CI) full-vocabulary logits and plain layers; with CUDA visible
    # (ACCORD_TESTS_SEE_CUDA=1 on a GPU machine) the chunked head and lean layers, in that order on the line
    dev = get_accelerator().device
    want = [f"train: {dev.type}, weights float32, attention sdpa, packed examples attended apart (",
            f"; 1 process(es); autocast {'bf16' if bf16_process() else 'no'}; padding-free packing; "]
    if use_lean(None, dev):
        fused = " (RMSNorm in PyTorch fused kernels)" if fused_on(dev) else ""
        want.append(f"lean RMSNorm/SwiGLU: 7 module(s){fused}; ")
    want.append("loss: token cross-entropy " + ("from the hidden states in chunks (no full-vocabulary logits)"
                                                if chunks_asked(None, dev) else "over full-vocabulary logits"))
    line = next(x for x in err.splitlines() if x.startswith("train: "))
    at = [line.find(w) for w in want]
    assert -1 not in at and at == sorted(at), (want, line)
    if dev.type == "cpu":
        assert "packed examples attended apart (varlen); 1 process(es)" in line
    train(load(micro)[0], tok, rows(8), TrainArgs(steps=1, batch_size=4, lr=1e-3))
    assert "train:" not in capsys.readouterr().err  # said once per process


def test_examples_that_train_max_len_cuts_are_counted(micro, capsys):
    """An example longer than train.max_len loses its ending and EOS; one whose prompt fills it keeps no target:
    the run says how many of each, once (against a count from the untruncated encodings)."""
    from accord import ui

    model, tok = load(micro)
    data = rows(6) + [{"messages": [{"role": "user", "content": "Start at 1 and follow 2 links. " * 12},
                                    {"role": "assistant", "content": "\\boxed{1}"}]}]
    full = [encode_example(tok, r, 10**6)[0] for r in data]
    heads = [len(encode_example(tok, r, 10**6)[1]) - sum(t != IGNORE for t in encode_example(tok, r, 10**6)[1])
             for r in data]
    max_len = min(len(f) for f in full[:6]) - 2  # every short example loses its last two tokens
    cut = sum(len(f) > max_len and h < max_len for f, h in zip(full, heads))
    empty = sum(h >= max_len for h in heads)
    assert cut == 6 and empty == 1
    ui._SAID.clear()
    train(model, tok, data, TrainArgs(steps=1, batch_size=4, lr=1e-3, max_len=max_len))
    err = " ".join(capsys.readouterr().err.split())
    assert f"train: {cut} of 7 example(s) ({cut / 7:.1%}) are longer than train.max_len={max_len} tokens" in err
    assert f"train: 1 of 7 example(s) keep no completion token within train.max_len={max_len}" in err
    train(load(micro)[0], tok, rows(6), TrainArgs(steps=1, batch_size=4, lr=1e-3))
    assert "train.max_len" not in capsys.readouterr().err  # nothing cut: nothing said


@pytest.mark.parametrize("which", ["LinearCrossEntropy", "LinearTokenNLL"])
def test_the_chunked_head_multiplies_in_the_autocast_dtype_both_ways(which, monkeypatch):
    """Under bf16 autocast with float32 weights the final hidden states arrive in float32 (the final norm sees the
    float32 residual stream): every product over the vocabulary, forward and backward — which runs outside
    autocast — is a bf16 GEMM, as the plain head's, and the gradients are the plain head's under autocast to bf16
    rounding.  (``LinearTokenNLL``'s backward ran them in float32 until session 18: ~10× slower on a GPU.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    from accord.train import engine

    fn = getattr(engine, which)
    monkeypatch.setattr(fn, "CHUNK", 7)
    seen = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(3)
    h = torch.randn(20, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    tgt = torch.randint(0, 50, (20,), generator=g)
    with Products(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn.apply(h, w, tgt)
    with Products():
        got = torch.autograd.grad(out.sum(), (h, w))
    assert len(seen) >= 3 and set(seen) == {torch.bfloat16}, seen
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), tgt, reduction="sum")
    want = torch.autograd.grad(ref, (h, w))
    assert torch.allclose(out.sum(), ref, rtol=1e-2)
    assert all(torch.allclose(a, b, rtol=3e-2, atol=3e-2) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_linear_cross_entropy_matches_the_plain_one(dtype, monkeypatch):
    """Loss and gradients (hidden states and head weight) equal the plain logits → CE path, over several
    chunks, with ignored positions dropped before the head as the engine does (issue 13, item 2)."""
    from accord.train.engine import IGNORE, LinearCrossEntropy

    monkeypatch.setattr(LinearCrossEntropy, "CHUNK", 7)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(50, 16, generator=g).requires_grad_()
    tgt = torch.randint(0, 50, (3, 11), generator=g)
    tgt[0, :4] = IGNORE
    tgt[2, 9:] = IGNORE
    keep = tgt != IGNORE
    got = LinearCrossEntropy.apply(h[keep], w, tgt[keep])
    gh, gw = torch.autograd.grad(got * 0.5, (h, w))
    ref = torch.nn.functional.cross_entropy((h @ w.to(dtype).T).float().reshape(-1, 50), tgt.reshape(-1),
                                            ignore_index=IGNORE, reduction="sum")
    rh, rw = torch.autograd.grad(ref * 0.5, (h, w))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got, ref, rtol=tol, atol=tol)
    assert torch.allclose(gh.float(), rh.float(), rtol=tol, atol=tol)
    assert torch.allclose(gw, rw.float(), rtol=tol, atol=tol * 10)
    assert not gh[~keep].any()  # ignored positions get no gradient


@pytest.mark.parametrize("which", ["LinearCrossEntropy", "LinearTokenNLL"])
def test_the_chunked_head_never_holds_more_than_one_chunk_of_logits(which, monkeypatch):
    """A chunk has at most ``LOGITS_PER_CHUNK`` logits whatever the vocabulary (``chunk_rows``: 441 rows at
    Qwen3's 151,936 words, where 4,096 rows held 2.5 GB of float32 logits at a step's memory peak), and a chunk's
    tensors go before the next chunk's logits come: no tensor any op makes, forward or backward, is larger than
    one chunk's logits, and at most two chunk-sized float32 tensors are alive at once (the logits beside their
    softmax; three when the loop kept the last chunk's until the next) — with the
    loss and gradients of the full logits."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from accord.train import engine

    assert engine.chunk_rows(151_936, 4096) == 441 and engine.chunk_rows(256, 4096) == 4096
    assert engine.chunk_rows(151_936, 7) == 7  # the class's CHUNK stays the most
    monkeypatch.setattr(engine, "LOGITS_PER_CHUNK", 8 * 50)  # 8 rows of a 50-word vocabulary
    fn = getattr(engine, which)
    biggest, live, most = [0], set(), [0]

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == 50 and t.dtype == torch.float32
                        and not func.is_view):  # w.T, d.T: views of what is counted
                    biggest[0] = max(biggest[0], t.numel())
                    if t.shape[0] > 1 and id(t) not in live and t.untyped_storage().nbytes() == t.numel() * 4:
                        live.add(id(t))
                        weakref.finalize(t, live.discard, id(t))
                        most[0] = max(most[0], len(live))
            return out

    g = torch.Generator().manual_seed(3)
    h = torch.randn(30, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    tgt = torch.randint(0, 50, (30,), generator=g)
    with Sizes():
        out = fn.apply(h, w, tgt)
        got = torch.autograd.grad(out.sum(), (h, w))
    assert biggest[0] == 8 * 50 and most[0] <= 2, (biggest, most)
    ref = torch.nn.functional.cross_entropy(h @ w.T, tgt, reduction="sum")
    want = torch.autograd.grad(ref, (h, w))
    assert torch.allclose(out.sum(), ref, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got, want, strict=True))


def test_chunked_loss_trains_the_same_model(micro):
    model, tok = load(micro)
    plain = train(model, tok, rows(8), TrainArgs(steps=3, batch_size=4, lr=1e-2, chunked_loss=False))
    model2, _ = load(micro)
    chunked = train(model2, tok, rows(8), TrainArgs(steps=3, batch_size=4, lr=1e-2, chunked_loss=True))
    assert_same_run(chunked, plain)


def test_compile_targets_are_each_layers_mlp_and_norms(micro):
    from accord.train.engine import compile_targets

    model, _ = load(micro)
    parts = compile_targets(model)
    layers = model.model.layers
    assert parts and {id(p) for p in parts} == {id(c) for layer in layers
                                                 for c in (layer.mlp, layer.input_layernorm,
                                                           layer.post_attention_layernorm)}


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="compiling on CPU needs C++")
def test_compiled_training_gives_the_same_model_and_leaves_it_eager(micro, capsys):
    """``train.compile``: the MLP and norms under torch.compile train the same weights as eager (3 steps of packed
    rows), the first line says so, and the model is eager again afterwards."""
    from accord.train.engine import n_compiled

    model, tok = load(micro)
    plain = train(model, tok, rows(8), TrainArgs(steps=3, batch_size=4, lr=1e-2))
    model2, _ = load(micro)
    seen = []
    fast = train(model2, tok, rows(8), TrainArgs(steps=3, batch_size=4, lr=1e-2, compile=True),
                 on_step=lambda s, _loss: seen.append(n_compiled(model2)))
    assert seen == [3 * len(model2.model.layers)] * 3 and n_compiled(fast.model) == 0
    assert "torch.compile: 6 MLP/norm module(s)" in capsys.readouterr().err
    assert_same_run(fast, plain)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_a_head_chunk_reads_logsumexp_off_its_softmax_exactly(scale):
    """``chunk_ce`` takes each row's logsumexp as top − log p(top) from its float32 softmax (no logsumexp passes):
    equal to the plain CE also where p(target) underflows float32 (scale 30: losses of thousands of nats), and its
    d/d logits is the softmax minus the one-hot, bit for bit in float32."""
    from accord.train.engine import chunk_ce

    g = torch.Generator().manual_seed(4)
    hs, w = scale * torch.randn(12, 32, generator=g), scale * torch.randn(200, 32, generator=g)
    tg = torch.randint(0, 200, (12,), generator=g)
    loss, d = chunk_ce(hs, w, tg)
    want = torch.nn.functional.cross_entropy(hs @ w.T, tg, reduction="none")
    assert scale == 1.0 or want.max() > 200  # a p(target) below float32's smallest normal
    assert torch.allclose(loss, want.sum(), rtol=1e-6)
    assert torch.equal(d, torch.softmax(hs @ w.T, -1) - torch.nn.functional.one_hot(tg, 200))


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="compiling on CPU needs C++")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_head_chunk_equals_the_eager_one(dtype):
    """``train.compile`` runs the chunked head's per-chunk work (:func:`chunk_ce`: the row maxima, the softmax with
    its float32 cast, the −1 at the targets, the cast back) through torch.compile: the same loss and d/d logits as
    eager, for chunks of other row counts too (one graph, dynamic rows)."""
    from accord.train.engine import _compiled_chunk_ce, chunk_ce

    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 16, generator=g).to(dtype)
    for rows in (9, 4):
        hs = torch.randn(rows, 16, generator=g).to(dtype)
        tg = torch.randint(0, 300, (rows,), generator=g)
        (want_loss, want_d), (loss, d) = chunk_ce(hs, w, tg), _compiled_chunk_ce()(hs, w, tg)
        assert d.dtype == want_d.dtype == dtype and d.shape == (rows, 300)
        assert torch.allclose(loss, want_loss, rtol=1e-5)
        tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: one rounding of d either way
        assert torch.allclose(d.float(), want_d.float(), rtol=tol, atol=tol)
        assert torch.allclose(d.float().sum(-1), torch.zeros(rows), atol=tol * 300)  # softmax − one-hot


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="compiling on CPU needs C++")
def test_compile_with_the_chunked_head_trains_the_same_model_and_restores_the_eager_head(micro, capsys):
    from accord import ui
    from accord.train import engine

    ui._SAID.clear()

    model, tok = load(micro)
    plain = train(model, tok, rows(8), TrainArgs(steps=3, batch_size=4, lr=1e-2, chunked_loss=True))
    seen = []
    fast = train(load(micro)[0], tok, rows(8), TrainArgs(steps=3, batch_size=4, lr=1e-2, chunked_loss=True,
                                                         compile=True),
                 on_step=lambda s, _loss: seen.append(engine._CHUNK["ce"]))
    assert seen and all(f is engine._compiled_chunk_ce() for f in seen)
    assert engine._CHUNK["ce"] is engine.chunk_ce
    assert "MLP/norm module(s) and the chunked head;" in capsys.readouterr().err
    assert_same_run(fast, plain)


def test_a_head_with_an_adapter_is_not_chunked(micro):
    """The chunked head reads only ``lm_head.weight``: a LoRA adapter on the head (``target_modules`` naming it)
    would be skipped silently, so such a head keeps the full logits; PEFT's ``all-linear`` leaves the head alone."""
    from peft import LoraConfig, get_peft_model

    from accord.train.engine import chunkable_head

    assert chunkable_head(load(micro)[0])
    assert chunkable_head(get_peft_model(load(micro)[0], LoraConfig(r=2, target_modules="all-linear")))
    assert not chunkable_head(get_peft_model(load(micro)[0], LoraConfig(r=2, target_modules=["q_proj", "lm_head"])))


def _varied_rows(n: int) -> list[dict]:
    """Rows of very different lengths, so packed rows hold several examples."""
    return [{"messages": [{"role": "user", "content": f"Start at {i}."},
                          {"role": "assistant", "content": "<think>\n" + "".join(f"({k}) {k}>{k + 1}\n"
                                                                                  for k in range(1 + 3 * (i % 4)))
                           + f"</think>\n\n\\boxed{{{i % 10}}}"}]} for i in range(n)]


@pytest.mark.parametrize(("one_row", "kernel"), [(False, "sdpa"), (True, "sdpa"), (True, "varlen"), (False, "varlen"),
                                                  ("buckets", "varlen")])
def test_packed_step_equals_the_padded_step(micro, one_row, kernel):
    """Issue 13 item 3: the same micro-batch packed (rows as wide as the longest example, or one row) and
    padded gives the same loss and gradients; examples really share rows.  Under SDPA's block mask and under
    accord's varlen SDPA (accord.train.varlen), which the padded batch also runs through."""
    from accord.train.engine import collate_packed
    from accord.train.varlen import segmented

    model, tok = load(micro)
    stack = contextlib.ExitStack()
    stack.enter_context(segmented(model, kernel == "varlen"))
    ex = [encode_example(tok, r, 128) for r in _varied_rows(8)]
    n_tok = sum(sum(1 for y in e[1][1:] if y != IGNORE) for e in ex)
    from accord.train.engine import collate_bucketed

    packed = (collate_bucketed(ex, tok.pad_token_id) if one_row == "buckets"
              else collate_packed(ex, tok.pad_token_id, one_row))
    assert packed["input_ids"].shape[0] == (1 if one_row else 6)  # 8 examples in fewer rows
    assert "attention_mask" not in packed
    got = []
    for b in (collate(ex, tok.pad_token_id), packed):
        model.zero_grad()
        loss, _ = sft_step(model, [b], "cpu", n_tok)
        got.append((float(loss), [p.grad.clone() for p in model.parameters()]))
    stack.close()
    assert got[1][0] == pytest.approx(got[0][0], rel=1e-6)
    for a, b in zip(got[0][1], got[1][1]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["sdpa", "varlen"])
def test_no_token_attends_across_a_packed_boundary(micro, kernel):
    """Changing one example's tokens changes nothing in the other examples of its packed row, and each
    example's logits equal the example run alone."""
    from accord.train.engine import collate_packed, model_inputs, unpack
    from accord.train.varlen import segmented

    model, tok = load(micro)
    ex = [encode_example(tok, r, 128) for r in _varied_rows(4)]
    b = collate_packed(ex, tok.pad_token_id, one_row=True)
    with torch.no_grad(), segmented(model, kernel == "varlen") as on:
        assert on == (kernel == "varlen")
        logits = unpack(model(**model_inputs(b)).logits, b)
        for i, e in enumerate(ex):
            alone = model(input_ids=torch.tensor([e[0]])).logits[0]
            assert torch.allclose(logits[i, :len(e[0])], alone, atol=1e-5)
        changed = [(list(reversed(ex[0][0])), ex[0][1])] + ex[1:]
        b2 = collate_packed(changed, tok.pad_token_id, one_row=True)
        assert torch.equal(b2["where"], b["where"])
        logits2 = unpack(model(**model_inputs(b2)).logits, b2)
    assert not torch.allclose(logits2[0], logits[0])
    assert torch.allclose(logits2[1:], logits[1:], atol=1e-6)


def test_a_flash_style_kernel_gets_each_rows_boundaries_from_the_batch(micro):
    """Under a FlashAttention-style kernel the engine packs a micro-batch into one row and hands the kernel
    ``cu_seq_lens_q/k`` and ``max_length_q/k`` (as TRL's flattening collator does), so no layer derives them from
    ``position_ids`` (two host syncs per layer in transformers).  A varlen reference kernel that reads only those
    arguments trains to the padded run's losses and weights; the boundaries equal transformers' own reading of the
    position ids."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    from accord.train.engine import collate_packed, model_inputs

    seen = []

    def flash_like(module, q, k, v, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                   max_length_q=None, position_ids=None, **kw):
        if cu_seq_lens_q is None:  # the packing probe's plain forward
            (cu_seq_lens_q, _), (max_length_q, _) = prepare_fa_kwargs_from_position_ids(position_ids)
        else:
            seen.append((cu_seq_lens_q.tolist(), max_length_q))
        cu = cu_seq_lens_q.tolist()
        assert max_length_q == max(b - a for a, b in itertools.pairwise(cu))
        out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=scaling, enable_gqa=True)
            for a, b in itertools.pairwise(cu)], dim=2)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("flash_like_test", flash_like)
    AttentionMaskInterface.register("flash_like_test", lambda *a, attention_mask=None, **k: None)
    model, tok = load(micro)
    model.config._attn_implementation = "flash_like_test"
    ex = [encode_example(tok, r, 128) for r in _varied_rows(8)]
    b = collate_packed(ex, tok.pad_token_id, one_row=True)
    (cu, _), (n, _) = prepare_fa_kwargs_from_position_ids(b["position_ids"])
    assert torch.equal(b["cu_seq_lens"], cu) and b["max_length"] == int(n) and isinstance(b["max_length"], int)
    assert model_inputs(b)["cu_seq_lens_k"] is b["cu_seq_lens"] and model_inputs(b)["max_length_k"] == int(n)
    packed = train(model, tok, _varied_rows(16), TrainArgs(steps=3, batch_size=8, lr=1e-2))
    n_layers = model.config.num_hidden_layers
    assert len(seen) == 3 * n_layers and all(len(c) == 9 for c, _ in seen)  # every layer, every step: 8 examples
    plain = train(load(micro)[0], tok, _varied_rows(16), TrainArgs(steps=3, batch_size=8, lr=1e-2, packing=False))
    assert_same_run(packed, plain)


def test_accords_varlen_kernel_gets_the_bucketed_rows_boundaries_from_the_batch(micro, monkeypatch):
    """The engine's default on a GPU (accord's varlen SDPA with PyTorch's varlen kernel, forced here with a reference
    kernel in its place): every layer of every step gets the bucketed row's ``cu_seq_lens`` from the collate, never
    from the device's position ids (only the packing probe's plain forwards read them), and the run trains to the
    padded run's losses and weights."""
    from accord.train import varlen

    seen, read = [], []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        seen.append(len(cu_q) - 1)
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True, scale=scale,
            enable_gqa=enable_gqa)[0].transpose(0, 1) for a, b in itertools.pairwise(cu_q.tolist())])

    boundaries = varlen.boundaries
    monkeypatch.setattr(varlen, "boundaries", lambda *a: read.append(1) or boundaries(*a))
    monkeypatch.setattr(varlen, "_varlen_attn", lambda: (kernel, True))
    monkeypatch.setattr(varlen, "native", lambda module, query, dropout: True)
    model, tok = load(micro)
    packed = train(model, tok, _varied_rows(16), TrainArgs(steps=3, batch_size=8, lr=1e-2))
    assert len(read) == 1  # the probe's two forwards (one position-ids tensor, read once); no step's
    assert len(seen) == 2 * model.config.num_hidden_layers + 3 * model.config.num_hidden_layers
    assert seen[-1] == 8  # a step's eight examples, one kernel call per layer
    plain = train(load(micro)[0], tok, _varied_rows(16), TrainArgs(steps=3, batch_size=8, lr=1e-2, packing=False))
    assert_same_run(packed, plain)


def test_packing_trains_the_same_model_and_a_model_that_cannot_pack_is_caught(micro):
    from accord.train.engine import packing_works

    model, tok = load(micro)
    plain = train(model, tok, _varied_rows(16), TrainArgs(steps=3, batch_size=8, lr=1e-2, packing=False))
    packed = train(load(micro)[0], tok, _varied_rows(16), TrainArgs(steps=3, batch_size=8, lr=1e-2, packing=True))
    assert_same_run(packed, plain)
    assert packed.model.config._attn_implementation == "sdpa"  # varlen SDPA while training only

    class Blind(torch.nn.Module):  # drops position_ids: its packed rows would attend across examples
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def save_pretrained(self, *a, **k):  # looks like a transformers model to the engine
            raise NotImplementedError

        def forward(self, input_ids, position_ids=None, **kw):
            return self.inner(input_ids=input_ids, **kw)

    blind = Blind(load(micro)[0])
    assert packing_works(load(micro)[0], "cpu") and not packing_works(blind, "cpu")
    from accord.train.engine import use_packing

    assert use_packing(blind, TrainArgs(), "cpu") is False
    with pytest.raises(ValueError, match=r"Blind .*packed examples attend to each other; set train\.packing: false"):
        use_packing(blind, TrainArgs(packing=True), "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_linear_nll_matches_the_plain_one(dtype):
    """LinearTokenNLL (COMPACT's chunked head): per-row NLL and the gradients of any weighting of it equal the
    plain logits → cross-entropy path, over several chunks."""
    from accord.train.engine import LinearTokenNLL

    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g) * 0.3
    t, weights = torch.randint(0, 50, (37,), generator=g), torch.rand(37, generator=g)
    h, w = h0.to(dtype).requires_grad_(), w0.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy((h @ w.to(dtype).T).float(), t, reduction="none")
    (ref * weights).sum().backward()
    rh, rw = h.grad.clone(), w.grad.clone()
    h.grad, w.grad = None, None
    LinearTokenNLL.CHUNK = 8
    try:
        got = LinearTokenNLL.apply(h, w, t)
    finally:
        LinearTokenNLL.CHUNK = 4096
    (got * weights).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got, ref.detach(), rtol=tol, atol=tol)
    assert torch.allclose(h.grad.float(), rh.float(), rtol=tol, atol=tol)
    assert torch.allclose(w.grad, rw, rtol=tol, atol=tol * 10)


def test_pad_rows_and_the_collates_match_a_row_by_row_reference():
    """``pad_rows`` (one tensor scattered by a mask) against filling a padded tensor row by row; ``collate`` and
    ``collate_packed`` built on it hold every example's tokens, labels, positions and flat index where a slow
    per-example reading finds them."""
    import random

    from accord.train.engine import collate_packed, pad_rows

    rng = random.Random(0)
    rows_ = [[rng.randrange(100) for _ in range(rng.randrange(0, 9))] for _ in range(7)]
    ref = torch.full((7, 12), -5, dtype=torch.long)
    for r, x in enumerate(rows_):
        ref[r, :len(x)] = torch.tensor(x, dtype=torch.long)
    assert torch.equal(pad_rows(rows_, -5, 12), ref)
    assert torch.equal(pad_rows(rows_, -5), ref[:, :max(map(len, rows_))])
    assert pad_rows([], 0).shape == (0, 0)

    ex = [([rng.randrange(1, 50) for _ in range(n)], [IGNORE] * 2 + [rng.randrange(1, 50) for _ in range(n - 2)])
          for n in (3, 9, 5, 2, 9, 4)]
    b = collate(ex, 0)
    for r, (x, y) in enumerate(ex):
        assert b["input_ids"][r, :len(x)].tolist() == x and b["labels"][r, :len(y)].tolist() == y
        assert b["attention_mask"][r].tolist() == [1] * len(x) + [0] * (9 - len(x))
        assert set(b["labels"][r, len(y):].tolist()) <= {IGNORE} and set(b["input_ids"][r, len(x):].tolist()) <= {0}
    p = collate_packed(ex, 0)
    flat_ids, flat_lab, flat_pos = p["input_ids"].view(-1), p["labels"].view(-1), p["position_ids"].view(-1)
    seen = set()
    for i, (x, y) in enumerate(ex):
        w = p["where"][i]
        idx = w[w >= 0]
        assert (w[len(x):] == -1).all() and len(idx) == len(x)
        assert flat_ids[idx].tolist() == x and flat_pos[idx].tolist() == list(range(len(x)))
        assert flat_lab[idx].tolist() == [IGNORE] + y[1:]
        assert not seen & set(idx.tolist())
        seen |= set(idx.tolist())
    assert p["input_ids"].shape[1] == 9 and p["input_ids"].shape[0] < len(ex)  # rows as wide as the longest

    from accord.train.engine import collate_bucketed

    p = collate_bucketed(ex, 0)  # one row, bucket by bucket, each example padded to its bucket's longest
    flat_ids, flat_lab, flat_pos = p["input_ids"].view(-1), p["labels"].view(-1), p["position_ids"].view(-1)
    assert p["input_ids"].shape[0] == 1 and "attention_mask" not in p
    for i, (x, y) in enumerate(ex):
        idx = p["where"][i][p["where"][i] >= 0]
        assert flat_ids[idx].tolist() == x and flat_lab[idx].tolist() == [IGNORE] + y[1:]
        assert flat_pos[idx].tolist() == list(range(len(x)))
    starts = (flat_pos == 0).nonzero().squeeze(1).tolist()
    assert len(starts) == len(ex)  # a bucket's padding continues its example's positions
    assert int((flat_lab != IGNORE).sum()) == sum(sum(1 for t in y[1:] if t != IGNORE) for _, y in ex)
    from accord.train.engine import repack

    # the varlen kernel's boundaries, made on the host: what varlen.boundaries reads from the position ids
    from accord.train.varlen import boundaries

    cu, longest = boundaries(p["position_ids"], 1, p["input_ids"].shape[1], "cpu")
    assert p["cu_seq_lens"].dtype == torch.int32 and torch.equal(p["cu_seq_lens"], cu)
    assert p["max_length"] == longest and p["cu_seq_lens"].tolist()[:-1] == starts
    one = collate_packed(ex, 0, one_row=True)
    assert torch.equal(one["cu_seq_lens"], boundaries(one["position_ids"], 1, one["input_ids"].shape[1], "cpu")[0])
    cut = repack(collate(ex, 0), 0, bucketed=True)  # the same row cut from a padded batch by tensor slices
    assert cut.keys() == {"input_ids", "position_ids", "labels", "where", "cu_seq_lens", "max_length"}
    assert all(cut[k] == p[k] if k == "max_length" else torch.equal(cut[k], p[k]) for k in cut)


def test_every_step_records_its_throughput_and_utilisation(micro, tmp_path, monkeypatch):
    """metrics.jsonl (and every tracker) gets each step's input tokens, tokens/s and — where the device's bf16 peak
    is known (a table of data-sheet peaks by device name, or ``ACCORD_PEAK_TFLOPS``) and 6 · N holds (no LoRA) —
    its model-FLOPs utilisation, 6 · parameters · tokens/s over the peak."""
    from accord import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, want in (("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 3060", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_, n=name: n)
        assert models.peak_flops("cuda") == want, name
    monkeypatch.undo()
    assert models.peak_flops("cpu") is None
    monkeypatch.setenv("ACCORD_PEAK_TFLOPS", "0.002")
    model, tok = load(micro)
    n = sum(p.numel() for p in model.parameters())
    data = rows(8)
    train(model, tok, data, TrainArgs(steps=2, batch_size=4, lr=1e-3), out_dir=tmp_path / "full")
    events = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lengths = {len(encode_example(tok, r, 4096)[0]) for r in data}
    for e in events:
        assert min(lengths) * 4 <= e["input_tokens"] <= max(lengths) * 4 and e["tokens_per_s"] > 0
        assert e["mfu"] == pytest.approx(6 * n * e["tokens_per_s"] / 2e9, rel=1e-3, abs=1e-4)
    train(load(micro)[0], tok, data, TrainArgs(steps=1, batch_size=4, lr=1e-3, lora_r=2), out_dir=tmp_path / "lora")
    event = json.loads((tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()[0])
    assert "tokens_per_s" in event and "mfu" not in event  # LoRA: 6 · N does not count what it computes


def test_counted_states_are_the_rows_a_label_mask_picks():
    """``counted_states``: the flat indices r·T + t of the final states whose next label counts, against a loop over
    rows and positions; the labels they predict are ``labels.view(-1)[i + 1]`` — the rows and targets the chunked
    head read before through a boolean mask on the device (a host sync per micro-batch)."""
    from accord.train.engine import counted_states

    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 50, (4, 11), generator=g)
    labels[torch.rand(4, 11, generator=g) < 0.4] = IGNORE
    labels[2] = IGNORE  # a row with nothing to learn
    want = [r * 11 + t for r in range(4) for t in range(10) if labels[r, t + 1] != IGNORE]
    at = counted_states(labels)
    assert at.tolist() == want
    assert labels.view(-1)[at + 1].tolist() == [labels[i // 11, i % 11 + 1].item() for i in want]
    h = torch.randn(4, 11, 6, generator=g)
    keep = labels[:, 1:] != IGNORE
    assert torch.equal(h.reshape(-1, 6)[at], h[:, :-1][keep])


def test_the_chunked_loss_reads_the_collates_counted_states_and_equals_the_mask(micro):
    """``sft_loss(chunked=True)`` over a padded batch of three rows: with the collate's ``states_at`` and without it
    (computed from the labels), loss and gradients equal a plain logits → CE reference."""
    from accord.train.engine import collate, counted_states, encode_example, sft_loss, with_states_at

    model, tok = load(micro)
    ex = [encode_example(tok, r, 64) for r in rows(3)]
    b = with_states_at(lambda c: collate(c, tok.pad_token_id))(ex)
    assert "states_at" in b and "states_at" not in collate(ex, tok.pad_token_id)
    from accord.train.engine import default_collate  # the engine's own: only where the head runs in chunks

    assert "states_at" in default_collate(model, tok.pad_token_id, False, ex, chunked=True)(ex)
    assert "states_at" not in default_collate(model, tok.pad_token_id, False, ex)(ex)
    grouped = with_states_at(lambda c: {"parts": [collate(c[:1], 0), collate(c[1:], 0)], "index": [[0], [1, 2]]})(ex)
    assert [part["states_at"].tolist() for part in grouped["parts"]] == [
        counted_states(part["labels"]).tolist() for part in grouped["parts"]] and "states_at" not in grouped
    grads = []
    for batch in (b, {k: v for k, v in b.items() if k != "states_at"}, None):
        model.zero_grad()
        if batch is None:  # the reference: every logit, cross-entropy over the counted targets
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     b["labels"][:, 1:].reshape(-1), ignore_index=IGNORE,
                                                     reduction="sum") / 7
        else:
            loss, _ = sft_loss(model, batch, 7, chunked=True)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for loss, gs in grads[1:]:
        assert torch.allclose(loss, grads[0][0], atol=1e-5)
        assert all(torch.allclose(a, b_, atol=1e-5) for a, b_ in zip(gs, grads[0][1]))


def test_the_next_steps_batches_are_collated_before_the_host_waits_for_this_one(micro):
    """The host collates step s + 1 before it reads step s's loss (``loss.item()`` waits for the device; on a GPU
    the collate then overlaps the backward and the optimizer): every collate but the first comes before the
    previous step's ``on_step``, and the run collates exactly once per micro-batch of its steps."""
    from accord.train.engine import collate

    model, tok = load(micro)
    seen = []

    def traced(c):
        seen.append("collate")
        return collate(c, tok.pad_token_id)

    res = train(model, tok, rows(8), TrainArgs(steps=3, batch_size=4, lr=1e-3, packing=False), collate_fn=traced,
                on_step=lambda s, _loss: seen.append(f"step {s}"))
    assert len(res.history) == 3
    assert seen == ["collate", "collate", "step 0", "collate", "step 1", "step 2"]


@pytest.mark.gpu
def test_a_cuda_step_waits_for_the_device_only_to_read_its_loss(micro):
    """On CUDA in bf16 with the engine's defaults (packed rows, the chunked head): under PyTorch's sync debug mode a
    step's only host syncs in accord's code are where it reads its loss (transformers' own mask preparation may
    add one per forward; outside accord)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import warnings

    model, tok = load(micro)
    catch, box, n = warnings.catch_warnings(record=True), [], [0]

    def on_step(*_):
        n[0] += 1
        if n[0] == 3:
            torch.cuda.set_sync_debug_mode(0)
            catch.__exit__(None, None, None)
        elif n[0] == 2:
            box.append(catch.__enter__())
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    try:
        train(model, tok, _varied_rows(16), TrainArgs(steps=3, batch_size=8, grad_accum=2, lr=1e-3, bf16=True),
              on_step=on_step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    from pathlib import Path

    import accord

    pkg = Path(accord.__file__).resolve().parent
    ours = [f"{w.filename}:{w.lineno}" for w in box[0]
            if "synchroniz" in str(w.message) and Path(w.filename).resolve().is_relative_to(pkg)]
    assert len(ours) == 1 and "engine.py" in ours[0], ours


@pytest.mark.gpu
def test_host_batches_reach_cuda_through_pinned_memory_unchanged():
    """``to_device`` to CUDA: pinned, non-blocking copies of every tensor in a nested batch (``meta`` as it is),
    equal to the host's once the stream has run them."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from accord.train.engine import to_device

    b = {"input_ids": torch.arange(12).view(3, 4), "parts": [{"labels": torch.ones(2, 2)}], "max_length": 4,
         "meta": [{"x": torch.zeros(1)}]}
    got = to_device(b, torch.device("cuda"))
    torch.cuda.synchronize()
    assert got["input_ids"].is_cuda and torch.equal(got["input_ids"].cpu(), b["input_ids"])
    assert got["parts"][0]["labels"].is_cuda and got["max_length"] == 4 and got["meta"] is b["meta"]
