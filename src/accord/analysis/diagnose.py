"""Teacher diagnostics before training: which teacher's traces fit the student (``specs/diagnostics.md`` §6).

``accord diagnose CONFIG`` reads every teacher's verified corpus (``<run_dir>/corpora/<teacher>.jsonl``, as
collected) and the student *before* training (θ0), and says per teacher — before a single step is paid for —
how the student sees its traces and how the teachers write.  Nobody else offers this: the multi-teacher
trainers weight teachers by fixed ratios or metadata keys, never by the student (the spec's §5).

What is computed (the spec's items 1–6; item 7, post-training drift, is ``accord drift``: :mod:`accord.analysis.drift`):

1. **Compatibility** (item 1; COMPACT's S_PPL; the Rank-Surprisal Ratio of Yang et al. 2026, arXiv 2601.14249).
   For every completion token y_t of a trace, ℓ_t = log p_θ0(y_t | x, y_<t) and its rank
   1 + #{v : logit_v > logit_{y_t}}.  Per trace: NLL = −mean ℓ_t; the surprise rate, the share of tokens with
   −ℓ_t > κ (κ = 5 nats); the mean rank clipped at 100 (the public RSR code's clip, which keeps one
   astronomically unlikely token from dominating); RSR = Σ clip(rank_t) / Σ −ℓ_t (lower: informative yet
   aligned).  Per teacher: median and interquartile range of the trace NLLs, mean ± SE of each score over its
   problems, and the dataset RSR as the paper aggregates it (mean of the traces' mean ranks over the mean of
   their mean surprisals).  **Paired** differences of NLL on the problems two teachers share,
   Δ_{k,k'} = mean_i (NLL_{k,i} − NLL_{k',i}) ± SE, which cancel the problems' difficulty.  Step-level
   incompatibility: the highest 64-token window-mean NLL of a trace (the whole trace when shorter), mean ± SE.
   And COMPACT's own view at θ0 (the spec's "which teacher COMPACT would favour on day one"): its loss function,
   with the run's ``compact:`` settings, over the shared problems four at a time, no step taken — each
   teacher's share of α and its mean S_MI, S_cons, S_PPL (:func:`compact_view`).  On the lab COMPACT gives
   ``verbose`` 0.60 of the weight although the student finds it the least likely: S_MI and S_cons outvote
   S_PPL.
2. **Style signatures** (item 2): completion length in student tokens (mean, p50, p90), lines, and per 100
   words the rates of thinking words (COMPACT's list, ``config.THINKING_WORDS``), hedges (maybe, perhaps,
   probably, I think, not sure) and verification (check, verify, double-check, substitute back).  How far apart
   the teachers write: the Jensen–Shannon divergence (bits) between every two teachers' word-bigram
   distributions, add-δ smoothed over the union of their bigrams (:func:`style_distance`; δ = 0.01, only to keep
   the logs finite).  How strong each signature is: the cross-validated accuracy of a multinomial logistic
   regression telling the teacher from a trace's hashed word unigrams and bigrams, beside chance 1/K
   (:func:`signature_strength`; the folds hold out whole problems, so it reads style, not the problem).
3. **Length vs difficulty** (item 3): where the corpus rows carry a ``level`` (the lab's hop count; reading
   (b)), the Spearman correlation of trace length with it per teacher; and, from the trace store, with reading
   (a), the failure rate over every teacher's samples of the problem (:func:`verdict_view`) — and per split
   where the store's problems carry several (the spec's in distribution / OOD) — beside the mean
   length of each teacher's right and wrong traces.
4. **Step-level vs global confidence** (item 4), from the trace store — every sample, right or wrong, on the
   first problems every teacher attempted (the corpora hold only verified traces, and problems every teacher
   got right hold no wrong ones): the AUROC at telling right from wrong of the student's global mean ℓ_t and
   its lowest 64-token window mean (:func:`analysis.confidence.window_confidence`, item 1's w = 64), and of the
   teacher's own ``mean_logprob`` / ``min_window_logprob`` where its backend returned log-probs; two more
   student scores, the lowest mean over the trace's lines (steps, :func:`step_confidence`) and the mean over
   its last 64 tokens (tail).  The retention curve (:func:`retention`): the accuracy of the most confident
   90/80/70/50% and the score that keeps them, by the teacher's window score where every sample has one (its
   threshold is a ``min_window_logprob``), else the student's.  AUROC is the
   Mann–Whitney probability, ties ½.
5. **Local-pattern seams** (item 5): the share of a teacher's token-trigram occurrences (the student tokens
   item 1 scores: completion and EOS) whose trigram no other teacher writes (:func:`novelty`).
6. **Ordering hint** (item 6): teachers ranked by mean NLL (most compatible first); a teacher whose mean NLL
   is more than 2 standard deviations above the *other* teachers' means is flagged (needs ≥ 3 teachers).  The
   z is leave-one-out: over all K means, including the outlier's own, no z can exceed (K − 1)/√K — 1.5 for
   four teachers — so the spec's "z > 2" could never fire.  On the lab it is ``verbose`` (its wordier steps
   cost the base student +0.77 ± 0.05 nats a token over ``terse``), not ``shifted``, that stands out.

Choices where the spec is silent:

- Which traces: the problems every teacher has (so the paired differences and the per-teacher means are over
  the same problems), the first ``--problems`` of them by id (default 200); a teacher's several samples of one
  problem are averaged into one value per problem (problems are the unit, as in ``analysis.stats``).  When the
  teachers share no problem, each teacher's first problems are used and the paired table is empty.
- Tokens scored: the training labels (:func:`engine.encode_example`: the completion and EOS, never the
  prompt), so the NLL is exactly the one SFT would start from.  The forward runs under ``no_grad`` in batches of
  16 padded rows; ranks are counted against the full-vocabulary logits of the scored positions only, formed from
  the final hidden states ``CHUNK`` positions at a time where the head is h W^T (``engine.chunkable_head``), so a
  batch of long traces never holds its [rows, length, vocabulary] logits (issue 13's rule, at a 152k vocabulary
  16 × 4,096 positions would be 20 GB in bf16).
- Written to ``<run_dir>/analysis/teachers.json``; the report shows its table when it exists.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import re
import statistics
from pathlib import Path

import torch

from accord.analysis.confidence import window_confidence
from accord.analysis.stats import mean_se
from accord.config import THINKING_WORDS
from accord.errors import UsageError
from accord.models import pick_device
from accord.train.engine import (
    IGNORE,
    chunk_rows,
    chunkable_head,
    collate,
    collate_grouped,
    encode_example,
    final_states,
    model_inputs,
    output_states,
    to_device,
)
from accord.ui import progress

KAPPA = 5.0  # nats: a token the student finds this surprising counts as a surprise (spec item 1)
RANK_CLIP = 100
CHUNK = 4096  # scored positions whose logits exist at once (head_scores)
WINDOW = 64  # tokens: the step-level window of the spec's item 1 (the student's window-mean ℓ)
HEDGES = ("maybe", "perhaps", "probably", "i think", "not sure")
CHECKS = ("check", "verify", "double-check", "substitute back")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
JS_DELTA = 0.01  # add-δ smoothing of the word-bigram counts (item 2's style distance): small, only to keep logs
# finite — the union of bigrams grows with the corpora, so a δ near 1 would put a size-dependent floor under JS
SIG_DIM = 1 << 14  # hashed n-gram buckets of the teacher-identity classifier (item 2's signature strength)
SIG_FOLDS = 5
KEEP = (1.0, 0.9, 0.8, 0.7, 0.5)  # shares kept by confidence in item 4's retention-vs-accuracy curve
STUDENT_ROW = "student (θ0)"  # the student's own outputs' row of the style distances (``--student-samples``)


def token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(−ℓ_t, rank_t) of each target under ``logits`` [N, V] (float32; rank 1 = the most probable token,
    ties with the target not counted, unclipped)."""
    lg = logits.float()
    tgt = lg.gather(1, targets[:, None])
    nll = torch.logsumexp(lg, -1) - tgt[:, 0]
    return nll, 1 + (lg > tgt).sum(-1)


