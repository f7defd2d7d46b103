"""COMPACT (paper 001, §3): compatibility-aware multi-teacher distillation, ``train.method: compact``.

Every problem's K′ verified traces (one per teacher) train together in one micro-batch.  From the
*same* forward that computes the loss, the student scores each trace (no extra pass, no teacher):

    S_PPL,k  = mean NLL of the reasoning tokens                                   (Eq. 6)
    S_MI,k   = Σ_t ReLU(I(t) − I(t−1)) · M_t,  I(t) = mean_j log p(g_j | h_t)        (Eqs. 2–3)
    S_cons,k = Σ_{j≠k} A_jk,  A = mean_h softmax_j(q_i·k_j / √d_h) of the last layer  (Eqs. 4–5)
    α(x)     = softmax((β₁ z(S_MI) + β₂ z(S_cons) − β₃ z(S_PPL)) / τ),  detached      (Eq. 7)
    L_x      = Σ_k α_k (L_SFT,k + λ Σ_{j≠k} α_j KL(P_k ‖ P_j))                        (Eqs. 9–11)

and the step's loss is Σ_x L_x / (problems in the step, over every process).  §3.4: one backward pass
on the weighted loss — not per-teacher branches plus a merge.

Readings where the paper is silent (``../shared/specs/compact.md``, its corrections win):
1. I(t) is the LM head on h_t read from the training logits (no answer-probe passes); g = the gold
   answer's *content* tokens (digits, letters, signs) tokenised inside ``\\boxed{…}``, shared by the K′
   traces of a problem.
2. Reasoning positions t = 1..T_k are the completion tokens before the final-answer clause (``</think>``,
   else the line holding the last ``\\boxed``), t = 0 the last prompt token; so the answer-copy spike
   is not counted.  S_PPL averages NLL over the same tokens (never the SFT loss).
3. M_t = 1 where the *next* token c_{t+1} starts a thinking word (the state that emits it, as MI-Peaks
   records it), ε elsewhere; words and ε configurable (``compact.thinking_words``, ``compact.epsilon``).
   The lab's traces have no such words: its config sets ε = 1.
4. v_k = the last decoder layer's input at EOS through its ``input_layernorm``; the layer's own
   ``q_proj``/``k_proj`` (+ ``q_norm``/``k_norm`` where present), per head, GQA by repeating kv heads,
   no RoPE, scale √d_h, softmax over all j (self included), incoming off-diagonal weight; computed
   with the attention module in eval mode (no dropout noise in the scores).
5. z-scores across a problem's K′ traces, population std, 0 when degenerate; K′ = 1 → α = 1, no MCon.
6. L_SFT,k is the per-trace mean NLL (departure from Eq. 8's token sum, which would let a long trace
   outweigh its α; ``compact.sft_norm: token-sum`` restores the paper).  Logged in the result.
7. MCon compares the answer spans (content of the last ``\\boxed{}``) of two traces only when their
   token ids are identical; other pairs are skipped and the skip rate logged.  Gradient flows through
   both distributions (as MCC-KD).  Defaults where the paper gives none: β = (1, 1, 1), τ = 1,
   λ = 0.1 (MCC-KD's), ε = 0.1.
8. ``train.batch_size`` counts traces (4 teachers × 4 problems = 16), so COMPACT's compute matches
   STD/MTD/MoT at equal steps (T × S, a checkpoint every S).  Rows without a problem id (replay) are
   groups of one.  In multi-process runs whole problems go to processes; the logged metrics are
   rank 0's.
9. The paper's 497 vs 200 problems and Table 1's OOD training sets do not affect the method.
10. Speed (issue 13): batches may be packed (``batch["where"]`` maps each trace's tokens) and a problem-grouped
    micro-batch is cut into length buckets, one forward each, the per-trace terms computed once over every bucket;
    with ``train.chunked_loss`` (default on CUDA) the head is read from the final hidden states — per-token NLL
    through ``LinearTokenNLL``, the gold and next-token logits as dot products, full rows only at answer spans —
    so no [tokens, V] tensor exists.  Every path gives the same loss, scores and gradients (tests).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections import Counter
from typing import NamedTuple

import torch

from accord.config import THINKING_WORDS, AccordConfig
from accord.prompts import THINK_CLOSE, last_boxed_span, training_target
from accord.train.common import (
    barrier,
    engine_args,
    is_main,
    load_student,
    read_result,
    save_model,
    step_checkpoints,
    teacher_corpora,
    work_dir,
    write_result,
)
from accord.train.engine import (
    IGNORE,
    capture_input,
    chat_head,
    final_states,
    flat_positions,
    flat_token_nll,
    grouped_batches,
    model_inputs,
    output_states,
    train,
    use_chunked,
)
from accord.train.sharded import fsdp_launch, sharded, whole
from accord.ui import progress

_CONTENT = re.compile(r"[0-9A-Za-z+\-]")


# --------------------------------------------------------------------------- encoding a trace


def answer_clause(text: str) -> int:
    """Where the final-answer clause starts: ``</think>``, else the line of the last ``\\boxed``, else the end."""
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        return close
    b = text.rfind("\\boxed")
    return text.rfind("\n", 0, b) + 1 if b >= 0 else len(text)


def gold_ids(tok, answer: str) -> list[int]:
    """The gold answer's content tokens, tokenised in ``\\boxed{}`` context (format tokens dropped)."""
    text = "\\boxed{" + str(answer) + "}"
    s0, e0 = 7, 7 + len(str(answer))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [i for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])
           if s < e0 and e > s0 and _CONTENT.search(text[max(s, s0):min(e, e0)])]
    return ids or tok(str(answer), add_special_tokens=False)["input_ids"]


