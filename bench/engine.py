"""Training throughput: accord's engine vs a plain PyTorch loop and TRL's SFTTrainer (padded, and padding-free).

Same model (the lab student's shape, fresh weights), same lab corpus, same
batches (the engine's length-grouped order replayed), same AdamW, same
clipping; throughput counts real (non-padding) tokens per second.  Each
contender runs ``--repeats`` times, interleaved; the best run counts.

    python bench/engine.py [--steps 60] [--batch 32] [--repeats 2]
    python bench/engine.py --device cuda --shape qwen3-0.6b --batch 4 --steps 10 [--max-len 4096] [--no-compile]
    python bench/engine.py --device cuda --shape qwen3-0.6b --batch 4 --profile     # where one step's time goes
    python bench/engine.py --device cuda --shape qwen3-0.6b --batch 4 --profile --master-weights
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import time
from pathlib import Path

import torch


def setup():
    from accord.lab.recipe import PROFILES, _new_model, lab_tokenizer, style_rows

    tok = lab_tokenizer()
    rows = style_rows(PROFILES["quick"], ["terse", "verbose", "verify", "shifted"], seed=0)
    return tok, rows, lambda: _new_model(tok, 64, 3, seed=0)


def run_engine(tok, rows, new_model, args) -> tuple[float, int]:
    from accord.train.engine import TrainArgs, train

    model = new_model()
    targs = TrainArgs(steps=args.steps, batch_size=args.batch, lr=1e-3, max_len=256, seed=0)
    t0 = time.perf_counter()
    train(model, tok, rows, targs)
    return time.perf_counter() - t0, _tokens(tok, rows, args)


def _batches(tok, rows, args):
    from accord.train.engine import BatchStream, encode_example

    ex = [encode_example(tok, r, 256) for r in rows]
    stream = BatchStream(ex, args.batch, 0)
    return ex, [stream.next() for _ in range(args.steps)]


def _tokens(tok, rows, args) -> int:
    ex, batches = _batches(tok, rows, args)
    return sum(len(ex[i][0]) for b in batches for i in b)


def run_plain(tok, rows, new_model, args) -> tuple[float, int]:
    """The reference: the loop anyone would write by hand."""
    from accord.train.engine import TrainArgs

    model = new_model()
    targs = TrainArgs(steps=args.steps, batch_size=args.batch, lr=1e-3, max_len=256, seed=0)
    t0 = time.perf_counter()  # like the engine's: tokenising the corpus counts
    ex, batches = _batches(tok, rows, args)
    plain_loop(model, ex, batches, targs, tok.pad_token_id, "cpu", lambda: None)
    return time.perf_counter() - t0, sum(len(ex[i][0]) for b in batches for i in b)


def plain_loop(model, ex, batches, targs, pad_id: int, dev: str, tick) -> None:
    """The loop anyone would write by hand: padded batches, (bf16 autocast on CUDA), full logits, AdamW, clip."""
    from accord.train.engine import IGNORE, collate, lr_at, make_optimizer

    opt = make_optimizer(model, targs)
    model.train()
    for step, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, targs)
        b = {k: v.to(dev) for k, v in collate([ex[i] for i in idx], pad_id).items()}
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        tgt = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 tgt.reshape(-1), ignore_index=IGNORE, reduction="sum")
        (loss / (tgt != IGNORE).sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tick()


def run_trl_padding_free(tok, rows, new_model, args) -> tuple[float, int] | None:
    """TRL with ``padding_free=True`` (its batch as one row, position ids restarting per example) — the setting
    its users run; with Liger's kernels too when ``liger-kernel`` is installed."""
    liger = importlib.util.find_spec("liger_kernel") is not None
    return run_trl(tok, rows, new_model, args, padding_free=True, use_liger_kernel=liger)


