"""A generator on vLLM's offline engine (optional extra: ``pip install accord[vllm]``).

Imported lazily.  Prefix caching is on by default, so CoRD's step proposals that
share a prefix reuse its KV blocks (§4.4).  Scoring uses ``prompt_logprobs``.
Per-request seeds map onto vLLM's per-request ``seed``.  Prompts go in as token ids of the rendered chat
template (no special tokens added: the template writes its own BOS), as the hf backend tokenizes them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from accord.models import merged_adapter, resolve_model
from accord.teachers.base import (
    Generation,
    Request,
    SamplingParams,
    TeacherConfigError,
)
from accord.teachers.hf import inside_think, render_chat


class VLLMGenerator:
    def __init__(self, cfg):
        try:
            import vllm
        except ImportError:
            raise TeacherConfigError(f"teacher {cfg.name!r}: backend 'vllm' needs vLLM: pip install 'accord[vllm]'") \
                from None
        from transformers import AutoTokenizer

        self.name, self.cfg, self._vllm = cfg.name, cfg, vllm
        path = merged_adapter(resolve_model(cfg.model, f"teacher {cfg.name!r}"), f"teacher {cfg.name!r}")
        args = {"enable_prefix_caching": True, "trust_remote_code": cfg.trust_remote_code,
                "dtype": "auto" if cfg.dtype == "auto" else cfg.dtype, **cfg.vllm_args}
        self.llm = vllm.LLM(model=path, **args)
        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)

    def _text(self, r: Request) -> str:
        return render_chat(self.tok, r.prompt, r.prefix, self.cfg.system_prompt, self.cfg.chat_template_kwargs)

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Generation]:
        sp = [self._vllm.SamplingParams(n=1, temperature=params.temperature, top_p=params.top_p,
                                        max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
                                        seed=r.seed, logprobs=0 if params.logprobs else None) for r in requests]
        t0 = time.perf_counter()
        texts = [self._text(r) for r in requests]
        # token ids, not the text: vLLM tokenizes a text prompt with the tokenizer's special tokens, so a chat
        # template that writes its own BOS (Llama 3, Gemma, Mistral) would start with two — the hf backend and
        # score() below tokenize the rendered template as it is
        ids = [{"prompt_token_ids": x} for x in self.tok(texts, add_special_tokens=False)["input_ids"]]
        outs = self.llm.generate(ids, sp, use_tqdm=False)
        dt = (time.perf_counter() - t0) / max(1, len(requests))
        gens = []
        for o in outs:
            c = o.outputs[0]
            lps = None
            if params.logprobs and c.logprobs:
                lps = [step[tid].logprob for step, tid in zip(c.logprobs, c.token_ids)]
            stop = c.stop_reason if isinstance(c.stop_reason, str) else None
            opened = inside_think(self.tok, texts[len(gens)], requests[len(gens)].prefix)
            text = "<think>\n" + c.text if opened else c.text
            gens.append(Generation(text, len(c.token_ids), "length" if c.finish_reason == "length" else "stop",
                                   token_logprobs=lps, elapsed_s=dt, stop_string=stop))
        return gens

    def score(self, requests: Sequence[Request], continuations: Sequence[str]) -> list[list[float]]:
        prompts, spans = [], []
        for r, c in zip(requests, continuations):
            head = self.tok(self._text(r), add_special_tokens=False)["input_ids"]
            tail = self.tok(c, add_special_tokens=False)["input_ids"]
            prompts.append({"prompt_token_ids": head + tail})
            spans.append((len(head), tail))
        sp = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
        outs = self.llm.generate(prompts, sp, use_tqdm=False)
        res = []
        for o, (h, tail) in zip(outs, spans):
            plp = o.prompt_logprobs
            res.append([plp[h + i][t].logprob for i, t in enumerate(tail)])
        return res

    def close(self) -> None:
        self.llm = None