def head_scores(x: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor, chunk: int = CHUNK
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_scores` of ``targets`` from ``x``: logits [N, V] (``weight`` None), or final hidden states
    [N, d] with the head's ``weight`` [V, d], the logits formed ``chunk`` rows at a time."""
    if weight is None:
        return token_scores(x, targets)
    w = weight.to(x.dtype)
    chunk = chunk_rows(w.shape[0], chunk)  # as the training head: a bounded number of logits at once
    parts = [token_scores(x[a:a + chunk] @ w.T, targets[a:a + chunk]) for a in range(0, x.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def trace_scores(nll: torch.Tensor, rank: torch.Tensor, kappa: float = KAPPA, clip: int = RANK_CLIP) -> dict:
    """One trace's NLL (mean −ℓ_t), surprise rate, mean clipped rank and RSR from its tokens' −ℓ_t and ranks."""
    r = rank.clamp(max=clip).float()
    return {"nll": float(nll.mean()), "surprise": float((nll > kappa).float().mean()), "rank": float(r.mean()),
            "rsr": float(r.sum() / nll.sum().clamp(min=1e-12))}


def ends_line(tok, token_id: int, seen: dict) -> bool:
    """Whether a token's text holds a line break (a step ends there); ``seen`` caches the answer per id."""
    if token_id not in seen:
        seen[token_id] = "\n" in tok.decode([token_id])
    return seen[token_id]


def step_confidence(lp: list[float], ends: list[bool]) -> float | None:
    """Item 4's per-step score: the lowest mean ℓ_t over the trace's steps, a step being the tokens up to and
    including one that ends a line (the last step: whatever follows the last line break)."""
    steps, cur = [], []
    for x, e in zip(lp, ends):
        cur.append(x)
        if e:
            steps.append(cur)
            cur = []
    if cur:
        steps.append(cur)
    return min(sum(s) / len(s) for s in steps) if steps else None


@torch.no_grad()
def score_traces(model, tok, rows: list[dict], max_len: int, batch: int = 16, on_batch=None,
                 window: int = WINDOW, template_kwargs: dict | None = None) -> list[dict]:
    """:func:`trace_scores` of every row's completion under ``model`` (the student at θ0), its token count and
    the student's confidence in it: the global mean ℓ_t and the lowest ``window``-token mean
    (:func:`analysis.confidence.window_confidence`)."""
    model.eval()
    out, seen = [], {}
    dev = next(model.parameters()).device
    weight = output_states(model).weight if chunkable_head(model) else None
    for s in range(0, len(rows), batch):
        ex = [encode_example(tok, r, max_len, template_kwargs) for r in rows[s:s + batch]]
        b = collate(ex, tok.pad_token_id)
        b = to_device(b, dev)
        x = final_states(model, b) if weight is not None else model(**model_inputs(b)).logits
        tgt = b["labels"][:, 1:]
        for i in range(len(ex)):
            keep = tgt[i] != IGNORE
            if not keep.any():
                out.append({"nll": math.nan, "surprise": math.nan, "rank": math.nan, "rsr": math.nan, "tokens": 0,
                            "global": None, "window": None, "tail": None, "step": None, "ids": []})
                continue
            nll, rank = head_scores(x[i, :-1][keep], weight, tgt[i][keep])
            lp, ids = (-nll).tolist(), tgt[i][keep].tolist()
            g, w = window_confidence(lp, window)
            out.append({**trace_scores(nll, rank), "tokens": int(keep.sum()), "global": g, "window": w,
                        "tail": sum(lp[-window:]) / len(lp[-window:]),
                        "step": step_confidence(lp, [ends_line(tok, t, seen) for t in ids]), "ids": ids})
        if on_batch:
            on_batch(len(ex))
    return out


@torch.no_grad()
def compact_view(cfg, model, tok, rows: dict[str, list[dict]], problems_per_batch: int = 4) -> dict[str, dict]:
    """COMPACT's weights and scores at θ0 (spec item 1: which teacher COMPACT would favour on day one): its own
    loss function (``cfg.compact``'s settings) over the problems every teacher answered, ``problems_per_batch``
    problems a micro-batch, no step taken.  Per teacher: its share of α (the shares sum to 1) and mean S_MI,
    S_cons, S_PPL, each averaged over problems."""
    from accord.train.compact import encode_trace, make_loss_fn

    c = cfg.compact
    by: dict = {}
    for t, rs in rows.items():
        for r in rs:
            if r.get("problem_id") is not None:
                by.setdefault(r["problem_id"], []).append(encode_trace(
                    tok, r, cfg.train.max_len, group=r["problem_id"], teacher=t, words=c.thinking_words,
                    epsilon=c.epsilon, template_kwargs=cfg.student.chat_template_kwargs))
    groups = [g for g in by.values() if len({e["teacher"] for e in g}) > 1]
    loss_fn = make_loss_fn(c, cfg.train.chunked_loss)
    dev = next(model.parameters()).device
    sums: dict = {}
    n = 0
    for s in range(0, len(groups), problems_per_batch):
        part = groups[s:s + problems_per_batch]
        b = collate_grouped([e for g in part for e in g], lambda x: collate(x, tok.pad_token_id))
        _, m = loss_fn(model, to_device(b, dev), len(part))
        for k, v in m.items():
            if k.split("/")[0] in ("alpha", "s_mi", "s_cons", "s_ppl"):
                sums[k] = sums.get(k, 0.0) + v * len(part)
        n += len(part)
    out: dict = {}
    for k, v in sums.items():
        name, t = k.split("/", 1)
        out.setdefault(t, {})[name] = v / max(1, n)
    return out


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """P(a positive's score > a negative's), ties counted ½ (the Mann–Whitney reading); None without both."""
    pos = sorted(x for x, y in zip(scores, positive) if y)
    neg = sorted(x for x, y in zip(scores, positive) if not y)
    if not pos or not neg:
        return None
    wins = sum(bisect.bisect_left(neg, x) + 0.5 * (bisect.bisect_right(neg, x) - bisect.bisect_left(neg, x))
               for x in pos)
    return wins / (len(pos) * len(neg))


def verdict_view(cfg, model, tok, n: int, batch: int = 16, on_batch=None) -> tuple[dict[str, dict], int]:
    """Items 4 and 3 (a) from the trace store — every sample, right or wrong, on the first ``n`` problems (by id)
    that every teacher attempted: per teacher its accuracy, the mean length (student tokens) of its correct and
    wrong traces, the AUROC at telling them apart of the student's global and window confidence and, where the
    backend stored them, of the teacher's own (``mean_logprob``, ``min_window_logprob``); and ρ(length,
    difficulty) with difficulty the failure rate over every teacher's samples of the problem.  Returns
    ({teacher: {…}}, problems); nothing when there is no store (an imported corpus without one)."""
    from accord.collect import corpus_row
    from accord.problems import Problem
    from accord.store import TraceStore
    from accord.verify import CORRECT, FAILED

    store = TraceStore.reader(Path(cfg.run_dir) / "traces.sqlite")
    if store is None:
        return {}, 0
    try:
        names = [t.name for t in cfg.teachers]
        rows = {t: [r for r in store.traces(t) if r["verdict"] != FAILED] for t in names}
        probs = {r["id"]: r for r in store.db.execute("SELECT id, question, answer, split, meta FROM problems")}
    finally:
        store.close()
    ids = [{r["problem_id"] for r in rs} for rs in rows.values() if rs]
    keep = set(sorted(set.intersection(*ids), key=str)[:n]) if ids else set()
    rows = {t: [r for r in rs if r["problem_id"] in keep] for t, rs in rows.items()}
    if not keep:
        return {}, 0
    problem = {pid: Problem(pid, probs[pid]["question"], probs[pid]["answer"], json.loads(probs[pid]["meta"] or "{}"))
               for pid in keep}
    right: dict = {}
    for rs in rows.values():
        for r in rs:
            right.setdefault(r["problem_id"], []).append(r["verdict"] == CORRECT)
    difficulty = {p: 1 - sum(v) / len(v) for p, v in right.items()}
    out = {}
    for t, rs in rows.items():
        sc = score_traces(model, tok, [corpus_row(r, problem[r["problem_id"]]) for r in rs], cfg.train.max_len,
                          batch, on_batch, template_kwargs=cfg.student.chat_template_kwargs)
        ok = [r["verdict"] == CORRECT for r in rs]
        v = {"samples": len(rs), "accuracy": sum(ok) / len(ok) if ok else None}
        for name, vals in (("student_global", [s["global"] for s in sc]), ("student_window", [s["window"] for s in sc]),
                           ("student_step", [s["step"] for s in sc]), ("student_tail", [s["tail"] for s in sc]),
                           ("teacher_global", [r["mean_logprob"] for r in rs]),
                           ("teacher_window", [r["min_window_logprob"] for r in rs])):
            have = [(x, y) for x, y in zip(vals, ok) if x is not None]
            v[f"auroc_{name}"] = auroc([x for x, _ in have], [y for _, y in have]) if have else None
        for label, want in (("tokens_correct", True), ("tokens_wrong", False)):
            xs = [s["tokens"] for s, y in zip(sc, ok) if y == want]
            v[label] = sum(xs) / len(xs) if xs else None
        right_rows = [(difficulty[r["problem_id"]], s["tokens"]) for r, s, y in zip(rs, sc, ok) if y]
        v["length_vs_difficulty"] = spearman([d for d, _ in right_rows], [x for _, x in right_rows])
        by_split: dict[str, list[tuple[float, int]]] = {}  # the spec's "separately in distribution and OOD"
        for r, s, y in zip(rs, sc, ok):
            if y:
                by_split.setdefault(probs[r["problem_id"]]["split"] or "–", []).append(
                    (difficulty[r["problem_id"]], s["tokens"]))
        if len(by_split) > 1:
            v["length_vs_difficulty_by_split"] = {sp: spearman([d for d, _ in xs], [n for _, n in xs])
                                                  for sp, xs in sorted(by_split.items())}
        own = [r["min_window_logprob"] for r in rs]  # the score collect.confidence filters on, where it was kept
        name, vals = (("teacher_window", own) if all(x is not None for x in own)
                      else ("student_window", [s["window"] for s in sc]))
        v["retention"] = {"score": name, "curve": retention(vals, ok)} if ok else None
        out[t] = v
    return out, len(keep)


def retention(scores: list[float], ok: list[bool], keep: tuple[float, ...] = KEEP) -> list[dict]:
    """Item 4's retention-vs-accuracy: for each share ``keep`` of the samples with the highest score, the accuracy
    of those kept and the lowest score among them — the threshold that keeps them (for the teacher's own window
    score, the ``collect.confidence.min_window_logprob`` that would)."""
    ranked = sorted(zip(scores, ok), key=lambda p: -p[0])
    out = []
    for share in keep:
        kept = ranked[:max(1, round(share * len(ranked)))]
        out.append({"keep": share, "accuracy": sum(y for _, y in kept) / len(kept), "threshold": kept[-1][0]})
    return out


def style(text: str) -> dict:
    """Lines and, per 100 words, thinking words (case-sensitive, as COMPACT counts them), hedges and checks."""
    words = _WORD.findall(text)
    low = text.lower()
    per = 100 / max(1, len(words))
    count = lambda phrases: sum(len(re.findall(r"(?<![a-z])" + re.escape(p) + r"(?![a-z])", low)) for p in phrases)
    return {"lines": sum(1 for ln in text.splitlines() if ln.strip()),
            "thinking": per * sum(1 for w in words if w in THINKING_WORDS),
            "hedging": per * count(HEDGES), "checks": per * count(CHECKS)}


def novelty(ids: dict[str, list[list[int]]]) -> dict[str, float]:
    """Item 5: per teacher, the share of its token-trigram occurrences (student tokens) whose trigram appears in
    no other teacher's traces — high novelty marks a teacher whose local patterns make seams when mixed."""
    grams = {t: [tuple(x[i:i + 3]) for x in seqs for i in range(len(x) - 2)] for t, seqs in ids.items()}
    sets = {t: set(g) for t, g in grams.items()}
    out = {}
    for t, g in grams.items():
        others = set().union(*(v for u, v in sets.items() if u != t))
        out[t] = sum(1 for x in g if x not in others) / len(g) if g else 0.0
    return out


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def style_distance(texts: dict[str, list[str]], delta: float = JS_DELTA) -> dict[str, dict[str, float]]:
    """Item 2: the Jensen–Shannon divergence (bits: 0 for the same distribution, 1 for disjoint ones) between every
    two teachers' word-bigram distributions — counts over all their traces, add-δ smoothed over the union of the
    bigrams any teacher writes: ``JS(P, Q) = ½ KL(P‖M) + ½ KL(Q‖M)``, ``M = ½ (P + Q)``."""
    import numpy as np

    counts = {t: {} for t in texts}
    for t, xs in texts.items():
        for x in xs:
            w = _words(x)
            for b in itertools.pairwise(w):
                counts[t][b] = counts[t].get(b, 0) + 1
    vocab = {b: i for i, b in enumerate(sorted(set().union(*counts.values())))}
    if not vocab:
        return {t: dict.fromkeys(texts, 0.0) for t in texts}
    dist = {}
    for t, c in counts.items():
        v = np.full(len(vocab), delta)
        for b, n in c.items():
            v[vocab[b]] += n
        dist[t] = v / v.sum()

    def js(p, q):
        m = (p + q) / 2
        return float(0.5 * (p * np.log2(p / m)).sum() + 0.5 * (q * np.log2(q / m)).sum())

    return {t: {u: 0.0 if t == u else js(dist[t], dist[u]) for u in texts} for t in texts}


def _features(text: str, dim: int) -> dict[int, float]:
    """Hashed word unigrams and bigrams of ``text`` (crc32: the same buckets in every process), log-scaled counts."""
    import zlib

    w = _words(text)
    out: dict[int, float] = {}
    for g in [*w, *(f"{a} {b}" for a, b in itertools.pairwise(w))]:
        k = zlib.crc32(g.encode()) % dim
        out[k] = out.get(k, 0.0) + 1.0
    return {k: math.log1p(v) for k, v in out.items()}


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, k: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression's weights [D, k] and biases [k]: mean cross-entropy + ``l2`` ‖W‖², L-BFGS."""
    w = torch.zeros(x.shape[1], k, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(k, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        v = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        v.backward()
        return v

    opt.step(loss)
    return w.detach(), b.detach()


def signature_strength(texts: dict[str, list[str]], problems: dict[str, list[str]], folds: int = SIG_FOLDS,
                       dim: int = SIG_DIM, l2: float = 1e-3) -> dict | None:
    """Item 2: how well a trace's words tell which teacher wrote it — the cross-validated accuracy of a
    multinomial logistic regression (L2 ``l2``) on hashed word unigram and bigram counts (:func:`_features`, rows
    scaled to unit length).  The folds hold out whole problems (``problems``: each trace's problem id), so no
    held-out trace shares its problem with a training one; the accuracy is a mean over problems ± its SE, beside
    chance (1/K), with each teacher's recall and the pair most often mistaken (a teacher's traces taken for
    another's, how many).  None for one teacher or fewer than two problems.  Fitted by hand with L-BFGS in torch:
    scikit-learn is not among accord's dependencies, and one small linear model does not justify adding it."""
    names = sorted(texts)
    ids = sorted({p for t in names for p in problems[t]})
    if len(names) < 2 or len(ids) < 2:
        return None
    rows = [(i, _features(x, dim), p) for i, t in enumerate(names) for x, p in zip(texts[t], problems[t])]
    col = {k: j for j, k in enumerate(sorted({k for _, f, _ in rows for k in f}))}  # only the buckets traces fill
    x = torch.zeros(len(rows), max(1, len(col)), dtype=torch.float64)  # (an empty one would keep a zero weight)
    for r, (_, f, _) in enumerate(rows):
        for k, v in f.items():
            x[r, col[k]] = v
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    y = torch.tensor([i for i, _, _ in rows])
    fold_of = {p: n % min(folds, len(ids)) for n, p in enumerate(ids)}
    right: dict[str, list[bool]] = {}
    guessed = torch.zeros(len(names), len(names), dtype=torch.long)  # [true teacher, guessed teacher]
    for f in sorted(set(fold_of.values())):
        test = torch.tensor([fold_of[p] == f for _, _, p in rows])
        w, b = _fit_logistic(x[~test], y[~test], len(names), l2)
        with torch.no_grad():
            guess = (x[test] @ w + b).argmax(1)
        for (i, _, p), g in zip([r for r, t in zip(rows, test.tolist()) if t], guess.tolist()):
            right.setdefault(p, []).append(g == i)
            guessed[i, g] += 1
    acc, se = mean_se([sum(v) / len(v) for v in right.values()])
    recall = {t: int(guessed[i, i]) / max(1, int(guessed[i].sum())) for i, t in enumerate(names)}
    off = guessed - torch.diag(torch.diag(guessed))
    i, g = divmod(int(off.argmax()), len(names))
    return {"accuracy": acc, "se": se, "chance": 1 / len(names), "folds": len(set(fold_of.values())),
            "traces": len(rows), "problems": len(ids), "recall": recall,
            "most_confused": [names[i], names[g], int(off[i, g])] if off.sum() else None}


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's ρ (average ranks for ties); None below 3 points or for a constant series.  By hand: scipy is
    not among accord's dependencies, and one rank correlation does not justify adding it."""
    if len(x) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def paired(per_problem: dict[str, dict[str, float]]) -> dict[str, dict[str, dict]]:
    """Δ[k][k'] = mean over the problems both have of (value_k − value_k') with its SE and n."""
    out: dict = {}
    for k, a in per_problem.items():
        for k2, b in per_problem.items():
            if k == k2:
                continue
            shared = sorted(set(a) & set(b))
            m, se = mean_se([a[p] - b[p] for p in shared])
            out.setdefault(k, {})[k2] = {"mean": m, "se": se, "n": len(shared)}
    return out


def pick_problems(corpora: dict[str, list[dict]], n: int) -> tuple[dict[str, list[dict]], bool]:
    """Each teacher's rows on the first ``n`` problems (by id) that every teacher has; else each teacher's own
    first ``n``.  Returns (rows per teacher, shared)."""
    ids = [{r.get("problem_id") for r in rows} for rows in corpora.values()]
    common = sorted(set.intersection(*ids) - {None}, key=str)[:n] if ids else []
    if common:
        keep = set(common)
        return {t: [r for r in rows if r.get("problem_id") in keep] for t, rows in corpora.items()}, True
    out = {}
    for t, rows in corpora.items():  # rows without a problem id count one each
        first = set(sorted({r.get("problem_id") for r in rows} - {None}, key=str)[:n])
        out[t] = [r for r in rows if r.get("problem_id") in first]
        out[t] += [r for r in rows if r.get("problem_id") is None][:max(0, n - len(first))]
    return out, False


def length_ratios(tokens: dict[str, dict[str, float]]) -> dict[str, tuple[float | None, float | None]]:
    """Item 3: each teacher's length over the median of every teacher's length on the same problem,
    ``r_{k,i} = L_{k,i} / median_l L_{l,i}``, mean ± SE over the problems every teacher has (none for one
    teacher or no shared problem)."""
    shared = set.intersection(*(set(v) for v in tokens.values())) if len(tokens) > 1 else set()
    med = {p: statistics.median(v[p] for v in tokens.values()) for p in shared}
    return {t: mean_se([v[p] / med[p] for p in sorted(shared) if med[p] > 0]) if shared else (None, None)
            for t, v in tokens.items()}


def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def summarise(rows: dict[str, list[dict]], scores: dict[str, list[dict]]) -> dict:
    """The per-teacher table, the paired NLL differences, the ordering and the flags from traces and scores."""
    teachers: dict[str, dict] = {}
    per_problem: dict[str, dict[str, float]] = {}
    tokens_pp: dict[str, dict[str, float]] = {}
    for t, rs in rows.items():
        sc = [s for s in scores[t] if not math.isnan(s["nll"])]
        by: dict = {}
        for i, (r, s) in enumerate(zip(rs, scores[t])):  # a row without a problem id is a problem of its own
            if not math.isnan(s["nll"]):
                pid = r.get("problem_id")
                by.setdefault((t, i) if pid is None else pid, []).append((r, s))
        prob = {p: {k: sum(s[k] for _, s in v) / len(v) for k in ("nll", "surprise", "rank", "rsr", "tokens")}
                | {"worst": sum(-s["window"] for _, s in v) / len(v)}  # the highest 64-token window-mean NLL
                for p, v in by.items()}
        per_problem[t] = {p: v["nll"] for p, v in prob.items()}
        tokens_pp[t] = {p: v["tokens"] for p, v in prob.items()}
        st = [style(r["messages"][-1]["content"]) for r in rs]
        nlls = [s["nll"] for s in sc]
        lengths = [s["tokens"] for s in sc]
        levels = [(r.get("level"), s["tokens"]) for r, s in zip(rs, scores[t]) if isinstance(r.get("level"), int)]
        row = {"traces": len(sc), "problems": len(prob),
               "nll_median": _q(nlls, 0.5) if nlls else None,
               "nll_iqr": [_q(nlls, 0.25), _q(nlls, 0.75)] if nlls else None,
               "rsr": (sum(v["rank"] for v in prob.values()) / max(1e-12, sum(v["nll"] for v in prob.values())))
               if prob else None,
               "tokens_mean": sum(lengths) / len(lengths) if lengths else None,
               "tokens_p50": _q(lengths, 0.5) if lengths else None, "tokens_p90": _q(lengths, 0.9) if lengths else None,
               "length_vs_level": spearman([lv for lv, _ in levels], [n for _, n in levels]) if levels else None}
        for k in ("nll", "surprise", "rank", "worst"):
            row[k], row[f"{k}_se"] = mean_se([v[k] for v in prob.values()])
        for k in ("lines", "thinking", "hedging", "checks"):
            row[k] = sum(x[k] for x in st) / len(st) if st else None
        teachers[t] = row
    for t, (m, se) in length_ratios(tokens_pp).items():
        teachers[t]["length_ratio"], teachers[t]["length_ratio_se"] = m, se
    means = {t: r["nll"] for t, r in teachers.items() if r["nll"] is not None}
    order = sorted(means, key=means.get)
    flags = []
    if len(means) >= 3:
        for t, m in means.items():  # z of each teacher's mean against the others' (leave-one-out)
            rest = [v for u, v in means.items() if u != t]
            mu = sum(rest) / len(rest)
            sd = math.sqrt(sum((v - mu) ** 2 for v in rest) / max(1, len(rest) - 1))
            z = (m - mu) / sd if sd > 1e-12 else (math.inf if m - mu > 1e-6 else 0.0)
            teachers[t]["z"] = z
            if z > 2:
                flags.append(t)
    return {"teachers": teachers, "paired_nll": paired(per_problem), "order": order, "flagged": flags}


def run(cfg, console, problems: int = 200, batch: int = 16, student_samples: int = 0) -> dict:
    """Diagnose every teacher's corpus against the student at θ0; writes ``<run_dir>/analysis/teachers.json``.
    ``student_samples``: the student also answers that many of the problems (greedy, ``eval`` settings) and its
    own outputs join the style distances as a row (:data:`STUDENT_ROW`)."""
    from accord.train.common import load_corpus, load_student

    if problems < 1:
        raise UsageError("--problems must be at least 1")
    corpora = {}
    for t in cfg.teachers:
        rows = load_corpus(cfg, t.name, replay=False)
        if rows:
            corpora[t.name] = rows
        else:
            console.print(f"[yellow]warning[/]: teacher {t.name!r} has an empty corpus; left out")
    if not corpora:
        raise UsageError("every teacher corpus is empty: nothing to diagnose (check `accord collect`'s table)")
    picked, shared = pick_problems(corpora, problems)
    model, tok = load_student(cfg)
    model.to(pick_device("auto"))
    total = sum(len(r) for r in picked.values())
    n_prob = len({r.get("problem_id") for rows in picked.values() for r in rows})
    console.print(f"diagnose: {total} traces of {len(picked)} teacher(s) on {n_prob} "
                  f"{'shared' if shared else 'unshared'} problem(s), scored by the student before training "
                  f"({cfg.student.model})")
    scores = {}
    with progress(console) as bar:
        task = bar.add_task("diagnose", total=total)
        for t, rows in picked.items():
            scores[t] = score_traces(model, tok, rows, cfg.train.max_len, batch,
                                     on_batch=lambda n: bar.advance(task, n),
                                     template_kwargs=cfg.student.chat_template_kwargs)
    out = {"student": cfg.student.model, "problems": n_prob, "shared": shared, "kappa": KAPPA,
           "rank_clip": RANK_CLIP, **summarise(picked, scores)}
    for t, v in novelty({t: [s["ids"] for s in sc] for t, sc in scores.items()}).items():  # the scored tokens
        out["teachers"][t]["novelty"] = v
    texts = {t: [r["messages"][-1]["content"] for r in rows] for t, rows in picked.items()}
    out["signature"] = signature_strength(texts, {t: [r.get("problem_id") or f"{t}#{i}" for i, r in enumerate(rows)]
                                                  for t, rows in picked.items()})
    if shared and len(picked) > 1:
        for t, v in compact_view(cfg, model, tok, picked).items():
            if t in out["teachers"]:
                out["teachers"][t]["compact"] = v
    with progress(console) as bar:
        task = bar.add_task("diagnose: every sample, right or wrong", total=None)
        view, n_v = verdict_view(cfg, model, tok, problems, batch, on_batch=lambda n: bar.advance(task, n))
    out["verdicts"] = {"problems": n_v, "window": WINDOW, "teachers": view}
    if student_samples > 0:
        del model  # the generator loads the student as evaluation does
        own = student_outputs(cfg, [r["messages"][0]["content"] for r in next(iter(picked.values()))][:student_samples])
        if own:
            texts[STUDENT_ROW] = own
    out["style_js"] = style_distance(texts)
    head, body = table(out)
    v_head, v_body = verdict_table(out)
    js_head, js_body = js_table(out)
    r_head, r_body = retention_table(out)
    out["table"] = {"head": head, "body": body, "notes": notes(out),  # what the report shows, as printed here
                    "verdicts": {"head": v_head, "body": v_body}, "style_js": {"head": js_head, "body": js_body},
                    "retention": {"head": r_head, "body": r_body}}
    path = Path(cfg.run_dir) / "analysis" / "teachers.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    console.print(text(out))
    console.print(f"diagnose: {path} (and in the report: accord report CONFIG)")
    return out


HEAD = ["teacher", "traces", "NLL ± SE", "NLL median [IQR]", "worst window NLL", "surprise %", "rank@100", "RSR",
        "COMPACT α", "novel 3-grams %", "tokens mean / p90", "length / median", "lines", "thinking /100w",
        "hedges /100w", "checks /100w", "ρ(length, level)"]


def table(out: dict) -> tuple[list[str], list[list[str]]]:
    """The per-teacher table (most compatible first), as strings."""
    f = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"
    body = []
    for t in out["order"] + [t for t in out["teachers"] if t not in out["order"]]:
        r = out["teachers"][t]
        body.append([t + (" ⚑" if t in out["flagged"] else ""), str(r["traces"]),
                     f"{f(r['nll'])} ± {f(r['nll_se'])}",
                     f"{f(r['nll_median'])} [{f(r['nll_iqr'][0])}, {f(r['nll_iqr'][1])}]" if r["nll_iqr"] else "–",
                     f(r.get("worst")),
                     f(None if r["surprise"] is None else 100 * r["surprise"], 1), f(r["rank"], 2), f(r["rsr"], 2),
                     f(r.get("compact", {}).get("alpha"), 3),
                     f(None if r.get("novelty") is None else 100 * r["novelty"], 1),
                     f"{f(r['tokens_mean'], 0)} / {f(r['tokens_p90'], 0)}", f(r.get("length_ratio"), 2),
                     f(r["lines"], 1), f(r["thinking"], 1),
                     f(r["hedging"], 2), f(r["checks"], 2), f(r["length_vs_level"], 2)])
    return HEAD, body


V_HEAD = ["teacher", "samples", "accuracy", "tokens right / wrong", "AUROC student global", "AUROC student window",
          "AUROC student step", "AUROC student tail", "AUROC teacher global", "AUROC teacher window",
          "ρ(length, difficulty)"]


def verdict_table(out: dict) -> tuple[list[str], list[list[str]]]:
    """Items 4 and 3 (a): every sample on the store's first problems, right or wrong (:func:`verdict_view`)."""
    f = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"
    body = []
    for t, v in out.get("verdicts", {}).get("teachers", {}).items():
        body.append([t, str(v["samples"]), f(v["accuracy"]),
                     f"{f(v['tokens_correct'], 0)} / {f(v['tokens_wrong'], 0)}",
                     f(v["auroc_student_global"]), f(v["auroc_student_window"]), f(v.get("auroc_student_step")),
                     f(v.get("auroc_student_tail")), f(v["auroc_teacher_global"]),
                     f(v["auroc_teacher_window"]), f(v["length_vs_difficulty"], 2) + "".join(
                         f"; {sp} {f(x, 2)}" for sp, x in (v.get("length_vs_difficulty_by_split") or {}).items())])
    return V_HEAD, body


def student_outputs(cfg, prompts: list[str]) -> list[str]:
    """The student's own answers before training to ``prompts`` (the corpus rows' user messages; greedy,
    ``eval.max_new_tokens``, through ``eval.backend`` as evaluation loads it): the spec's extra row of the style
    distances.  Failed generations are left out."""
    from accord.evaluate import student_generator
    from accord.teachers.base import Request, SamplingParams

    gen = student_generator(cfg, cfg.student.model, "student")
    try:
        outs = gen.generate([Request(q) for q in prompts],
                            SamplingParams(temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens))
    finally:
        gen.close()
    return [g.text for g in outs if not g.failed]


def js_table(out: dict) -> tuple[list[str], list[list[str]]]:
    """Item 2's style distances as a teacher × teacher table (most compatible first; the student's own outputs,
    when asked for, last)."""
    js = out.get("style_js") or {}
    names = [t for t in out["order"] + [t for t in out["teachers"] if t not in out["order"]] if t in js]
    names += [t for t in js if t not in names]
    return ["JS (bits)", *names], [[t, *(f"{js[t][u]:.3f}" for u in names)] for t in names]


R_HEAD = ["teacher", "kept by", *(f"keep {round(100 * k)}%" for k in KEEP)]


def retention_table(out: dict) -> tuple[list[str], list[list[str]]]:
    """Item 4's retention curves: accuracy of the samples kept (and the threshold that keeps them) per share."""
    body = []
    for t, v in out.get("verdicts", {}).get("teachers", {}).items():
        if r := v.get("retention"):
            body.append([t, r["score"].replace("_", " "), *(f"{c['accuracy']:.3f} (≥ {c['threshold']:.2f})"
                                                              for c in r["curve"])])
    return R_HEAD, body


def notes(out: dict) -> list[str]:
    """The lines under the table: paired differences against the most compatible teacher, the order, flags."""
    lines = []
    if out["order"]:
        best = out["order"][0]
        diffs = [(t, out["paired_nll"].get(t, {}).get(best)) for t in out["order"][1:]]
        parts = [f"{t} {d['mean']:+.3f} ± {d['se']:.3f}" for t, d in diffs if d and d["mean"] is not None
                 and d["se"] is not None]
        if parts:
            lines.append(f"paired NLL against {best} (same problems): " + ", ".join(parts))
        lines.append("most compatible first: " + " < ".join(out["order"]))
    js = out.get("style_js") or {}
    pairs = sorted((js[a][b], a, b) for a in js for b in js if a < b and STUDENT_ROW not in (a, b))
    if pairs:
        lines.append(f"style distance (Jensen–Shannon over word bigrams, bits: 0 alike, 1 disjoint): closest "
                     f"{pairs[0][1]}–{pairs[0][2]} {pairs[0][0]:.3f}, farthest {pairs[-1][1]}–{pairs[-1][2]} "
                     f"{pairs[-1][0]:.3f}")
    if STUDENT_ROW in js and len(js) > 1:
        near = min((u for u in js if u != STUDENT_ROW), key=lambda u: js[STUDENT_ROW][u])
        lines.append(f"the student's own outputs before training write closest to {near} "
                     f"({js[STUDENT_ROW][near]:.3f} bits)")
    if sig := out.get("signature"):
        lines.append(f"signature strength: a bag-of-n-grams classifier names the teacher of a trace on problems it "
                     f"never saw {sig['accuracy']:.3f} ± {sig['se']:.3f} of the time (chance {sig['chance']:.3f}; "
                     f"{sig['folds']}-fold over {sig['problems']} problems)"
                     + (f"; most often taken for another: {sig['most_confused'][0]} for "
                        f"{sig['most_confused'][1]} ({sig['most_confused'][2]} traces)"
                        if sig.get("most_confused") else ""))
    for t in out["flagged"]:
        lines.append(f"⚑ {t}: its mean NLL is {out['teachers'][t]['z']:.1f} SD above the other teachers' — the "
                     "student finds its traces far less likely (COMPACT's S_PPL term weighs against them — its α "
                     "column is the whole score's verdict; MTD mixes them in as they are)")
    return lines


def text(out: dict) -> str:
    """What the CLI prints: the table and its notes."""
    from accord.analysis.report import text_table

    parts = [text_table(*table(out)), *notes(out)]
    if len(out.get("style_js") or {}) > 1:
        parts += ["", "style distance between every two teachers:", text_table(*js_table(out))]
    head, body = verdict_table(out)
    if body:
        v = out["verdicts"]
        parts += ["", f"every sample, right or wrong, on {v['problems']} problems every teacher attempted (AUROC: how "
                  f"well a confidence tells right from wrong; window = lowest {v['window']}-token mean ℓ; step = "
                  f"lowest line mean; tail = mean of the last {v['window']} tokens; "
                  "difficulty = the failure rate over every teacher's samples):", text_table(head, body)]
    head, body = retention_table(out)
    if body:
        parts += ["", "filtering by confidence: accuracy of the samples kept, keeping the most confident share (≥ "
                  "the score that keeps them; teacher window = the collect.confidence.min_window_logprob that would):",
                  text_table(head, body)]
    return "\n".join(parts)
