"""Training throughput: accord's engine vs a plain PyTorch loop (and TRL's SFTTrainer) on the lab student.

Same model (the lab student's shape, fresh weights), same lab corpus, same
batches (the engine's length-grouped order replayed), same AdamW, same
clipping; throughput counts real (non-padding) tokens per second.  Each
contender runs ``--repeats`` times, interleaved; the best run counts.

    python bench/engine.py [--steps 60] [--batch 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

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
    from accord.train.engine import IGNORE, TrainArgs, collate, lr_at, make_optimizer

    model = new_model()
    targs = TrainArgs(steps=args.steps, batch_size=args.batch, lr=1e-3, max_len=256, seed=0)
    t0 = time.perf_counter()  # like the engine's: tokenising the corpus counts
    ex, batches = _batches(tok, rows, args)
    opt = make_optimizer(model, targs)
    model.train()
    for step, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, targs)
        b = collate([ex[i] for i in idx], tok.pad_token_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        tgt = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum") / (tgt != IGNORE).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    return time.perf_counter() - t0, sum(len(ex[i][0]) for b in batches for i in b)


def run_trl(tok, rows, new_model, args) -> tuple[float, int] | None:
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
                        adam_beta2=0.95, max_grad_norm=1.0, max_length=256, logging_steps=10**6, save_strategy="no",
                        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                        bf16=False, train_sampling_strategy="group_by_length")
        trainer = SFTTrainer(model=new_model(), args=cfg, train_dataset=data, processing_class=tok)
        batch_tokens = []
        orig = trainer.compute_loss

        def counting(model, inputs, *a, **k):
            batch_tokens.append(int(inputs["attention_mask"].sum()))
            return orig(model, inputs, *a, **k)

        trainer.compute_loss = counting
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0, sum(batch_tokens)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    tok, rows, new_model = setup()
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, fn in (("plain", run_plain), ("engine", run_engine), ("trl", run_trl)):
            r = fn(tok, rows, new_model, args)
            if r is not None:
                best[name] = max(best.get(name, 0.0), r[1] / r[0])
    for name, v in best.items():
        print(f"{name:7s} {v:10.0f} tokens/s")
    if "trl" in best:
        print(f"engine/TRL SFTTrainer throughput ratio: {best['engine'] / best['trl']:.2f}")
    else:
        print("engine/TRL SFTTrainer throughput ratio: n/a (pip install trl)")
    print(f"engine/plain-loop throughput ratio: {best['engine'] / best['plain']:.2f}")


if __name__ == "__main__":
    main()
