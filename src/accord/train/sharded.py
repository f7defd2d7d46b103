"""Weights sharded across processes: what the engine does differently under FSDP (``accelerate launch`` with an
FSDP config, version 1 or 2).

Under FSDP each process holds a shard of every weight outside the model's forward and backward; the whole weight
exists only inside them.  Three things in the engine read weights outside a forward, and each would be wrong or
would hang (the first checkpoint hung: process 0 gathered the weights in ``save_pretrained`` while the others
waited at the barrier):

- **Checkpoints and the trained model.**  Every process takes part in gathering the full state dict
  (``torch.distributed.checkpoint.state_dict``, which serves FSDP 1 and 2 alike), offloaded to the CPU on
  process 0 only, which writes it (``save_pretrained(state_dict=…)``) and gets back a plain model of the same
  class built from it (on the meta device first, so no second random initialisation is paid).  The other
  processes get ``None`` for the model: under ``accelerate launch`` only process 0 saves.
- **The optimizer's state** is saved as the full state keyed by parameter name (the same module's
  ``get_optimizer_state_dict``), so a killed run resumes under any number of processes, with or without FSDP;
  it is set after FSDP has sharded the model (process 0 reads the file and broadcasts).  A checkpoint written
  without FSDP (keyed by parameter index) is converted to that form before sharding, where the parameters are
  still the model's own.
- **COMPACT's consensus score** recomputes the last decoder layer's q and k from its captured input after the
  forward: the layer's weights are gathered for it (:func:`whole`; each decoder layer must be its own FSDP unit,
  accelerate's ``TRANSFORMER_BASED_WRAP``, else a clear error).
- **MoT's branches** run one after another, each sharded over every process (without FSDP they run in parallel,
  one per process, each holding the whole model — which a student that needs FSDP cannot); every branch is a plain
  model built from the round's base (:func:`plain_model`), process 0 merges what it gets back, and every process
  loads the merged student from disk.
- **The chunked head** (``train.chunked_loss``) multiplies the final hidden states by the head's weight outside
  the forward, so under FSDP it is off and the loss is the model's own, over full-vocabulary logits (the first
  line says so).

- **LoRA** (``train.lora.r`` > 0): peft adds the adapters before FSDP shards the model, so the frozen base is
  sharded with them (what a student too large for one device needs; FSDP 2 keeps frozen and trainable weights in
  one unit, FSDP 1 only with ``use_orig_params``).  A checkpoint gathers the trainable weights alone (the
  adapters: ``ignore_frozen_params``), never the base; the trained model is gathered whole, built on process 0 as
  a plain peft model of the same adapters (:func:`plain_model`) and merged there as without FSDP.

Refused, with the reason: several models in one run (QR-Distill's students; their optimizer spans models), QLoRA
(``train.lora.quantize``: bitsandbytes keeps a 4-bit weight's quantisation state beside its packed bytes, which
shards would split), LoRA under FSDP 1 without ``use_orig_params``, and DeepSpeed, every ZeRO stage (it
partitions the optimizer's state, and at stage 3 the weights, through its own API, which this project cannot test:
a checkpoint would keep process 0's part only).  ``train.master_weights`` is refused
where it is decided (:func:`accord.train.engine.master_weights`): FSDP keeps float32 copies itself.

Tested on the CPU (``tests/test_fsdp.py``): torch's ``fully_shard`` runs over gloo there, but accelerate lets
FSDP run on GPUs only, so the test sets accelerate's state to FSDP by hand on two CPU processes.
"""

from __future__ import annotations

import contextlib

import torch

from accord.errors import UsageError


