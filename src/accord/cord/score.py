"""Step scorers for CoRD (§4.2, App. A.1, §5.2.2, App. G.2).

``predictive-perplexity`` (the paper's): a meta-prover model scores a partial
reasoning τ by how well it predicts the ground-truth answer A after the App. A.1
template ``τ </think> The final answer is A``:

    S(τ) = exp( (1/M) Σ_m log p(a_m | prompt ⊕ τ ⊕ "</think> The final answer is", a_<m) )   ∈ [0, 1]

Choices where the paper is silent: A is scored as it would be written after
"is" — with its leading space, ``" " + answer`` — and its M tokens are the
meta-prover tokenizer's encoding of that string on its own (the same rule as
``Generator.score``).  The template is configurable (``cord.answer_template``)
for models that close their reasoning differently; the lab's teachers write
``</think>\n\n\boxed{A}``, and under the paper's wording every score is ~0.

With an ``hf`` meta-prover a decoding step costs two forwards
whatever the beam: the B beams' prefixes (chat prompt ⊕ τ) are encoded in one
left-padded batch, and their key/value cache, indexed to one row per candidate,
serves all B×K candidate steps in one batched forward (§4.4); when the
meta-prover is also a proposer, the prefixes' states come from its prefix cache
(``accord.teachers.prefix_cache``), so they are not encoded again — and when at
most ``ONE_PASS_MAX`` tokens of each prefix are not cached, each candidate row
reads those itself and the step costs one forward (the few duplicated tokens cost
less than a second pass over the model).  Other
backends go through one ``Generator.score`` call per step.

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
from accord.models import cache_kwarg, output_cache
from accord.registry import STEP_SCORERS
from accord.teachers.base import Request, SamplingParams
from accord.teachers.hf import render_chat
from accord.verify import CORRECT, check

DEFAULT_TEMPLATE = "</think> The final answer is {answer}."  # App. A.1
TEMPLATE = "</think> The final answer is"  # the part of the default template before the answer
ONE_PASS_MAX = 64  # uncached prefix tokens up to which each candidate row reads them itself (one forward, not two)


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
        return self.many(prompt, [(prefix, candidates)], answer)[0]

    def many(self, prompt: str, groups: list[tuple[str, list[str]]], answer: str) -> list[list[float]]:
        """Scores for the candidates of several prefixes of one problem (a beam-search step's beams) at once."""
        t0 = time.perf_counter()
        try:
            self.calls += 1
            return getattr(self, "_" + self.kind.replace("-", "_"))(prompt, groups, answer)
        finally:
            self.seconds += time.perf_counter() - t0

    # one method per entry of ``accord.registry.STEP_SCORERS`` (the name with "-" → "_"); each takes the
    # (prefix, candidates) groups and returns one list of scores per group
    def _random(self, prompt, groups, answer) -> list[list[float]]:
        return [[self.rng.random() for _ in cands] for _, cands in groups]

    def _max_length(self, prompt, groups, answer) -> list[list[float]]:
        return [[float(len(prefix) + len(c)) for c in cands] for prefix, cands in groups]

    def _binary_judgment(self, prompt, groups, answer) -> list[list[float]]:
        return _regroup(self._judge(prompt, _flat(groups), answer), groups)

    def _predictive_perplexity(self, prompt, groups, answer) -> list[list[float]]:
        if hasattr(self.meta, "model") and hasattr(self.meta, "tok"):
            return predictive_perplexity_groups(self.meta, prompt, groups, answer, self.suffix, self.lead)
        return _regroup(self._pp_generic(prompt, _flat(groups), answer), groups)

    def _pp_generic(self, prompt, pairs, answer) -> list[float]:
        reqs = [Request(prompt, prefix=prefix + c + self.suffix) for prefix, c in pairs]
        lps = self.meta.score(reqs, [self.lead + answer] * len(pairs))
        return [math.exp(sum(lp) / len(lp)) if lp else 0.0 for lp in lps]

    def _judge(self, prompt, pairs, answer) -> list[float]:
        reqs = [Request(prompt, prefix=prefix + c + TIME_UP, seed=self.rng.randrange(2**31))
                for prefix, c in pairs for _ in range(self.judge_runs)]
        gens = self.meta.generate(reqs, SamplingParams(temperature=self.judge_temperature, max_new_tokens=32))
        ok = [(not g.failed) and check(self.verifier, answer, g.text).verdict == CORRECT for g in gens]
        r = self.judge_runs
        return [sum(ok[i * r:(i + 1) * r]) / r for i in range(len(pairs))]


def _flat(groups: list[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    return [(prefix, c) for prefix, cands in groups for c in cands]


def _regroup(flat: list[float], groups: list[tuple[str, list[str]]]) -> list[list[float]]:
    out, at = [], 0
    for _, cands in groups:
        out.append(flat[at:at + len(cands)])
        at += len(cands)
    return out


def predictive_perplexity_cached(meta, prompt: str, prefix: str, candidates: list[str], answer: str,
                                 suffix: str = TEMPLATE, lead: str = " ") -> list[float]:
    """S for every candidate of one prefix (``predictive_perplexity_groups`` with one group)."""
    return predictive_perplexity_groups(meta, prompt, [(prefix, candidates)], answer, suffix, lead)[0]


@torch.inference_mode()
def predictive_perplexity_groups(meta, prompt: str, groups: list[tuple[str, list[str]]], answer: str,
                                 suffix: str = TEMPLATE, lead: str = " ") -> list[list[float]]:
    """S for every candidate of every (prefix, candidates) group in at most two forwards: the prefixes (left-padded,
    one batch) build a KV cache, which is indexed to one row per candidate; the candidates ⊕ template ⊕
    answer (right-padded) are then read in one batched forward on that cache.  A meta-prover that has just
    continued these prefixes itself (an ``hf`` teacher proposing steps) starts from their cached states, so
    the first forward reads only what it has not seen — or, when that is at most ``ONE_PASS_MAX`` tokens, each
    candidate row reads it in the one forward that reads its tail."""
    model, tok = meta.model, meta.tok
    dev = next(model.parameters()).device
    system, kwargs = getattr(meta.cfg, "system_prompt", None), getattr(meta.cfg, "chat_template_kwargs", None)
    # one tokenizer call for the prefixes, the answer and the candidate tails (each is encoded on its own)
    tails = [c + suffix for _, cands in groups for c in cands]
    enc = tok([render_chat(tok, prompt, p, system, kwargs) for p, _ in groups] + [lead + answer] + tails,
              add_special_tokens=False)["input_ids"]
    heads, ans, tails = enc[:len(groups)], enc[len(groups)], enc[len(groups) + 1:]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    h = max(len(x) for x in heads)
    head_ids = torch.tensor([[pad] * (h - len(x)) + x for x in heads], device=dev)
    head_mask = torch.tensor([[0] * (h - len(x)) + [1] * len(x) for x in heads], device=dev)
    pos = (head_mask.cumsum(-1) - 1).clamp(min=0)
    owner = [g for g, (_, cands) in enumerate(groups) for _ in cands]  # the group of each candidate row
    if not owner:
        return [[] for _ in groups]
    idx = torch.tensor(owner, device=dev)
    seqs = [t + ans for t in tails]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=dev)
    mask = torch.cat([head_mask[idx], torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs],
                                                   device=dev)], 1)
    tail_pos = torch.tensor([len(heads[g]) for g in owner], device=dev)[:, None] + torch.arange(width, device=dev)
    # a meta-prover that just continued these prefixes (it is one of the teachers) has their states cached
    cols, cache = meta.cached_prefix(heads, h) if hasattr(meta, "cached_prefix") else (0, None)
    kw = cache_kwarg(model)
    if cache is not None and h - cols <= ONE_PASS_MAX:
        # one forward: each candidate row reads its prefix's few uncached columns itself, then its tail and the
        # answer; position u - 1 is the prefix's last logit
        u = h - cols
        logits = model(input_ids=torch.cat([head_ids[idx, cols:], ids], 1), attention_mask=mask,
                       position_ids=torch.cat([pos[idx, cols:], tail_pos], 1),
                       **{kw: _select_cache(cache, idx)}).logits
        full = logits[:, u - 1:]
    else:
        out = model(input_ids=head_ids[:, cols:], attention_mask=head_mask, position_ids=pos[:, cols:],
                    use_cache=True, logits_to_keep=1, **({kw: cache} if cache else {}))  # cache + last logits
        logits = model(input_ids=ids, attention_mask=mask, position_ids=tail_pos,
                       **{kw: _select_cache(output_cache(out), idx)}).logits
        # position 0 = the prefix's last logit, which predicts the first token after it (an empty tail: an
        # empty candidate with an empty template suffix); position i+1 = the logit after tail/answer token i
        full = torch.cat([out.logits[idx, -1:], logits], 1)
    # answer token m of row r sits at tail position n_r + m and is predicted by shifted position n_r + m: only
    # those rows of the vocabulary are normalised
    rows = torch.tensor([[len(t) + m for m in range(len(ans))] for t in tails], device=dev)  # [R, A]
    lp = torch.log_softmax(full.gather(1, rows[..., None].expand(-1, -1, full.shape[-1])).float(), -1)
    tok_lp = lp.gather(-1, torch.tensor(ans, device=dev).expand(len(seqs), -1)[..., None])[..., 0]
    return _regroup(torch.exp(tok_lp.mean(1)).tolist(), groups)


def _select_cache(cache, idx: torch.Tensor):
    """The prefixes' KV cache with one row per candidate (row ``idx[r]``), in place: the prefixes' own cache
    is not used again; the candidates' forward appends to the selected one."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(idx)
        return cache
    return tuple((k[idx], v[idx]) for k, v in cache)  # legacy tuples


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