def run_trl(tok, rows, new_model, args, **extra) -> tuple[float, int] | None:
    try:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        return None
    import tempfile

    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                        learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.1,
                        adam_beta2=0.95, max_grad_norm=1.0, logging_steps=10**6, save_strategy="no",
                        max_length=None if extra.get("padding_free") else 256,  # lab traces are < 256 tokens
                        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                        bf16=False, train_sampling_strategy="group_by_length", **extra)
        trainer = SFTTrainer(model=new_model(), args=cfg, train_dataset=data, processing_class=tok)
        batch_tokens = []
        orig = trainer.compute_loss

        def counting(model, inputs, *a, **k):
            real = inputs["attention_mask"] if "attention_mask" in inputs else inputs["input_ids"] != tok.pad_token_id
            batch_tokens.append(int(real.sum()))
            return orig(model, inputs, *a, **k)

        trainer.compute_loss = counting
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0, sum(batch_tokens)


# --------------------------------------------------------------------------- model shapes (random init, no download)

SHAPES = {
    "qwen3-tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6),
}


def new_qwen3(shape: str, device: str, attention: str = "sdpa"):
    """A randomly initialised Qwen3 of ``shape`` attending with ``attention`` (transformers' attn_implementation,
    as ``student.attention`` sets it)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=40960, tie_word_embeddings=True, eos_token_id=1,
                      pad_token_id=0, bos_token_id=None)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=attention)


def synthetic(n: int, vocab: int, max_len: int, seed: int = 0, prompt: int = 64) -> list[tuple[list, list]]:
    """Token sequences of uniform random length in [max_len / 8, max_len], the first ``prompt`` tokens (at most half
    of a sequence) masked."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(10, vocab) for _ in range(rng.randint(max_len // 8, max_len))]
        p = min(prompt, len(ids) // 2)
        out.append((ids, [-100] * p + ids[p:]))
    return out


class _Clock:
    """Steady-state tokens/s: the time between the end of step ``warm`` and the last step (device synchronised)."""

    def __init__(self, device: str, warm: int):
        self.device, self.warm, self.stamps = device, warm, []

    def tick(self, *_):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def rate(self, tokens: list[int]) -> float:
        return sum(tokens[self.warm:]) / (self.stamps[-1] - self.stamps[self.warm - 1])


def _peak_reset(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def timed(run, device: str, reps: int) -> float:
    """Seconds of the fastest of ``reps`` calls of ``run()`` after an untimed one (which also compiles and plans),
    the device synchronised around each (``bench/head.py`` and ``bench/norm.py`` time with it too)."""
    run()
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def products_time(shape: str, tokens: int, device: str, reps: int = 3) -> float:
    """Seconds a training step of ``tokens`` tokens spends if it were nothing but its matrix products: every linear
    layer's forward product and its two backward ones (input and weight gradients), in bf16 on CUDA (float32 on a
    CPU), one decoder layer timed and counted ``num_hidden_layers`` times, the head once.  With 6 · params · tokens
    over it, the model-FLOPs utilisation no engine exceeds at this shape and token count on this device (attention's
    own products, outside 6 · params, left out — they add time, not counted FLOPs)."""
    c = SHAPES[shape]
    d, q, kv = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    layer = [(d, q), (d, kv), (d, kv), (q, d), (d, c["intermediate_size"]), (d, c["intermediate_size"]),
             (c["intermediate_size"], d)]

    def seconds(shapes) -> float:
        g = torch.Generator(device=device).manual_seed(0)
        mats = [tuple(torch.randn(*s, generator=g, device=device, dtype=dt) for s in ((tokens, i), (o, i), (tokens, o)))
                for i, o in shapes]

        def run():
            for x, w, gy in mats:
                x @ w.T, gy @ w, gy.T @ x

        return timed(run, device, reps)

    return seconds(layer) * c["num_hidden_layers"] + seconds([(d, c["vocab_size"])])


def attention_time(shape: str, steps: list[list[int]], device: str, reps: int = 3) -> float:
    """Seconds a training step spends in attention alone, averaged over ``steps`` (each a list of example lengths):
    every layer's causal attention over the step's examples, forward and backward, in bf16 on CUDA (float32 on a
    CPU), one layer timed and counted ``num_hidden_layers`` times — PyTorch's varlen FlashAttention over the packed
    examples where the engine uses it (:func:`accord.train.varlen.native`), else SDPA per example.  Outside 6 ·
    params: time that no FLOPs count but no engine avoids."""
    from accord.train import varlen

    c = SHAPES[shape]
    h, kv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    native = device == "cuda" and varlen.NATIVE and varlen._varlen_attn() is not None
    g = torch.Generator(device=device).manual_seed(0)

    def step(lengths):
        n = sum(lengths)
        q, k, v = (torch.randn(1, heads, n, d, generator=g, device=device, dtype=dt, requires_grad=True)
                   for heads in (h, kv, kv))
        gy = torch.randn(1, n, h, d, generator=g, device=device, dtype=dt)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)

        def run():
            if native:
                out = varlen.attend_native(q, k, v, cu, max(lengths), None)
            else:  # per example, as SDPA attends a batch of one
                out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=True).transpose(1, 2)
                    for a, b in itertools.pairwise(cu.tolist())], dim=1)
            torch.autograd.grad(out, (q, k, v), gy)

        return timed(run, device, reps)

    return sum(step(lengths) for lengths in steps) / len(steps) * c["num_hidden_layers"]


