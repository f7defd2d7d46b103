"""COMPACT (issue 17): every score against a slow reference, the §3.4 identity, Direct Avg., end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import run_cli, write_jsonl

from accord.train.compact import consensus, encode_trace, group_alphas, make_loss_fn


# slow, obviously-correct references for the batched scores (one trace at a time)
def mi_score(gold_logp: torch.Tensor, mask: torch.Tensor, reduce: str = "sum") -> float:
    """Eqs. 2–3: gold_logp [T+1] = I(t) for t = 0..T; mask [T] = M_t; Σ ReLU(ΔI)·M (or its mean)."""
    if gold_logp.numel() < 2:
        return 0.0
    gain = torch.relu(gold_logp[1:] - gold_logp[:-1]) * mask
    return float(gain.sum() if reduce == "sum" else gain.mean())


def gold_curve(logits: torch.Tensor, start: int, T: int, gold: list[int], chunk: int = 1024) -> torch.Tensor:
    """I(t) = mean_j log softmax(logits[start + t])[g_j] for t = 0..T, in chunks (no [T, V] log-softmax kept)."""
    out = []
    g = torch.tensor(gold, device=logits.device)
    for a in range(start, start + T + 1, chunk):
        lg = logits[a:min(start + T + 1, a + chunk)].float()
        out.append(lg[:, g].mean(-1) - torch.logsumexp(lg, -1))
    return torch.cat(out)


def slow_consensus(q, k, self_loop=True):
    K, H, d = q.shape
    rep = H // k.shape[1]
    A = torch.zeros(K, K)
    for h in range(H):
        for i in range(K):
            row = [float(q[i, h] @ k[j, h // rep]) / math.sqrt(d) for j in range(K)]
            if not self_loop:
                row[i] = -math.inf
            m = max(row)
            e = [math.exp(x - m) for x in row]
            for j in range(K):
                A[i, j] += e[j] / sum(e) / H
    return torch.tensor([sum(float(A[j, kk]) for j in range(K) if j != kk) for kk in range(K)])


@pytest.mark.parametrize("K,H,Hkv,self_loop", [(4, 4, 2, True), (3, 8, 8, True), (2, 4, 1, False), (4, 6, 3, False)])
def test_consensus_matches_a_loop_over_heads_and_pairs(K, H, Hkv, self_loop):
    g = torch.Generator().manual_seed(K * 10 + H)
    q, k = torch.randn(K, H, 16, generator=g), torch.randn(K, Hkv, 16, generator=g)
    assert torch.allclose(consensus(q, k, self_loop), slow_consensus(q, k, self_loop), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under the training's autocast: still a float32 score
        s = consensus(q, k, self_loop)
    assert s.dtype == torch.float32 and torch.allclose(s, slow_consensus(q, k, self_loop), atol=1e-5)


@pytest.mark.parametrize("self_loop", [True, False])
def test_consensus_of_a_whole_micro_batch_is_each_problems_own(self_loop):
    """Every problem at once (a block-masked softmax) = the loop reference per problem; a lone trace scores 0."""
    g = torch.Generator().manual_seed(7)
    gid = torch.tensor([0, 1, 0, 2, 1, 0, 1])  # problems of 3, 3 and 1 traces, interleaved
    q, k = torch.randn(7, 4, 16, generator=g), torch.randn(7, 2, 16, generator=g)
    got = consensus(q, k, self_loop, gid)
    for p in range(3):
        idx = (gid == p).nonzero()[:, 0]
        want = slow_consensus(q[idx], k[idx], self_loop) if len(idx) > 1 else torch.zeros(1)
        assert torch.allclose(got[idx], want, atol=1e-5), p


def test_mi_score_on_a_known_trajectory():
    # I(t) = 0.1, 0.5, 0.3, 0.9 → ΔI = 0.4, −0.2, 0.6 → ReLU = 0.4, 0, 0.6
    curve, mask = torch.tensor([0.1, 0.5, 0.3, 0.9]), torch.tensor([1.0, 1.0, 0.1])
    assert mi_score(curve, mask) == pytest.approx(0.4 + 0.06)
    assert mi_score(curve, mask, "mean") == pytest.approx((0.4 + 0.06) / 3)
    assert mi_score(torch.tensor([0.3]), torch.tensor([])) == 0.0


def test_gold_curve_reads_the_lm_head_at_each_state():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 11, generator=g)
    got = gold_curve(logits, 2, 4, [3, 7], chunk=2)
    lp = torch.log_softmax(logits, -1)
    want = torch.stack([(lp[t, 3] + lp[t, 7]) / 2 for t in range(2, 7)])
    assert torch.allclose(got, want, atol=1e-6)


def slow_alphas(s_mi, s_cons, s_ppl, beta=(1.0, 1.0, 1.0), tau=1.0):
    """Eq. 7 for one problem, element by element: population-std z-scores (0 when K′ = 1 or std < 1e-6)."""
    def z(x):
        x = [float(v) for v in x]
        mean = sum(x) / len(x)
        sd = math.sqrt(sum((v - mean) ** 2 for v in x) / len(x))
        return [0.0] * len(x) if len(x) < 2 or sd < 1e-6 else [(v - mean) / (sd + 1e-6) for v in x]

    score = [beta[0] * a + beta[1] * b - beta[2] * c for a, b, c in zip(z(s_mi), z(s_cons), z(s_ppl))]
    e = [math.exp((v - max(score)) / tau) for v in score]
    return [v / sum(e) for v in e], score


def test_group_weights_match_the_per_problem_reference():
    g = torch.Generator().manual_seed(0)
    gid = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 0, 4, 4, 4])  # K′ = 2, 2, 3, 2, 1, 3; problem 5 equal scores
    s = [torch.randn(12, generator=g) for _ in range(3)]
    s[0][gid == 4] = 0.7
    s[1][gid == 4] = 0.2
    s[2][gid == 4] = 1.5
    gid = torch.cat([gid, torch.tensor([5])])
    s = [torch.cat([x, torch.tensor([0.3])]) for x in s]
    for beta, tau in (((1.0, 1.0, 1.0), 1.0), ((0.5, 2.0, 1.0), 0.3), ((0.0, 0.0, 0.0), 1.0)):
        a, score = group_alphas(gid, *s, beta=beta, tau=tau)
        for p in range(6):
            ix = (gid == p).nonzero()[:, 0]
            want_a, want_s = slow_alphas(*(x[ix] for x in s), beta=beta, tau=tau)
            assert a[ix].tolist() == pytest.approx(want_a, rel=1e-5, abs=1e-7)
            assert score[ix].tolist() == pytest.approx(want_s, rel=1e-5, abs=1e-6)
            assert float(a[ix].sum()) == pytest.approx(1.0)
    assert a[gid == 5].item() == 1.0  # K′ = 1
    a, _ = group_alphas(gid, *s)
    assert torch.allclose(a[gid == 4], torch.full((3,), 1 / 3))  # equal scores: uniform
    three = torch.tensor([0, 0, 0])
    a, _ = group_alphas(three, torch.tensor([0.0, 1.0, 2.0]), torch.ones(3), torch.tensor([3.0, 2.0, 1.0]))
    assert a[2] > a[1] > a[0]  # informative and easy wins


def test_encode_trace_positions(micro):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro)
    text = "<think>\n(1) 3 + 4 = 7\nWait, (2) 7 * 2 = 4\n</think>\n\n\\boxed{4}"
    row = {"messages": [{"role": "user", "content": "Start at 3."}, {"role": "assistant", "content": text}],
           "answer": "4"}
    ex = encode_trace(tok, row, 256, group="p", teacher="t", words=("Wait",), epsilon=0.1)
    P, T = ex["prompt_len"], ex["reason_len"]
    reasoning = tok.decode(ex["ids"][P:P + T])
    assert "</think>" not in reasoning and reasoning.rstrip().endswith("= 4")  # the answer clause is excluded
    assert tok.decode(ex["span_ids"]) == "4" and ex["span"][-1] < ex["eos"] == len(ex["ids"]) - 1
    assert tok.decode(ex["gold"]) == "4"
    # M_t = 1 at the state that emits "Wait" (its next token), ε elsewhere
    t_wait = [t for t in range(1, T + 1) if ex["think_mask"][t - 1] == 1.0]
    assert len(t_wait) == 1 and tok.decode(ex["ids"][P + t_wait[0]:P + t_wait[0] + 6]).strip().startswith("Wait")


def _row(q, trace, answer="4", pid="p0"):
    return {"problem_id": pid, "answer": answer,
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": trace}]}


def _batch(micro, traces, words=(), packed=False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accord.train.engine import collate, collate_packed

    model, tok = AutoModelForCausalLM.from_pretrained(micro), AutoTokenizer.from_pretrained(micro)
    ex = [encode_trace(tok, _row("Start at 3.", t, pid=f"p{g}"), 128, group=g, teacher=f"t{i}", words=words)
          for i, (g, t) in enumerate(traces)]
    return model, tok, ex, (collate_packed(ex, tok.pad_token_id, one_row=True) if packed
                            else collate(ex, tok.pad_token_id))


def _logits(model, b):
    """The model's output rows, their flat [tokens, V] view, the per-example positions and the per-example
    (unpacked) logits."""
    from accord.train.compact import _Head
    from accord.train.engine import flat_positions, model_inputs, unpack

    rows = model(**model_inputs(b)).logits
    return rows, _Head(logits=[rows.reshape(-1, rows.shape[-1])]), flat_positions(b), unpack(rows, b)


TRACES = ["<think>\n(1) 3 + 4 = 7\n(2) 7 * 2 = 4\n</think>\n\n\\boxed{4}",
          "<think>\n[1] 3 plus 4 makes 7\n[2] 7 times 2 makes 4\n</think>\n\n\\boxed{4}",
          "<think>\n(1) 3 + 4 = 7\n</think>\n\n\\boxed{7}"]


@pytest.mark.parametrize("packed", [False, True])
def test_mcon_skips_pairs_whose_answers_differ(micro, packed):
    from accord.config import CompactConfig
    from accord.train.compact import mcon, span_logprobs

    model, _tok, _ex, b = _batch(micro, [(0, t) for t in TRACES], packed=packed)
    _, head, where, logits = _logits(model, b)
    stats = {"pairs": 6, "skipped": 0, "mcon": 0.0}
    a = torch.tensor([0.5, 0.3, 0.2])
    out = mcon(span_logprobs(head, where, b["meta"]), b["meta"], torch.zeros(3, dtype=torch.long), a, stats)
    assert stats == {"pairs": 6, "skipped": 4, "mcon": pytest.approx(stats["mcon"])}  # only 0↔1 share "4"
    lp = [torch.log_softmax(logits[i, torch.tensor(b["meta"][i]["span"]) - 1], -1) for i in (0, 1)]
    kl01 = float((lp[0].exp() * (lp[0] - lp[1])).sum(-1).mean())
    assert float(out[0]) == pytest.approx(0.3 * kl01, rel=1e-5) and out[2] == 0.0
    apart = {"pairs": 2, "skipped": 0, "mcon": 0.0}  # the same answer in two problems is never a pair
    out = mcon(span_logprobs(head, where, b["meta"]), b["meta"], torch.tensor([0, 1, 0]), a, apart)
    assert apart["skipped"] == 2 and not out.any()
    loss, metrics = make_loss_fn(CompactConfig())(model, b, 1)
    assert metrics["mcon_skip"] == pytest.approx(4 / 6) and loss.requires_grad


@pytest.mark.parametrize("packed", [False, True])
def test_one_compact_step_is_the_weighted_sum_of_single_trace_steps(micro, monkeypatch, packed):
    """§3.4 (λ = 0): with plain SGD, one problem and α fixed, θ − η Σ α_k ∇L_k = Σ α_k (θ − η ∇L_k)."""
    from accord.config import CompactConfig
    from accord.train import compact as C

    fixed = torch.tensor([0.6, 0.3, 0.1])
    monkeypatch.setattr(C, "group_alphas", lambda *a, **k: (fixed, torch.zeros(3)))
    model, tok, ex, b = _batch(micro, [(0, t) for t in TRACES], packed=packed)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    eta = 0.5
    loss, _ = make_loss_fn(CompactConfig(mcon_weight=0.0))(model, b, 1)
    loss.backward()
    got = {n: theta[n] - eta * p.grad for n, p in model.named_parameters()}
    want = {n: torch.zeros_like(t) for n, t in theta.items()}
    from accord.train.engine import collate, token_nll

    for k in range(3):
        model.zero_grad()
        one = collate([ex[k]], tok.pad_token_id)
        nll = token_nll(model(input_ids=one["input_ids"]).logits, one["labels"])
        n = int((one["labels"][:, 1:] != -100).sum())
        (nll.sum() / n).backward()
        for name, p in model.named_parameters():
            want[name] += fixed[k] * (theta[name] - eta * p.grad)
    for name in got:
        assert torch.allclose(got[name], want[name], atol=1e-6), name


def _same_loss_scores_and_gradients(a, b):
    """Two (loss, metrics, gradients) of one COMPACT step: equal to float tolerance, the scores really computed."""
    (l0, m0, g0), (l1, m1, g1) = a, b
    assert float(l1) == pytest.approx(float(l0), rel=1e-5)
    assert m0.keys() == m1.keys() and all(m1[k] == pytest.approx(m0[k], rel=1e-4, abs=1e-6) for k in m0)
    assert m0["s_cons/t0"] != 0.0 and m0["mcon"] > 0.0  # the scores were computed, not skipped
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-4), n


def test_packed_and_padded_batches_give_the_same_loss_scores_and_gradients(micro):
    """The whole COMPACT loss (every score, MCon) from one packed row equals the padded batch's."""
    from accord.config import CompactConfig

    fn = make_loss_fn(CompactConfig(epsilon=1.0))
    got = []
    for packed in (False, True):
        model, _tok, _ex, b = _batch(micro, [(0, TRACES[0]), (0, TRACES[1]), (0, TRACES[2]), (1, TRACES[0]),
                                           (1, TRACES[1])], words=("plus",), packed=packed)
        loss, metrics = fn(model, b, 2)
        loss.backward()
        got.append((loss, metrics, {n: p.grad for n, p in model.named_parameters()}))
    _same_loss_scores_and_gradients(*got)


