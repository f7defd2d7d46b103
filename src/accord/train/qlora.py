"""QLoRA (Dettmers et al., 2023) for the engine: ``train.lora.quantize: nf4``.

While the LoRA adapters train, the frozen base's linear layers are held in 4-bit NF4 with double
quantisation (bitsandbytes ``Linear4bit``), so a 7B student's base takes ≈ 3.5 GB of accelerator memory
(plus quantisation statistics) instead of 28 GB in float32.  Choices:

- The quantisation is made here, from the model in memory, not by transformers' loader (which quantizes
  only while reading from disk): MoT's branches start from a merged student that exists only in memory,
  and every recipe hands the engine a float model.  Every ``nn.Linear`` but the output head is replaced
  (transformers' bitsandbytes loader keeps the head in float too); embeddings and norms stay float.
- The float weights that were replaced stay on the CPU meanwhile (host memory, never the accelerator's).
- The trained model is the float base plus each adapter's delta B·A·α/r, merged in float32 and returned on
  the CPU — the usual way a QLoRA adapter is merged (reload the base in full precision, merge), never
  peft's ``merge_and_unload`` on 4-bit layers, which dequantizes, adds the delta and quantizes again.
  Evaluation and every later stage see an ordinary checkpoint.
- Compute dtype: bf16 under bf16 autocast, else float32.  Step checkpoints hold the adapter (as any LoRA
  run); a resumed run quantizes the same float base again, so it continues exactly.
- FSDP/DeepSpeed sharding of 4-bit weights is not attempted (``accelerate launch`` with DDP works).
"""

from __future__ import annotations

import torch

from accord.errors import UsageError


def bitsandbytes():
    """bitsandbytes, or an error that says how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UsageError("train.lora.quantize needs bitsandbytes: pip install 'accord[qlora]' "
                          "(or set train.lora.quantize: null)") from None
    return bnb


def _linears(model):
    """(parent module, attribute, qualified name, module) of every child linear layer."""
    for name, mod in list(model.named_modules()):
        for attr, child in list(mod.named_children()):
            yield mod, attr, f"{name}.{attr}" if name else attr, child


def quantize_base(model, kind: str, compute_dtype: torch.dtype, device) -> dict[str, torch.nn.Linear]:
    """Replace every ``nn.Linear`` of ``model`` but its output head by a 4-bit ``kind`` layer on ``device``; returns
    the replaced float layers by qualified name (on the CPU), for :func:`merge_into_base`."""
    bnb = bitsandbytes()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kept = {}
    for parent, attr, name, child in _linears(model):
        if type(child) is not torch.nn.Linear or child is head:
            continue
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type=kind, device="meta")
        q.weight = bnb.nn.Params4bit(child.weight.data.detach().cpu(), requires_grad=False, quant_type=kind,
                                     compress_statistics=True, module=q).to(device)
        # bitsandbytes repacks a layer's weight for a CPU inference kernel the first time it runs in eval mode without
        # grad (COMPACT's scores do), which fails below 64 input features and leaves a format made for inference
        q.support_avx512bf16_for_cpu = False
        if child.bias is not None:
            q.bias = torch.nn.Parameter(child.bias.data.detach().to(device), requires_grad=False)
        setattr(parent, attr, q)
        kept[name] = child.cpu()
    model.is_loaded_in_4bit = True  # how peft recognises a 4-bit base (it then wraps Linear4bit layers)
    return kept


@torch.no_grad()
def merge_into_base(peft_model, kept: dict[str, torch.nn.Linear]):
    """The trained model in float on the CPU: each quantized layer's float original plus its LoRA delta."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for mod in peft_model.modules():
        names = [a for a in mod.active_adapters if a in mod.lora_A] if isinstance(mod, LoraLayer) else []
        if names:
            deltas[id(mod.get_base_layer())] = sum(mod.get_delta_weight(a).float() for a in names)
    base = peft_model.unload()  # the LoRA layers replaced by their (4-bit) base layers
    for parent, attr, name, child in _linears(base):
        if name in kept:
            lin = kept[name]
            if id(child) in deltas:
                lin.weight += deltas[id(child)].to(lin.weight.device, lin.weight.dtype)
            setattr(parent, attr, lin)
    base.is_loaded_in_4bit = False
    return base.cpu()
