"""The training engine: one supervised fine-tuning loop on ``accelerate``.

Used by every recipe (STD, MTD, MoT branches) and by the lab to train its zoo.

- Examples are chat rows ``{"messages": [user, assistant]}``.  The prompt is the
  model's chat template with the generation prompt; the target is the assistant
  text plus EOS.  Rendering prompt and completion separately (rather than the
  whole conversation) trains exactly the token sequence the model produces at
  generation time (Qwen3-style templates rewrite past assistant turns).  Loss is
  on the target only.  Targets are normalised to one format: a trace opens its
  own ``<think>`` unless the student's template already opened it
  (``prompts.training_target``), so corpora mixing both forms train one format.
- Batches group similar lengths (shuffled mega-batches sorted by length).
- Padding-free packing (``packing``, default on when a probe shows the model keeps packed examples
  apart): a micro-batch's examples are laid end to end in rows with position ids restarting per
  example and no attention mask, so transformers' flattening path (FlashAttention-2's varlen kernel,
  or a block-diagonal mask for SDPA/eager) never lets a token attend across an example.  Rows: one
  for FlashAttention (its cost is Σ Lᵢ²); for SDPA/eager, first-fit decreasing into rows as wide as
  the longest example, so every cost is at most the padded batch's.  A recipe's ``loss_fn`` reads the
  per-example view through ``batch["where"]`` (:func:`unpack`, :func:`flat_positions`).
- Loss normalisation: the sum of token losses over an optimizer step divided by
  the number of target tokens in that step, whatever the gradient accumulation.
- AdamW (0.9, 0.95), weight decay 0.1, warmup + cosine, clip 1.0 (MoT App. G.1).
- LoRA (peft) when ``lora_r`` > 0, merged into the returned model; ``lora_quantize: nf4`` holds the frozen
  base in 4-bit meanwhile and merges into the float one (QLoRA, :mod:`accord.train.qlora`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from accord.errors import RunFailure, UsageError
from accord.launch import world as launch_world
from accord.prompts import bos_text, training_target
from accord.train.lean import fused_on, lean_layers, n_lean, use_lean
from accord.train.master import MasterWeights
from accord.train.sharded import (
    accumulating,
    deepspeed_launch,
    deepspeed_settings,
    is_deepspeed,
    shard_kind,
    sharded,
    whole_loads,
    will_shard,
)
from accord.train.varlen import NAME as VARLEN
from accord.train.varlen import active as varlen_active
from accord.train.varlen import compute_dtype, segmented, split_by_length
from accord.ui import no_hf_bars, say_once

IGNORE = -100


@dataclass
class TrainArgs:
    steps: int = 100
    batch_size: int = 16  # sequences per optimizer step (across accumulation and processes)
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
    # the cosine schedule may span more steps than this run (MoT branches: round r uses steps [rS, (r+1)S))
    schedule_steps: int | None = None
    schedule_offset: int = 0
    checkpoint_every: int | None = None  # save an HF checkpoint every N steps (None: only the final one)
    keep_checkpoints: int | None = None  # keep only the newest N step checkpoints (None: all)
    bf16: bool | None = None  # None: bf16 when the device supports it
    device: str = "auto"  # student.device: where this process trains (auto: accelerate's choice; one per process)
    gradient_checkpointing: bool = False
    chunked_loss: bool | None = None  # the head + CE in chunks (no [B, T, V] logits); None: on CUDA only
    lean_layers: bool | None = None  # RMSNorm/SwiGLU keeping only their inputs for backward (train/lean.py); None: CUDA
    packing: bool | None = None  # padding-free rows; None: on when the model passes the packing probe
    compile: bool = False  # torch.compile each decoder layer's MLP and norms for the run (compile_targets)
    master_weights: bool = False  # bf16 weights in forward/backward, float32 ones in the optimizer (train/master.py)
    lora_r: int = 0  # >0: train LoRA adapters (peft) instead of all weights
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str | list[str] = "all-linear"
    lora_quantize: str | None = None  # nf4: QLoRA, the frozen base in 4-bit while the adapters train (train/qlora.py)
    report_to: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, mlflow
    log_every: int = 1
    lrs: dict[str, float] = field(default_factory=dict)  # several models: peak lr per model name (default lr)
    chat_template_kwargs: dict = field(default_factory=dict)  # the student's template variables (chat_head)


def chat_head(tok, prompt_msgs: list[dict], template_kwargs: dict | None = None) -> str:
    """The prompt text a model sees before its answer: its chat template with the generation prompt and the
    template's own variables (``student.chat_template_kwargs``), or for a tokenizer without one its BOS
    (:func:`prompts.bos_text`) and the turns joined by newlines — as :func:`teachers.hf.render_chat` renders it."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True,
                                       **(template_kwargs or {}))
    return bos_text(tok) + "\n".join(m["content"] for m in prompt_msgs) + "\n"


def encode_example(tok, row: dict, max_len: int, template_kwargs: dict | None = None) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one chat row; the prompt part is masked with -100."""
    msgs = row["messages"]
    head, target = chat_head(tok, msgs[:-1], template_kwargs), msgs[-1]["content"]
    h = tok(head, add_special_tokens=False)["input_ids"]
    t = tok(training_target(head, target), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
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


def ex_ids(ex) -> list[int]:
    """Input ids of an example: an ``(ids, labels)`` tuple, or a dict ``{"ids", "labels", **meta}``."""
    return ex["ids"] if isinstance(ex, dict) else ex[0]


def ex_labels(ex) -> list[int]:
    return ex["labels"] if isinstance(ex, dict) else ex[1]


def example_meta(examples: list[dict]) -> list[dict]:
    """What a recipe's ``loss_fn`` reads of each dict example: every field but the token ids and labels."""
    return [{k: v for k, v in e.items() if k not in ("ids", "labels")} for e in examples]


def pad_rows(rows: Sequence[Sequence[int]], fill: int, width: int | None = None) -> torch.Tensor:
    """[len(rows), width] long tensor of the rows left-aligned, ``fill`` past each row's end.  One tensor is made
    from all the rows' values and scattered in place (a boolean mask fills row-major): a tensor per row, sliced
    in, cost QR's collate 3.7 ms a step of 32 paths."""
    n = [len(r) for r in rows]
    out = torch.full((len(rows), width if width is not None else max(n, default=0)), fill, dtype=torch.long)
    out[length_mask(n, out.shape[1]).bool()] = torch.tensor(list(itertools.chain.from_iterable(rows)),
                                                            dtype=torch.long)
    return out


def length_mask(lengths: Sequence[int], width: int) -> torch.Tensor:
    """[len(lengths), width] long tensor, 1 over each row's first ``lengths[i]`` positions (an attention mask)."""
    return (torch.arange(width) < torch.tensor(lengths, dtype=torch.long)[:, None]).long()


def collate(examples: list, pad_id: int) -> dict:
    """Right-padded batch (training needs no left padding); dict examples pass their other fields through
    as ``batch["meta"]`` (one dict per row) for a recipe's ``loss_fn``."""
    x = [ex_ids(e) for e in examples]
    ids = pad_rows(x, pad_id)
    out = {"input_ids": ids, "attention_mask": length_mask([len(r) for r in x], ids.shape[1]),
           "labels": pad_rows([ex_labels(e) for e in examples], IGNORE, ids.shape[1])}
    if examples and isinstance(examples[0], dict):
        out["meta"] = example_meta(examples)
    return out


BUCKET_COST = 50  # split_by_length's cost of one more bucket in collate_bucketed, in cells (one more SDPA call)


def collate_packed(examples: list, pad_id: int, one_row: bool = False) -> dict:
    """Padding-free batch: the examples end to end in rows, ``position_ids`` restarting at every example, no
    ``attention_mask`` (transformers then keeps the examples apart).  ``one_row``: a single row (FlashAttention's
    varlen kernel); else first-fit decreasing into rows as wide as the longest example.  Each example's first
    label is ignored (the token before it belongs to another example).  ``batch["where"]`` [B, L_max] holds the
    flat index (into ``rows.view(-1)``) of token t of example i, −1 past its end."""
    lens = [len(ex_ids(e)) for e in examples]
    rows: list[list[int]] = []
    fill: list[int] = []
    width = sum(lens) if one_row else max(lens)
    for i in sorted(range(len(examples)), key=lambda i: -lens[i]):
        r = next((r for r in range(len(rows)) if fill[r] + lens[i] <= width), None)
        if r is None:
            rows.append([])
            fill.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        fill[r] += lens[i]
    width = max(fill)
    row_ids, row_labels, row_pos, where = [], [], [], [range(0)] * len(examples)
    for r, members in enumerate(rows):
        x_r, y_r, p_r, o = [], [], [], 0
        for i in members:
            n = lens[i]
            x_r += ex_ids(examples[i])
            y_r += [IGNORE, *ex_labels(examples[i])[1:n]]
            p_r += range(n)
            where[i] = range(r * width + o, r * width + o + n)
            o += n
        row_ids.append(x_r)
        row_labels.append(y_r)
        row_pos.append([*p_r, *range(n, n + width - o)])  # the tail pads the row's last example (ignored labels)
    ids, labels = pad_rows(row_ids, pad_id, width), pad_rows(row_labels, IGNORE, width)
    pos, where = pad_rows(row_pos, 0, width), pad_rows(where, -1, max(lens))
    out = {"input_ids": ids, "position_ids": pos, "labels": labels, "where": where}
    if one_row:  # FlashAttention's varlen arguments, computed once here rather than from position_ids in each layer
        out.update(varlen_kwargs([lens[i] for i in rows[0]]))
    if examples and isinstance(examples[0], dict):
        out["meta"] = example_meta(examples)
    return out