def adamw_time(params: int, device: str, reps: int = 3) -> float:
    """Seconds of one AdamW step over ``params`` float32 parameters (fused on CUDA, as the engine's there) in tensors
    of at most 2²⁴ elements — the optimizer's memory traffic, which no engine avoids either."""
    sizes = [min(2**24, params - i) for i in range(0, params, 2**24)]
    ps = [torch.zeros(n, device=device, requires_grad=True) for n in sizes]
    for p in ps:
        p.grad = torch.randn(p.shape, device=device)
    opt = torch.optim.AdamW(ps, lr=1e-5, fused=device == "cuda")
    return timed(opt.step, device, reps)


# the engine's configurations read against issue 13's goals (bench/goals.py reads the same names)
CONFIGS = ("engine", "engine[master]", "engine+compile")


def shape_bench(args) -> None:
    """``--shape qwen3-0.6b --device cuda``: the engine (its defaults there: bf16 autocast, packing, PyTorch's varlen
    attention, lean layers, chunked loss) against a plain bf16-autocast loop on identical batches — tokens/s,
    model-FLOPs utilisation (6·params·tokens over ``--peak-tflops``), peak memory —, after one untimed engine run
    on other sequences; beside it the engine with SDPA per bucket (``engine[sdpa-runs]``), with the other
    ``train.lean_layers`` and with ``train.master_weights`` (``engine[master]``, CUDA), the engine with
    ``train.compile`` (``--compile``, default on CUDA), and TRL padding-free (+ Liger) when TRL is installed."""
    from types import SimpleNamespace

    from accord.train.engine import BatchStream, TrainArgs, train

    dev, warm = args.device, 2
    steps = args.steps
    vocab = SHAPES[args.shape]["vocab_size"]
    ex = synthetic(args.batch * steps, vocab, args.max_len)
    tok = SimpleNamespace(pad_token_id=0)
    stream = BatchStream(ex, args.batch, 0)
    batches = [stream.next() for _ in range(steps)]
    tokens = [sum(len(ex[i][0]) for i in b) for b in batches]
    targs = TrainArgs(steps=steps, batch_size=args.batch, lr=1e-5, max_len=args.max_len, seed=0, warmup_ratio=0.1)

    if args.profile:
        return profile_step(args, tok, ex, targs)
    res, said = {}, set()
    from accord.models import peak_flops

    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(dev) or 989e12)
    if dev == "cuda":
        print(f"MFU against a bf16 peak of {peak / 1e12:.0f} TFLOP/s", flush=True)
    print(f"shape {args.shape} on {dev}, batch {args.batch} × ≤ {args.max_len} tokens, attention {args.attention}",
          flush=True)

    def report() -> None:  # each figure as soon as it exists: a step killed at its timeout keeps what it measured
        for name, (rate, mem) in res.items():
            mfu = f", MFU {6 * params * rate / peak:.1%}" if dev == "cuda" else ""
            line = f"{name:14s} {rate:10.0f} tokens/s{mfu}"
            _say(said, line + (f", peak memory {mem:.1f} GiB" if mem is not None else ""))
        for name in [n for n in CONFIGS if n in res and "plain" in res]:
            _say(said, f"{name}/plain throughput ratio: {res[name][0] / res['plain'][0]:.2f}")
            if dev == "cuda":
                _say(said, f"{name}/plain peak memory ratio: {res[name][1] / res['plain'][1]:.2f}")
        for name in [n for n in CONFIGS if n in res and "trl-pf" in res]:
            _say(said, f"{name}/{trl_label} throughput ratio: {res[name][0] / res['trl-pf'][0]:.2f}")
            if dev == "cuda":
                _say(said, f"{name}/{trl_label} peak memory ratio: {res[name][1] / res['trl-pf'][1]:.2f}")

    if dev == "cuda":  # the first run in a process was 2.6× slower on the H200, whichever contender ran first
        # (first uses of kernels and per-shape set-up): one untimed engine run first, on *other* sequences (seed 1),
        # so the contenders are timed on warm kernels but on batch shapes they meet for the first time, as a
        # long run's new batches are (session 18 warmed on the timed batches themselves: 33,917 tokens/s)
        warm_ex = synthetic(args.batch * steps, vocab, args.max_len, seed=1)
        train(new_qwen3(args.shape, dev, args.attention), tok, [], targs, examples=warm_ex)
        print("warm-up: one untimed engine run on other sequences (seed 1)", flush=True)
    _peak_reset(dev)
    model = new_qwen3(args.shape, dev, args.attention)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters", flush=True)
    clock = _Clock(dev, warm)
    train(model, tok, [], targs, examples=ex, on_step=clock.tick)
    res["engine"] = (clock.rate(tokens), _peak(dev))
    del model
    report()
    per_step = sum(tokens) // len(tokens)
    t = products_time(args.shape, per_step, dev)
    mfu = f", model-FLOPs utilisation {6 * params * per_step / t / peak:.1%}" if dev == "cuda" else ""
    print(f"matrix products alone ({per_step} tokens a step): {t * 1e3:.1f} ms a step, "
          f"{per_step / t:.0f} tokens/s{mfu} — the ceiling of any engine here", flush=True)
    try:  # a context figure: whatever goes wrong here, the contenders below still run
        a = attention_time(args.shape, [[len(ex[i][0]) for i in b] for b in batches], dev)
        o = adamw_time(params, dev)
        floor = t + a + o
        mfu = f", model-FLOPs utilisation {6 * params * per_step / floor / peak:.1%}" if dev == "cuda" else ""
        print(f"products + attention + AdamW alone ({per_step} tokens a step): {t * 1e3:.1f} + {a * 1e3:.1f} + "
              f"{o * 1e3:.1f} = {floor * 1e3:.1f} ms a step, {per_step / floor:.0f} tokens/s{mfu} — the ceiling "
              f"with the work every step does besides its products", flush=True)
    except Exception as e:  # noqa: BLE001 — a bench reports what it could not measure
        print(f"products + attention + AdamW alone: not measured ({type(e).__name__}: {e})", flush=True)

    # the plain loop next, the reference of two of issue 13's goals: a step stopped at its timeout during the
    # variants below still has engine/plain (throughput and peak memory)
    _peak_reset(dev)
    model = new_qwen3(args.shape, dev, args.attention)
    clock = _Clock(dev, warm)
    plain_loop(model, ex, batches, targs, 0, dev, clock.tick)
    res["plain"] = (clock.rate(tokens), _peak(dev))
    del model
    report()

    if dev == "cuda":  # train.master_weights: a bf16 model, float32 masters in the optimizer (off by default)
        try:
            _peak_reset(dev)
            clock = _Clock(dev, warm)
            train(new_qwen3(args.shape, dev, args.attention), tok, [],
                  dataclasses.replace(targs, master_weights=True), examples=ex, on_step=clock.tick)
            res["engine[master]"] = (clock.rate(tokens), _peak(dev))
            _say(said, f"engine[master]/engine throughput ratio: {res['engine[master]'][0] / res['engine'][0]:.2f}")
        except Exception as e:  # noqa: BLE001 — a bench reports what it could not measure
            print(f"engine[master]: not measured ({type(e).__name__}: {e})", flush=True)
        report()

    from accord.train import varlen

    if dev == "cuda" and varlen.NATIVE and varlen._varlen_attn() is not None:  # before PyTorch's: SDPA per bucket
        varlen.NATIVE = False
        try:
            _peak_reset(dev)
            clock = _Clock(dev, warm)
            train(new_qwen3(args.shape, dev, args.attention), tok, [], targs, examples=ex, on_step=clock.tick)
            res["engine[sdpa-runs]"] = old = (clock.rate(tokens), _peak(dev))
        finally:
            varlen.NATIVE = True
        report()
        _say(said, f"engine/engine[sdpa-runs] throughput ratio: {res['engine'][0] / old[0]:.2f}")

    # the engine with the other train.lean_layers (its default: on CUDA only), to see what lean layers change
    other = "engine[no-lean]" if dev == "cuda" else "engine[lean]"
    _peak_reset(dev)
    clock = _Clock(dev, warm)
    train(new_qwen3(args.shape, dev, args.attention), tok, [], dataclasses.replace(targs, lean_layers=dev != "cuda"),
          examples=ex, on_step=clock.tick)
    res[other] = (clock.rate(tokens), _peak(dev))
    report()
    _say(said, f"engine/{other} throughput ratio: {res['engine'][0] / res[other][0]:.2f}")
    if dev == "cuda":
        _say(said, f"engine/{other} peak memory ratio: {res['engine'][1] / res[other][1]:.2f}")

    if args.compile:  # before TRL: Liger patches transformers' model classes for the whole process
        try:
            _peak_reset(dev)
            clock = _Clock(dev, warm)
            train(new_qwen3(args.shape, dev, args.attention), tok, [], dataclasses.replace(targs, compile=True),
                  examples=ex, on_step=clock.tick)
            res["engine+compile"] = (clock.rate(tokens), _peak(dev))
        except Exception as e:  # noqa: BLE001 — a bench reports what it could not measure
            print(f"engine + compile: not measured ({type(e).__name__}: {e})", flush=True)
        report()

    trl_label = ""
    liger = importlib.util.find_spec("liger_kernel") is not None
    for use in [True, False] if liger else [False]:  # with Liger when it is there; without it if that fails
        label = "TRL padding-free" + (" + Liger" if use else "")
        try:
            res["trl-pf"] = _trl_synthetic(args, ex, batches, warm, use)
            trl_label = label
            break
        except ImportError as e:
            print(f"{label}: not measured ({e})", flush=True)
            if not use:
                break
        except Exception as e:  # noqa: BLE001 — a bench reports what it could not measure
            print(f"{label}: not measured ({type(e).__name__}: {e})", flush=True)
    report()