@pytest.mark.parametrize("packed", [False, True])
def test_length_buckets_give_the_whole_batch_loss_scores_and_gradients(micro, packed):
    """A problem-grouped micro-batch cut into length buckets (a forward each, the terms computed once over every
    bucket's rows, in micro-batch order) gives the loss, every score, MCon and the gradients of one batch."""
    from accord.config import CompactConfig
    from accord.train.engine import collate, collate_grouped, collate_packed

    long = "<think>\n" + "(1) 3 + 4 = 7\n" * 12 + "</think>\n\n\\boxed{4}"
    traces = [(0, TRACES[0]), (0, long), (0, TRACES[1]), (1, TRACES[2]), (1, long), (1, TRACES[0])]
    fn = make_loss_fn(CompactConfig(epsilon=1.0))
    got = []
    for cut in (False, True):
        model, tok, ex, b = _batch(micro, traces, words=("plus",), packed=packed)
        if cut:
            pad = tok.pad_token_id
            b = collate_grouped(ex, (lambda c, pad=pad: collate_packed(c, pad)) if packed else
                                (lambda c, pad=pad: collate(c, pad)))
            assert len(b["parts"]) >= 2 and b["index"] != [list(range(len(ex)))]  # really cut, out of order
        loss, metrics = fn(model, b, 2)
        loss.backward()
        got.append((loss, metrics, {n: p.grad for n, p in model.named_parameters()}))
    _same_loss_scores_and_gradients(*got)


