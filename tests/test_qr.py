"""QR-Distill: the router's signal, the entropy term, word alignment across tokenizers, the mutual loss,
frozen students, resume, and `accord train/run` end to end on two micro students with two tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, write_jsonl

from accord.config import QrConfig
from accord.train import qr

TRACES = ["<think>\nStart 3 , add 4 : 7 .\n</think>\n\n\\boxed{7}",
          "<think>\nthree plus four is 7 , so 7\n</think>\n\n\\boxed{7}",
          "<think>\n3+4=7 check 7-4=3 ok\n</think>\n\n\\boxed{7}"]


def _row(q: str, trace: str, pid: str, teacher: str = "a") -> dict:
    return {"problem_id": pid, "teacher": teacher, "style": "default", "question": q, "answer": "7",
            "prompt": q, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": trace}]}


# --------------------------------------------------------------------------- the router's signal


def _train_router(ce: torch.Tensor, types: torch.Tensor, steps: int, *, normalised: bool = True,
                  entropy: float = 0.0, sft: bool = True, bias: float = 0.0, lr: float = 0.1,
                  kind: str = "per-student", baseline: str = "batch") -> torch.nn.Module:
    """A router on one-hot path-type features, trained on fixed per-(path, student) CE values."""
    torch.manual_seed(0)
    feats = torch.nn.functional.one_hot(types).float()
    router = qr.Router(feats.shape[1], [torch.eye(2)] * ce.shape[1])
    with torch.no_grad():
        router.mlp[-1].bias.fill_(bias)
    opt = torch.optim.SGD(router.parameters(), lr=lr)
    meta = [{"group": i // 4} for i in range(len(types))]
    for _ in range(steps):
        logits = router(feats)
        alpha, _ = qr.gates(logits, 1.0)
        loss = torch.zeros(())
        if sft:
            for k in range(ce.shape[1]):
                a = alpha[:, k]
                loss = loss + (qr.routed_sft(a, ce[:, k], meta, baseline) if normalised
                               else (a * ce[:, k]).sum() / len(a))  # the literal Σ α·CE over all paths
        loss = loss - entropy * qr._entropy(torch.sigmoid(logits), meta, kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return router


def test_router_learns_to_send_a_type_to_the_student_that_fits_it():
    """Student 0 has the lower CE on type A (0), student 1 on type B: the gradient raises the gate logit
    (A, s0) and lowers (B, s0); a trained router sends A to s0 and B to s1."""
    types = torch.tensor([0, 1] * 32)
    ce = torch.stack([torch.where(types == 0, 0.5, 2.0), torch.where(types == 0, 1.2, 0.8)], 1)
    eye = torch.eye(2)
    torch.manual_seed(0)
    logits = torch.zeros(64, 2, requires_grad=True)  # the gate logits themselves, one per (path, student)
    alpha, _ = qr.gates(logits, 1.0)
    meta = [{"group": i // 4} for i in range(64)]
    loss = sum(qr.routed_sft(alpha[:, k], ce[:, k], meta, "batch") for k in range(2))
    g = torch.autograd.grad(loss, logits)[0]
    # non-zero, and a descent step raises (A, s0) and (B, s1) and lowers (B, s0) and (A, s1)
    assert g[types == 0, 0].mean() < 0 < g[types == 1, 0].mean()
    assert g[types == 1, 1].mean() < 0 < g[types == 0, 1].mean()
    p = torch.sigmoid(_train_router(ce, types, steps=150, lr=0.5, entropy=0.1)(eye)).detach()
    assert p[0, 0] > 0.5 > p[1, 0] and p[1, 1] > 0.5 > p[0, 1]


def test_literal_sum_without_normalisation_collapses_the_selection_rate():
    """Documents the spec's Q6: Σ α·CE over all paths (not the assigned paths' mean) and no entropy term →
    selection rate 0 for every type and student; the assigned-paths mean with the entropy term keeps routing."""
    types = torch.tensor([0, 1] * 32)
    ce = torch.stack([torch.where(types == 0, 0.5, 2.0), torch.where(types == 0, 1.2, 0.8)], 1)
    eye = torch.eye(2)
    lit = torch.sigmoid(_train_router(ce, types, steps=300, normalised=False, lr=1.0)(eye)).detach()
    norm = torch.sigmoid(_train_router(ce, types, steps=300, lr=0.5, entropy=0.1)(eye)).detach()
    assert lit.max() < 0.05
    assert norm[0, 0] > 0.5 and norm[1, 1] > 0.5
    # the paper's self-normalised form alone drifts to fewer paths until nothing is assigned (docstring 2):
    # student 0 ends up with no path at all, even type A where it is the better student
    bare = torch.sigmoid(_train_router(ce, types, steps=300, lr=0.5, baseline="none")(eye)).detach()
    assert bare[:, 0].max() < 0.05


def test_batch_baseline_changes_the_routers_signal_not_the_value_or_the_students_gradient():
    torch.manual_seed(0)
    ce = torch.rand(8, requires_grad=True)
    lg = torch.randn(8, requires_grad=True)
    a, soft = qr.gates(lg, 1.0)
    meta = [{"group": i // 2} for i in range(8)]
    v0, v1 = qr.routed_sft(a, ce, meta, "none"), qr.routed_sft(a, ce, meta, "batch")
    assert float(v0) == pytest.approx(float(v1), abs=1e-6)
    d = a.detach().sum().clamp(min=1)
    g_ce, g_l = torch.autograd.grad(v1, (ce, lg))
    assert torch.allclose(g_ce, a.detach() / d)  # the student learns the assigned paths' mean
    centred = (ce.detach() - ce.detach().mean()) / d  # the router: CE − the batch mean, through σ′
    assert torch.allclose(g_l, centred * (soft * (1 - soft)).detach(), atol=1e-6)


def test_entropy_term_drives_the_rate_to_one_half():
    types = torch.tensor([0, 1] * 32)
    ce = torch.zeros(64, 2)
    start = torch.sigmoid(_train_router(ce, types, steps=0, bias=-2.5)(torch.eye(2))).mean()
    end = torch.sigmoid(_train_router(ce, types, steps=400, sft=False, entropy=1.0, bias=-2.5, lr=1.0)(
        torch.eye(2))).mean()
    assert start < 0.15 and abs(end - 0.5) < 0.05


def test_gates_are_hard_in_value_and_soft_in_gradient():
    lg = torch.randn(50, 3, requires_grad=True)
    a, soft = qr.gates(lg, 1.0)
    v = a.detach()
    assert torch.allclose(v, v.round(), atol=1e-6) and torch.equal(v.round(), (soft > 0.5).float())
    a.sum().backward()
    assert torch.allclose(lg.grad, (soft * (1 - soft)).detach())  # ∂soft/∂l at τ = 1


# --------------------------------------------------------------------------- word alignment


def test_word_units_agree_across_two_tokenizers(micro, micro_b):
    from transformers import AutoTokenizer

    text_row = _row("Start at 3.", "<think>\nStart 31 , add 45 : 76 .  ok\n</think>\n\n\\boxed{76}", "p0")
    words = None
    for path in (micro, micro_b):
        tok = AutoTokenizer.from_pretrained(path)
        e = qr.encode_path(tok, text_row, 256)
        units = sorted({u for u in e["unit"] if u >= 0})
        # every word has a token, and the tokens of unit u decode to exactly word u
        pieces: dict[int, list[int]] = {}
        for i, u in zip(e["ids"], e["unit"]):
            if u >= 0:
                pieces.setdefault(u, []).append(i)
        got = [tok.decode(pieces[u]).strip() for u in units]
        words = words or got
        assert got == words
        assert e["n_units"] == len(words)
    assert words[0] == "Start" and "76" in words and "<think>" not in words


def test_pooled_states_match_a_slow_reference():
    torch.manual_seed(0)
    z = torch.randn(3, 9, 5)
    unit = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, -1, -1], [-1, -1, 0, 1, 1, 3, -1, -1, -1], [0] * 9])
    pooled, present = qr.pool_units(z, unit, 4)
    for b in range(3):
        for u in range(4):
            idx = [t for t in range(9) if unit[b, t] == u]
            assert bool(present[b, u]) == bool(idx)
            if idx:
                assert torch.allclose(pooled[b, u], z[b, idx].mean(0), atol=1e-6)


def test_token_units_fall_back_to_the_word_of_the_first_non_space_character():
    text = "ab  cd e"
    units = qr.word_units(text)
    assert units == [(0, 2), (4, 6), (7, 8)]
    assert qr.token_units(text, [(0, 1), (1, 3), (3, 5), (5, 6), (6, 8)], units) == [0, 0, 1, 1, 2]
    assert qr.token_units(text, [(2, 3)], units) == [-1]


def test_procrustes_recovers_a_rotation_and_random_rows_are_orthonormal():
    torch.manual_seed(0)
    z, _ = torch.linalg.qr(torch.randn(200, 6))  # whitened states: Procrustes is then exact least squares
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    p = qr.procrustes(z, z @ q[:4].T)  # the reference is narrower: 4 of the 6 directions
    assert p.shape == (4, 6) and torch.allclose(p, q[:4], atol=1e-4)
    r = qr.random_projection(4, 6, seed=1)
    assert torch.allclose(r @ r.T, torch.eye(4), atol=1e-5)


# --------------------------------------------------------------------------- the joint loss


def _models(paths: list[Path], rows: list[dict], freeze=()):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = [f"s{i}" for i in range(len(paths))]
    students = {n: AutoModelForCausalLM.from_pretrained(p) for n, p in zip(names, paths)}
    toks = {n: AutoTokenizer.from_pretrained(p) for n, p in zip(names, paths)}
    for n in freeze:
        students[n].requires_grad_(False)
    for r in rows:
        r["type"] = r["teacher"]
    ex = qr._encode(rows, names, toks, 128, True)
    feat = qr._hashing([r["messages"][-1]["content"] for r in rows])
    router = qr.Router(feat.shape[1], qr.fit_projections(students, ex, "fitted", 0))
    return names, students, toks, ex, feat, router


def test_identical_students_have_zero_mutual_loss(micro):
    rows = [_row("Start at 3.", t, f"p{i}", teacher="ab"[i % 2]) for i, t in enumerate(TRACES)]
    names, students, toks, ex, feat, router = _models([micro, micro], rows)
    assert torch.allclose(router.proj(0), router.proj(1), atol=1e-5)
    b = qr.collate_paths(names, [t.pad_token_id for t in toks.values()], feat)(ex)
    out = [qr.student_pass(students[n], b["per"][n], b["n_units"], True) for n in names]
    mutual, gamma = qr._mutual(out, names, set(), router, torch.ones(3, 2), QrConfig())
    assert float(mutual) < 1e-8
    assert torch.allclose(gamma, torch.full_like(gamma, 0.5))


def test_the_mutual_loss_pulls_each_student_towards_the_detached_ensemble(micro, micro_b):
    rows = [_row("Start at 3.", t, f"p{i}") for i, t in enumerate(TRACES)]
    names, students, toks, ex, feat, router = _models([micro, micro_b], rows)
    b = qr.collate_paths(names, [t.pad_token_id for t in toks.values()], feat)(ex)
    out = [qr.student_pass(students[n], b["per"][n], b["n_units"], True) for n in names]
    mutual, gamma = qr._mutual(out, names, set(), router, torch.ones(3, 2), QrConfig())
    # slow reference: per path, per student, mean over shared units of ‖P z − Σ γ P z‖² / d′
    zt = [o[2] @ router.proj(k).T for k, o in enumerate(out)]
    ref = 0.0
    for j in range(3):
        shared = [u for u in range(b["n_units"]) if all(bool(o[3][j, u]) for o in out)]
        ens = {u: sum(gamma[j, k] * zt[k][j, u] for k in range(2)) for u in shared}
        for k in range(2):
            ref += sum(float(((zt[k][j, u] - ens[u]) ** 2).mean()) for u in shared) / len(shared) / 3
    assert float(mutual) == pytest.approx(ref, rel=1e-4)
    assert mutual.requires_grad
    mutual.backward()
    assert router.proj(0).grad is None  # the projections are fixed buffers


def test_a_frozen_student_is_bitwise_unchanged(micro, micro_b, tmp_path):
    from accord.train.engine import TrainArgs, train

    rows = [_row("Start at 3.", t, f"p{i // 2}", teacher="ab"[i % 2]) for i, t in enumerate(TRACES * 2)]
    names, students, toks, ex, feat, router = _models([micro, micro_b], rows, freeze=("s1",))
    before = {k: v.clone() for k, v in students["s1"].state_dict().items()}
    before0 = {k: v.clone() for k, v in students["s0"].state_dict().items()}
    q = QrConfig(encoder="hashing", freeze=["s1"])
    args = TrainArgs(steps=3, batch_size=6, lr=1e-2, max_len=128, lrs={"heads": 1e-2})
    res = train({**students, "heads": router}, {**toks, "heads": None}, [], args, examples=ex,
                batcher=qr.capped_batcher(None), units_fn=len, loss_fn=qr.make_loss_fn(q, names, {"s1"}),
                collate_fn=qr.collate_paths(names, [t.pad_token_id for t in toks.values()], feat))
    after = res.model["s1"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(before0[k], v) for k, v in res.model["s0"].state_dict().items())


def test_paths_per_question_caps_each_question_per_epoch():
    import random

    keys = [(g, 10) for g in ("a", "a", "a", "a", "b", "b", "c")]
    batches = qr.capped_batcher(2)(keys, 4, random.Random(0))
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 5  # 2 of a, 2 of b, 1 of c
    assert sum(1 for i in seen if keys[i][0] == "a") == 2


# --------------------------------------------------------------------------- end to end


def _qr_run(tmp_path, micro, micro_b, **qr_over):
    run = tmp_path / "run"
    (run / "corpora").mkdir(parents=True)
    for t, shift in (("a", 0), ("b", 1), ("c", 2)):
        rows = [_row(f"Start at {i}.", TRACES[(shift + i) % 3], pid=f"p{i}", teacher=t) | {"level": 1 + i % 2}
                for i in range(6) if (t, i) != ("c", 5)]
        write_jsonl(run / "corpora" / f"{t}.jsonl", rows)
    cfg = {"run_dir": str(run), "problems": {"path": "unused.jsonl"}, "student": {"model": str(micro)},
           "teachers": [{"name": t, "backend": "column", "column": t} for t in "abc"],
           "train": {"method": "qr", "rounds": 2, "steps_per_round": 2, "batch_size": 6, "lr": 1e-3,
                     "max_len": 128},
           "qr": {"students": [{"model": str(micro), "name": "llama"}, {"model": str(micro_b), "name": "qwen",
                                                                         "lr": 2e-3}],
                  "encoder": "hashing", **qr_over},
           "eval": {"splits": {"target": {"path": "unused.jsonl"}}}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return run, p


def test_accord_train_qr_end_to_end(tmp_path, micro, micro_b):
    from accord.analysis.report import routing_table, write_report
    from accord.config import load_config

    run, p = _qr_run(tmp_path, micro, micro_b)
    code, out = run_cli("train", str(p))
    assert code == 0, out
    assert "qr: 17 paths of 6 questions, 3 path type(s); students llama, qwen" in out
    res = [json.loads((run / "train" / f"qr-{n}" / "result.json").read_text()) for n in ("llama", "qwen")]
    assert [r["method"] for r in res] == ["qr", "qr"] and res[1]["base_model"] == str(micro_b)
    assert len(res[0]["curve"]) == 2 and (Path(res[0]["curve"][0]["path"]) / "config.json").exists()
    assert (run / "train" / "qr" / "checkpoint-2" / "heads" / "model.safetensors").exists()
    steps = [json.loads(x) for x in (run / "train" / "qr" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(0 <= ev["sel/llama"] <= 1 and "sel-type/a/qwen" in ev for ev in steps)
    assert all("sel-level/1/llama" in ev and ev["mutual"] >= 0 for ev in steps)
    routing = [json.loads(x) for x in (run / "train" / "qr" / "routing.jsonl").read_text().splitlines()]
    assert len(routing) == 17 and set(routing[0]["gate"]) == {"llama", "qwen"}
    head, body = routing_table(run / "train" / "qr" / "routing.jsonl", "type")
    assert [r[0] for r in body] == ["a", "b", "c"] and head[-1] == "selected by qwen"
    html = write_report(load_config(p), res, []).read_text()
    assert "qr-routing-type.png" in html and "qr-routing-level.png" in html and "qr-selection.png" in html
    assert "<h2>QR-Distill: selection rate per student over training</h2>" in html  # the default: no variant
    import re

    assert re.findall(r"<h2>QR-Distill: the trained router's selections by ([^<]*)</h2>", html) == [
        "path type (teacher / style) (Fig. 4)", "difficulty level (Fig. 5)"]
    code, out = run_cli("train", str(p))
    assert code == 0 and "qr: finished earlier, skipped" in out


def test_qr_over_two_training_seeds_reports_the_routing_once(tmp_path, micro, micro_b):
    """`accord train --seeds 0,1` trains QR per seed (`train/qr-seed1/`, `qr-llama-seed1`, …); the report shows the
    routing under one set of headings, the second seed's folded under them."""
    from accord.analysis.report import write_report
    from accord.config import load_config

    run, p = _qr_run(tmp_path, micro, micro_b)
    code, out = run_cli("train", str(p), "--seeds", "0,1")
    assert code == 0, out
    assert (run / "train" / "qr-seed1" / "routing.jsonl").exists()
    res = [json.loads((run / "train" / n / "result.json").read_text())
           for n in ("qr-llama", "qr-qwen", "qr-llama-seed1", "qr-qwen-seed1")]
    html = write_report(load_config(p), res, []).read_text()
    assert html.count("<h2>QR-Distill: selection rate per student over training") == 1
    assert "<details><summary>qr-seed1: QR's routing for this training seed</summary><h3>QR-Distill: selection " \
           "rate per student over training — qr-seed1</h3>" in html and "qr-seed1-routing-type.png" in html