def collate_bucketed(examples: list, pad_id: int) -> dict:
    """One packed row for accord's varlen SDPA (:mod:`accord.train.varlen`): the examples cut into length buckets
    (:func:`split_by_length`), laid end to end bucket by bucket, each one right-padded to its bucket's longest
    (the padding continues its positions; ignored labels), so each bucket's attention is a view of the row, not a
    gather.  The padded cells are the buckets' (a few %); the forward is one.  ``batch["where"]`` as
    :func:`collate_packed`'s.  Cut from the padded batch (:func:`bucket_padded`), as QR's subsets are."""
    b = collate(examples, pad_id)
    return {**bucket_padded(b), **({"meta": b["meta"]} if "meta" in b else {})}


def collate_grouped(examples: list, collate_one: Callable[[list], dict]) -> dict:
    """A problem-grouped micro-batch: one batch, or ``{"parts": [batch, …], "index": [[i, …], …], "meta"}`` when
    :func:`split_by_length` cuts it (a recipe's ``loss_fn`` runs one forward per part and reassembles its
    per-example terms by ``index``; :func:`sft_loss` sums the parts)."""
    parts = split_by_length([len(ex_ids(e)) for e in examples])
    if len(parts) == 1:
        return collate_one(examples)
    return {"parts": [collate_one([examples[i] for i in p]) for p in parts], "index": parts,
            "meta": example_meta(examples)}


def repack(b: dict, pad_id: int, one_row: bool = True, bucketed: bool = False) -> dict:
    """A right-padded batch (``input_ids``, ``attention_mask``, ``labels``) as :func:`collate_packed`'s rows (or
    :func:`collate_bucketed`'s row), for a recipe that decides which rows go together only inside its ``loss_fn``
    (QR's routed subsets)."""
    if bucketed:
        return bucket_padded(b)
    n = b["attention_mask"].sum(1).tolist()
    ids, labels = b["input_ids"].tolist(), b["labels"].tolist()
    ex = [(x[:k], y[:k]) for x, y, k in zip(ids, labels, n)]
    return to_device(collate_packed(ex, pad_id, one_row), b["input_ids"].device)


def bucket_padded(b: dict) -> dict:
    """:func:`collate_bucketed`'s row cut from a right-padded batch (its rows are already padded with the pad id
    and ignored labels, so a bucket is its rows cut to the bucket's width): tensor slices, no Python lists —
    QR repacks four subsets a step, and rebuilding them from lists cost ≈ 4% of its step."""
    dev = b["input_ids"].device
    n = b["attention_mask"].sum(1)
    lens = n.tolist()
    where = torch.full((len(lens), max(lens)), -1, dtype=torch.long, device=dev)
    ids, labels, pos, o, spans = [], [], [], 0, []
    for part in split_by_length(lens, part_cost=BUCKET_COST):
        p, w = torch.tensor(part, device=dev), max(lens[i] for i in part)
        spans += [w] * len(part)
        t = torch.arange(w, device=dev)
        ids.append(b["input_ids"][p, :w].reshape(-1))
        y = b["labels"][p, :w].clone()
        y[:, 0] = IGNORE  # an example's first label: the token before it belongs to another example
        labels.append(y.reshape(-1))
        pos.append(t.repeat(len(part)))
        flat = o + torch.arange(len(part), device=dev)[:, None] * w + t
        where[p, :w] = flat.masked_fill(t >= n[p, None], -1)
        o += len(part) * w
    return {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat(pos)[None], "labels": torch.cat(labels)[None],
            "where": where, **varlen_kwargs(spans, dev)}


def varlen_kwargs(spans: Sequence[int], device=None) -> dict:
    """A one-row batch's example boundaries for a varlen kernel, from the examples' spans in row order (bucket
    padding included): ``cu_seq_lens`` (int32 offsets, 0 first, the row's width last) and ``max_length``.  Made
    where the spans are known on the host, as TRL's flattening collator does, so the kernel never reads them back
    from the device's ``position_ids`` (a host sync per forward, :func:`accord.train.varlen.boundaries`)."""
    return {"cu_seq_lens": torch.tensor([0, *itertools.accumulate(spans)], dtype=torch.int32, device=device),
            "max_length": max(spans)}


def model_inputs(b: dict) -> dict:
    """The model's keyword arguments for a padded or a packed batch (never a KV cache in training: with one,
    transformers would not detect packed rows); a one-row batch also carries FlashAttention's ``cu_seq_lens_*`` and
    ``max_length_*``, which other attention kernels ignore."""
    keys = ("input_ids", "position_ids") if "where" in b else ("input_ids", "attention_mask")
    out = {**{k: b[k] for k in keys}, "use_cache": False}
    if "cu_seq_lens" in b:
        cu, n = b["cu_seq_lens"], b["max_length"]
        out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n, max_length_k=n)
    return out


def flat_positions(b: dict) -> torch.Tensor:
    """[B, L_max] flat index of token t of example i in the model's output rows (``x.view(R·W, …)``); −1 past the
    example's end.  A padded batch maps to itself."""
    if "where" in b:
        return b["where"]
    B, L = b["input_ids"].shape
    idx = torch.arange(B * L, device=b["input_ids"].device).view(B, L)
    return idx.masked_fill(b["attention_mask"] == 0, -1)


def unpack(x: torch.Tensor, b: dict, fill=0) -> torch.Tensor:
    """A per-token tensor [R, W, …] of the model's rows as [B, L_max, …] per example (``fill`` past each end);
    a padded batch's tensor is returned as it is."""
    if "where" not in b:
        return x
    where = b["where"]
    # index_select: its backward adds rows, where x[idx]'s sorts the indices to accumulate
    flat = x.reshape(-1, *x.shape[2:]).index_select(0, where.clamp(min=0).reshape(-1)).view(*where.shape,
                                                                                            *x.shape[2:])
    pad = (where < 0).view(*where.shape, *([1] * (x.dim() - 2)))
    return flat.masked_fill(pad, fill)


@torch.no_grad()
def packing_works(model, device) -> bool:
    """The probe behind ``packing: null``: in one row holding two examples, the second example's logits must not
    change when the first one's tokens do.  A model that ignores ``position_ids`` or builds its own mask fails."""
    V = getattr(model, "module", model).get_input_embeddings().num_embeddings
    a, b2, tail = [1 % V, 2 % V, 3 % V], [4 % V, 5 % V, 6 % V], [7 % V, 8 % V, 9 % V, 10 % V]
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=device)
    try:
        out = [model(input_ids=torch.tensor([h + tail], device=device), position_ids=pos,
                     use_cache=False).logits[0, 3:].float() for h in (a, b2)]
    except (TypeError, ValueError, RuntimeError):
        return False
    return bool((out[0] - out[1]).abs().max() <= 1e-3 * (1 + out[0].abs().max()))


