"""Local ``transformers`` generator (teacher, judge, student under evaluation): batched sampling with left padding.

Choices where nothing prescribes one:
- requests are sorted by prompt length and cut into batches of ``batch_size`` so
  padding stays small; results are returned in request order;
- sampling is seeded per batch from the requests' seeds (``transformers`` has no
  per-row generator), so a batch of the same requests reproduces exactly;
- token log-probs (for step-level confidence and for ``score``) come from one extra
  forward pass over prompt ⊕ completion, read from the *untempered* model
  distribution, with ``logits_to_keep`` so only completion positions are projected;
- weights load from safetensors only; ``trust_remote_code`` is off unless configured;
- decoding runs accord's own loop (``sampling.decode``: the same tokens as ``generate``, without its ~1.3 ms of
  set-up per call), or ``generate`` for a model whose generation config turns on more (``sampling.supports``);
- a request that continues an assistant prefix starts from the key/value states an earlier continuation left
  (``prefix_cache``, bounded by ``prefix_cache_mb``); each stop-string criterion is built once (transformers
  rebuilds it from the whole vocabulary on every call otherwise);
- a chat template that opens ``<think>`` itself (QwQ, R1-Distill) is never given a
  second one by an assistant prefix, and a completion that starts inside that
  block is returned with ``<think>\n`` in front, so a truncated trace still reads
  as truncated and every stored trace has one format.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import torch

from accord.models import cache_kwarg, load_model_and_tokenizer, output_cache, runtime
from accord.prompts import bos_text, join_prefix, opens_think
from accord.teachers.base import (
    Generation,
    Request,
    SamplingParams,
    TeacherUnavailable,
    truncate_at_stop,
)
from accord.teachers.prefix_cache import PrefixCache, layer_states, to_cache
from accord.teachers.sampling import decode, supports
from accord.ui import say_once


def render_chat(tok, prompt: str, prefix: str = "", system: str | None = None,
                template_kwargs: dict | None = None) -> str:
    """The model's own chat template with the generation prompt, then the assistant prefix; ``template_kwargs``
    are the template's own variables (a generator's ``chat_template_kwargs``: Qwen3's ``enable_thinking``)."""
    if getattr(tok, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return join_prefix(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                   **(template_kwargs or {})), prefix)
    return bos_text(tok) + (f"{system}\n\n" if system else "") + prompt + "\n" + prefix


def inside_think(tok, text: str, prefix: str) -> bool:
    """Whether a completion of ``text`` (a rendered prompt) starts inside a think block the template
    opened, with no assistant prefix of the caller's: its stored form then gets the ``<think>`` back."""
    return not prefix and opens_think(text)


def _batch_seed(requests: Sequence[Request]) -> int:
    key = ",".join(str(r.seed) for r in requests).encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16)


def _seed(device: torch.device, seed: int) -> None:
    """Seed the generator sampling draws from.  On CPU only the CPU generator: ``torch.manual_seed`` also queues
    a lazy seeding of every accelerator backend, each capturing a stack trace (≈ 0.4 ms, as much as a small
    model's decoding step, paid once per ``generate`` call)."""
    if device.type == "cpu":
        torch.random.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


