"""The training engine: one supervised fine-tuning loop on ``accelerate``.

Used by every recipe (STD, MTD, MoT branches) and by the lab to train its zoo.

- Examples are chat rows ``{"messages": [user, assistant]}``.  The prompt is the
  model's chat template with the generation prompt; the target is the assistant
  text plus EOS.  Rendering prompt and completion separately (rather than the
  whole conversation) trains exactly the token sequence the model produces at
  generation time (Qwen3-style templates rewrite past assistant turns).  Loss is
  on the target only.
- Batches group similar lengths (shuffled mega-batches sorted by length), so
  padding stays small without packing across examples.
- Loss normalisation: the sum of token losses over an optimizer step divided by
  the number of target tokens in that step, whatever the gradient accumulation.
- AdamW (0.9, 0.95), weight decay 0.1, warmup + cosine, clip 1.0 (MoT App. G.1).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

IGNORE = -100


@dataclass
class TrainArgs:
    steps: int = 100
    batch_size: int = 16  # sequences per optimizer step (across accumulation)
    grad_accum: int = 1
    lr: float = 1e-5
    min_lr_ratio: float = 0.0
    warmup_ratio: float = 0.01
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    max_len: int = 4096
    seed: int = 0
    optimizer: str = "adamw"  # adamw | sgd (plain SGD: used to check MoT App. A's identity)


def encode_example(tok, row: dict, max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one chat row; the prompt part is masked with -100."""
    msgs = row["messages"]
    prompt_msgs, target = msgs[:-1], msgs[-1]["content"]
    if getattr(tok, "chat_template", None):
        head = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    else:
        head = "\n".join(m["content"] for m in prompt_msgs) + "\n"
    h = tok(head, add_special_tokens=False)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, labels = (h + t)[:max_len], ([IGNORE] * len(h) + t)[:max_len]
    return ids, labels


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random,
                           group: int = 64) -> list[list[int]]:
    """Shuffle, cut into mega-batches of ``group`` batches, sort each by length, split, shuffle batches."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    mega = batch_size * group
    batches = []
    for s in range(0, len(idx), mega):
        chunk = sorted(idx[s:s + mega], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (training needs no left padding)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, (x, y) in enumerate(examples):
        ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padding_waste(batches: list[list[int]], lengths: Sequence[int]) -> float:
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / padded if padded else 0.0


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio × lr``."""
    warm = max(1, int(round(args.warmup_ratio * args.steps)))
    if step < warm:
        return args.lr * (step + 1) / warm
    progress = (step - warm) / max(1, args.steps - warm)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, args: TrainArgs) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0, weight_decay=0.0)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=args.betas)


class BatchStream:
    """Endless length-grouped batches over encoded examples, epoch after epoch (seeded)."""

    def __init__(self, examples, batch_size: int, seed: int):
        self.examples, self.batch_size = examples, batch_size
        self.lengths = [len(x) for x, _ in examples]
        self.rng, self.epoch, self.queue = random.Random(seed), 0, []

    def next(self) -> list[int]:
        if not self.queue:
            self.queue = length_grouped_batches(self.lengths, self.batch_size, self.rng)
            self.epoch += 1
        return self.queue.pop()


def sft_step(model, batches: list[dict], device) -> torch.Tensor:
    """Forward/backward over micro-batches; loss = Σ token NLL / Σ target tokens of the whole step."""
    n_tok = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total = torch.zeros((), device=device)
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        tgt = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum") / max(1, n_tok)
        loss.backward()
        total += loss.detach()
    return total


def train_sft(model, tok, rows: list[dict], args: TrainArgs, on_step: Callable[[int, float], None] | None = None):
    """Train ``model`` in place for ``args.steps`` optimizer steps on chat ``rows``; returns the loss history."""
    torch.manual_seed(args.seed)
    examples = [encode_example(tok, r, args.max_len) for r in rows]
    if not examples:
        raise ValueError("no training examples")
    stream = BatchStream(examples, args.batch_size, args.seed)
    opt = make_optimizer(model, args)
    device = next(model.parameters()).device
    model.train()
    history = []
    micro = max(1, args.batch_size // args.grad_accum)
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        idx = stream.next()
        parts = [collate([examples[i] for i in idx[s:s + micro]], tok.pad_token_id) for s in range(0, len(idx), micro)]
        loss = sft_step(model, parts, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}")
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(loss.item())
        if on_step:
            on_step(step, history[-1])
    model.eval()
    return history