def grouped_batches(keys: Sequence, batch_size: int, rng: random.Random, group: int = 64) -> list[list[int]]:
    """Batches of whole groups (a problem's traces stay together), about ``batch_size`` rows each.

    ``keys[i]`` is example i's ``(group key, length)``.  As :func:`length_grouped_batches` does for rows:
    groups are shuffled, cut into mega-batches of ``group`` batches, sorted by their longest row inside
    each (so padding stays small), packed in order until the next group would overflow (a group larger
    than a batch is a batch of its own), and the batches shuffled."""
    by: dict = {}
    for i, (g, _) in enumerate(keys):
        by.setdefault(g, []).append(i)
    order = list(by.values())
    rng.shuffle(order)
    per_mega = max(1, batch_size * group // max(1, round(len(keys) / max(1, len(order)))))
    batches = []
    for s in range(0, len(order), per_mega):
        batches += pack_groups(sorted(order[s:s + per_mega], key=lambda g: max(keys[i][1] for i in g)), batch_size)
    rng.shuffle(batches)
    return batches


def pack_groups(groups: list[list[int]], size: int) -> list[list[int]]:
    """Concatenate groups in order into chunks of at most ``size`` rows; a group is never split (one larger
    than ``size`` is a chunk of its own)."""
    chunks, cur = [], []
    for g in groups:
        if cur and len(cur) + len(g) > size:
            chunks.append(cur)
            cur = []
        cur = cur + g
    if cur:
        chunks.append(cur)
    return chunks


def shard_chunks(idx: list[int], examples: list, rank: int, world: int, micro: int) -> list[list]:
    """This process's micro-batches of a step.  Plain examples: every ``world``-th row, cut every ``micro``
    rows.  Examples with a ``group``: whole groups go to processes in turn and micro-batches cut on group
    boundaries, so no problem's traces are ever split."""
    if not (idx and isinstance(examples[idx[0]], dict) and "group" in examples[idx[0]]):
        mine = idx[rank::world]
        return [[examples[i] for i in mine[s:s + micro]] for s in range(0, len(mine), micro)]
    runs: list[list[int]] = []
    for i in idx:
        if runs and examples[runs[-1][-1]]["group"] == examples[i]["group"]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [[examples[i] for i in c] for c in pack_groups(runs[rank::world], micro)]


def step_chunks(idx: list[int], examples: list, rank: int, world: int, micro: int) -> tuple[list[list], int]:
    """This process's micro-batches of a step (:func:`shard_chunks`) and how many fillers end them.  Under several
    processes every process runs as many micro-batches as the busiest: FSDP gathers weights in every forward and
    DDP all-reduces in the last backward, so a process with fewer (none where a batch holds fewer rows than there
    are processes, or fewer whole problems) left the others waiting for ever.  A filler repeats process 0's first
    micro-batch, and :func:`sft_step` counts its loss zero times; every process derives every share from the same
    batch, so no message is needed."""
    if world == 1:
        return shard_chunks(idx, examples, 0, 1, micro), 0
    every = [shard_chunks(idx, examples, r, world, micro) for r in range(world)]
    mine, most = every[rank], max(map(len, every))
    return mine + [every[0][0]] * (most - len(mine)), most - len(mine)


def padding_waste(batches: list[list[int]], lengths: Sequence[int]) -> float:
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / padded if padded else 0.0


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio × lr``."""
    total = args.schedule_steps or args.steps
    step += args.schedule_offset
    warm = max(1, round(args.warmup_ratio * total))
    if step < warm:
        return args.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, args: TrainArgs, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only; ``model`` may be a dict of named models (one optimizer, two param
    groups per model, each carrying its ``peak_lr`` from ``args.lrs``; frozen models contribute nothing).
    ``fused``: PyTorch's one-kernel AdamW (the engine's choice on CUDA, where the per-tensor loop of the default
    implementation launches several kernels per parameter; on a CPU the lab keeps the default)."""
    models = model if isinstance(model, dict) else {"": model}
    if args.optimizer == "sgd":
        params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=args.lr, momentum=0.0, weight_decay=0.0)
    groups = []
    for name, m in models.items():
        peak = args.lrs.get(name, args.lr)
        trained = [p for p in m.parameters() if p.requires_grad]
        # ZeRO-3 loads a model partitioned (transformers' zero.Init): each weight an empty 1-d tensor, its shape kept
        matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in trained]
        decay = [p for p, mat in zip(trained, matrix) if mat]
        rest = [p for p, mat in zip(trained, matrix) if not mat]
        groups += [{"params": ps, "weight_decay": wd, "peak_lr": peak, "lr": peak}
                   for ps, wd in ((decay, args.weight_decay), (rest, 0.0)) if ps]
    return torch.optim.AdamW(groups, lr=args.lr, betas=args.betas, fused=fused or None)


def fused_adamw(device: torch.device) -> bool:
    """Whether the engine's AdamW is PyTorch's fused one on ``device``: on CUDA (one kernel for all parameters)."""
    return device.type == "cuda"


class BatchStream:
    """Endless length-grouped batches over encoded examples, epoch after epoch (seeded)."""

    def __init__(self, examples, batch_size: int, seed: int, batcher: Callable | None = None):
        self.examples, self.batch_size = examples, batch_size
        self.batcher = batcher or length_grouped_batches
        grouped = bool(examples) and isinstance(examples[0], dict) and "group" in examples[0]
        self.keys = ([(e["group"], len(ex_ids(e))) for e in examples] if grouped
                     else [len(ex_ids(e)) for e in examples])
        self.rng, self.epoch, self.queue = random.Random(seed), 0, []

    def next(self) -> list[int]:
        if not self.queue:
            self.queue = self.batcher(self.keys, self.batch_size, self.rng)
            self.epoch += 1
        return self.queue.pop()




# --------------------------------------------------------------------------- the loop


class TrainingDiverged(RunFailure, FloatingPointError):
    """A non-finite loss; the message names the step and the last good checkpoint kept."""


_ACCELERATOR = None


def get_accelerator(args: TrainArgs | None = None):
    """One ``accelerate.Accelerator`` per process (accelerate keeps global state anyway), on ``args.device``
    (``student.device``) when that is not ``auto``: ``cpu`` even where a GPU is visible, ``cuda:N`` as the current
    CUDA device.  Under ``accelerate launch``/``torchrun`` accelerate gives each process its device, so a set
    ``student.device`` is an error there; so is a device this process cannot have (not visible here, or not the
    one an earlier ``train()`` of this process already trains on), and a ``train.bf16`` other than the precision
    it already trains with (accelerate fixes both for the process; silently keeping the first would train in a
    precision the config does not ask for)."""
    global _ACCELERATOR  # noqa: PLW0603 — one per process, created on first use
    device = args.device if args else "auto"
    if _ACCELERATOR is None:
        from accelerate import Accelerator

        world = launch_world()
        if world > 1 and not torch.cuda.is_available():
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")  # torchrun on CPU: gloo, as `accelerate launch --cpu`
        want = check_device(device, select=True)
        bf16 = uses_bf16(args.bf16 if args else None, want)
        from accelerate.utils import DistributedDataParallelKwargs

        # DDP broadcasts the model's buffers from process 0 in every forward, a collective: where the number of
        # forwards in a step differs between processes (COMPACT's length-bucketed parts; QR's routed and unrouted
        # paths hung this way before its models left DDP), the broadcasts pair across steps and hang.  A language
        # model's buffers (rotary frequencies) are the same on every process and never change, so nothing is lost
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        _ACCELERATOR = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=want.type == "cpu",
                                   kwargs_handlers=[ddp])
        if deepspeed_launch(_ACCELERATOR):
            whole_loads()
    elif device != "auto" and not _same_device(check_device(device, select=True), _ACCELERATOR.device):
        raise UsageError(f"student.device: {device}, but this process already trains on "
                         f"{_ACCELERATOR.device} (one device per process); run it in a process of its own")
    elif args and args.bf16 is not None and args.bf16 != (_ACCELERATOR.mixed_precision == "bf16"):
        raise UsageError(f"train.bf16: {str(args.bf16).lower()}, but this process already trains with mixed "
                         f"precision {_ACCELERATOR.mixed_precision!r} (accelerate's, one per process); run it in a "
                         "process of its own or leave train.bf16 unset")
    return _ACCELERATOR


def check_device(device: str, select: bool = False) -> torch.device:
    """``student.device`` as a device this process can train on (``auto``: what accelerate would pick), or a
    :class:`UsageError` naming the setting; ``select``: a CUDA index becomes the current device.  ``accord
    run``/``train`` call it before building or loading any model."""
    from accord.models import pick_device

    world = launch_world()
    if device != "auto" and world > 1:
        raise UsageError(f"student.device: {device} is set, but this run is launched on {world} processes, "
                         "and accelerate gives each its own device; set student.device: auto")
    try:
        want = pick_device(device)
    except RuntimeError as e:
        raise UsageError(f"student.device: {device} is not a device ({e})") from None
    if want.type == "cuda" and device != "auto":
        if not torch.cuda.is_available() or (want.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"student.device: {device}, but no such CUDA device is visible here "
                             f"({torch.cuda.device_count()} visible); set student.device: auto or cpu")
        if want.index is not None and select:
            torch.cuda.set_device(want.index)
    if want.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"student.device: {device}, but MPS is not available here; set student.device: auto")
    return want


def uses_bf16(setting: bool | None, device: torch.device) -> bool:
    """``train.bf16`` on ``device`` (``student.device`` resolved): ``None`` → where CUDA has bf16."""
    return setting if setting is not None else _bf16_supported() and device.type != "cpu"


NEEDS_BF16 = ("train.master_weights: true needs bf16 mixed precision (train.bf16: true, on a device with bf16), "
              "which this run does not have; set train.master_weights: false")


def check_precision(bf16: bool | None, master_weights: bool, device: torch.device) -> None:
    """``train.master_weights`` needs bf16 mixed precision: a :class:`UsageError` where ``train.bf16`` on
    ``device`` (:func:`check_device`'s) resolves to none (``accord run``/``train`` call it before loading any
    model)."""
    if master_weights and not uses_bf16(bf16, device):
        raise UsageError(NEEDS_BF16)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same type, and the same CUDA index where either names one (an index-less ``cuda`` is the current one)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    return (a.index if a.index is not None else torch.cuda.current_device()) == \
        (b.index if b.index is not None else torch.cuda.current_device())


def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def sft_loss(model, b: dict, n_units: int, chunked: bool = False) -> tuple[torch.Tensor, dict]:
    """The default ``loss_fn``: Σ token NLL of the micro-batch / the step's target tokens.  ``chunked``: from the
    final hidden states through :class:`LinearCrossEntropy`, never materialising the [B, T, V] logits."""
    if "parts" in b:
        return sum(sft_loss(model, part, n_units, chunked)[0] for part in b["parts"]), {}
    if chunked:
        h = final_states(model, b)  # the head runs in chunks below
        at = b["states_at"] if "states_at" in b else counted_states(b["labels"])
        rows = h.reshape(-1, h.shape[-1]).index_select(0, at)
        head = output_states(model)
        return LinearCrossEntropy.apply(rows, head.weight, b["labels"].reshape(-1).index_select(0, at + 1)) \
            / max(1, n_units), {}
    logits = model(**model_inputs(b)).logits[:, :-1]
    tgt = b["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum") / max(1, n_units)
    return loss, {}