def profile_step(args, tok, ex, targs, rows: int = 25) -> None:
    """``--profile``: where one engine step's time goes — the third step of a run (torch.profiler), its operators
    and kernels by GPU time (by CPU time on a CPU), and the share of the GPU time in matrix products.  On CUDA also
    how busy the GPU is: the kernels' time per token of the profiled step against the wall time per token of the
    unprofiled step after it, and the kernel launches a step makes — a GPU idle for much of a step waits on the
    host (launches, host syncs, collation), which faster kernels would not change.  On CUDA the fifth step runs
    under PyTorch's sync debug mode, which warns at every operation that makes the host wait for the device: the
    line ``host syncs in an engine step`` counts them by where they were called."""
    import warnings

    from accord.train.engine import train

    dev = args.device
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    prof, n, events_log = torch.profiler.profile(activities=acts), [0], []
    catch, syncs = warnings.catch_warnings(record=True), []

    def on_step(*_):
        n[0] += 1
        if n[0] == 5 and dev == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            catch.__exit__(None, None, None)
        if dev == "cuda":
            torch.cuda.synchronize()
        if n[0] == 2:
            prof.start()
        elif n[0] == 3:
            prof.stop()
        elif n[0] == 4 and dev == "cuda":
            syncs.append(catch.__enter__())  # the list the warnings will be recorded in
            warnings.simplefilter("always")  # every sync, not the first one at each place
            torch.cuda.set_sync_debug_mode("warn")

    train(new_qwen3(args.shape, dev, args.attention), tok, [],
          dataclasses.replace(targs, steps=5 if dev == "cuda" else 4, log_every=1,
                              master_weights=args.master_weights), examples=ex, on_step=on_step, log=events_log.append)
    from torch.autograd import DeviceType

    key = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)
    # the table lists each operator *and* the kernels it launched, both with that GPU time (its "%" column adds up
    # to about 200%): count the operators' rows alone
    ops = [e for e in events if e.device_type == DeviceType.CPU]
    total = sum(getattr(e, key) for e in ops)
    mm = sum(getattr(e, key) for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    where = "GPU" if dev == "cuda" else "CPU"
    print(f"profiled step: {total / 1e3:.1f} ms of {where} time (the operators' own); matrix products "
          f"(aten::mm/addmm/bmm) {mm / max(total, 1):.0%} of it", flush=True)
    if dev == "cuda" and len(events_log) >= 4:
        print(busy_line(total / 1e6, events_log[2], events_log[3],
                        sum(e.count for e in events if e.device_type == DeviceType.CUDA)), flush=True)
    if dev == "cuda":
        print(sync_line(syncs[0] if syncs else []), flush=True)


def sync_line(records: list) -> str:
    """``host syncs in an engine step: N — file:line ×k, …`` from the warnings PyTorch's sync debug mode recorded
    (``warnings.WarningMessage``s; others ignored), the places most often first.  One is the loss the step reads
    (``loss.item()``, which waits on purpose); a step with more makes the GPU idle while the host catches up."""
    import collections

    where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in records
                                if "synchroniz" in str(w.message))
    places = ", ".join(f"{k} ×{v}" if v > 1 else k for k, v in where.most_common(8))
    more = f", {len(where) - 8} more places" if len(where) > 8 else ""
    return f"host syncs in an engine step: {sum(where.values())}" + (f" — {places}{more}" if where else "")