def encode_trace(tok, row: dict, max_len: int, *, group, teacher: str, words=THINKING_WORDS,
                 epsilon: float = 0.1, template_kwargs: dict | None = None) -> dict:
    """One trace as an engine example with what COMPACT reads: prompt length, reasoning length, the
    thinking mask, the answer-span positions and ids, the gold ids and the EOS index."""
    msgs = row["messages"]
    head = chat_head(tok, msgs[:-1], template_kwargs)
    text = training_target(head, msgs[-1]["content"])
    h = tok(head, add_special_tokens=False)["input_ids"]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    t_ids, offs = enc["input_ids"], enc["offset_mapping"]
    P = len(h)
    ids = (h + t_ids + [tok.eos_token_id])[:max_len]
    labels = ([IGNORE] * P + t_ids + [tok.eos_token_id])[:max_len]
    room = max(0, len(ids) - P - 1)  # completion tokens that survived truncation (EOS aside)
    clause = answer_clause(text)
    T = min(room, sum(1 for s, _ in offs if s < clause))
    starts = set()
    if words:
        pat = re.compile(r"(?<![A-Za-z])(" + "|".join(map(re.escape, words)) + r")(?![A-Za-z])")
        for m in pat.finditer(text):
            starts.update(i for i, (s, e) in enumerate(offs) if s <= m.start() < e)
    mask = [1.0 if t in starts else epsilon for t in range(1, T + 1)]  # state t emits c_{t+1} (0-based t)
    span = last_boxed_span(text)
    span_pos = [P + i for i, (s, e) in enumerate(offs) if span and s < span[1] and e > span[0]] if span else []
    if span_pos and span_pos[-1] >= len(ids):
        span_pos = []
    return {"ids": ids, "labels": labels, "group": group, "teacher": teacher, "prompt_len": P, "reason_len": T,
            "think_mask": mask, "span": span_pos, "span_ids": [ids[p] for p in span_pos],
            "gold": gold_ids(tok, row["answer"]) if row.get("answer") not in (None, "") else [],
            "eos": len(ids) - 1}


# --------------------------------------------------------------------------- the scores (no grad)