def counted_states(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices ``r·T + t`` into a batch's final states ``[R, T, d]`` of the positions whose next label counts
    (``labels[r, t + 1] ≠ IGNORE``; that label is ``labels.view(-1)[i + 1]``), in row order.  The engine's collates
    add them as ``states_at``, computed on the host: a boolean mask applied on the device makes the host wait for
    the whole forward to learn how many rows the chunked head has (a sync per micro-batch)."""
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != IGNORE
    return counted.reshape(-1).nonzero().squeeze(1)


def with_states_at(collate_fn: Callable[[list], dict]) -> Callable[[list], dict]:
    """``collate_fn`` whose batches (and a grouped batch's parts) carry :func:`counted_states` as ``states_at``."""
    def add(b: dict) -> dict:
        if "parts" in b:
            return {**b, "parts": [add(p) for p in b["parts"]]}
        return {**b, "states_at": counted_states(b["labels"])} if "labels" in b else b

    return lambda examples: add(collate_fn(examples))


# logits a chunked head forms at once: 256 MiB in float32, whatever the vocabulary (chunk_rows)
LOGITS_PER_CHUNK = 2**26


def chunk_rows(vocab: int, most: int) -> int:
    """Rows a chunked head forms logits for at once: at most ``most``, and at most :data:`LOGITS_PER_CHUNK`
    logits.  The head runs at the end of the forward, where the activations peak: at Qwen3's 151,936 words a
    chunk of 4,096 rows held 2.5 GB of float32 logits and, with its temporaries, about 7.5 GB at that peak; 441
    rows hold 256 MiB (and each product still has 441 × hidden × vocabulary multiply-adds)."""
    return max(1, min(most, LOGITS_PER_CHUNK // max(1, vocab)))


def chunk_ce(hs: torch.Tensor, w: torch.Tensor, tg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of :class:`LinearCrossEntropy`: Σ CE of its rows' logits ``hs`` W^T (softmax and loss in float32)
    and d Σ / d logits in ``hs``'s dtype, in which both backward products run (the autocast dtype, as the plain
    head's backward: no float32 GEMM).  Passes over the chunk's logits: the product writes them, a max reads them,
    the softmax casts them to float32 and reads that twice and writes its result, the cast back — about 28 bytes a
    logit at bf16, where a float32 copy, logsumexp (four passes of its own) and a softmax took about 50; at Qwen3's
    vocabulary a step of ~9k tokens has 1.3 G logits."""
    logits = hs @ w.T
    rows = torch.arange(len(tg), device=logits.device)
    top, at = logits.max(-1)
    picked = logits[rows, tg]
    d = torch.softmax(logits, -1, dtype=torch.float32)
    del logits
    # logsumexp without its own passes over the chunk (a max, a subtraction, an exp and a sum, each as large as the
    # logits): p(top) = exp(top − logsumexp) from the softmax, so logsumexp = top − log p(top) to float32 rounding,
    # and p(top) ≥ 1/V never underflows (p(target) would, for a loss beyond 87 nats)
    loss = (top.float() - torch.log(d[rows, at]) - picked.float()).sum()
    d[rows, tg] -= 1.0
    return loss, d.to(hs.dtype)


@functools.cache
def _compiled_chunk_ce():
    return torch.compile(chunk_ce, dynamic=True)  # the last chunk of a batch is shorter: one graph for any rows


# what LinearCrossEntropy runs per chunk: chunk_ce, or under ``train.compile`` (:func:`compiled`) the same function
# through torch.compile, which fuses the max, the softmax with its float32 cast, the −1 at the targets and the cast
# back into fewer passes over the chunk's logits (at Qwen3's vocabulary a chunk's logits are 256 MiB of float32,
# and a step of ~9k tokens has ~20 chunks)
_CHUNK = {"ce": chunk_ce}


class LinearCrossEntropy(torch.autograd.Function):
    """Σ over rows of CE(h W^T, target), chunk by chunk: the logits of :func:`chunk_rows` rows at a time, never
    all of them.  The gradients are computed in the forward pass (the loss is a sum, so d loss/d h and d loss/d W
    are final once the chunk is seen) and scaled in backward — Liger Kernel's fused-linear-cross-entropy
    idea, in plain PyTorch because no installed library does it on CPU.  Logits in the autocast dtype,
    softmax and the loss in float32, as the plain path; each chunk's tensors dropped before the next chunk's
    logits exist, so at most two chunks' worth of float32 logits are alive at once."""

    CHUNK = 4096  # rows at most (chunk_rows: fewer where the vocabulary is large)

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        grad_h = torch.zeros_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        dt = compute_dtype(h)  # autocast's: the fp32 final states would make every product over V fp32
        w = weight.to(dt)  # the fp32 master weights in the autocast dtype, as the plain head under autocast
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        n = chunk_rows(weight.shape[0], LinearCrossEntropy.CHUNK)
        step = _CHUNK["ce"]
        for s in range(0, h.shape[0], n):
            hs, tg = h[s:s + n].to(dt), targets[s:s + n]
            loss, d = step(hs, w, tg)
            total += loss
            grad_h[s:s + len(tg)] = d @ w
            grad_w.add_(d.T @ hs)  # in float32, reading the product as it is (no float32 copy of it)
            del d  # before the next chunk's logits exist
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * g.to(grad_h.dtype), grad_w * g.to(grad_w.dtype), None


class LinearTokenNLL(torch.autograd.Function):
    """Per-row NLL of ``targets`` under h W^T, chunk by chunk (:func:`chunk_rows`), for losses that weight tokens
    after the fact (COMPACT's α per trace): the forward keeps only the log-normalisers; the backward recomputes
    each chunk's softmax, scales it by the upstream gradient of each row and accumulates d/dh and d/dW.  One more
    pass over the head than :class:`LinearCrossEntropy` (whose loss is a plain sum, so its gradients can be formed
    in the forward), and never a [rows, V] tensor either way."""

    CHUNK = 4096  # rows at most

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx.dt = dt = compute_dtype(h)  # the backward runs outside autocast: it reads the dtype from here
        w = weight.to(dt)
        lse = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
        picked = torch.empty_like(lse)
        n = chunk_rows(weight.shape[0], LinearTokenNLL.CHUNK)
        for s in range(0, h.shape[0], n):
            logits = (h[s:s + n].to(dt) @ w.T).float()
            tg = targets[s:s + n]
            lse[s:s + len(tg)] = torch.logsumexp(logits, -1)
            picked[s:s + len(tg)] = logits.gather(-1, tg[:, None])[:, 0]
            del logits
        ctx.save_for_backward(h, weight, targets, lse)
        return lse - picked

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, weight, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.dt)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        n = chunk_rows(weight.shape[0], LinearTokenNLL.CHUNK)
        for s in range(0, h.shape[0], n):
            hs, tg = h[s:s + n].to(ctx.dt), targets[s:s + n]
            d = (hs @ w.T).float().sub_(lse[s:s + len(tg), None]).exp_()  # the softmax, in place
            d[torch.arange(len(tg), device=d.device), tg] -= 1.0
            d = d.mul_(g[s:s + len(tg), None].float()).to(ctx.dt)  # the products in the autocast dtype, as above
            grad_h[s:s + len(tg)] = d @ w
            grad_w.add_(d.T @ hs)  # in float32, reading the product as it is (no float32 copy of it)
            del d
        return grad_h, grad_w.to(weight.dtype), None


def final_states(model, b: dict) -> torch.Tensor:
    """The final hidden states [rows, T, d] of batch ``b`` (the LM head's input), with the model's own head run on
    the last position only: what every chunked-head reader starts from (``train.chunked_loss``)."""
    return model(**model_inputs(b), output_hidden_states=True, logits_to_keep=1).hidden_states[-1]


def chunks_asked(setting: bool | None, device) -> bool:
    """``train.chunked_loss`` resolved: None means on CUDA (``device``'s type, or whether CUDA is there when
    ``device`` is None)."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return bool(cuda if setting is None else setting)


def use_chunked(setting: bool | None, device, model) -> bool:
    """Whether ``model`` reads its head in chunks: :func:`chunks_asked`, a head that is h W^T
    (:func:`chunkable_head`), and weights that are whole outside the forward (not FSDP's or ZeRO-3's shards: the
    chunked head multiplies by the head's weight there, :mod:`accord.train.sharded`)."""
    return chunks_asked(setting, device) and chunkable_head(model) and not sharded(model)


def chunkable_head(model) -> bool:
    """Whether the logits are exactly h W^T (no bias, no soft-capping, no adapter on the head — a ``lm_head`` named
    in ``train.lora.target_modules``), so the head may run in chunks."""
    m = getattr(model, "module", model)
    cfg = getattr(m, "config", None)
    head = output_states(m)
    return (getattr(head, "bias", None) is None and not hasattr(head, "base_layer")
            and not getattr(cfg, "final_logit_softcapping", None) and getattr(cfg, "logit_scale", None) is None)


def to_device(obj, device):
    """Tensors inside dicts and lists moved to ``device`` (a multi-model batch nests one batch per model); a batch's
    ``meta`` (per-example fields, never tensors) passes as it is.  A host tensor bound for a GPU goes through pinned
    memory without blocking: a plain copy from pageable memory makes PyTorch wait for everything queued on the
    device first, so each micro-batch would start only once the last one's backward had finished."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu" and torch.device(device).type == "cuda":
            return obj.pin_memory().to(device, non_blocking=True)
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: v if k == "meta" else to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list) and obj and isinstance(obj[0], (torch.Tensor, dict)):
        return [to_device(v, device) for v in obj]
    return obj


def output_states(model):
    """The module whose *input* is the last hidden state a causal LM reads its logits from (``lm_head``),
    through DDP and PEFT wrappers."""
    m = getattr(model, "module", model)
    return m.get_output_embeddings()


@contextlib.contextmanager
def capture_input(module):
    """Keep the hidden states entering ``module`` (a forward pre-hook; a recomputation under gradient
    checkpointing overwrites the same slot)."""
    box = {}

    def hook(mod, args, kwargs):
        box["x"] = args[0] if args else kwargs["hidden_states"]

    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        h.remove()


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T] float32 NLL of each target token (position t predicted by logits t−1); 0 where ignored."""
    lg, tgt = logits[:, :-1].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1).clamp(min=0),
                                            reduction="none").view(tgt.shape)
    nll = nll * (tgt != IGNORE)
    return torch.nn.functional.pad(nll, (1, 0))


def flat_token_nll(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Float32 NLL of each of ``targets`` (any shape; IGNORE: 0) under ``h`` W^T (``h``: the targets' shape × d),
    through :class:`LinearTokenNLL`: the head in chunks, ignored rows never through it."""
    keep = targets != IGNORE
    vals = LinearTokenNLL.apply(h[keep], weight, targets[keep])
    return torch.zeros(targets.shape, device=vals.device, dtype=torch.float32).masked_scatter(keep, vals)


def state_token_nll(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`token_nll` from the final hidden states ``h`` [B, T, d] and the head's ``weight`` instead of the
    logits (``train.chunked_loss``): the same [B, T] layout, no [B, T, V] tensor."""
    return torch.nn.functional.pad(flat_token_nll(h[:, :-1], weight, labels[:, 1:]), (1, 0))


def sft_step(model, batches: list[dict], device, n_units: int, scale: float = 1.0, backward=None,
             no_sync=None, loss_fn: Callable | None = None, fill: int = 0) -> tuple[torch.Tensor, dict]:
    """Forward/backward over micro-batches; loss = Σ ``loss_fn`` over them, each normalised by ``n_units``
    (the whole step's target tokens by default; problems for COMPACT).  Metrics are averaged over
    micro-batches.

    ``scale`` undoes DDP's gradient averaging (× world size) so every process
    contributes its sum over the *global* unit count.  The last ``fill`` micro-batches are fillers
    (:func:`step_chunks`): forward and backward run, so every process takes part in the same collectives, with
    the loss times zero, and neither the loss returned nor the metrics count them.
    """
    total, sums, real = torch.zeros((), device=device), {}, len(batches) - fill
    for j, b in enumerate(batches):
        b = to_device(b, device)
        ctx = no_sync(model) if (no_sync and j < len(batches) - 1) else contextlib.nullcontext()
        with ctx:
            loss, metrics = (loss_fn or sft_loss)(model, b, max(1, n_units))
            (backward or torch.Tensor.backward)(loss * (scale if j < real else 0.0))
        if j >= real:
            continue
        total += loss.detach()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) / real
    return total, sums


@dataclass
class TrainResult:
    model: object  # the trained model (LoRA adapters merged in when ``lora_r`` > 0)
    history: list[float]
    resumed_from: int = 0
    out_dir: Path | None = None


def _n_targets(part: list) -> int:
    return sum(sum(1 for y in ex_labels(e)[1:] if y != IGNORE) for e in part)


def train(model, tok, rows: list[dict], args: TrainArgs, **kw) -> TrainResult:
    """Train ``model`` for ``args.steps`` optimizer steps on chat ``rows``.

    With ``out_dir``: checkpoints every ``checkpoint_every`` steps under
    ``out_dir/checkpoint-<step>``, resume from the newest one, ``metrics.jsonl``.
    ``shard=False`` trains on this process alone (MoT branches spread over processes).
    ``examples``: ``rows`` already encoded with ``encode_example`` (MoT reuses them every round).
    ``on_step(step, loss)`` runs after every optimizer step; returning ``True`` stops training
    there (the lab's base stops once it has learned its task).

    Hooks for recipes whose loss is not plain SFT (COMPACT, QR-Distill): ``examples`` may be dicts
    ``{"ids", "labels", "group", **meta}``; ``batcher(keys, batch_size, rng)`` makes the batches
    (:func:`grouped_batches` keeps each ``group`` whole; groups are sharded across processes whole);
    ``loss_fn(model, batch, n_units) -> (loss, metrics)`` replaces the token-NLL loss and its metrics
    join the step's record in ``metrics.jsonl``; ``units_fn(micro_batch_examples) -> int`` counts the
    normaliser (default: target tokens), summed over the step and over processes;
    ``collate_fn(micro_batch_examples) -> batch`` replaces the padding collate.

    Several models: ``model`` a dict ``{name: module}`` (``tok`` a dict too, or ``None`` for a module without
    one) trains them in one optimizer step — one optimizer, per-model peak learning rates (``args.lrs``),
    one clip over all of them, ``loss_fn`` receiving the dict; checkpoints hold ``checkpoint-N/<name>/``
    per model; a model with no trainable parameter is frozen (never wrapped, never stepped); the result's
    ``model`` is the dict.
    """
    # packed SDPA models attend example by example in one row (accord.train.varlen); back to sdpa afterwards
    compile_on = args.compile and not args.lora_quantize
    lean = use_lean(args.lean_layers, get_accelerator(args).device) and not compile_on  # compile fuses them itself
    with segmented(model, not isinstance(model, dict) and kw.get("collate_fn") is None and args.packing is not False), \
            compiled(model, compile_on), lean_layers(model, lean):
        return _train(model, tok, rows, args, **kw)


def compile_targets(model) -> list[torch.nn.Module]:
    """What ``train.compile`` compiles: every part of each decoder layer but its attention — the MLP and the norms,
    whose elementwise work (RMSNorm, SiLU · up) fusion saves.  Attention stays eager: SDPA is one fused kernel
    already, and accord's varlen kernel lays each batch out in Python (``accord.train.varlen``)."""
    m = getattr(model, "module", model)
    return [c for layer in m.modules() if type(layer).__name__.endswith("DecoderLayer")
            for c in layer.children() if "Attention" not in type(c).__name__]


@contextlib.contextmanager
def compiled(model, on: bool):
    """``model`` (or each language model of a dict) with :func:`compile_targets` compiled inside the block
    (``torch.compile``, dynamic shapes: packed rows change width every step; every layer shares one graph), and the
    chunked head's per-chunk work (:func:`chunk_ce`) compiled too; eager after it.  Not under QLoRA: bitsandbytes'
    4-bit layers would break the graphs."""
    parts = [c for m in (model.values() if isinstance(model, dict) else [model]) if _is_lm(m)
             for c in compile_targets(m)] if on else []
    for c in parts:
        c.compile(dynamic=True)
    if on:
        _CHUNK["ce"] = _compiled_chunk_ce()
    try:
        yield
    finally:
        for c in parts:
            c._compiled_call_impl = None  # what nn.Module.compile sets: eager again
        _CHUNK["ce"] = chunk_ce


def n_compiled(model) -> int:
    """How many modules of ``model`` run compiled now (:func:`compiled`)."""
    return sum(getattr(c, "_compiled_call_impl", None) is not None for c in getattr(model, "module", model).modules())


def _train(model, tok, rows: list[dict], args: TrainArgs, *, out_dir: str | Path | None = None,
           shard: bool = True, on_step: Callable[[int, float], bool | None] | None = None,
           log: Callable[[dict], None] | None = None, examples: list | None = None,
           batcher: Callable | None = None, loss_fn: Callable | None = None,
           units_fn: Callable[[list], int] | None = None, collate_fn: Callable[[list], dict] | None = None
           ) -> TrainResult:
    """:func:`train` under the attention kernel it picked."""
    acc = get_accelerator(args)
    world, rank = (acc.num_processes, acc.process_index) if shard else (1, 0)
    torch.manual_seed(args.seed)
    single = not isinstance(model, dict)
    models = {"": model} if single else dict(model)
    toks = {"": tok} if single else dict(tok or {})
    examples = examples if examples is not None else [encode_example(tok, r, args.max_len, args.chat_template_kwargs)
                                                      for r in rows]
    if not examples:
        raise ValueError("no training examples")
    float_base = {}  # QLoRA: the float layers that 4-bit ones replace while training, by model name
    frozen = {}  # LoRA freezes the base: which weights were frozen before it, by model name (set back after)
    for n, m in list(models.items()):
        if _is_lm(m) and _trainable(m):
            frozen[n] = {k for k, p in m.named_parameters() if not p.requires_grad}
            models[n], float_base[n] = _prepare_model(m, args, acc)
    shards = will_shard(acc, shard)  # FSDP: every weight split across the processes (train/sharded.py)
    if shards:
        from accord.train.sharded import check

        check(acc, several=not single, quantized=bool(args.lora_quantize), lora=bool(args.lora_r))
    micro = max(1, args.batch_size // args.grad_accum)
    ds = shards and deepspeed_launch(acc)  # DeepSpeed: ZeRO partitions the optimizer's state (stage 3: weights too)
    if ds:
        deepspeed_settings(acc, micro, world, args.clip)
    opt = make_optimizer(models, args, fused=fused_adamw(acc.device))
    out = Path(out_dir) if out_dir else None
    start, history, opt_state = _resume(out, models, opt, shards, ds) if out else (0, [], None)
    if start and (not shard or acc.is_main_process):  # a resumed run says so
        import sys

        print(f"resuming {out.name} from checkpoint-{start} (step {start} of {args.steps})", file=sys.stderr)
    stream = BatchStream(examples, args.batch_size, args.seed, batcher)
    for _ in range(start):
        stream.next()  # replay the data order up to the checkpoint (cheap: indices only)
    masters = master_weights(models, opt, args, acc)  # after the resume: the masters are what it loaded
    with contextlib.closing(masters):  # the float32 model as it came back in it, whatever happens
        by_hand = shard and world > 1 and not single  # several models: gradients averaged after the step
        models, opt = _place(acc, models, opt, shard, prepare_opt=not masters, wrap=not by_hand)
        if opt_state is not None and ds:  # DeepSpeed's own checkpoint: loaded into its engine
            from accord.train.sharded import load_deepspeed

            load_deepspeed(models[""], opt_state)
        elif opt_state is not None:  # a checkpoint's optimizer state keyed by name: set once the model is sharded
            from accord.train.sharded import set_optimizer_state

            set_optimizer_state(models[""], opt, opt_state)
        local = not shard or acc.is_main_process  # does this process write files?
        for m in models.values():
            m.train()
        call = models[""] if single else models
        packed = collate_fn is None and use_packing(call, args, acc.device) if single else False
        chunked = single and loss_fn is None and use_chunked(args.chunked_loss, acc.device, call)
        collate_fn = collate_fn or default_collate(call, tok.pad_token_id, packed, examples, chunked)
        trained = [m for m in models.values() if _trainable(m)]
        if loss_fn is None and chunked:
            import functools

            loss_fn = functools.partial(sft_loss, chunked=True)
        if local:
            say_once(_first_line(models, args, acc, world, shards, packed, chunked, loss_fn,
                                 quantized=any(float_base.values()), masters=len(masters) > 0))
            for line in overlong(examples, tok.eos_token_id, args.max_len) if single else []:
                say_once(f"warning: {line}")
        clock, last_ckpt = time.perf_counter(), latest_checkpoint(out)
        flops = model_flops(call, args, acc.device) if single else None  # per input token, over the peak
        plain_args = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))}
        trackers = start_trackers(args, out, plain_args) if local else []

        def batches() -> tuple[list[dict], int, int, int]:  # the next step's micro-batches, fillers, unit counts
            chunks, fill = step_chunks(stream.next(), examples, rank, world, micro)
            real = chunks[:len(chunks) - fill]
            n_tok, n_in = _global_count(acc, [sum((units_fn or _n_targets)(c) for c in real),
                                              sum(len(ex_ids(e)) for c in real for e in c)], shard and world > 1)
            return [collate_fn(c) for c in chunks], fill, n_tok, n_in

        ahead = batches() if start < args.steps else None
        for step in range(start, args.steps):
            t0 = time.perf_counter()
            factor = lr_at(step, args) / args.lr if args.lr else 0.0
            for g in opt.param_groups:
                g["lr"] = g.get("peak_lr", args.lr) * factor
            parts, fill, n_tok, n_in = ahead
            with acc.autocast():
                loss, metrics = sft_step(call, parts, acc.device, n_tok, scale=world,
                                         backward=call.backward if ds else acc.backward,
                                         no_sync=accumulating if ds else
                                         (lambda _: _no_sync_all(acc, trained)) if world > 1 else None,
                                         loss_fn=loss_fn, fill=fill)
            if by_hand:
                average_gradients([p for m in trained for p in m.parameters() if p.requires_grad], world)
            if world > 1:
                loss = acc.reduce(loss, "sum")
            gnorm = None
            if ds:  # DeepSpeed clips (train.clip, in its config), steps and zeroes the gradients itself
                call.step()
                gnorm = call.get_global_grad_norm() if args.clip else None
            else:
                with masters.full():
                    if args.clip:
                        params = [p for m in trained for p in m.parameters()]
                        clip = acc.clip_grad_norm_ if shard else torch.nn.utils.clip_grad_norm_
                        gnorm = clip(params, args.clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            # the host collates the next step while the device finishes this one, then waits for it: the step's
            # time is its time.  A non-finite loss is caught here, after the update (checking before it would make
            # the host wait between backward and optimizer); the weights in memory are then spoilt, the files not.
            ahead = batches() if step + 1 < args.steps else None
            loss_v, gnorm = _read_step(loss, gnorm, step, last_ckpt)
            history.append(loss_v)
            now = time.perf_counter()
            rate = n_in / max(now - t0, 1e-9)
            event = {"event": "step", "step": step + 1, "loss": history[-1], "lr": lr_at(step, args),
                     "grad_norm": float(gnorm) if gnorm is not None else None, "tokens": n_tok,
                     "elapsed_s": round(now - clock, 4), "input_tokens": n_in,
                     "tokens_per_s": round(rate, 1), **({"mfu": round(flops * rate, 4)} if flops else {}),
                     **metrics}  # metrics: this process's
            if local:
                _emit(out, event, log, args, trackers)
            stop = bool(on_step(step, history[-1])) if on_step else False
            if out and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
                with masters.full():  # float32 weights in the checkpoint
                    _check_finite(models, step, last_ckpt)  # never write a checkpoint that holds NaN/inf weights
                    last_ckpt = save_checkpoint(acc, models, toks, opt, out, step + 1, history, args, local, shard)
            if stop:
                break
    for t in trackers:
        t.finish()
    if shards:  # a plain model of the trained weights on process 0, None elsewhere (only process 0 saves)
        from accord.train.sharded import gathered

        models = {n: gathered(m, acc.is_main_process) for n, m in models.items()}
    elif shard:
        models = {n: _plain_forward(acc.unwrap_model(m)) for n, m in models.items()}
    if shard:
        _give_back(acc)
    models = {n: _as_trained(m, args, float_base.get(n), frozen.get(n)) for n, m in models.items()}
    return TrainResult(models[""] if single else models, history, start, out)


def _read_step(loss: torch.Tensor, gnorm, step: int, last_ckpt: Path | None) -> tuple[float, float | None]:
    """The step's loss and gradient norm as numbers, read in one wait for the device (the host's only one in a
    step); :class:`TrainingDiverged` for a non-finite loss, naming the last good checkpoint."""
    read = torch.stack([v.detach().float().to(loss.device) for v in (loss, gnorm)
                        if isinstance(v, torch.Tensor)]).tolist()
    value, gnorm = read[0], (read[1] if len(read) > 1 else gnorm)
    if not math.isfinite(value):
        where = f"the last good checkpoint {last_ckpt} is kept" if last_ckpt else "no checkpoint was written yet"
        raise TrainingDiverged(f"loss became {value} at step {step + 1}; {where}. Lower train.lr or check the corpus.")
    return value, gnorm


def default_collate(model, pad_id: int, packed: bool, examples: list, chunked: bool = False) -> Callable[[list], dict]:
    """The engine's collate where a recipe gives none: one packed row in length buckets for accord's varlen SDPA,
    one row for FlashAttention, first-fit rows elsewhere (``packed``), else right-padded rows; problem-grouped dict
    examples (``group``) cut by length unless the kernel attends a row example by example.  ``chunked`` (the head
    runs in chunks): each batch carries the rows it reads (:func:`with_states_at`)."""
    varlen = varlen_attention(model)  # FlashAttention: one row; accord's varlen SDPA: one row in buckets
    one = ((lambda c: collate_bucketed(c, pad_id)) if packed and varlen_active(model) else
           (lambda c: collate_packed(c, pad_id, varlen)) if packed else
           (lambda c: collate(c, pad_id)))
    grouped = isinstance(examples[0], dict) and "group" in examples[0] and not varlen
    fn = (lambda c: collate_grouped(c, one)) if grouped else one
    return with_states_at(fn) if chunked else fn


def overlong(examples: list, eos: int | None, max_len: int) -> list[str]:
    """What ``train.max_len`` cut (:func:`encode_example` truncates): examples whose completion lost its ending and
    EOS — a student trained on many learns to write on rather than stop — and examples whose prompt fills the
    whole length, which teach nothing.  TRL's trainers truncate as silently; a reasoning corpus (R1's traces run
    to 16k tokens) meets the default 4,096 often, so the run says how many."""
    cut = empty = 0
    for ex in examples:
        labels = ex_labels(ex)
        if all(t == IGNORE for t in labels):
            empty += 1
        elif len(labels) >= max_len and labels[-1] != eos:
            cut += 1
    n, out = len(examples), []
    if cut:
        out.append(f"train: {cut} of {n} example(s) ({cut / n:.1%}) are longer than train.max_len={max_len} tokens "
                   "and cut there: their ending and EOS are never learned (raise train.max_len)")
    if empty:
        out.append(f"train: {empty} of {n} example(s) keep no completion token within train.max_len={max_len} "
                   "(the prompt fills it): they teach nothing")
    return out


def _first_line(models: dict, args: TrainArgs, acc, world: int, shards: bool, packed: bool, chunked: bool,
                loss_fn, quantized: bool, masters: bool) -> str:
    """What a training run says first (issue 13): device, weights' dtype and attention kernel
    (:func:`accord.models.runtime`), processes and sharding, autocast, packing, LoRA, compiled and lean modules,
    master weights, and which loss runs."""
    from accord.models import runtime

    lms = [m for m in models.values() if _is_lm(m)]
    lora = (f"LoRA r={args.lora_r}{' on a 4-bit NF4 base (QLoRA)' if quantized else ''}; " if args.lora_r else "")
    n_comp, n_lean_mods = sum(n_compiled(m) for m in lms), sum(n_lean(m) for m in lms)
    if loss_fn and not chunked:
        loss = "the recipe's (its own head: see its first line)"
    else:
        loss = "token cross-entropy" + (" from the hidden states in chunks (no full-vocabulary logits)" if chunked
                                        else " over full-vocabulary logits")
        if shards and not chunked and chunks_asked(args.chunked_loss, acc.device):
            loss += " (the chunked head reads the head's weight outside the forward, which is sharded)"
    return (f"train: {runtime(lms[0]) if lms else acc.device.type}; {world} process(es)"
            f"{' (data-parallel)' if world > 1 and not shards else ''}"
            f"{f' (sharded: {shard_kind(acc)})' if shards else ''}; "
            f"autocast {acc.mixed_precision}; "
            f"{'padding-free packing' if packed else 'no packing'}; {lora}"
            + (f"torch.compile: {n_comp} MLP/norm module(s)"
               f"{' and the chunked head' if chunked and _CHUNK['ce'] is not chunk_ce else ''}; " if n_comp else "")
            + (f"lean RMSNorm/SwiGLU: {n_lean_mods} module(s)"
               f"{' (RMSNorm in PyTorch fused kernels)' if fused_on(acc.device) else ''}; " if n_lean_mods else "")
            + ("bf16 weights, float32 master weights in the optimizer; " if masters else "")
            + "loss: " + loss)


def _as_trained(m, args: TrainArgs, float_base, frozen: set | None):
    """A trained model as :func:`train` returns it: in eval mode, QLoRA's adapters merged into the float base it
    replaced, LoRA's merged, and the weights LoRA froze trainable again as they came (MoT trains the merged
    student next round).  ``None`` (a sharded run's other processes) stays ``None``."""
    if m is None:
        return None
    m.eval()
    if float_base:
        from accord.train.qlora import merge_into_base

        m = merge_into_base(m, float_base)
    elif args.lora_r and hasattr(m, "merge_and_unload"):
        m = m.merge_and_unload()
    if args.lora_r and frozen is not None:
        for k, p in m.named_parameters():
            p.requires_grad_(k not in frozen)
    return m


def master_weights(models: dict, opt, args: TrainArgs, acc) -> MasterWeights:
    """``train.master_weights``: the trainable language models' float32 weights as bf16 copies for the run, on
    the device (:mod:`accord.train.master`); a :class:`UsageError` where bf16 mixed precision is off or FSDP or
    DeepSpeed hold master copies of their own.  The optimizer's (resumed) state goes to the device here, while
    the parameters are float32: accelerate's ``prepare`` would reload it cast to the parameters' dtype, bf16 by
    then, so with master weights the optimizer is not handed to it (for DDP it only delegates)."""
    if not args.master_weights:
        return MasterWeights([], False)
    if acc.mixed_precision != "bf16":
        raise UsageError(NEEDS_BF16)
    if will_shard(acc, True):
        raise UsageError(f"train.master_weights: true under {acc.distributed_type}, which keeps float32 master "
                         "copies itself; set train.master_weights: false and use its mixed-precision settings")
    lms = [m.to(acc.device) for m in models.values() if _is_lm(m) and _trainable(m)]
    opt.load_state_dict(opt.state_dict())  # moves a resumed state to its parameters' device, float32 as they are
    return MasterWeights(lms, True)


def _plain_forward(m):
    """``m`` with the forward it had before ``accelerate.prepare``: under mixed precision prepare replaces it by an
    autocast one that casts every output to float32, which would stay on the model given back (its evaluation, a
    later run's).  By hand: ``unwrap_model(keep_fp32_wrapper=False)`` follows ``__wrapped__`` past transformers'
    own decorators on ``forward`` (``can_return_tuple``…) and binds the undecorated function."""
    orig = vars(m).pop("_original_forward", None)
    if orig is None:
        return m
    if getattr(orig, "__self__", None) is m and getattr(orig, "__func__", None) is getattr(type(m), "forward", None):
        vars(m).pop("forward", None)  # it was the class's own: no instance attribute, as before
    else:
        m.forward = orig
    return m


def _give_back(acc) -> None:
    """accelerate keeps every prepared model and optimizer: drop its references (issue 13).  On an accelerator
    ``free_memory`` also collects garbage and empties the device cache; on CPU there is no device cache, and a full
    ``gc.collect()`` (0.2–0.3 s with transformers loaded) per run would be the only cost, so the lists are cleared
    the way ``free_memory`` clears them."""
    if acc.device.type != "cpu":
        acc.free_memory()
        return
    for name in ("_models", "_optimizers", "_schedulers", "_dataloaders"):
        getattr(acc, name, []).clear()
    if getattr(acc, "deepspeed_engine_wrapped", None) is not None:
        acc.deepspeed_engine_wrapped = None


def varlen_attention(model) -> bool:
    """FlashAttention-style kernels (``flash_attention_2/3``…) and accord's varlen SDPA (:mod:`accord.train.varlen`),
    whose cost on one packed row is Σ Lᵢ²: packing is free there, while SDPA/eager pay a block mask over the row."""
    impl = str(getattr(getattr(getattr(model, "module", model), "config", None), "_attn_implementation", ""))
    return "flash" in impl or impl == VARLEN


def use_packing(model, args: TrainArgs, device) -> bool:
    """``args.packing``: False → padded; None → packed when the model passes :func:`packing_works`; True → packed,
    and an error naming the model when it fails the probe."""
    if args.packing is False or not _is_lm(model):
        return False
    inner = getattr(model, "module", model)
    was = model.training
    model.eval()
    try:
        ok = packing_works(model, device)
    finally:
        model.train(was)
    if args.packing and not ok:
        attn = getattr(inner.config, "_attn_implementation", "?")
        raise ValueError(f"train.packing: true, but {type(inner).__name__} (attention {attn}) lets packed examples "
                         "attend to each other; set train.packing: false")
    return ok


def _is_lm(m) -> bool:
    """A transformers model (LoRA and gradient checkpointing apply), not a small head module."""
    return hasattr(m, "config") and hasattr(m, "save_pretrained")


def _trainable(m) -> bool:
    return any(p.requires_grad for p in m.parameters())


def average_gradients(params: list, world: int) -> None:
    """Several models in one optimizer step under several processes (QR-Distill's students and router): their
    gradients averaged across the processes by hand, once the step's backward is done, in one fixed order.  DDP
    all-reduces from hooks as each model's backward finishes, so its order follows each process's graph: where the
    processes routed different paths it differed, and the all-reduces paired wrongly (gloo: "received data size
    doesn't match").  A parameter without a gradient here (a frozen part, no path through it) counts as zeros."""
    import torch.distributed as dist

    by: dict = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by.values():  # one message per dtype and device
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def _place(acc, models: dict, opt, shard: bool, prepare_opt: bool = True, wrap: bool = True) -> tuple[dict, object]:
    """DDP/FSDP/DeepSpeed wrapping, device placement and autocast (``shard``) for every trainable model (and the
    optimizer, unless not ``prepare_opt``); frozen ones and unsharded runs are only moved to the device, and so are
    all models where not ``wrap`` (their gradients are averaged by :func:`average_gradients`)."""
    if not shard or not wrap:
        return {n: m.to(acc.device) for n, m in models.items()}, (acc.prepare(opt) if shard and prepare_opt else opt)
    names = [n for n, m in models.items() if _trainable(m)]
    if prepare_opt:
        *prepared, opt = acc.prepare(*(models[n] for n in names), opt)
    else:  # master weights: DDP at most (FSDP/DeepSpeed are refused), which wraps each model on its own
        prepared = [acc.prepare(models[n]) for n in names]
    out = {n: m.to(acc.device) for n, m in models.items()}
    out.update(zip(names, prepared))
    return out, opt


@contextlib.contextmanager
def _no_sync_all(acc, models: list):
    with contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(acc.no_sync(m))
        yield


def _check_finite(models: dict, step: int, last_ckpt: Path | None) -> None:
    if all(torch.isfinite(p).all() for m in models.values() for p in m.parameters()):
        return
    where = f"the last good checkpoint {last_ckpt} is kept" if last_ckpt else "no checkpoint was written yet"
    raise TrainingDiverged(f"weights became non-finite by step {step + 1}; {where}. Lower train.lr.")


def _prepare_model(model, args: TrainArgs, acc) -> tuple[object, dict]:
    """Gradient checkpointing, then LoRA adapters (on a 4-bit base with ``lora_quantize``); returns the model to
    train and the float layers a 4-bit base replaced (empty otherwise)."""
    # transformers ≥ 5.2x names it activation checkpointing (the old name warns, and goes in v6); older ones have
    # only the old name
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable",
                                                                                 None)
    if args.gradient_checkpointing and enable is not None:
        enable()
        model.config.use_cache = False
    kept = {}
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        if args.lora_quantize:
            from accord.train.qlora import quantize_base

            dtype = torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float32
            kept = quantize_base(model, args.lora_quantize, dtype, acc.device)
            if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()  # peft leaves this to the caller on a 4-bit base
        cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=args.lora_targets, task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    return model, kept


def _global_count(acc, ns: list[int], distributed: bool) -> list[int]:
    """Counts summed over processes (one all-reduce for all of them)."""
    if not distributed:
        return ns
    return [int(x) for x in acc.reduce(torch.tensor(ns, device=acc.device), "sum").tolist()]


def model_flops(model, args: TrainArgs, device) -> float | None:
    """Model-FLOPs utilisation per input token per second: 6 · parameters (forward and backward, attention's own
    products not counted, as PaLM's MFU) over the device's bf16 peak (:func:`accord.models.peak_flops`); ``None``
    where the peak is unknown (a CPU) or the 6 · N count does not hold (LoRA: no weight gradients for the base)."""
    from accord.models import peak_flops

    peak = peak_flops(device)
    if peak is None or args.lora_r:
        return None
    m = getattr(model, "module", model)
    return 6 * sum(p.numel() for p in m.parameters()) / peak


def start_trackers(args: TrainArgs, out: Path | None, config: dict) -> list:
    """accelerate's experiment trackers named in ``args.report_to`` for this run (TensorBoard writes under
    ``<out>/tracking/<run>``).  Made per run rather than through the process-wide ``Accelerator``, whose
    trackers are fixed when it is created."""
    if not args.report_to:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    name = out.name if out else "accord"
    trackers = []
    for kind in args.report_to:
        cls = LOGGER_TYPE_TO_CLASS.get(kind)
        if cls is None:
            raise ValueError(f"train.report_to: unknown tracker {kind!r} ({', '.join(LOGGER_TYPE_TO_CLASS)})")
        t = cls(name, str((out or Path(".")) / "tracking")) if cls.requires_logging_directory else cls(name)
        t.start()
        t.store_init_configuration(config)
        trackers.append(t)
    return trackers


def _emit(out: Path | None, event: dict, log, args: TrainArgs, trackers: list) -> None:
    if event["step"] % max(1, args.log_every):
        return
    if out:
        with (out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(event) + "\n")
    for t in trackers:
        t.log({k: v for k, v in event.items() if isinstance(v, (int, float)) and k != "step"}, step=event["step"])
    if log:
        log(event)


# --------------------------------------------------------------------------- checkpoints


def latest_checkpoint(out: Path | None) -> Path | None:
    """The newest *complete* step checkpoint (``trainer_state.json`` is written last)."""
    if out is None or not out.exists():
        return None
    done = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(acc, models: dict, toks: dict, opt, out: Path, step: int, history: list[float],
                    args: TrainArgs, write: bool = True, barrier: bool = True) -> Path:
    """An HF checkpoint (safetensors weights or LoRA adapter + tokenizer) plus optimizer/RNG state; several
    models each get their own ``<name>/`` directory (a head without ``save_pretrained``: its safetensors)."""
    ckpt = out / f"checkpoint-{step}"
    whole = None  # FSDP, DeepSpeed: every process gathers (train/sharded.py); process 0 writes what it gathered
    engine = models[""] if is_deepspeed(models.get("")) else None
    if any(sharded(m) for m in models.values()) or engine is not None:
        from accord.train.sharded import full_state, optimizer_state

        whole = {n: full_state(m, tied=False, frozen=not hasattr(m, "peft_config")) for n, m in models.items()}
        opt_state = {} if engine is not None else {"optimizer_by_name": optimizer_state(models[""], opt)}
    if engine is not None:  # DeepSpeed's partitioned optimizer state, its own format, every process its part
        from accord.train.sharded import DEEPSPEED_STATE, save_deepspeed

        parts = out / f".checkpoint-{step}.{DEEPSPEED_STATE}"
        if write:
            shutil.rmtree(parts, ignore_errors=True)
        acc.wait_for_everyone()
        save_deepspeed(engine, parts)
        acc.wait_for_everyone()
    if write:
        tmp = out / f".checkpoint-{step}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        for name, m in models.items():
            _save_module(acc.unwrap_model(m), toks.get(name), tmp / name, whole[name] if whole else None)
        torch.save({**(opt_state if whole else {"optimizer": opt.state_dict()}), "torch_rng": torch.get_rng_state()},
                   tmp / "optimizer.pt")
        if engine is not None:
            parts.rename(tmp / DEEPSPEED_STATE)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "history": history}))
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
        _prune(out, args.keep_checkpoints)
    if barrier:
        acc.wait_for_everyone()
    return ckpt