def test_qr_resumes_students_router_and_optimizer_exactly(tmp_path, micro, micro_b):
    from safetensors.torch import load_file

    run, p = _qr_run(tmp_path, micro, micro_b)
    assert run_cli("train", str(p))[0] == 0
    files = {n: run / "train" / f"qr-{n}" / "final" / "model.safetensors" for n in ("llama", "qwen")}
    files["heads"] = run / "train" / "qr" / "heads" / "model.safetensors"
    ref = {n: load_file(f) for n, f in files.items()}
    for n in ("llama", "qwen"):  # killed after the step-2 checkpoint
        shutil.rmtree(run / "train" / f"qr-{n}")
    (run / "train" / "qr" / "heads" / "model.safetensors").unlink()
    code, out = run_cli("train", str(p))
    assert code == 0, out
    assert "resuming qr from checkpoint-2 (step 2 of 4)" in out
    for n, f in files.items():
        got = load_file(f)
        for k in ref[n]:
            assert torch.equal(ref[n][k], got[k]), (n, k)


def test_qr_with_one_student_is_a_clear_error(tmp_path, micro):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "r"), "problems": {"path": "x.jsonl"},
                                 "teachers": [{"name": "a", "backend": "column", "column": "a"}],
                                 "train": {"method": "qr"}, "qr": {"students": [{"model": str(micro)}]}}))
    code, out = run_cli("train", str(p))
    assert code == 2 and "qr needs at least two students" in out and "train.method=std" in out


