"""The hf backend's decoding loop: left-padded batches, temperature → top-p sampling or greedy, a KV cache.

Written by hand because ``transformers``' ``generate`` pays about 1.3 ms of set-up on every call (a deep copy of
the generation config, keyword validation by signature inspection, processor and criterion lists) and ~0.25 ms
of bookkeeping per token — as much as a small model's whole decoding step.  CoRD calls a teacher once per step
and per teacher, hundreds of times per problem set, and evaluation and collection call it per batch; on the lab
a call is 20–30% faster (``bench/eval.py`` compares accord's evaluation with a plain ``generate`` loop).

It does exactly what ``generate`` does for the settings accord uses, and is tested token for token against it
(greedy and seeded sampling, stop strings, left padding, a deferred running check; with a prefix cache, the
same text as without): the last position's logits in float32, divided by the temperature, top-p as
``TopPLogitsWarper`` computes it (ascending sort, cumulative probability ≤ 1 − p removed, the top token always
kept), softmax, one ``torch.multinomial`` draw from the default generator (argmax when greedy); a finished row
is fed the pad token; a row finishes at an end id or a stop string.  A model whose generation config asks for
more (a repetition penalty, a minimum length, banned words…) keeps ``generate``: ``supports`` says which (the hf
backend checks it once per model).
"""

from __future__ import annotations

import inspect

import torch

# generation-config fields the loop honours or the caller always sets; any other non-default one sends a model
# to ``generate`` so that nothing its authors configured is silently dropped
_HANDLED = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "do_sample", "temperature",
            "top_p", "top_k", "max_length", "max_new_tokens", "use_cache", "transformers_version",
            "_from_model_config"}


def supports(model, cache_kw: str) -> bool:
    """Whether ``decode`` reproduces ``generate`` for this model: a decoder-only model whose forward takes the
    cache by ``cache_kw`` and ``logits_to_keep``, and whose generation config turns on nothing beyond ``_HANDLED``."""
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    params = inspect.signature(model.forward).parameters
    if cache_kw not in params or "logits_to_keep" not in params:
        return False
    gc = getattr(model, "generation_config", None)
    return gc is None or not any(_on(v) for k, v in gc.to_diff_dict().items() if k not in _HANDLED)


def _on(value) -> bool:
    """Whether a generation-config value turns something on: None, False, empty and the neutral numbers 0 and 1
    (a penalty of 1.0, a minimum length of 0, one beam) do not; True does."""
    if value is None or value is False or value == [] or value == {}:
        return False
    return value is True or not (isinstance(value, (int, float)) and value in (0, 1))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the smallest set of top tokens whose probability exceeds ``top_p`` set to −inf (the top
    token always kept); ``top_p`` ≥ 1 keeps all."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float, top_p: float, end_ids: set[int], pad_id: int, stop=None, cache=None,
           cached: int = 0, cache_kw: str = "cache", check_every: int | None = None):
    """``(new_ids [B, n], cache)``: up to ``max_new_tokens`` tokens per row after the left-padded batch.

    ``cache`` may hold the states of the first ``cached`` columns (a prefix cache); the returned cache holds every
    column the model was fed (the prompt and all generated tokens but the last).  ``stop`` is a stopping criterion
    called as ``stop(ids, None)`` → a bool per row (transformers' ``StopStringCriteria``).

    Whether any row is still running is read back every ``check_every`` tokens (default: every token on a CPU,
    every 8 on an accelerator, where reading it waits for the device and leaves it idle while the next step is
    launched — ``generate`` defers the check there too); the steps decoded past the end are cut off again, and
    the cache cropped, so the result is the same either way."""
    from transformers import DynamicCache

    every = check_every or (1 if input_ids.device.type == "cpu" else 8)
    if cache is None:
        cache, cached = DynamicCache(config=model.config), 0
    b, width = input_ids.shape
    pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    ends = torch.tensor(sorted(i for i in end_ids if i is not None), device=input_ids.device)
    live = torch.ones(b, dtype=torch.bool, device=input_ids.device)
    out = model(input_ids=input_ids[:, cached:], attention_mask=attention_mask, position_ids=pos[:, cached:],
                use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    seq, last, mask, running = input_ids, pos[:, -1:], attention_mask, []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].to(device=input_ids.device, dtype=torch.float32)  # a split model's head
        if temperature > 0:
            probs = top_p_filter(logits / temperature, top_p).softmax(-1)
            nxt = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(live, nxt, torch.full_like(nxt, pad_id))
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        live &= ~torch.isin(nxt, ends)
        if stop is not None:
            live &= ~stop(seq, None)
        running.append(live.any())  # stays on the device until read
        if step == max_new_tokens - 1 or ((step + 1) % every == 0 and not bool(running[-1])):
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, use_cache=True,
                    logits_to_keep=1, **{cache_kw: cache})
    flags = torch.stack(running).tolist() if running else []
    n = next((i + 1 for i, r in enumerate(flags) if not r), len(flags))  # the step after which no row ran
    if n < len(flags) and hasattr(cache, "crop"):
        cache.crop(n - len(flags))  # drop the states of the tokens fed past the end (a negative count: 4.x and 5.x)
    return seq[:, width:width + n], cache
