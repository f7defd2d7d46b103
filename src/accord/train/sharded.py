"""Weights sharded across processes: what the engine does differently under FSDP (``accelerate launch`` with an
FSDP config, version 1 or 2) and DeepSpeed ZeRO (``accelerate launch --use_deepspeed``, stages 1–3; the last
section below).

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
shards would split), LoRA under FSDP 1 without ``use_orig_params``.  ``train.master_weights`` is refused where it
is decided (:func:`accord.train.engine.master_weights`): FSDP and DeepSpeed keep float32 copies themselves.

**DeepSpeed ZeRO.**  Stages 1–2 partition the optimizer's state (and the gradients), stage 3 the weights too, each
through DeepSpeed's own engine, which ``accelerate.prepare`` returns in place of the model.  The choices made:

- **accord's loop, DeepSpeed's step.**  The engine keeps its batches, loss normalisation and schedule; it tells
  DeepSpeed the micro-batch and no accumulation of its own (:func:`deepspeed_settings`), marks every micro-batch but
  a step's last as accumulating (:func:`accumulating`, DeepSpeed's ``no_sync``), and calls the engine's
  ``backward`` and ``step`` (which clips at ``train.clip``).  The optimizer is accord's AdamW, its state
  partitioned by ZeRO; a DeepSpeed config with its own ``optimizer`` or ``scheduler`` is refused.
- **Every model is loaded whole.**  accelerate tells transformers of ZeRO-3, which then builds every model
  partitioned at load (``zero.Init``) and generates in step across processes: teachers and evaluated checkpoints
  too, whose work accord deals out unevenly, which would hang (:func:`whole_loads` drops that).  The student is
  partitioned when training starts, so, as under FSDP, it must fit one device whole before its optimizer state.
  (Partitioned, a weight is an empty 1-d tensor: the optimizer's decay group reads its shape from ``ds_shape``.)
- **Checkpoints.**  The weights are gathered into ordinary HF files (ZeRO-3 layer by layer; each trained weight
  as its float32 master); the optimizer's state stays in DeepSpeed's own checkpoint format, each process its part,
  in the checkpoint's ``deepspeed/`` folder (:func:`save_deepspeed`).  Gathering it into torch's form would go
  through DeepSpeed's internals (its own per-parameter getter fails with two parameter groups, as accord's AdamW
  has: the state is linked after the first group's step only), so a DeepSpeed checkpoint resumes under DeepSpeed
  on as many processes, and a run resumed across that line is refused with the reason.
- **The rest as under FSDP:** COMPACT's consensus score gathers the last layer (ZeRO-3; :func:`whole`), the chunked
  head is off at stage 3 only (stages 1–2 keep whole weights), MoT's branches run one after another over every
  process, LoRA's adapters are what a checkpoint gathers, and the trained model comes back whole on process 0.

Tested on the CPU (``tests/test_fsdp.py``, ``tests/test_deepspeed.py``): torch's ``fully_shard`` and DeepSpeed's
ZeRO (its CPU accelerator) run over gloo there, but accelerate lets FSDP and DeepSpeed run on GPUs only, so the
tests set accelerate's state by hand on two CPU processes, from the variables accelerate's launcher reads out of
``configs/accelerate/fsdp2.yaml`` and ``deepspeed-zero{2,3}.yaml`` (the launch files users are handed).
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
    return shard and ("FSDP" in str(getattr(acc, "distributed_type", "")) or deepspeed_launch(acc))


def check(acc, *, several: bool, quantized: bool = False, lora: bool = False) -> None:
    """The settings sharded weights do not serve: a clear error instead of a hang or a wrong checkpoint."""
    kind = str(acc.distributed_type)
    if several:
        raise UsageError(f"several models in one run (QR-Distill's students) under {kind}: their optimizer spans "
                         "the models, which accord does not gather; run it data-parallel (DDP)")
    if quantized:
        raise UsageError(f"train.lora.quantize under {kind}: bitsandbytes packs a 4-bit weight with its "
                         "quantisation state, which sharding would split; set train.lora.quantize: null "
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
    if any(hasattr(p, "ds_id") for p in module.parameters()):  # DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
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
    if is_deepspeed(model):
        state, model = _deepspeed_state(model, frozen), model.module  # the names without the engine's "module."
    else:
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


# --------------------------------------------------------------------------- DeepSpeed


def deepspeed_launch(acc) -> bool:
    """Whether this run trains under DeepSpeed (``accelerate launch --use_deepspeed``, any ZeRO stage)."""
    return "DEEPSPEED" in str(getattr(acc, "distributed_type", ""))


def shard_kind(acc) -> str:
    """What shards this run's model, in words for its first line: ``FSDP 2``, ``DeepSpeed ZeRO-3``."""
    if deepspeed_launch(acc):
        return f"DeepSpeed ZeRO-{acc.state.deepspeed_plugin.zero_stage}"
    plugin = getattr(getattr(acc, "state", None), "fsdp_plugin", None)
    return f"FSDP {getattr(plugin, 'fsdp_version', 1)}" if plugin is not None else "FSDP"