def test_missing_encoder_is_a_clear_error(tmp_path):
    from accord.train.common import TrainSetupError

    with pytest.raises(TrainSetupError, match="not a local sentence-transformers directory"):
        qr.embed(["x"], str(tmp_path / "nowhere"))


def test_routed_forward_split_matches_the_full_forward(micro):
    """``mutual_paths: routed`` runs the gradient forward on routed paths only: the values are the full
    forward's, and the gradient reaches the student only through the routed paths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(micro), AutoTokenizer.from_pretrained(micro)
    rows = [_row("Start at 3.", t, f"p{i}") | {"type": "a"} for i, t in enumerate(TRACES + TRACES[:1])]
    ex = qr._encode(rows, ["s"], {"s": tok}, 128, True)
    b = qr.collate_paths(["s"], [tok.pad_token_id], torch.zeros(4, 1))(ex)
    full = qr.student_pass(model, b["per"]["s"], b["n_units"], True)
    routed = torch.tensor([True, False, True, False])
    split = qr.split_pass(model, b["per"]["s"], b["n_units"], routed)
    for x, y in zip(full, split):
        assert torch.allclose(x.float(), y.float(), atol=1e-5)
    assert split[0][routed].requires_grad and not split[0][~routed].detach().requires_grad
    (split[0] * torch.tensor([0.0, 1.0, 0.0, 1.0])).sum().backward()  # only unrouted paths in the loss
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_packed_student_pass_equals_the_padded_one(micro, micro_b):
    """Paths packed for each student's forward (both tokenizers): the same per-path CE, competence, pooled
    states and gradients as the padded forward — whole batch and the routed split."""
    long = "<think>\n" + "Start 3 , add 4 : 7 .\n" * 8 + "</think>\n\n\\boxed{7}"
    rows = [_row("Start at 3.", t, f"p{i}") for i, t in enumerate(TRACES + [long, TRACES[0]])]
    names, students, toks, ex, feat, _router = _models([micro, micro_b], rows)
    b = qr.collate_paths(names, [t.pad_token_id for t in toks.values()], feat)(ex)
    routed = torch.tensor([True, False, True, True, False])
    for n in names:
        runs = []
        for pad in (None, toks[n].pad_token_id):
            students[n].zero_grad()
            out = qr.student_pass(students[n], b["per"][n], b["n_units"], True, pad)
            split = qr.split_pass(students[n], b["per"][n], b["n_units"], routed, pad)
            (out[0].sum() + (out[2] ** 2).mean() + split[0].sum()).backward()
            runs.append((out, split, [p.grad.clone() for p in students[n].parameters()]))
        (a, sa, ga), (c, sc, gc) = runs
        for x, y in [*zip(a, c), *zip(sa, sc)]:
            assert torch.allclose(x.float(), y.float(), atol=1e-5), n
        assert all(torch.allclose(u, v, atol=1e-6, rtol=1e-4) for u, v in zip(ga, gc)), n
    assert qr.repack(b["per"][names[0]], 0)["input_ids"].shape[0] < len(rows)  # paths really shared rows


@pytest.mark.parametrize("over", [
    {"qr": {"route": "frozen"}}, {"qr": {"route": "all"}}, {"qr": {"mutual_paths": "routed", "proj": "random"}},
    {"qr": {"competence": "uniform", "entropy": "pooled", "router_baseline": "question"}},
    {"qr": {"router_baseline": "none", "paths_per_question": 2, "tau_end": 0.5, "schedule": "cosine"}},
    {"qr": {"freeze": ["qwen"], "mutual_weight": 0.0}}, {"train": {"lora": {"r": 4}}},
    {"train": {"lora": {"r": 4, "quantize": "nf4"}}}, {"train": {"chunked_loss": True}},
], ids=["frozen-router", "no-routing", "routed-random-proj", "uniform-pooled-question", "paper-literal",
        "frozen-peer-no-collab", "lora", "qlora", "chunked-head"])
def test_every_ablation_trains_end_to_end(tmp_path, micro, micro_b, over):
    """Table 2 / Table 5 ablations and the reading options run through `accord train` and write both students."""
    run, p = _qr_run(tmp_path, micro, micro_b)
    cfg = yaml.safe_load(p.read_text())
    for section, values in over.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    p.write_text(yaml.safe_dump(cfg))
    code, out = run_cli("train", str(p))
    assert code == 0, out
    for n in ("llama", "qwen"):
        assert (run / "train" / f"qr-{n}" / "final" / "config.json").exists()
    steps = [json.loads(x) for x in (run / "train" / "qr" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(np_finite(ev["loss"]) for ev in steps)
    from accord.train.engine import chunks_asked

    chunked = chunks_asked(over.get("train", {}).get("chunked_loss"), None)  # unset: on where CUDA is visible
    assert ("qr: the head in chunks from the hidden states (no full-vocabulary logits) for llama, qwen" in out) == \
        bool(chunked) and ("qr: the head over full-vocabulary logits" in out) != bool(chunked)
    if over.get("qr", {}).get("route") == "all":
        assert all(ev["sel/llama"] == 1.0 for ev in steps)
    if over.get("train", {}).get("lora", {}).get("quantize"):  # QR-Distill's QLoRA: both students, saved in float
        assert out.count("on a 4-bit NF4 base (QLoRA)") == 1  # one joint run
        for n in ("llama", "qwen"):
            assert "quantization_config" not in json.loads((run / "train" / f"qr-{n}" / "final" / "config.json")
                                                           .read_text())


def np_finite(x: float) -> bool:
    import math

    return math.isfinite(x)


def test_length_buckets_give_the_whole_batch_values_and_gradients(micro):
    """Short and long paths of a question share a batch: ``split_pass`` cuts it into length buckets (a forward
    each) and returns what one padded forward gives — per-path CE, competence, pooled states, gradients."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accord.train.varlen import split_by_length

    model, tok = AutoModelForCausalLM.from_pretrained(micro), AutoTokenizer.from_pretrained(micro)
    long = "<think>\n" + "Start 3 , add 4 : 7 .\n" * 8 + "</think>\n\n\\boxed{7}"
    rows = [_row("Start at 3.", t, f"p{i}") | {"type": "a"} for i, t in enumerate(TRACES + [long, long])]
    ex = qr._encode(rows, ["s"], {"s": tok}, 256, True)
    batch = qr.collate_paths(["s"], [tok.pad_token_id], torch.zeros(len(rows), 1))(ex)
    b, n = batch["per"]["s"], batch["n_units"]
    assert len(split_by_length(b["attention_mask"].sum(1).tolist())) >= 2  # really cut into buckets
    runs = []
    for fn in (lambda: qr.student_pass(model, b, n, True), lambda: qr.split_pass(model, b, n, None)):
        model.zero_grad()
        out = fn()
        (out[0].sum() + (out[2] ** 2).mean()).backward()
        runs.append((out, [p.grad.clone() for p in model.parameters()]))
    (a, ga), (c, gc) = runs
    for x, y in zip(a, c):
        assert torch.allclose(x.float(), y.float(), atol=1e-5)
    assert all(torch.allclose(u, v, atol=1e-6, rtol=1e-4) for u, v in zip(ga, gc))