def sharded(model) -> bool:
    """Whether ``model``'s weights are split across processes: FSDP 1's wrapper, FSDP 2's ``DTensor`` weights,
    DeepSpeed ZeRO-3's partitioned ones."""
    if type(model).__name__ == "FullyShardedDataParallel":
        return True
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def fsdp_launch() -> bool:
    """Whether this process was launched with FSDP (``accelerate launch`` sets ``ACCELERATE_USE_FSDP``, and
    accelerate decides by it): what a recipe asks before the engine has sharded anything."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def will_shard(acc, shard: bool) -> bool:
    """Whether ``accelerate.prepare`` will split a model's weights or its optimizer's state across the processes
    in this run: FSDP, DeepSpeed (``shard``: the run's models go through ``prepare``; MoT's branches do not)."""
    kind = str(getattr(acc, "distributed_type", ""))
    return shard and ("FSDP" in kind or "DEEPSPEED" in kind)


def check(acc, *, several: bool, quantized: bool = False, lora: bool = False) -> None:
    """The settings sharded weights do not serve: a clear error instead of a hang or a wrong checkpoint."""
    kind = str(acc.distributed_type)
    if "DEEPSPEED" in kind:
        raise UsageError("DeepSpeed partitions the optimizer's state (ZeRO stages 1–2) and the weights (stage 3) "
                         "its own way, and accord's checkpoints gather them through torch's functions only: a "
                         "resumed run would lose them. Use FSDP (accelerate launch --use_fsdp) or data-parallel "
                         "training")
    if several:
        raise UsageError(f"several models in one run (QR-Distill's students) under {kind}: their optimizer spans "
                         "the models, which accord does not gather; run it data-parallel (DDP)")
    if quantized:
        raise UsageError(f"train.lora.quantize under {kind}: bitsandbytes packs a 4-bit weight with its "
                         "quantisation state, which FSDP's shards would split; set train.lora.quantize: null "
                         "(LoRA on a bf16 base sharded by FSDP), or run QLoRA data-parallel (DDP)")
    plugin = getattr(getattr(acc, "state", None), "fsdp_plugin", None)
    if lora and plugin is not None and getattr(plugin, "fsdp_version", 2) == 1 and not plugin.use_orig_params:
        raise UsageError("train.lora under FSDP 1 without use_orig_params: FSDP 1 flattens each unit's weights "
                         "into one tensor, which cannot mix the frozen base with trainable adapters; set "
                         "fsdp_use_orig_params: true in the accelerate config, or use FSDP 2 (--fsdp_version 2)")


@contextlib.contextmanager
def whole(module):
    """``module``'s weights whole for a computation outside its forward (COMPACT's consensus score recomputes the
    last layer's q and k): FSDP 1's ``summon_full_params``, FSDP 2's ``unshard``/``reshard`` — collective, so every
    process computes it; a no-op for a module whose weights are not sharded."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    if isinstance(module, FSDP1):
        with FSDP1.summon_full_params(module, writeback=False):
            yield
        return
    if not sharded(module):
        yield
        return
    if not isinstance(module, FSDPModule):
        raise UsageError(f"{type(module).__name__}'s weights are sharded with a larger unit, so they cannot be "
                         "gathered alone outside the forward: wrap each decoder layer (accelerate's "
                         "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP)")
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def full_state(model, tied: bool = True, frozen: bool = True) -> dict:
    """The model's full state dict on the CPU of process 0 (empty elsewhere); every process must call it.  Not
    ``tied``: without the names that alias an earlier parameter (a tied head), as ``save_pretrained`` writes a
    model whose tied weights are one tensor — gathered, they are two copies.  Not ``frozen``: the trainable
    parameters only (a LoRA checkpoint gathers its adapters, not the base)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=not frozen))
    if not tied:
        seen = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                state.pop(_clean(name), None)
            seen.add(id(p))
    return state


def _clean(name: str) -> str:
    """A parameter or buffer name without FSDP 1's (and activation checkpointing's) wrapper levels."""
    for w in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(w, "")
    return name


def optimizer_state(model, opt) -> dict:
    """The optimizer's full state keyed by parameter name, on the CPU of process 0 (empty elsewhere); every
    process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _inner(opt), options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))


def set_optimizer_state(model, opt, state: dict) -> None:
    """Load :func:`optimizer_state`'s form into ``opt``, sharded or not; under several processes, process 0's
    ``state`` is broadcast (the others may pass an empty one)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    set_optimizer_state_dict(model, _inner(opt), state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=several))


def _inner(opt):
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one


def gathered(model, is_main: bool):
    """A plain model (the class before FSDP, its config, the trained weights) on process 0's CPU, else None;
    every process must call it."""
    state = full_state(model)
    if not is_main:
        return None
    return plain_model(getattr(model, "module", model), state)  # FSDP 1's wrapper; FSDP 2 changes the class


def plain_model(like, state: dict):
    """A plain model of ``like``'s class (before FSDP) and config holding ``state`` (its tensors, not copies),
    built on the meta device so that no random initialisation is paid; the buffers a state dict leaves out come
    from ``like``.  MoT under FSDP builds each branch so, from the round's base (FSDP shards a model in place).
    A LoRA model (peft's) comes back as one: its base's class with the same adapters, for the engine to merge."""
    with torch.device("meta"):
        plain = _empty_like(like)
    plain.load_state_dict(state, assign=True)
    _buffers_from(plain, like)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    if getattr(like, "generation_config", None) is not None:
        plain.generation_config = like.generation_config
    return plain


def _empty_like(like):
    """An untrained model of ``like``'s architecture (on the current default device): its class before FSDP and
    its config; for a peft model, its base so and the same adapters added."""
    import copy

    from peft import PeftModel, get_peft_model

    if not isinstance(like, PeftModel):
        return _original_class(like)(like.config)
    name = like.active_adapter
    return get_peft_model(_empty_like(like.get_base_model()), copy.deepcopy(like.peft_config[name]), adapter_name=name)


def _buffers_from(plain, inner) -> None:
    """The buffers a state dict leaves out (non-persistent ones: rotary frequencies), still on the meta device,
    copied from the sharded model, where FSDP keeps every buffer whole (FSDP 1 names them inside its wrappers)."""
    have = {_clean(name): b for name, b in inner.named_buffers()}
    for name, b in list(plain.named_buffers()):
        if b.is_meta:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, have[name].detach().cpu().clone(), persistent=False)


def _original_class(m) -> type:
    """``m``'s class before FSDP 2 made it a subclass of ``FSDPModule`` (FSDP 1 keeps the class)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(m).__mro__ if not issubclass(c, FSDPModule))