def whole_loads() -> None:
    """Under DeepSpeed ZeRO-3 every model this process loads is loaded whole; DeepSpeed partitions the student when
    training starts.  accelerate tells transformers of ZeRO-3 (a process-wide weak reference), and transformers then
    builds every model partitioned (``zero.Init``) and generates in step across the processes (``synced_gpus``):
    teachers, evaluated checkpoints and MoT's merges too, whose work accord deals out unevenly among the processes,
    which would hang.  This drops that reference (accelerate keeps the config it reads in ``prepare`` itself)."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def is_deepspeed(model) -> bool:
    """Whether ``model`` is DeepSpeed's engine (what ``accelerate.prepare`` returns under DeepSpeed)."""
    return type(model).__name__ == "DeepSpeedEngine"


def deepspeed_settings(acc, micro: int, world: int, clip: float | None) -> None:
    """What accord fixes in the DeepSpeed config before ``prepare``, whatever the config file says: one micro-batch
    of ``micro`` rows per process (accord builds its own batches, so accelerate cannot fill ``auto`` from a data
    loader), no accumulation of DeepSpeed's own (the engine accumulates its micro-batches and marks the step's last
    one, :func:`accumulating`), the run's ``train.clip`` (DeepSpeed clips inside its step), and ZeRO-3's weights
    gathered for a checkpoint.  The optimizer and its schedule are accord's (AdamW, decay on matrices only, the
    methods' own schedules; ZeRO partitions its state): a config that names its own is refused."""
    cfg = acc.state.deepspeed_plugin.deepspeed_config
    if own := [k for k in ("optimizer", "scheduler") if k in cfg]:
        raise UsageError(f"the DeepSpeed config sets {' and '.join(own)}, but accord's training sets its own "
                         "(AdamW from train.lr, train.weight_decay and train.betas; each method's schedule): remove "
                         f"the {' and '.join(repr(k) for k in own)} block from the DeepSpeed config file")
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1, train_batch_size=micro * world,
               gradient_clipping=float(clip or 0.0), zero_allow_untested_optimizer=True)
    cfg.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


@contextlib.contextmanager
def accumulating(engine):
    """A micro-batch that is not the step's last: DeepSpeed keeps its gradients for the next one instead of
    reducing them across processes (DDP's ``no_sync``); ``engine.step()`` then steps once per optimizer step."""
    engine.set_gradient_accumulation_boundary(False)
    try:
        yield
    finally:
        engine.set_gradient_accumulation_boundary(True)


def _deepspeed_state(engine, frozen: bool) -> dict:
    """:func:`full_state` under DeepSpeed, on process 0: the module's weights (ZeRO-3's gathered layer by layer, as
    accelerate's ``get_state_dict`` does), the trained ones replaced by their float32 masters (under bf16
    DeepSpeed trains bf16 weights); not ``frozen``: the trained ones alone.  Collective."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    main = not dist.is_initialized() or dist.get_rank() == 0
    state = {}
    if frozen:
        zero3 = engine.zero_optimization_partition_weights()
        whole = engine._zero3_consolidated_16bit_state_dict() if zero3 else engine.module.state_dict()
        state = {k: v.detach().cpu() for k, v in whole.items()} if main else {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)  # every process: the pieces are gathered
            if main:
                state[name] = full.detach().cpu()
    return state


DEEPSPEED_STATE = "deepspeed"  # a checkpoint's folder for DeepSpeed's own optimizer state


def save_deepspeed(engine, path) -> None:
    """The optimizer's state as DeepSpeed partitions it, in DeepSpeed's own checkpoint format (each process writes
    its part; frozen weights left out).  Collective.  Gathering ZeRO's partitions into torch's form would go through
    DeepSpeed's internals, so a run resumes from it under DeepSpeed on as many processes (:func:`load_deepspeed`);
    the weights beside it are the checkpoint's ordinary HF files."""
    engine.save_checkpoint(str(path), tag="state", save_latest=False, exclude_frozen_parameters=True)


def load_deepspeed(engine, path) -> None:
    """What :func:`save_deepspeed` wrote, back into ``engine`` (weights, and the optimizer's partitions)."""
    engine.load_checkpoint(str(path), tag="state", load_module_strict=False, load_optimizer_states=True,
                           load_lr_scheduler_states=False)