def test_chunked_head_gives_the_full_logits_loss_scores_and_gradients(micro):
    """Issue 13 item 2: COMPACT's loss, every score and the gradients are the same when the head runs in chunks
    from the hidden states (no [tokens, V] logits) as from the full logits — packed batch, MCon on."""
    from accord.config import CompactConfig
    from accord.train.engine import LinearTokenNLL

    got = []
    for chunked in (False, True):
        model, _tok, _ex, b = _batch(micro, [(0, TRACES[0]), (0, TRACES[1]), (0, TRACES[2]), (1, TRACES[0]),
                                           (1, TRACES[1])], words=("plus",), packed=True)
        LinearTokenNLL.CHUNK = 7  # several chunks
        try:
            loss, metrics = make_loss_fn(CompactConfig(epsilon=1.0), chunked=chunked)(model, b, 2)
            loss.backward()
        finally:
            LinearTokenNLL.CHUNK = 4096
        got.append((loss, metrics, {n: p.grad for n, p in model.named_parameters()}))
    (l0, m0, g0), (l1, m1, g1) = got
    assert float(l1) == pytest.approx(float(l0), rel=1e-5)
    assert all(m1[k] == pytest.approx(m0[k], rel=1e-4, abs=1e-6) for k in m0) and m0["mcon"] > 0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-4), n