@pytest.mark.parametrize("mutual_paths", ["all", "routed"])
def test_chunked_head_gives_the_full_logits_loss_metrics_and_gradients(micro, micro_b, mutual_paths):
    """Issue 13 item 2: QR's per-path CE (both students, two tokenizers; one packed, one padded) read through the
    chunked head from the final hidden states gives the full logits' loss, metrics and gradients — the students'
    and the router's."""
    from accord.train.engine import LinearTokenNLL

    long = "<think>\n" + "Start 3 , add 4 : 7 .\n" * 8 + "</think>\n\n\\boxed{7}"
    rows = [_row("Start at 3.", t, f"p{i // 2}", teacher="ab"[i % 2]) for i, t in enumerate(TRACES + [long, TRACES[0]])]
    names, students, toks, ex, feat, router = _models([micro, micro_b], rows)
    b = qr.collate_paths(names, [t.pad_token_id for t in toks.values()], feat)(ex)
    models = {**students, qr.HEADS: router}
    q = QrConfig(encoder="hashing", mutual_paths=mutual_paths)
    got = []
    for chunked in (False, True):
        for m in models.values():
            m.zero_grad()
        torch.manual_seed(3)  # the same gates
        LinearTokenNLL.CHUNK = 5  # several chunks
        try:
            loss, metrics = qr.make_loss_fn(q, names, set(), pack={"s0": toks["s0"].pad_token_id},
                                            chunked=chunked)(models, b, len(rows))
            loss.backward()
        finally:
            LinearTokenNLL.CHUNK = 4096
        got.append((loss, metrics, {f"{k}.{n}": p.grad.clone() for k, m in models.items()
                                    for n, p in m.named_parameters() if p.grad is not None}))
    (l0, m0, g0), (l1, m1, g1) = got
    assert float(l1.detach()) == pytest.approx(float(l0.detach()), rel=1e-5)
    assert m1.keys() == m0.keys() and all(m1[k] == pytest.approx(m0[k], rel=1e-4, abs=1e-6) for k in m0)
    assert g1.keys() == g0.keys() and any(k.startswith("s1.") for k in g0)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-4), n


def test_state_token_nll_matches_token_nll_on_random_tensors():
    """engine.state_token_nll (QR's chunked head): the [B, T] per-token NLL and its gradients of any weighting equal
    token_nll over the full logits h W^T, ignored positions 0, over several chunks."""
    from accord.train.engine import IGNORE, LinearTokenNLL, state_token_nll, token_nll

    torch.manual_seed(0)
    h = torch.randn(3, 9, 8, requires_grad=True)
    w = torch.randn(21, 8, requires_grad=True)
    labels = torch.randint(0, 21, (3, 9))
    labels[0, :4] = IGNORE
    labels[2, 6:] = IGNORE
    weights = torch.rand(3, 9)
    ref = token_nll(h @ w.T, labels)
    (ref * weights).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    LinearTokenNLL.CHUNK = 4
    try:
        got = state_token_nll(h, w, labels)
        (got * weights).sum().backward()
    finally:
        LinearTokenNLL.CHUNK = 4096
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5)
    assert not got[0, :4].any() and not got[2, 6:].any() and got[1, 1:].all()
    assert torch.allclose(h.grad, gh, atol=1e-5) and torch.allclose(w.grad, gw, atol=1e-5)
