"""A generator behind any OpenAI-compatible server (vLLM, SGLang, Ollama, OpenAI, ``transformers serve``).

- Retries: the ``openai`` client already retries 408/409/429/5xx, timeouts and
  dropped connections with exponential backoff and jitter (``max_retries``); we
  rely on it rather than writing another.  After the last retry the sample is
  returned as failed (``Generation.error``) and the run goes on.  When a whole
  batch fails to *connect*, the server is unreachable and we raise
  :class:`TeacherUnavailable` so the caller can stop that teacher cleanly.
- Parameters a model refuses (OpenAI's reasoning models: ``max_tokens``, a temperature, top-p or stop strings)
  are adapted once for the run, with a warning, and the request sent again (``_create``).
- Concurrency: a thread pool of ``max_concurrency`` workers.
- Replicas: ``base_url`` may list several servers of the same model.  Requests go round-robin to the
  replicas in rotation; a replica that still cannot be reached after the client's retries is taken out of
  rotation (said once on stderr) and the request is sent to the next one.  Only when every replica is gone
  does the teacher become unavailable (the caller stops it cleanly; the store keeps what was collected).
- Reasoning: a ``reasoning_content`` field (vLLM reasoning parsers, DeepSeek API)
  is folded back as ``<think>…</think>`` so every backend yields the same format, also when the request
  continues a prefix inside the think block (:func:`fold_reasoning`).
- Continuing a prefix: on the chat endpoint the prefix is sent as a final assistant
  message with ``continue_final_message`` (vLLM/SGLang semantics); on the
  completions endpoint the prompt is rendered with ``tokenizer``'s chat template.
- A completions prompt rendered with a local ``tokenizer`` leaves out a leading BOS that the tokenizer adds on
  encoding: the server tokenizes the text with special tokens (vLLM, SGLang) and adds it once itself.
- Scoring needs ``echo`` + ``logprobs`` on the completions endpoint (vLLM has it);
  elsewhere :class:`NotSupported` is raised.  Its requests go to the replicas in the same rotation as
  generation's, and a server that cannot be reached is :class:`TeacherUnavailable`, never "not supported".
- The API key is read from the environment variable named by ``api_key_env`` and
  is never logged or written.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from accord.prompts import REASONING_KEYS, THINK_CLOSE, THINK_OPEN
from accord.teachers.base import (
    Generation,
    NotSupported,
    Request,
    SamplingParams,
    TeacherConfigError,
    TeacherUnavailable,
    truncate_at_stop,
)


class OpenAIGenerator:
    def __init__(self, cfg):
        import openai

        self.name, self.cfg, self._openai = cfg.name, cfg, openai
        key = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise TeacherConfigError(f"teacher {cfg.name!r}: environment variable {cfg.api_key_env} is not set")
        self.urls = [cfg.base_url] if isinstance(cfg.base_url, str) else list(cfg.base_url)
        self.clients = [openai.OpenAI(base_url=u, api_key=key or "EMPTY", max_retries=cfg.max_retries,
                                      timeout=cfg.timeout) for u in self.urls]
        self._alive, self._next, self._lock = list(range(len(self.clients))), 0, threading.Lock()
        self._renamed: dict[str, str] = {}  # request parameters this model refused, and what replaces them
        self._left_out: set[str] = set()  # … or that it refused with no replacement (the server's default applies)
        self._tok = None
        if cfg.tokenizer:
            from transformers import AutoTokenizer

            from accord.models import resolve_model

            self._tok = AutoTokenizer.from_pretrained(resolve_model(cfg.tokenizer, f"teacher {cfg.name!r} tokenizer"))
            # the server tokenizes a completions prompt with special tokens (vLLM, SGLang): a BOS the template
            # writes would come twice, so the rendered prompt leaves out the one the server adds itself
            bos = self._tok.bos_token
            self._server_bos = bos if bos and self._tok("x")["input_ids"][:1] == [self._tok.bos_token_id] else None

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Generation]:
        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency) as pool:
            gens = list(pool.map(lambda r: self._one(r, params), requests))
        conn = [g for g in gens if g.meta.get("connection_error")]
        if gens and (len(conn) == len(gens) or not self._alive):
            where = ", ".join(self.urls)
            raise TeacherUnavailable(f"teacher {self.name!r}: cannot reach {where} after "
                                     f"{self.cfg.max_retries} retries ({conn[0].error if conn else 'no replica left'})")
        return gens

    def _pick(self) -> int | None:
        with self._lock:
            if not self._alive:
                return None
            i = self._alive[self._next % len(self._alive)]
            self._next += 1
            return i

    def _drop(self, i: int, err: Exception) -> None:
        with self._lock:
            if i not in self._alive:
                return
            self._alive.remove(i)
            left = len(self._alive)
        if len(self.clients) > 1:
            print(f"warning: teacher {self.name!r}: replica {self.urls[i]} unreachable ({err}); taken out of "
                  f"rotation, {left} of {len(self.clients)} left", file=sys.stderr)

    def _one(self, req: Request, params: SamplingParams) -> Generation:
        t0 = time.perf_counter()
        while True:
            i = self._pick()
            if i is None:
                return Generation("", 0, "error", error="connection: no replica left", meta={"connection_error": True},
                                  elapsed_s=time.perf_counter() - t0)
            try:
                g = self._chat(req, params, i) if self.cfg.endpoint == "chat" else self._completion(req, params, i)
            except self._openai.APIConnectionError as e:  # includes timeouts, after the client's retries
                if len(self.clients) > 1:
                    self._drop(i, e)
                    continue  # the next replica in rotation takes this request
                return Generation("", 0, "error", error=f"connection: {e}", elapsed_s=time.perf_counter() - t0,
                                  meta={"connection_error": True})
            except self._openai.APIError as e:
                return Generation("", 0, "error", error=f"{type(e).__name__}: {e}",
                                  elapsed_s=time.perf_counter() - t0)
            g.text, g.stop_string = truncate_at_stop(g.text, params.stop)
            g.elapsed_s = time.perf_counter() - t0
            g.meta["replica"] = self.urls[i]
            return g

    def _common(self, req: Request, params: SamplingParams) -> dict:
        kw = dict(model=self.cfg.model, max_tokens=params.max_new_tokens, temperature=params.temperature,
                  seed=req.seed)
        if params.top_p < 1:
            kw["top_p"] = params.top_p
        if params.stop:
            kw["stop"] = list(params.stop)[:4]  # the OpenAI API accepts at most four
        return kw

    def _create(self, call, **kw):
        """``call(**kw)`` with what this model accepts: OpenAI's reasoning models (o-series, GPT-5) answer 400 to
        ``max_tokens`` (they take ``max_completion_tokens``) and to a temperature, top-p or stop strings they do not
        support.  Such a refusal is adapted once for the whole run — renamed, or left out with a warning that the
        server's default applies (texts are still cut at the stop strings afterwards) — and the request is sent
        again; any other 400 fails the sample as before."""
        while True:  # ends: each adapted parameter leaves the request, and a refused replacement is raised
            sent = {self._renamed.get(k, k): v for k, v in kw.items() if k not in self._left_out}
            try:
                return call(**sent)
            except self._openai.BadRequestError as e:
                why = e.body.get("message", str(e)) if isinstance(e.body, dict) else str(e)
                param = getattr(e, "param", None) or (m[1] if (m := _REFUSED.search(why)) else None)
                if param not in sent or not self._adapt(param, why):
                    raise

    def _adapt(self, param: str, why: str) -> bool:
        """Remember a parameter this model refused (:meth:`_create`); False for one accord cannot do without."""
        if param not in ADAPTABLE:
            return False
        with self._lock:
            if param in self._renamed or param in self._left_out:
                return True  # another thread adapted it meanwhile
            if ADAPTABLE[param]:
                self._renamed[param] = ADAPTABLE[param]
                what = f"sending {ADAPTABLE[param]} instead"
            else:
                self._left_out.add(param)
                what = "left out of its requests from now on: the server's default applies, not the config's"
        print(f"warning: teacher {self.name!r} ({self.cfg.model}) refused {param!r} ({why}); {what}", file=sys.stderr)
        return True

    def _messages(self, req: Request) -> list[dict]:
        msgs = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        msgs.append({"role": "user", "content": req.prompt})
        if req.prefix:
            msgs.append({"role": "assistant", "content": req.prefix})
        return msgs

    def _chat(self, req: Request, params: SamplingParams, replica: int = 0) -> Generation:
        kw = self._common(req, params)
        if params.logprobs:
            kw["logprobs"] = True
        extra = {"continue_final_message": True, "add_generation_prompt": False} if req.prefix else {}
        if self.cfg.chat_template_kwargs:  # the server's chat template reads them (vLLM, SGLang)
            extra["chat_template_kwargs"] = dict(self.cfg.chat_template_kwargs)
        if extra:
            kw["extra_body"] = extra
        resp = self._create(self.clients[replica].chat.completions.create, messages=self._messages(req), **kw)
        choice = resp.choices[0]
        reasoning = next((r for k in REASONING_KEYS if isinstance(r := getattr(choice.message, k, None), str)
                          and r), None)
        text = fold_reasoning(reasoning, choice.message.content or "", req.prefix)
        lps = None
        if params.logprobs and choice.logprobs and choice.logprobs.content:
            lps = [t.logprob for t in choice.logprobs.content]
        n = resp.usage.completion_tokens if resp.usage else len(lps or [])
        return Generation(text, n, _finish(choice.finish_reason), token_logprobs=lps)

    def _render(self, req: Request) -> str:
        if self._tok is not None:
            from accord.teachers.hf import render_chat

            text = render_chat(self._tok, req.prompt, req.prefix, self.cfg.system_prompt,
                               self.cfg.chat_template_kwargs)
            return text.removeprefix(self._server_bos) if self._server_bos else text
        return req.prompt + "\n" + req.prefix

    def _completion(self, req: Request, params: SamplingParams, replica: int = 0) -> Generation:
        kw = self._common(req, params)
        if params.logprobs:
            kw["logprobs"] = 1
        resp = self._create(self.clients[replica].completions.create, prompt=self._render(req), **kw)
        choice = resp.choices[0]
        lps = list(choice.logprobs.token_logprobs) if params.logprobs and choice.logprobs else None
        n = resp.usage.completion_tokens if resp.usage else len(lps or [])
        return Generation(choice.text or "", n, _finish(choice.finish_reason), token_logprobs=lps)

    # -- scoring ------------------------------------------------------------------------------------
    def score(self, requests: Sequence[Request], continuations: Sequence[str]) -> list[list[float]]:
        return [self._score_one(r, c) for r, c in zip(requests, continuations)]

    def _score_one(self, req: Request, cont: str) -> list[float]:
        """The log-probs of ``cont``'s tokens after ``req``'s rendered prompt, from a replica in rotation (as
        generation: a replica that cannot be reached is dropped and the next one asked).  A server that answers
        but cannot echo prompt log-probs is :class:`NotSupported`; none answering is :class:`TeacherUnavailable`."""
        head = self._render(req)
        while True:
            i = self._pick()
            if i is None:
                raise TeacherUnavailable(f"teacher {self.name!r}: cannot reach {', '.join(self.urls)} to score "
                                         f"(no replica left)")
            try:
                resp = self.clients[i].completions.create(model=self.cfg.model, prompt=head + cont, max_tokens=1,
                                                          temperature=0, echo=True, logprobs=0)
                lp = resp.choices[0].logprobs
                offsets, values = list(lp.text_offset), list(lp.token_logprobs)
            except self._openai.APIConnectionError as e:  # includes timeouts, after the client's retries
                if len(self.clients) > 1:
                    self._drop(i, e)
                    continue
                raise TeacherUnavailable(f"teacher {self.name!r}: cannot reach {self.urls[i]} to score after "
                                         f"{self.cfg.max_retries} retries ({e})") from None
            except (self._openai.APIError, AttributeError, TypeError) as e:
                raise NotSupported(f"teacher {self.name!r}: this server cannot return prompt log-probs (completions "
                                   f"with echo+logprobs); use an hf or vllm teacher as scorer ({e})") from None
            return [v for o, v in zip(offsets, values) if len(head) <= o < len(head) + len(cont) and v is not None]

    def close(self) -> None:
        for c in self.clients:
            c.close()


# a 400 that names the parameter in its message only (proxies that drop OpenAI's ``param`` field)
_REFUSED = re.compile(r"Unsupported (?:parameter|value): '(\w+)'")
# parameters a model may refuse that accord can adapt: renamed (the value), or left out (None)
# (logprobs left out: the trace has no confidence scores, which the confidence filter lets through)
ADAPTABLE = {"max_tokens": "max_completion_tokens", "temperature": None, "top_p": None, "stop": None, "seed": None,
             "logprobs": None}


def fold_reasoning(reasoning: str | None, content: str, prefix: str = "") -> str:
    """The continuation of ``prefix`` as the model wrote it, from a server that split it into reasoning and content
    (a reasoning parser strips the think tags): what the hf and vllm backends return for the same request.

    - ``prefix`` inside an open think block (CoRD's steps): the reasoning continues it, no second ``<think>``;
    - ``prefix`` past its think block: the parser, seeing no ``</think>`` in the output, took the answer for
      reasoning; it is the text as it is;
    - otherwise the think block opens here (``<think>\n`` as the hf backend writes it);
    - ``</think>`` closes the reasoning only when an answer follows it: a reasoning stopped by the token limit or a
      stop string (a CoRD step) was never closed, and a stored trace says so.
    A ``content`` that carries its own think tags is kept as it is."""
    if not reasoning or THINK_OPEN in content or THINK_CLOSE in content:
        return content
    if prefix.rfind(THINK_OPEN) > prefix.rfind(THINK_CLOSE):
        head = ""
    elif THINK_CLOSE in prefix:
        return reasoning + content
    else:
        head = THINK_OPEN if reasoning.startswith("\n") else THINK_OPEN + "\n"
    return head + reasoning + (THINK_CLOSE + content if content else "")


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"