def test_direct_avg_is_uniform_sft_on_grouped_problems(micro):
    from accord.config import CompactConfig
    from accord.train.engine import collate, token_nll

    model, tok, ex, b = _batch(micro, [(0, TRACES[0]), (0, TRACES[1]), (1, TRACES[2])])
    loss, metrics = make_loss_fn(CompactConfig(scores=[], mcon_weight=0.0))(model, b, 2)
    per = []
    for e in ex:
        one = collate([e], tok.pad_token_id)
        nll = token_nll(model(input_ids=one["input_ids"]).logits, one["labels"])
        per.append(nll.sum() / int((one["labels"][:, 1:] != -100).sum()))
    ref = ((per[0] + per[1]) / 2 + per[2]) / 2
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert metrics["alpha/t0"] == pytest.approx(0.5) and "alpha/t2" not in metrics  # shares over K′ ≥ 2


def test_accord_train_compact_end_to_end(tmp_path, micro):
    from accord.analysis.report import compact_scores, write_report
    from accord.config import load_config

    run = tmp_path / "run"
    (run / "corpora").mkdir(parents=True)
    for t, style in (("a", 0), ("b", 1), ("c", 2)):
        rows = [_row(f"Start at {i}.", TRACES[(style + i) % 3], pid=f"p{i}") for i in range(6) if (t, i) != ("c", 5)]
        write_jsonl(run / "corpora" / f"{t}.jsonl", rows)
    cfg = {"run_dir": str(run), "problems": {"path": "unused.jsonl"}, "student": {"model": str(micro)},
           "teachers": [{"name": t, "backend": "column", "column": t} for t in "abc"],
           "train": {"method": "compact", "rounds": 2, "steps_per_round": 2, "batch_size": 6, "lr": 1e-3,
                     "max_len": 128}, "compact": {"epsilon": 1.0},
           "eval": {"splits": {"target": {"path": "unused.jsonl"}}}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code, out = run_cli("train", str(p))
    assert code == 0, out
    assert "K′: 2: 1, 3: 5" in out
    res = json.loads((run / "train" / "compact" / "result.json").read_text())
    assert res["method"] == "compact" and res["branch_steps"] == 4 and len(res["curve"]) == 2
    steps = [json.loads(x) for x in (run / "train" / "compact" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4
    for ev in steps:
        assert sum(v for k, v in ev.items() if k.startswith("alpha/")) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= ev["mcon_skip"] <= 1.0 and "s_cons/a" in ev
    _head, body = compact_scores(run / "train" / "compact" / "metrics.jsonl")
    assert [r[0] for r in body] == ["a", "b", "c"]
    html = write_report(load_config(p), [res], []).read_text()
    assert "compact-alpha.png" in html and (run / "report" / "compact-alpha.png").exists()
    # the ablation of Fig. 5 beside it (no S_MI): not "finished earlier", its own directory, weights plot and table
    code, out = run_cli("train", str(p), "compact.scores=[ppl,cons]")
    assert code == 2 and "compact.scores" in out and "train.tag=<word>" in out
    code, out = run_cli("train", str(p), "compact.scores=[ppl,cons]", "train.tag=no-mi")
    assert code == 0, out
    variant = json.loads((run / "train" / "compact-no-mi" / "result.json").read_text())
    assert variant["name"] == "compact-no-mi" and variant["trained_with"]["compact"]["scores"] == ["ppl", "cons"]
    html = write_report(load_config(p), [res, variant], []).read_text()
    assert "(COMPACT Fig. 3) — compact-no-mi</h2>" in html and (run / "report" / "compact-no-mi-alpha.png").exists()
    # QLoRA (4-bit base): the scores read the adapted 4-bit projections; the model comes back in float
    code, out = run_cli("train", str(p), "train.lora.r=2", "train.lora.quantize=nf4", "train.tag=qlora")
    assert code == 0, out
    assert "on a 4-bit NF4 base (QLoRA)" in out
    steps = [json.loads(x) for x in (run / "train" / "compact-qlora" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all("s_cons/a" in ev and math.isfinite(ev["loss"]) for ev in steps)
    assert "quantization_config" not in json.loads((run / "train" / "compact-qlora" / "final" / "config.json")
                                                   .read_text())


def test_compact_resumes_to_the_uninterrupted_weights(tmp_path, micro):
    import shutil

    from safetensors.torch import load_file

    run = tmp_path / "run"
    (run / "corpora").mkdir(parents=True)
    for t, style in (("a", 0), ("b", 1)):
        write_jsonl(run / "corpora" / f"{t}.jsonl",
                    [_row(f"Start at {i}.", TRACES[(style + i) % 3], pid=f"p{i}") for i in range(4)])
    cfg = {"run_dir": str(run), "problems": {"path": "unused.jsonl"}, "student": {"model": str(micro)},
           "teachers": [{"name": t, "backend": "column", "column": t} for t in "ab"],
           "train": {"method": "compact", "rounds": 2, "steps_per_round": 2, "batch_size": 4, "lr": 1e-3,
                     "max_len": 128}, "eval": {"splits": {"target": {"path": "unused.jsonl"}}}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert run_cli("train", str(p))[0] == 0
    ref = load_file(run / "train" / "compact" / "final" / "model.safetensors")
    shutil.rmtree(run / "train" / "compact" / "final")  # killed after the step-2 checkpoint
    (run / "train" / "compact" / "result.json").unlink()
    code, out = run_cli("train", str(p))
    assert code == 0, out
    res = json.loads((run / "train" / "compact" / "result.json").read_text())
    assert res["resumed_from"] == 2 and "resuming compact from checkpoint-2 (step 2 of 4)" in out
    got = load_file(run / "train" / "compact" / "final" / "model.safetensors")
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.parametrize("packed", [False, True])
def test_batched_scores_match_the_per_trace_reference(micro, packed):
    """S_PPL and S_MI for a whole micro-batch (lse taken from the SFT loss) equal the slow per-trace forms,
    from padded rows and from one packed row alike."""
    from accord.train.compact import _ppl_mi
    from accord.train.engine import IGNORE, token_nll, unpack

    model, _tok, ex, b = _batch(micro, [(0, TRACES[0]), (0, TRACES[1]), (1, TRACES[2])], words=("plus",),
                               packed=packed)
    with torch.no_grad():
        rows, head, where, logits = _logits(model, b)
        nll = unpack(token_nll(rows, b["labels"]), b)
        ids = unpack(b["input_ids"], b, 0)
        s_ppl, s_mi = _ppl_mi(head, where, nll, ids, b["meta"], "sum", True)
        if packed:  # the per-example view equals each trace run alone
            for i, e in enumerate(ex):
                alone = model(input_ids=torch.tensor([e["ids"]])).logits[0]
                assert torch.allclose(alone, logits[i, :len(e["ids"])], atol=1e-4)
                assert unpack(b["labels"], b, IGNORE)[i, 1:len(e["ids"])].tolist() == e["labels"][1:]
    for i, m in enumerate(b["meta"]):
        P, T = m["prompt_len"], m["reason_len"]
        want_ppl = nll[i, P:P + T].mean()
        want_mi = mi_score(gold_curve(logits[i], P - 1, T, m["gold"]), torch.tensor(m["think_mask"]))
        assert float(s_ppl[i]) == pytest.approx(float(want_ppl), rel=1e-5)
        assert float(s_mi[i]) == pytest.approx(want_mi, rel=1e-4, abs=1e-6)
    assert any(0.1 < v < 1.0 for m in b["meta"] for v in m["think_mask"]) is False  # ε = 0.1 or 1 only


def test_compact_with_lora_scores_through_the_adapters(tmp_path, micro):
    """LoRA students: the consensus score reads the adapted q/k projections; training merges the adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from accord.config import CompactConfig
    from accord.train.compact import _qk, last_decoder_layer

    _model, _tok, _ex, b = _batch(micro, [(0, t) for t in TRACES])
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(micro),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], lora_dropout=0.5))
    layer = last_decoder_layer(peft)
    for n, p in layer.self_attn.q_proj.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # make the adapter matter
    v = torch.randn(3, layer.self_attn.q_proj.in_features)
    peft.train()
    q1, _ = _qk(layer, v)
    q2, _ = _qk(layer, v)
    assert torch.equal(q1, q2)  # no dropout noise in the scores, even in train mode
    base_q = layer.self_attn.q_proj.base_layer(layer.input_layernorm(v)).view_as(q1)
    assert not torch.allclose(q1, base_q)  # the adapter is part of the score
    loss, metrics = make_loss_fn(CompactConfig())(peft, b, 1)
    loss.backward()
    assert "s_cons/t0" in metrics and layer.self_attn.q_proj.lora_A["default"].weight.grad is not None
