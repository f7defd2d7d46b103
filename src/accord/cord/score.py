"""Step scorers for CoRD (§4.2, App. A.1, §5.2.2, App. G.2).

``predictive-perplexity`` (the paper's): a meta-prover model scores a partial
reasoning τ by how well it predicts the ground-truth answer A after the App. A.1
template ``τ </think> The final answer is A``:

    S(τ) = exp( (1/M) Σ_m log p(a_m | prompt ⊕ τ ⊕ "</think> The final answer is", a_<m) )   ∈ [0, 1]

Choices where the paper is silent: A is scored as it would be written after
"is" — with its leading space, ``" " + answer`` — and its M tokens are the
meta-prover tokenizer's encoding of that string on its own (the same rule as
``Teacher.score``).  The template is configurable (``cord.answer_template``)
for models that close their reasoning differently; the lab's teachers write
``</think>\n\n\boxed{A}``, and under the paper's wording every score is ~0.  With an ``hf`` meta-prover the shared prefix (chat prompt ⊕
τ) is encoded once per beam and its key/value cache is reused for all K
candidate steps, which are scored in one batched forward (§4.4); other backends
go through ``Teacher.score``.

Alternatives: ``random`` (seeded uniform), ``max-length`` (longer reasoning wins),
``binary-judgment`` (App. G.2: r roll-outs after the "Time is up…" prompt, the
share that reaches the right answer).
"""

from __future__ import annotations

import math
import random
import time

import torch

from accord.errors import UsageError
from accord.registry import STEP_SCORERS

DEFAULT_TEMPLATE = "</think> The final answer is {answer}."  # App. A.1
TEMPLATE = "</think> The final answer is"  # the part of the default template before the answer


def split_template(template: str) -> tuple[str, str]:
    """(text written after the reasoning, lead glued to the answer): ``"… is {answer}."`` → ``("… is", " ")``."""
    if "{answer}" not in template:
        raise CordError(f"cord.answer_template {template!r} has no {{answer}} placeholder")
    before = template.split("{answer}", 1)[0]
    return (before[:-1], " ") if before.endswith(" ") else (before, "")
TIME_UP = ("Time is up. Given the time I've spent and the approaches I've tried, I should stop thinking and "
           "formulate a final answer based on what I already have.</think> The final answer is:")


class CordError(UsageError):
    """A CoRD setting that cannot work (the message says which and why)."""


class Scorer:
    """Scores candidate continuations of one shared prefix; records its own wall time."""

    def __init__(self, kind: str, meta=None, *, seed: int = 0, judge_runs: int = 4, verifier: str = "math",
                 judge_temperature: float = 0.6, template: str = DEFAULT_TEMPLATE):
        if kind not in STEP_SCORERS:
            raise CordError(f"unknown selection {kind!r}; choose one of {', '.join(STEP_SCORERS)}")
        if STEP_SCORERS[kind].meta_prover and meta is None:
            raise CordError(f"selection {kind!r} needs a meta-prover (cord.meta_prover)")
        self.kind, self.meta, self.rng = kind, meta, random.Random(seed)
        self.judge_runs, self.verifier, self.judge_temperature = judge_runs, verifier, judge_temperature
        self.suffix, self.lead = split_template(template)
        self.seconds = 0.0
        self.calls = 0

    def answer_problem(self, answer: str) -> str | None:
        """Why the meta-prover cannot score this gold answer (its tokenizer cannot write it), or None."""
        if self.kind != "predictive-perplexity":
            return None
        tok = getattr(self.meta, "tok", None)
        if tok is None:
            return None
        text = self.lead + answer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        unk = getattr(tok, "unk_token_id", None)
        if not ids or (unk is not None and unk in ids) or tok.decode(ids) != text:
            return (f"meta-prover {self.meta.name!r}: its tokenizer cannot encode the answer {answer!r} "
                    f"(it decodes back as {tok.decode(ids)!r})")
        return None

    def __call__(self, prompt: str, prefix: str, candidates: list[str], answer: str) -> list[float]:
        t0 = time.perf_counter()
        try:
            self.calls += 1
            return getattr(self, "_" + self.kind.replace("-", "_"))(prompt, prefix, candidates, answer)
        finally:
            self.seconds += time.perf_counter() - t0

    # one method per entry of ``accord.registry.STEP_SCORERS`` (the name with "-" → "_")
    def _random(self, prompt, prefix, candidates, answer) -> list[float]:
        return [self.rng.random() for _ in candidates]

    def _max_length(self, prompt, prefix, candidates, answer) -> list[float]:
        return [float(len(prefix) + len(c)) for c in candidates]

    def _binary_judgment(self, prompt, prefix, candidates, answer) -> list[float]:
        return self._judge(prompt, prefix, candidates, answer)

    def _predictive_perplexity(self, prompt, prefix, candidates, answer) -> list[float]:
        if hasattr(self.meta, "model") and hasattr(self.meta, "tok"):
            return predictive_perplexity_cached(self.meta, prompt, prefix, candidates, answer, self.suffix, self.lead)
        return self._pp_generic(prompt, prefix, candidates, answer)

    def _pp_generic(self, prompt, prefix, candidates, answer) -> list[float]:
        from accord.teachers.base import Request

        reqs = [Request(prompt, prefix=prefix + c + self.suffix) for c in candidates]
        lps = self.meta.score(reqs, [self.lead + answer] * len(candidates))
        return [math.exp(sum(lp) / len(lp)) if lp else 0.0 for lp in lps]

    def _judge(self, prompt, prefix, candidates, answer) -> list[float]:
        from accord.teachers.base import Request, SamplingParams
        from accord.verify import CORRECT, check

        reqs = [Request(prompt, prefix=prefix + c + TIME_UP, seed=self.rng.randrange(2**31))
                for c in candidates for _ in range(self.judge_runs)]
        gens = self.meta.generate(reqs, SamplingParams(temperature=self.judge_temperature, max_new_tokens=32))
        ok = [(not g.failed) and check(self.verifier, answer, g.text).verdict == CORRECT for g in gens]
        r = self.judge_runs
        return [sum(ok[i * r:(i + 1) * r]) / r for i in range(len(candidates))]