def busy_line(kernel_s: float, profiled: dict, after: dict, launches: int) -> str:
    """How busy the GPU was: ``kernel_s`` seconds of kernels over the profiled step's input tokens, against the wall
    time per token of the unprofiled step after it (its ``tokens_per_s``; another batch, so per token)."""
    busy = kernel_s / profiled["input_tokens"] * after["tokens_per_s"]
    return (f"GPU busy {busy:.0%} of an unprofiled step (kernels {kernel_s * 1e3:.1f} ms for "
            f"{profiled['input_tokens']:,} tokens; the next step {after['input_tokens']:,} tokens at "
            f"{after['tokens_per_s']:,.0f} tokens/s); {launches:,} kernel launches in the profiled step")


def _say(said: set, line: str) -> None:
    if line not in said:
        said.add(line)
        print(line, flush=True)


def _trl_synthetic(args, ex, batches, warm, liger: bool) -> tuple[float, float | None]:
    """TRL ``padding_free=True`` (+ ``use_liger_kernel``) on the same sequences, pre-tokenised."""
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    order = [i for b in batches for i in b]
    data = Dataset.from_dict({"input_ids": [ex[i][0] for i in order],
                              "completion_mask": [[int(y != -100) for y in ex[i][1]] for i in order]})
    dev = args.device
    clock = _Clock(dev, warm)

    class Tick(TrainerCallback):
        def on_step_end(self, *a, **k):
            clock.tick()

    _peak_reset(dev)
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                        learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10),
                        weight_decay=0.1,
                        adam_beta2=0.95, max_grad_norm=1.0, max_length=None, logging_steps=10**6,  # already ≤ max_len
                        save_strategy="no", report_to=[], use_cpu=dev == "cpu", dataloader_num_workers=0,
                        disable_tqdm=True, seed=0, bf16=dev == "cuda", padding_free=True, use_liger_kernel=liger,
                        completion_only_loss=True, shuffle_dataset=False)
        trainer = SFTTrainer(model=new_qwen3(args.shape, dev, args.attention), args=cfg, train_dataset=data,
                             processing_class=_stub_tokenizer(), callbacks=[Tick()])
        seen, orig = [], trainer.compute_loss

        def counting(model, inputs, *a, **k):  # TRL samples its own batches: count the tokens it really trains
            seen.append(int(inputs["input_ids"].numel()))  # one row, no padding
            return orig(model, inputs, *a, **k)

        trainer.compute_loss = counting
        trainer.train()
    return clock.rate(seen), _peak(dev)