def _save_module(m, tok, path: Path, state: dict | None = None) -> None:
    """``m``'s weights (``state``: its gathered state dict, under FSDP) and tokenizer in ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    if hasattr(m, "save_pretrained"):
        with no_hf_bars():
            m.save_pretrained(path, safe_serialization=True, state_dict=state)
    else:
        from safetensors.torch import save_model

        save_model(m, str(path / "model.safetensors"))
    if tok is not None:
        tok.save_pretrained(path)


def _prune(out: Path, keep: int | None) -> None:
    if not keep:
        return
    done = sorted((p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists()),
                  key=lambda p: int(p.name.split("-")[1]))
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _resume(out: Path, models: dict, opt, shards: bool = False, ds: bool = False) -> tuple[int, list[float], object]:
    """(step, loss history, optimizer state still to set) from the newest checkpoint, the weights loaded.  The
    optimizer's state is keyed by parameter index, loaded here, or (written under FSDP) keyed by name, which is
    set once the model is placed; a run that will shard its model gets the name-keyed form either way
    (:mod:`accord.train.sharded`).  Under DeepSpeed (``ds``) it is the folder of DeepSpeed's own, loaded once the
    engine exists; a checkpoint written with DeepSpeed resumes only under it, and one written without it only
    without it."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        return 0, [], None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for name, m in models.items():
        _load_module(m, ckpt / name)
    extra = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
    later = extra.get("optimizer_by_name")
    from accord.train.sharded import DEEPSPEED_STATE

    if ds or (ckpt / DEEPSPEED_STATE).exists():
        if ds != (ckpt / DEEPSPEED_STATE).exists():
            raise UsageError(f"{ckpt}: its optimizer state was written {'without' if ds else 'under'} DeepSpeed, "
                             f"and this run trains {'under' if ds else 'without'} it; resume it as it was launched, "
                             f"or move {ckpt.name} aside to start again (its weights are ordinary HF files)")
        later = ckpt / DEEPSPEED_STATE
    elif later is None:
        opt.load_state_dict(extra["optimizer"])
        if shards:  # into the name-keyed form while the parameters are still the model's own
            from accord.train.sharded import optimizer_state

            later = optimizer_state(models[""], opt)
            opt.state.clear()  # FSDP swaps the parameters: state keyed by the old ones would only hold memory
    torch.set_rng_state(extra["torch_rng"])
    _truncate_metrics(out / "metrics.jsonl", state["step"])
    return state["step"], list(state["history"]), later


def _load_module(m, path: Path) -> None:
    from safetensors.torch import load_file

    if (path / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(m, load_file(path / "adapter_model.safetensors"))
    elif _is_lm(m):
        from accord.train.merge import load_state

        m.load_state_dict(load_state(path), strict=False)  # single-file or sharded safetensors
    else:
        from safetensors.torch import load_model

        load_model(m, str(path / "model.safetensors"))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint (they are written again by the resumed run)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    path.write_text("".join(x + "\n" for x in keep))


def train_sft(model, tok, rows: list[dict], args: TrainArgs, on_step: Callable[[int, float], None] | None = None):
    """Train ``model`` in place (full fine-tuning, no checkpoints); returns the loss history (the lab uses it)."""
    return train(model, tok, rows, args, on_step=on_step).history