def group_zscore(x: torch.Tensor, gid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """z-scores within each problem (``gid[i]`` = trace i's problem, ``n`` traces per problem): population std,
    0 for a problem of one trace or one whose std is below 1e-6."""
    G = n.shape[0]
    mean = torch.zeros(G, dtype=x.dtype).index_add_(0, gid, x) / n
    d = x - mean[gid]
    sd = (torch.zeros(G, dtype=x.dtype).index_add_(0, gid, d * d) / n).sqrt()
    ok = (n >= 2) & (sd >= 1e-6)
    return torch.where(ok[gid], d / (sd[gid] + 1e-6), torch.zeros_like(x))


def group_alphas(gid: torch.Tensor, s_mi, s_cons, s_ppl, beta=(1.0, 1.0, 1.0), tau: float = 1.0):
    """Eq. 7 for every problem of a micro-batch at once: α = softmax over each problem's traces of
    (β₁ z(S_MI) + β₂ z(S_cons) − β₃ z(S_PPL)) / τ; returns (α, score) per trace (α = 1 for a lone trace).  In
    float32 whatever the scores came in (under bf16 autocast a score can arrive in bf16)."""
    s_mi, s_cons, s_ppl = (s.float() for s in (s_mi, s_cons, s_ppl))
    n = torch.bincount(gid).to(torch.float32)
    score = (beta[0] * group_zscore(s_mi, gid, n) + beta[1] * group_zscore(s_cons, gid, n)
             - beta[2] * group_zscore(s_ppl, gid, n))
    logit = score / tau
    top = torch.full((n.shape[0],), -math.inf, dtype=logit.dtype).scatter_reduce(0, gid, logit, "amax")
    e = (logit - top[gid]).exp()
    return e / torch.zeros_like(top).index_add_(0, gid, e)[gid], score


def consensus(q: torch.Tensor, k: torch.Tensor, self_loop: bool = True,
              gid: torch.Tensor | None = None) -> torch.Tensor:
    """Eqs. 4–5: q [N, H, d], k [N, H_kv, d] → S_cons [N] (incoming off-diagonal weight).  ``gid`` [N]: each
    trace's problem — every problem of a micro-batch at once, a trace attending only to its own problem's
    traces (one block-masked softmax instead of a loop over problems); None: one problem.  A trace alone in
    its problem scores 0."""
    N, H, d = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)  # GQA: each kv head serves H / H_kv query heads
    with torch.autocast(q.device.type, enabled=False):  # a score: float32 under the training's bf16 autocast too
        s = torch.einsum("ihd,jhd->hij", q.float(), k.float()) / math.sqrt(d)
        eye = torch.eye(N, dtype=torch.bool, device=s.device)
        off = (gid[:, None] != gid[None, :]) if gid is not None else torch.zeros_like(eye)
        s = s.masked_fill(off | (eye if not self_loop else torch.zeros_like(eye)), float("-inf"))
        A = torch.softmax(s, -1).nan_to_num(0.0).mean(0)  # [N, N], rows i, columns j; a row with no partner: 0
        return A.sum(0) - A.diagonal()


def last_decoder_layer(model):
    """The last transformer block, through DDP and PEFT wrappers."""
    m = getattr(model, "module", model)
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    try:
        return m.get_decoder().layers[-1]
    except AttributeError:
        raise ValueError(f"COMPACT's consensus score needs the last decoder layer's q/k projections, which "
                         f"{type(m).__name__} does not expose; set compact.scores without 'cons'") from None