class HFGenerator:
    def __init__(self, cfg, model=None, tokenizer=None):
        self.name, self.cfg = cfg.name, cfg
        if model is None:
            model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code,
                                                        who=f"teacher {cfg.name!r}", attention=cfg.attention)
        self.model, self.tok = model, tokenizer
        self.device = next(model.parameters()).device
        self._stops: dict = {}
        self._cache_kw = cache_kwarg(model)
        self._fast = supports(model, self._cache_kw)  # accord's decoding loop, else transformers' generate
        eos = getattr(model.generation_config, "eos_token_id", None)
        self._ends = {tokenizer.pad_token_id, tokenizer.eos_token_id,
                      *([eos] if isinstance(eos, int) else list(eos or []))}
        mb = getattr(cfg, "prefix_cache_mb", 0)
        self._prefix = PrefixCache(mb * 2**20) if mb and getattr(self.tok, "padding_side", "left") == "left" else None

        say_once(f"hf backend: {runtime(model)}; batch {cfg.batch_size}")

    # -- generation ---------------------------------------------------------------------------------
    def _render(self, r: Request) -> str:
        return render_chat(self.tok, r.prompt, r.prefix, self.cfg.system_prompt, self.cfg.chat_template_kwargs)

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Generation]:
        rendered: dict[tuple[str, str], str] = {}  # k samples of a problem share one rendered prompt
        texts = [rendered.get((r.prompt, r.prefix)) or rendered.setdefault(
            (r.prompt, r.prefix), self._render(r)) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(texts[i]))
        out: list[Generation | None] = [None] * len(requests)
        bs = self.cfg.batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            for i, g in zip(idx, self._generate_batch([texts[i] for i in idx], [requests[i] for i in idx], params)):
                if inside_think(self.tok, texts[i], requests[i].prefix):
                    g.text = "<think>\n" + g.text  # the stored form opens its own think block
                out[i] = g
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, texts: list[str], reqs: list[Request], params: SamplingParams) -> list[Generation]:
        t0 = time.perf_counter()
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        _seed(self.device, _batch_seed(reqs))
        reuse = self._prefix is not None and all(r.prefix for r in reqs)
        cols, cache, rows = 0, None, None
        if reuse:  # a continuation: start from the cached states of the prefix it shares with earlier requests
            rows = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
            cols, cache = self.cached_prefix(rows, enc["input_ids"].shape[1])
        try:
            new, cache = self._run(enc, params, cache, cols)
        except torch.OutOfMemoryError as e:
            raise TeacherUnavailable(f"teacher {self.name!r}: out of memory; lower batch_size ({e})") from None
        if reuse:
            try:
                self._remember(rows, enc["input_ids"].shape[1], new, cache)
            except torch.OutOfMemoryError:  # the cache is an optimisation: drop it rather than the run
                self._prefix.clear()
        gens = self._decode_rows(new, params)
        if params.logprobs:
            lps = self._token_logprobs(enc["input_ids"], enc["attention_mask"], new)
            for g, lp in zip(gens, lps):
                g.token_logprobs = lp[: g.token_count]
        dt = (time.perf_counter() - t0) / max(1, len(reqs))
        for g in gens:
            g.elapsed_s = dt
        return gens

    def _run(self, enc, params: SamplingParams, cache, cols: int):
        """``(new token ids, cache)`` for a left-padded batch: ``sampling.decode`` where it reproduces
        ``generate`` for this model (``self._fast``), else ``generate`` with the same settings."""
        stop = self._stop_criteria(tuple(params.stop)) if params.stop else None
        if self._fast:
            return decode(self.model, enc["input_ids"], enc["attention_mask"], max_new_tokens=params.max_new_tokens,
                          temperature=params.temperature, top_p=params.top_p,
                          end_ids=self._end_ids(), pad_id=self.tok.pad_token_id, stop=stop, cache=cache,
                          cached=cols, cache_kw=self._cache_kw)
        sample = params.temperature > 0
        kwargs = dict(do_sample=sample, max_new_tokens=params.max_new_tokens, pad_token_id=self.tok.pad_token_id,
                      return_dict_in_generate=True, **({"stopping_criteria": stop} if stop else {}),
                      **({self._cache_kw: cache} if cache is not None else {}))
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(**enc, **kwargs)
        return out.sequences[:, enc["input_ids"].shape[1]:], output_cache(out)

    def cache_stats(self) -> dict | None:
        """Rows that started from cached states and the prompt tokens they did not re-encode (None: no cache)."""
        if self._prefix is None:
            return None
        pc = self._prefix
        return {"rows": pc.hits, "tokens_reused": pc.reused_tokens, "mb": pc.bytes / 2**20}

    def cached_prefix(self, rows: list[list[int]], width: int):
        """``(C, cache)``: the key/value states of the first ``C`` columns of the left-padded batch ``rows`` (token
        ids, padded to ``width``) from earlier continuations, or ``(0, None)`` — for a scorer reading the same
        prefixes this model just continued (CoRD's meta-prover)."""
        if self._prefix is None:
            return 0, None
        cols, layers = self._prefix.batch(rows, width)
        return cols, to_cache(layers) if layers else None

    def _remember(self, rows: list[list[int]], width: int, new: torch.Tensor, cache) -> None:
        """Keep each row's states — its prompt and the generated tokens the model was fed, up to its end — for
        the next request that continues it."""
        states = layer_states(cache)
        if not states:
            return
        fed = states[0][0].shape[2] - width  # generated tokens the model was fed (all but the last)
        stop = self._end_ids()
        for i, r in enumerate(rows):
            gen = new[i, :fed].tolist()
            gen = gen[:next((j for j, t in enumerate(gen) if t in stop), len(gen))]
            pad, n = width - len(r), len(r) + len(gen)
            self._prefix.put(r + gen, [k[i, :, pad:pad + n].clone() for k, _ in states],
                             [v[i, :, pad:pad + n].clone() for _, v in states])

    def _stop_criteria(self, stops: tuple[str, ...]):
        """transformers' stop-string criterion, built once per set of stop strings: it is stateless, and
        building it (reading and matching the whole vocabulary) costs more than a small model's decoding step,
        which CoRD's short step-wise calls would pay hundreds of times per problem set."""
        from transformers import StoppingCriteriaList, StopStringCriteria

        if stops not in self._stops:
            self._stops[stops] = StoppingCriteriaList([StopStringCriteria(self.tok, list(stops))])
        return self._stops[stops]

    def _decode_rows(self, new: torch.Tensor, params: SamplingParams) -> list[Generation]:
        """Each row's text up to its end (EOS/pad) and first stop string; a row cut at a stop string counts
        the tokens of its kept text (re-tokenised, all such rows in one call)."""
        stop_ids = self._end_ids()
        gens = []
        for ids in new.tolist():
            n = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
            text, stop = truncate_at_stop(self.tok.decode(ids[:n], skip_special_tokens=True), params.stop)
            gens.append(Generation(text=text, token_count=n, stop_string=stop,
                                   finish_reason="stop" if (n < len(ids) or stop is not None) else "length"))
        cut = [g for g in gens if g.stop_string is not None]
        if cut:
            for g, ids in zip(cut, self.tok([g.text for g in cut], add_special_tokens=False)["input_ids"]):
                g.token_count = len(ids)
        return gens

    def _end_ids(self) -> set[int]:
        """Token ids that end a row: pad, the tokenizer's EOS and the generation config's (read once)."""
        return self._ends

    # -- scoring ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _token_logprobs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        cont_ids: torch.Tensor) -> list[list[float]]:
        """log p(cont_t | prompt, cont_<t) for each row, from one forward pass (left-padded prompts)."""
        ids = torch.cat([prompt_ids, cont_ids], dim=1)
        mask = torch.cat([prompt_mask, torch.ones_like(cont_ids)], dim=1)
        k = cont_ids.shape[1]
        lp = torch.log_softmax(self._tail_logits(ids, mask, k), dim=-1)
        lp = lp.gather(-1, cont_ids.unsqueeze(-1)).squeeze(-1)
        return lp.cpu().tolist()

    def _tail_logits(self, ids: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
        """Logits predicting the last ``k`` positions; position ids follow the mask (left padding)."""
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=k + 1)
        return out.logits[:, :-1].float()

    def score(self, requests: Sequence[Request], continuations: Sequence[str]) -> list[list[float]]:
        """Log-prob of each continuation token after prompt ⊕ prefix (continuation tokenised on its own)."""
        out = []
        for start in range(0, len(requests), self.cfg.batch_size):
            reqs, conts = requests[start:start + self.cfg.batch_size], continuations[start:start + self.cfg.batch_size]
            heads = [self._render(r) for r in reqs]
            out += self._score_batch(heads, list(conts))
        return out

    def _score_batch(self, heads: list[str], conts: list[str]) -> list[list[float]]:
        head = [self.tok(h, add_special_tokens=False)["input_ids"] for h in heads]
        tail = [self.tok(c, add_special_tokens=False)["input_ids"] for c in conts]
        width, k = max(len(h) + len(t) for h, t in zip(head, tail)), max(len(t) for t in tail)
        pad = self.tok.pad_token_id
        # right-align every continuation so all of them end at the last position
        rows, masks = [], []
        for h, t in zip(head, tail):
            fill = width - len(h) - len(t)
            rows.append([pad] * fill + h + t)
            masks.append([0] * fill + [1] * (len(h) + len(t)))
        ids = torch.tensor(rows, device=self.device)
        mask = torch.tensor(masks, device=self.device)
        with torch.inference_mode():
            lp = torch.log_softmax(self._tail_logits(ids, mask, k), dim=-1)
        res = []
        for r, t in enumerate(tail):
            if not t:
                res.append([])
                continue
            tgt = torch.tensor(t, device=self.device)
            res.append(lp[r, k - len(t):].gather(-1, tgt.unsqueeze(-1)).squeeze(-1).cpu().tolist())
        return res

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        if self._prefix is not None:
            self._prefix.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