def _stub_tokenizer():
    from accord.lab.tokenizer import build_tokenizer

    return build_tokenizer()  # only its pad/eos ids are read: the dataset is already tokenised


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shape", choices=["lab", *SHAPES], default="lab",
                    help="lab: the lab student on the lab corpus (default); a Qwen3 shape: random init on "
                         "synthetic token sequences (nothing downloaded)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-len", type=int, default=4096, help="longest synthetic sequence (Qwen3 shapes)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak (default: accord.models.peak_flops — the data-sheet figure "
                         "for a listed GPU, ACCORD_PEAK_TFLOPS — else an H200's 989)")
    ap.add_argument("--attention", default="sdpa",
                    help="Qwen3 shapes: every contender's attn_implementation (e.g. flash_attention_2, which needs "
                         "flash-attn; the engine then packs a micro-batch into one row)")
    ap.add_argument("--profile", action="store_true",
                    help="Qwen3 shapes: instead of the contenders, profile one engine step (torch.profiler) and print "
                         "its operators by GPU time (CPU time on a CPU)")
    ap.add_argument("--master-weights", action="store_true",
                    help="with --profile: profile the engine with train.master_weights (a bf16 model; CUDA)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="Qwen3 shapes: also the engine with train.compile (default: on CUDA)")
    args = ap.parse_args()
    if args.compile is None:
        args.compile = args.device == "cuda"
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if args.shape != "lab":
        return shape_bench(args)
    tok, rows, new_model = setup()
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, fn in (("plain", run_plain), ("engine", run_engine), ("trl", run_trl),
                         ("trl-pf", run_trl_padding_free)):
            r = fn(tok, rows, new_model, args)
            if r is not None:
                best[name] = max(best.get(name, 0.0), r[1] / r[0])
    for name, v in best.items():
        print(f"{name:7s} {v:10.0f} tokens/s")
    if "trl" in best:
        print(f"engine/TRL SFTTrainer throughput ratio: {best['engine'] / best['trl']:.2f}")
        print(f"engine/TRL padding-free throughput ratio: {best['engine'] / best['trl-pf']:.2f}")
    else:
        print("engine/TRL SFTTrainer throughput ratio: n/a (pip install trl)")
    print(f"engine/plain-loop throughput ratio: {best['engine'] / best['plain']:.2f}")


if __name__ == "__main__":
    main()
