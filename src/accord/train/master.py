"""Float32 master weights for bf16 training (``train.master_weights``): bf16 weights in the forward and backward,
float32 ones in the optimizer.

Why: under bf16 autocast with float32 weights (the engine's default on a GPU) only the matrix products run in
bf16.  The embedding's float32 output makes the residual stream float32, so every norm, rotary, residual add and
autocast cast moves float32 tensors, and autograd keeps float32 copies for the backward.  Profiled on an H200
(session 18, Qwen3-0.6B's shape) that elementwise work took two thirds of the GPU time, and activations most of
the 52 GiB peak.  The standard remedy is mixed-precision training with master weights (Micikevicius et al., 2018;
Megatron-LM's float32 "main" parameters, DeepSpeed's bf16 optimizer): the model's weights are bf16, so every
activation is bf16, and the optimizer updates float32 copies, from which the bf16 weights are rounded after
every step — an update of lr·1e-5 that bf16 would round away still moves the float32 weight.  No library does
this for a plain ``nn.Module`` trained outside FSDP/DeepSpeed, hence by hand.

Choices:

- **The float32 tensors the model came with are the masters.**  Each float32 parameter's ``data`` is swapped to
  a bf16 copy for the forward and backward and back to its float32 master for the optimizer step, gradient
  clipping and checkpoints (:meth:`MasterWeights.full`), and for good when the run ends
  (:meth:`MasterWeights.close`).  So the optimizer and its state are the ones a run without master weights
  has (float32, keyed by the same parameters), a resume loads them as it does now, checkpoints hold float32
  weights, and the returned model is the float32 model it was, with no copy.
- **Gradients** leave the backward in bf16 (each product accumulates in float32 inside its kernel; the chunked
  head accumulates its weight gradient in float32 over chunks); with ``grad_accum`` > 1 they are summed over the
  micro-batches in bf16, as DDP's all-reduce of bf16 gradients sums over processes.  The optimizer and the clip
  see them as float32: views of one buffer filled by one multi-tensor copy (``torch._foreach_copy_``, which
  PyTorch batches into a few kernels on CUDA where a list's dtype pair is uniform), as the bf16 weights are
  rounded back from the masters after the step — a cast and a copy per parameter launched about 600 kernels a
  step at Qwen3-0.6B's 310 tensors.
- **Frozen float32 parameters** (a LoRA run's base) run in bf16 as well; their float32 originals wait on the CPU
  (on a GPU: bf16 in device memory instead of float32, less than without master weights) and come back at the
  end, so adapters merge into the float32 base as before.
- Parameters that are not float32 (a 4-bit QLoRA base, a student loaded in bf16) are left as they are.
- Only with bf16 mixed precision (``train.bf16``): autocast keeps softmax, norms' statistics and the loss in
  float32 on bf16 inputs.  Not with FSDP or DeepSpeed, which hold their own master copies.
"""

from __future__ import annotations

import contextlib

import torch


class MasterWeights:
    """The float32 parameters of ``models`` as bf16 copies until :meth:`close`; ``on=False``: nothing changes
    and every method is a no-op."""

    def __init__(self, models: list[torch.nn.Module], on: bool, dtype: torch.dtype = torch.bfloat16):
        # (parameter, its float32 master, its low-precision copy, trainable)
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor, bool]] = []
        seen: set[int] = set()
        for m in models if on else []:
            for p in m.parameters():
                if p.dtype != torch.float32 or id(p) in seen:
                    continue
                seen.add(id(p))
                master = p.data if p.requires_grad else p.data.to("cpu")  # frozen: the original waits on the CPU
                self.pairs.append((p, master, p.data.to(dtype), p.requires_grad))
        for p, _, low, _ in self.pairs:
            p.data = low

    def __len__(self) -> int:  # also its truth: any parameter mastered
        return len(self.pairs)

    @contextlib.contextmanager
    def full(self):
        """Inside the block the trainable parameters are their float32 masters, with float32 gradients (the
        optimizer step, the clip, a checkpoint); after it, bf16 copies of the masters again, gradients dropped."""
        live = [(p, master, low) for p, master, low, trainable in self.pairs if trainable]
        held: dict[torch.device, list] = {}  # the bf16 gradients by device
        for p, master, _ in live:
            g, p.grad = p.grad, None
            p.data = master
            if g is not None:
                held.setdefault(g.device, []).append((p, g))
        for dev, pg in held.items():  # float32 copies: one buffer and one multi-tensor copy, not a cast per parameter
            flat = torch.empty(sum(g.numel() for _, g in pg), dtype=torch.float32, device=dev)
            views = [v.view(g.shape) for v, (_, g) in zip(flat.split([g.numel() for _, g in pg]), pg)]
            torch._foreach_copy_(views, [g for _, g in pg])
            for (p, _), v in zip(pg, views):
                p.grad = v
        try:
            yield
        finally:
            if live:  # one multi-tensor copy rather than a copy per parameter (see Gradients above)
                torch._foreach_copy_([low for _, _, low in live], [master for _, master, _ in live])
            for p, _, low in live:
                p.grad = None
                p.data = low

    def close(self) -> None:
        """Every parameter its float32 master again, for good (where it lives now); idempotent."""
        for p, master, low, _ in self.pairs:
            p.grad = None
            p.data = master.to(low.device)
        self.pairs = []