@torch.no_grad()
def _qk(layer, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    attn = layer.self_attn
    was = attn.training
    attn.eval()  # no dropout noise (LoRA) in the scores
    try:
        with whole(layer):  # FSDP: the layer's weights gathered for this, outside its forward (train/sharded.py)
            v = layer.input_layernorm(v)
            d = getattr(attn, "head_dim", None) or attn.q_proj.out_features // attn.config.num_attention_heads
            q = attn.q_proj(v).view(v.shape[0], -1, d)
            k = attn.k_proj(v).view(v.shape[0], -1, d)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
    finally:
        attn.train(was)
    return q, k


# --------------------------------------------------------------------------- the loss


def make_loss_fn(c, chunked: bool | None = False):
    """The engine ``loss_fn`` for ``compact`` settings ``c`` (a ``CompactConfig``); ``chunked`` (``train.chunked_loss``;
    None: on CUDA) reads the head from the hidden states in chunks, never the full logits."""
    use = set(c.scores)
    beta = tuple(b if name in use else 0.0 for b, name in zip(c.beta, ("mi", "cons", "ppl")))

    def loss_fn(model, b: dict, n_units: int):
        meta = b["meta"]
        layer = last_decoder_layer(model) if "cons" in use else None
        parts, index = (b["parts"], b["index"]) if "parts" in b else ([b], [list(range(len(meta)))])
        chunk = use_chunked(chunked, parts[0]["input_ids"].device, model)
        t = _trace_terms(model, parts, index, meta, layer, c, "mi" in use, chunk)
        per, s_ppl, s_mi = t["per"], t["s_ppl"], t["s_mi"]
        groups: dict = {}
        for i, m in enumerate(meta):
            groups.setdefault(m["group"], []).append(i)
        gid = torch.empty(len(meta), dtype=torch.long)
        for k, g in enumerate(groups.values()):
            gid[g] = k
        s_cons, several = torch.zeros(len(meta)), any(len(g) > 1 for g in groups.values())
        if layer is not None and (several or sharded(layer)):  # sharded: gathering the layer is collective, so
            with torch.no_grad():  # every process gathers it, whatever its own micro-batch holds
                q, k = _qk(layer, t["eos_state"])
                if several:
                    s_cons = consensus(q, k, c.consensus_self == "include", gid.to(q.device)).cpu()
        a, score = group_alphas(gid, s_mi, s_cons, s_ppl, beta, c.tau)
        a_dev = a.to(per.device)
        total = (a_dev * per).sum()
        stats = {"pairs": 0, "skipped": 0, "mcon": 0.0}
        if c.mcon_weight:
            stats["pairs"] = sum(len(g) * (len(g) - 1) for g in groups.values())
            total = total + c.mcon_weight * (a_dev * mcon(t["spans"], meta, gid, a_dev, stats)).sum()
        return total / n_units, _metrics(meta, a, score, s_mi, s_cons, s_ppl, stats, groups)

    return loss_fn


class _Head:
    """The LM head at the flat rows COMPACT reads (every bucket's rows end to end): from the buckets' full logits
    (kept apart — joining them would copy every logit and its gradient), or — ``chunked`` (issue 13: no
    [tokens, V] tensor) — formed from the final hidden states and the head's weight, only for the rows asked
    for, the per-token NLL through :class:`LinearTokenNLL`."""

    def __init__(self, logits: list[torch.Tensor] | None = None, h=None, weight=None):
        self.parts, self.h, self.w = logits, h, weight  # [[N_k, V], …], or [N, d] and [V, d]
        self.starts = [0] if logits is None else [0, *itertools.accumulate(x.shape[0] for x in logits)][:-1]

    def _split(self, rows: torch.Tensor):
        """Per bucket: its logits, which of ``rows`` fall in it, and their rows inside it."""
        for x, o in zip(self.parts, self.starts):
            m = (rows >= o) & (rows < o + x.shape[0])
            yield x, m, rows[m] - o

    def token_nll(self, targets: torch.Tensor) -> torch.Tensor:
        """[N] float32 NLL of ``targets[q]`` (the token each flat row predicts; IGNORE: none, NLL 0)."""
        if self.parts is not None:
            out = [torch.nn.functional.cross_entropy(x.float(), targets[o:o + x.shape[0]], ignore_index=IGNORE,
                                                     reduction="none") for x, o in zip(self.parts, self.starts)]
            return out[0] if len(out) == 1 else torch.cat(out)
        return flat_token_nll(self.h, self.w, targets)

    @torch.no_grad()
    def pair(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logit of token ``ids[i]`` at flat row ``rows[i]`` (same shapes)."""
        if self.parts is None:
            return (self.h[rows].float() * self.w[ids].float()).sum(-1)
        out = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
        for x, m, r in self._split(rows):
            out[m] = x[r, ids[m]].float()
        return out

    @torch.no_grad()
    def gold(self, rows: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """[B, L, G]: the logits of example b's gold ids at each of its rows ``rows`` [B, L]."""
        if self.parts is None:
            return torch.einsum("bld,bgd->blg", self.h[rows].float(), self.w[gold].float())
        out = torch.empty(*rows.shape, gold.shape[1], dtype=torch.float32, device=rows.device)
        g = gold[:, None, :].expand(*rows.shape, gold.shape[1])
        for x, m, r in self._split(rows):
            out[m] = x[r[:, None], g[m]].float()
        return out

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of a few flat rows (1-D, with gradient)."""
        if self.parts is None:
            return self.h[rows] @ self.w.to(self.h.dtype).T
        if len(self.parts) == 1:
            return self.parts[0].index_select(0, rows)
        pieces, at = zip(*((x[r], m.nonzero().squeeze(1)) for x, m, r in self._split(rows)))
        return torch.cat(pieces)[torch.argsort(torch.cat(at))]


def _trace_terms(model, parts: list[dict], index: list[list[int]], meta: list[dict], layer, c, want_mi: bool,
                 chunked: bool) -> dict:
    """One forward per length bucket (padded or packed; ``index[k]``: bucket k's examples in the micro-batch), then
    what COMPACT needs of each trace, computed once over every bucket's rows laid end to end (``where`` [B, L]:
    example i's token t among them, in micro-batch order, as ``meta``): its SFT term ``per`` (with gradient),
    S_PPL and S_MI (no gradient), the answer-span log-probabilities (with gradient, for MCon) and the last
    layer's input at EOS (for S_cons)."""
    B = len(meta)
    rows, eos_rows, ids, targets, wheres, off = [], [], [], [], [], 0
    for b in parts:
        with capture_input(layer) if layer is not None else contextlib.nullcontext({}) as cap:
            if chunked:
                x = final_states(model, b)
            else:
                x = model(**model_inputs(b)).logits  # [R, W, V]: padded rows, or packed ones
        rows.append(x.reshape(-1, x.shape[-1]))
        if layer is not None:
            eos_rows.append(cap["x"].reshape(-1, cap["x"].shape[-1]))
        ids.append(b["input_ids"].reshape(-1))
        # the token each row predicts: the next label of its row (a packed example's first label is ignored)
        targets.append(torch.nn.functional.pad(b["labels"][:, 1:], (0, 1), value=IGNORE).reshape(-1))
        w = flat_positions(b)
        wheres.append(torch.where(w >= 0, w + off, w))
        off += rows[-1].shape[0]
    targets = _cat(targets)
    head = _Head(h=_cat(rows), weight=output_states(model).weight) if chunked else _Head(logits=rows)
    where = _in_batch_order(wheres, index, B)  # [B, L]: example i's token t among the flat rows; −1 past its end
    at, inside = where.clamp(min=0), where >= 0
    prev = at[:, :-1]  # the row that predicts token t = 1..L−1
    nll_at = head.token_nll(targets)
    # [B, L]: NLL of token t, 0 at t = 0 (index_select: its backward adds, where x[idx]'s sorts to accumulate)
    nll = torch.nn.functional.pad(nll_at.index_select(0, prev.reshape(-1)).view(prev.shape) * inside[:, :-1], (1, 0))
    n_tgt = ((targets[prev] != IGNORE) & inside[:, :-1]).sum(1)
    per = nll.sum(1) if c.sft_norm == "token-sum" else nll.sum(1) / n_tgt.clamp(min=1)
    with torch.no_grad():
        s_ppl, s_mi = _ppl_mi(head, where, nll.detach(), _cat(ids)[at] * inside, meta, c.mi_reduce, want_mi)
        eos = _cat(eos_rows)[at[torch.arange(B), torch.tensor([m["eos"] for m in meta])]] if layer is not None \
            else None
    return {"per": per, "s_ppl": s_ppl, "s_mi": s_mi, "eos_state": eos,
            "spans": span_logprobs(head, where, meta) if c.mcon_weight else None}


def _cat(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs)


def _in_batch_order(wheres: list[torch.Tensor], index: list[list[int]], B: int) -> torch.Tensor:
    """Each bucket's [B_k, L_k] flat positions as [B, L_max] in micro-batch order (−1 past each example's end)."""
    if len(wheres) == 1:
        return wheres[0]
    out = torch.full((B, max(w.shape[1] for w in wheres)), -1, dtype=torch.long, device=wheres[0].device)
    for w, ix in zip(wheres, index):
        out[torch.tensor(ix, device=w.device), :w.shape[1]] = w
    return out


def _ppl_mi(head: _Head, where, nll, ids, meta, reduce: str, want_mi: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """S_PPL and S_MI for every example at once (``head`` the LM head's outputs, ``where`` [B, L] each example's
    token positions in them).  The log-normaliser at each state comes from the SFT loss itself
    (lse = NLL of the next token + its logit), so S_MI costs a gather, not another pass over V."""
    B, L = ids.shape
    dev = where.device
    at = where.clamp(min=0)  # past an example's end: any valid row, masked below
    P = torch.tensor([m["prompt_len"] for m in meta], device=dev)
    T = torch.tensor([m["reason_len"] for m in meta], device=dev)
    pos = torch.arange(L, device=dev)[None]
    reason = (pos >= P[:, None]) & (pos < (P + T)[:, None])  # tokens c_1..c_T
    s_ppl = ((nll * reason).sum(1) / reason.sum(1).clamp(min=1)).float().cpu()
    if not want_mi:
        return s_ppl, torch.zeros(B)
    nxt = ids[:, 1:]
    lse = torch.zeros(B, L, device=dev)
    lse[:, :-1] = nll[:, 1:] + head.pair(at[:, :-1], nxt)  # state s → token s+1
    G = max((len(m["gold"]) for m in meta), default=0)
    if G == 0:
        return s_ppl, torch.zeros(B)
    # per-example lists padded in Python and made tensors in one call each (a tensor per example costs more)
    gold = torch.tensor([m["gold"] + [0] * (G - len(m["gold"])) for m in meta], device=dev)
    gmask = torch.tensor([[1.0] * len(m["gold"]) + [0.0] * (G - len(m["gold"])) for m in meta], device=dev)
    glp = head.gold(at, gold)  # [B, L, G]
    curve = (glp * gmask[:, None]).sum(-1) / gmask.sum(-1).clamp(min=1)[:, None] - lse  # I at every state
    states = (pos >= (P - 1)[:, None]) & (pos < (P + T)[:, None])  # t = 0..T
    gain = torch.relu(curve[:, 1:] - curve[:, :-1]) * (states[:, 1:] & states[:, :-1])  # ΔI at t = 1..T
    M = torch.tensor([_think_row(m, L - 1) for m in meta], device=dev)  # [B, L − 1]: M at states t = 1..T
    s_mi = (gain * M).sum(1)
    if reduce == "mean":
        s_mi = s_mi / T.clamp(min=1)
    has_gold = gmask.sum(1) > 0
    return s_ppl, (s_mi * has_gold).float().cpu()


def _think_row(m: dict, width: int) -> list[float]:
    """One trace's thinking mask M_t placed at its states' positions (``prompt_len − 1`` onwards), 0 elsewhere."""
    before = [0.0] * (m["prompt_len"] - 1) if m["reason_len"] else []
    row = before + (m["think_mask"][:m["reason_len"]] if m["reason_len"] else [])
    return row[:width] + [0.0] * (width - len(row))


def _metrics(meta, a, score, s_mi, s_cons, s_ppl, stats, groups) -> dict:
    """Per-teacher means over the micro-batch's problems that *are* weighted (K′ ≥ 2; groups of one — replay
    rows, single-trace problems — have α = 1 by construction, their scores unused, a lone trace's S_cons 0):
    ``alpha/<teacher>`` is each teacher's share of the weight, so the shares sum to 1 (COMPACT Fig. 3), and
    ``score``/``s_*`` the means of the scores that set it."""
    multi = {i for g in groups.values() if len(g) > 1 for i in g}
    n_prob = sum(1 for g in groups.values() if len(g) > 1)
    cols = [t.tolist() for t in (a, score, s_mi, s_cons, s_ppl)]
    by: dict[str, list[int]] = {}
    for i, m in enumerate(meta):
        by.setdefault(m["teacher"], []).append(i)
    out = {f"alpha/{t}": sum(cols[0][i] for i in ix if i in multi) / n_prob for t, ix in by.items()
           if n_prob and any(i in multi for i in ix)}
    for name, col in (("score", 1), ("s_mi", 2), ("s_cons", 3), ("s_ppl", 4)):
        out.update({f"{name}/{t}": sum(cols[col][i] for i in ix if i in multi) / sum(i in multi for i in ix)
                    for t, ix in by.items() if any(i in multi for i in ix)})
    out["mcon"] = stats["mcon"] / max(1, stats["pairs"] - stats["skipped"])
    out["mcon_skip"] = stats["skipped"] / max(1, stats["pairs"])
    for g in groups.values():
        out[f"kprime/{len(g)}"] = out.get(f"kprime/{len(g)}", 0) + 1
    return out


class SpanLogprobs(NamedTuple):
    """The answer-span log-probabilities of a micro-batch: ``lp`` [rows, V] (float32, with gradient) and, per
    example i with a span, ``at[i] = (first row, span length)``."""
    lp: torch.Tensor
    at: dict[int, tuple[int, int]]


def span_logprobs(head: _Head, where, meta) -> SpanLogprobs | None:
    """The log-probabilities of the states that emit each example's answer-span tokens, all read by *one*
    index into the logits: each indexing op's backward writes a logits-sized gradient buffer, so one per trace
    would cost more than the whole loss.  None when no example has a span."""
    rows = [(i, p - 1) for i, m in enumerate(meta) for p in m["span"]]
    if not rows:
        return None
    at = where[torch.tensor([r for r, _ in rows]), torch.tensor([t for _, t in rows])]
    starts, o = {}, 0
    for i, m in enumerate(meta):
        if m["span"]:
            starts[i], o = (o, len(m["span"])), o + len(m["span"])
    return SpanLogprobs(torch.log_softmax(head.rows(at).float(), -1), starts)


def mcon(spans: SpanLogprobs | None, meta, gid: torch.Tensor, a: torch.Tensor, stats: dict) -> torch.Tensor:
    """L_MCon,k = Σ_{j≠k} α_j KL(P_k ‖ P_j) over answer-span positions (Eq. 9) for every trace of a micro-batch
    (``spans`` from :func:`span_logprobs`; j ranges over the traces of k's problem).  Pairs whose span ids
    differ are skipped and counted (``stats``: pairs, skipped, Σ KL).  Every matched pair's positions are
    read from the flat rows by one index each side — no per-trace slices or padding in the graph."""
    by: dict[tuple, list[int]] = {}
    for i, m in enumerate(meta):
        if spans is not None and i in spans.at:
            by.setdefault((int(gid[i]), tuple(m["span_ids"])), []).append(i)
    pairs = [(i, j) for members in by.values() for i in members for j in members if i != j]
    stats["skipped"] += stats["pairs"] - len(pairs)
    out = torch.zeros(len(meta), device=a.device)
    if not pairs:
        return out
    rows_i, rows_j, owner_row = [], [], []
    for p, (i, j) in enumerate(pairs):  # same span ids, so the same span length
        (si, m), (sj, _) = spans.at[i], spans.at[j]
        rows_i += range(si, si + m)
        rows_j += range(sj, sj + m)
        owner_row += [p] * m
    dev = spans.lp.device
    lp_i, lp_j = (spans.lp.index_select(0, torch.tensor(r, device=dev)) for r in (rows_i, rows_j))
    per_row = (lp_i.exp() * (lp_i - lp_j)).sum(-1)  # KL(k‖j) at each span position
    length = torch.tensor([spans.at[i][1] for i, _ in pairs], device=dev, dtype=per_row.dtype)
    kl = torch.zeros(len(pairs), device=dev).index_add(0, torch.tensor(owner_row, device=dev), per_row) / length
    stats["mcon"] += float(kl.detach().sum())
    owner = torch.tensor([i for i, _ in pairs], device=out.device)
    other = torch.tensor([j for _, j in pairs], device=a.device)
    return out.index_add(0, owner, a[other] * kl)


def count_problems(examples: list) -> int:
    return len({e["group"] for e in examples})


# --------------------------------------------------------------------------- the recipe


def plan(cfg: AccordConfig, _arg: str = "") -> list[tuple[str, str, str]]:
    return [("compact", "compact", f"{cfg.train.rounds * cfg.train.steps_per_round} steps")]


def run(cfg: AccordConfig, console) -> list[dict]:
    if (done := read_result(cfg, "compact", console)) is not None:
        return [done]
    c = cfg.compact
    if not set(c.scores):
        console.print("compact: every score is off: this is the paper's \"Direct Avg.\" (α = 1/K′)")
    corpora = teacher_corpora(cfg, console)
    model, tok = load_student(cfg)
    examples = []
    for t, rows in corpora.items():
        for i, r in enumerate(rows):
            pid = r.get("problem_id")  # replay rows have none: a group of one, logged as "replay"
            examples.append(encode_trace(tok, r, cfg.train.max_len, group=pid or f"{t}-row-{i}",
                                         teacher=t if pid else "replay",
                                         words=c.thinking_words, epsilon=c.epsilon,
                                         template_kwargs=cfg.student.chat_template_kwargs))
    sizes = dict(Counter(Counter(e["group"] for e in examples).values()))
    console.print("compact: problems by number of traces K′: "
                  + ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items())))
    chunked = use_chunked(cfg.train.chunked_loss, None, model) and not fsdp_launch()  # FSDP: the engine's first line
    console.print("compact: the head " + ("in chunks from the hidden states (no full-vocabulary logits)"
                                          if chunked else "over full-vocabulary logits"))
    T, S, out = cfg.train.rounds, cfg.train.steps_per_round, work_dir(cfg, "compact", "compact", list(corpora))
    args = engine_args(cfg, T * S, checkpoint_every=S)
    with progress(console) as bar:
        task = bar.add_task("compact", total=T * S)
        res = train(model, tok, [], args, out_dir=out, examples=examples, batcher=grouped_batches,
                    loss_fn=make_loss_fn(c, cfg.train.chunked_loss), units_fn=count_problems,
                    on_step=lambda s, loss: bar.update(task, completed=s + 1, description=f"compact loss {loss:.3f}"))
    final = out / "final"
    if is_main():
        save_model(res.model, tok, final)
    barrier()
    curve = [p for p in step_checkpoints(out) if p["steps"] < T * S] + [{"steps": T * S, "path": str(final)}]
    return [write_result(cfg, "compact", method="compact", final=str(final), last=str(final), curve=curve,
                         branch_steps=T * S, teachers=list(corpora), examples=len(examples),
                         problems_by_kprime=sizes, settings=c.model_dump(mode="json"),
                         resumed_from=res.resumed_from)]