@torch.inference_mode()
def predictive_perplexity_cached(meta, prompt: str, prefix: str, candidates: list[str], answer: str,
                                 suffix: str = TEMPLATE, lead: str = " ") -> list[float]:
    """S for every candidate: the prefix is encoded once, its KV cache shared by one batched forward."""
    from accord.teachers.hf import render_chat

    model, tok = meta.model, meta.tok
    dev = next(model.parameters()).device
    head = tok(render_chat(tok, prompt, prefix, getattr(meta.cfg, "system_prompt", None)),
               add_special_tokens=False)["input_ids"]
    ans = tok(lead + answer, add_special_tokens=False)["input_ids"]
    tails = [tok(c + suffix, add_special_tokens=False)["input_ids"] for c in candidates]
    out = model(input_ids=torch.tensor([head], device=dev), use_cache=True, logits_to_keep=1)  # cache + last logit
    seqs = [t + ans for t in tails]
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=dev)
    mask = torch.tensor([[1] * len(head) + [1] * len(s) + [0] * (width - len(s)) for s in seqs], device=dev)
    pos = torch.arange(len(head), len(head) + width, device=dev).expand(len(seqs), -1)
    cache = _repeat_cache(out.past_key_values, len(seqs))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
    # position 0 = the head's last logit, which predicts the first token after the head (an empty tail:
    # an empty candidate with an empty template suffix); position i+1 = the logit after tail/answer token i
    full = torch.cat([out.logits[:, -1:].expand(len(seqs), -1, -1), logits], 1)
    # answer token m of row r sits at tail position n_r + m and is predicted by shifted position n_r + m: only
    # those rows of the vocabulary are normalised
    rows = torch.tensor([[len(t) + m for m in range(len(ans))] for t in tails], device=dev)  # [R, A]
    lp = torch.log_softmax(full.gather(1, rows[..., None].expand(-1, -1, full.shape[-1])).float(), -1)
    tok_lp = lp.gather(-1, torch.tensor(ans, device=dev).expand(len(seqs), -1)[..., None])[..., 0]
    return torch.exp(tok_lp.mean(1)).tolist()


def _repeat_cache(cache, n: int):
    """The prefix's KV cache repeated for ``n`` candidates, in place (the prefix's own cache is not used again;
    the candidates' forward appends to the repeated one)."""
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(n)
        return cache
    return tuple((k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in cache)  # legacy tuples


def full_sequence_score(model, tok, head_text: str, tail_text: str, answer: str, suffix: str = TEMPLATE,
                        lead: str = " ") -> float:
    """The slow reference: one forward over head ⊕ tail ⊕ answer ids, no cache (used by tests and curation)."""
    head = tok(head_text, add_special_tokens=False)["input_ids"]
    tail = tok(tail_text + suffix, add_special_tokens=False)["input_ids"]
    ans = tok(lead + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail + ans])
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(head) + len(tail)
    vals = [lp[start + m - 1, a] for m, a in enumerate(ans)]
    return float(torch.exp(torch.stack(vals).mean()))
