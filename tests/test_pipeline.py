"""End to end: `accord run/train/eval/report` on micro models, MoT = MTD (App. A), bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import bf16_process, corpus_run, pipeline_cfg, run_cli, write_jsonl


def chromium_dom(page: Path) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={page.parent / '.chromium'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=False)
    return out.stdout


def test_every_one_student_method_trains_with_lora(tmp_path, micro):
    """``train.lora.r`` for every method with one student (QR's students: tests/test_qr.py): each result is a plain
    model, LoRA's targets moved and nothing else.  MoT trains the merged student again each round (a LoRA run froze
    the base it returned, and round 2 stopped at "optimizer got an empty parameter list")."""
    from safetensors.torch import load_file

    p, run = corpus_run(tmp_path, micro, "lora", lora={"r": 2, "alpha": 4}, rounds=2)
    code, out = run_cli("train", str(p), "train.method=[std,mtd,posthoc,mot,compact]")
    assert code == 0, out
    base = load_file(micro / "model.safetensors")
    for name in ("std-a", "mtd", "posthoc", "mot", "compact"):
        final = Path(json.loads((run / "train" / name / "result.json").read_text())["final"])
        w = load_file(final / "model.safetensors")
        assert set(w) == set(base), name  # adapters merged in
        moved = {k for k in base if not torch.equal(base[k], w[k])}
        assert moved and all("proj" in k for k in moved), name
    mot = [load_file(run / "train/mot" / f"round-{r}/merged/model.safetensors") for r in (1, 2)]
    assert any(not torch.equal(mot[0][k], mot[1][k]) for k in mot[0])


def test_run_end_to_end_then_skips_finished_stages(tmp_path, problems_file, two_parrots, micro):
    cfg = pipeline_cfg(tmp_path, problems_file, two_parrots, micro)
    code, out = run_cli("run", str(cfg))
    assert code == 0, out
    run = tmp_path / "run"
    for name in ("std-seven", "std-eight", "mtd", "posthoc", "mot"):
        res = json.loads((run / "train" / name / "result.json").read_text())
        assert (Path(res["final"]) / "model.safetensors").exists(), name
    mot = json.loads((run / "train" / "mot" / "result.json").read_text())
    assert [c["round"] for c in mot["curve"]] == [1, 2] and mot["branch_steps"] == 2 * 2 * 2
    std = json.loads((run / "train" / "std-seven" / "result.json").read_text())
    assert [c["steps"] for c in std["curve"]] == [2, 4]  # T×S steps, a checkpoint every S (matched budget)
    rows = json.loads((run / "eval" / "results.json").read_text())
    finals = {(r["model"], r["split"]) for r in rows if r.get("final")}
    assert ("base", "target") in finals and ("mot", "general") in finals and ("posthoc", "target") in finals
    assert all(0 <= r["pass1"] <= 1 for r in rows)
    assert all(set(r["pass_at"]) == {"1", "2"} and r["pass_at"]["1"] == pytest.approx(r["pass1"])
               and r["pass_at"]["2"] >= r["pass1"] for r in rows)  # unbiased pass@k beside pass@1
    assert all(r["maj"] is not None for r in rows)  # maj@k recorded beside them
    assert all((r["temperature"], r["top_p"], r["n"], r["k"]) == (0.6, 1.0, r["n"], 2) and r["n"] > 0 for r in rows)
    assert "top-p 1.0 (k = 2)" in (run / "report" / "index.html").read_text()
    import torch
    import transformers

    # what produced the numbers: recorded beside each result and evaluation, one line at the report's foot
    assert std["provenance"]["torch"] == torch.__version__ and all(r["provenance"] == std["provenance"] for r in rows)
    assert f"Made with python {std['provenance']['python']}, accord" in (run / "report" / "index.html").read_text()
    assert f"transformers {transformers.__version__}" in (run / "report" / "index.html").read_text()
    assert "mot" in out and "branch-steps" in out  # the text table
    assert "paired against mtd" in out and "target Δ vs mtd" in out  # and each method's paired difference
    assert "<h3>Paired against mtd</h3>" in (run / "report" / "index.html").read_text()
    assert all(r["tokens"] > 0 and 0 <= r["cut"] <= 1 for r in rows)  # how long each model writes
    assert "<h2>How long each model writes</h2>" in (run / "report" / "index.html").read_text()
    dom = chromium_dom(run / "report" / "index.html")
    assert "<table>" in dom and "std-seven" in dom and "<td>mot</td>" in dom
    assert (run / "report" / "curve-target.png").exists()
    # each trained model's directory carries a Hub model card with its evaluation (accord/card.py)
    from huggingface_hub import ModelCard

    finals = {(r["model"], r["split"]): r for r in rows if r.get("final")}
    for name in ("std-seven", "mtd", "posthoc", "mot"):
        res = json.loads((run / "train" / name / "result.json").read_text())
        card = ModelCard.load(Path(res["final"]) / "README.md")
        assert card.data.library_name == "transformers" and res["method"] in card.data.tags, name
        assert card.data.base_model is None  # a local student, not a Hub id
        m = finals[name, "target"]
        assert f"| target | `{problems_file}` | {m['n']} | {m['pass1']:.3f} ± {m['pass1_se']:.3f} |" in card.text, \
            card.text
        assert "| general |" in card.text and "Δ pass@1 vs base" in card.text and "Not evaluated" not in card.text
        target = next(line for line in card.text.splitlines() if line.startswith("| target |"))
        assert target.split("|")[-2].strip() not in ("", "–"), target  # the paired difference from the base
    # everything is finished: a re-run trains and evaluates nothing
    code, out = run_cli("run", str(cfg))
    assert code == 0 and out.count("finished earlier") >= 4
    # any checkpoint can be evaluated beside the trained ones; the report is rebuilt from disk
    code, out = run_cli("eval", str(cfg), "--models", f"seven-teacher={two_parrots[0]['model']}")
    assert code == 0 and "seven-teacher" in out
    seven = [r for r in json.loads((run / "eval" / "results.json").read_text()) if r["model"] == "seven-teacher"]
    assert {r["split"] for r in seven} == {"target", "general"}
    assert seven[0]["pass1"] >= 0.4  # the parrot answers 7: right on half of the problems
    code, out = run_cli("report", str(cfg))
    assert code == 0 and "paired against mtd" in (run / "report" / "table.txt").read_text()  # as printed
    (run / "report" / "table.txt").unlink()
    code, out = run_cli("report", str(run))  # the run directory stands for the config it holds
    assert code == 0 and "paired against mtd" in (run / "report" / "table.txt").read_text()


def test_report_escapes_model_text(tmp_path, problems_file, two_parrots, micro):
    from accord.analysis.report import write_report
    from accord.config import load_config
    from accord.problems import problem_id

    q = "Is <b>3</b> plus 4 seven?"
    problems_file.write_text(json.dumps({"question": q, "answer": "7"}) + "\n")
    cfg = load_config(pipeline_cfg(tmp_path, problems_file, two_parrots, micro))
    d = tmp_path / "run" / "eval" / "base"
    d.mkdir(parents=True)
    (d / "target.rows.jsonl").write_text(json.dumps({"problem_id": problem_id(q), "mode": "greedy", "parsed": "<i>",
                                                     "output": "<script>alert(1)</script>", "verdict": "x"}) + "\n")
    rows = [{"key": "base", "model": "base", "split": "target", "final": True, "pass1": 0.5, "greedy": 0.5}]
    html = write_report(cfg, [], rows).read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # the sample stands under its problem's question and reference answer, both escaped
    assert "Is &lt;b&gt;3&lt;/b&gt; plus 4 seven?" in html and "reference answer: <code>7</code>" in html
    assert "(greedy, x, answered <code>&lt;i&gt;</code>)" in html
    assert "Only the base student is here" in html and "accord train CONFIG" in html  # says what is missing


def test_one_mot_round_equals_one_mtd_step(tmp_path, micro, lab_tokenizer):
    """MoT App. A at E = 1: plain SGD, one step per branch, equal-size teacher batches → average = MTD step."""
    run = tmp_path / "run"
    (run / "corpora").mkdir(parents=True)
    answers = ["<think>\n(1) 3>4\n</think>\n\n\\boxed{4}", "<think>\n(1) 5>1 (2) 1>9\n</think>\n\n\\boxed{9}"]

    def row(q, a):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    a_rows = [row(f"Start at {i}.", answers[i % 2]) for i in range(4)]
    b_rows = [row(f"Begin from {i}!", answers[(i + 1) % 2]) for i in range(4)]  # same target tokens, other prompts
    write_jsonl(run / "corpora" / "a.jsonl", a_rows)
    write_jsonl(run / "corpora" / "b.jsonl", b_rows)
    write_jsonl(run / "corpora" / "all.jsonl", a_rows + b_rows)
    teachers = [{"name": "a", "backend": "column", "column": "a"}, {"name": "b", "backend": "column", "column": "b"}]
    cfg = pipeline_cfg(tmp_path, "unused.jsonl", teachers, micro, method=["mtd", "mot"], rounds=1,
                       steps_per_round=1, batch_size=8, optimizer="sgd", clip=0, lr=0.5, warmup_ratio=0)
    code, out = run_cli("train", str(cfg))
    assert code == 0, out
    from safetensors.torch import load_file

    mtd = load_file(run / "train" / "mtd" / "final" / "model.safetensors")
    mot = load_file(run / "train" / "mot" / "round-1" / "merged" / "model.safetensors")
    base = load_file(Path(micro) / "model.safetensors")
    moved = 0
    for k in mtd:
        if not bf16_process():  # exact arithmetic's identity, to float32 rounding
            assert torch.allclose(mtd[k], mot[k], atol=1e-6), k
        moved += not torch.equal(mtd[k], base[k])
    assert moved > 5  # the step really changed the weights
    # under bf16 autocast (CUDA visible) the two gradients differ by bf16 rounding: a small part of the update
    diff = sum(float((mtd[k] - mot[k]).norm() ** 2) for k in mtd) ** 0.5
    step = sum(float((mtd[k] - base[k]).norm() ** 2) for k in mtd) ** 0.5
    assert diff <= (1e-5 if not bf16_process() else 0.05) * step, diff / step


def test_training_bad_input(tmp_path, problems_file, micro, parrot7):
    run = tmp_path / "run"
    (run / "corpora").mkdir(parents=True)
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\boxed{1}"}]}
    write_jsonl(run / "corpora" / "a.jsonl", [good] * 3)
    (run / "corpora" / "b.jsonl").write_text("")
    write_jsonl(run / "corpora" / "all.jsonl", [good] * 3)
    teachers = [{"name": "a", "backend": "column", "column": "a"}, {"name": "b", "backend": "column", "column": "b"}]
    cfg = pipeline_cfg(tmp_path, problems_file, teachers, micro, method="mot", rounds=1, steps_per_round=2)
    code, out = run_cli("train", str(cfg))
    assert code == 0, out
    assert "'b' has an empty corpus" in out and "more steps" not in out
    # every corpus empty → a clear error, exit 2
    (run / "corpora" / "a.jsonl").write_text("")
    shutil.rmtree(run / "train")
    code, out = run_cli("train", str(cfg))
    assert code == 2 and "every teacher corpus is empty" in out
    # a broken line names file and line
    (run / "corpora" / "a.jsonl").write_text(json.dumps(good) + "\n{oops\n")
    code, out = run_cli("train", str(cfg), "train.method=std:a")
    assert code == 2 and "a.jsonl:2: malformed JSON" in out
    # more steps than data: say how many epochs
    write_jsonl(run / "corpora" / "a.jsonl", [good] * 3)
    code, out = run_cli("train", str(cfg), "train.method=std:a", "train.steps_per_round=3")
    assert code == 0 and "3 steps × 4 = 4.0 epoch(s) of 3 examples" in out
    # a student that is not an HF checkpoint
    (tmp_path / "nothf").mkdir()
    code, out = run_cli("train", str(cfg), f"student.model={tmp_path / 'nothf'}", "train.method=mtd")
    assert code == 2 and "not a Hugging Face checkpoint" in out
    # unknown method / teacher are config errors
    code, out = run_cli("train", str(cfg), "train.method=std:zzz")
    assert code == 2 and "'zzz' is not one of the teachers" in out


def two_imported_teachers(tmp_path):
    """Two `column` teachers whose corpora (and the union) hold four identical rows: selection plumbing only."""
    run = tmp_path / "run"
    (run / "corpora").mkdir(parents=True)
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\boxed{7}"}]}
    for name in ("a", "b", "all"):
        write_jsonl(run / "corpora" / f"{name}.jsonl", [good] * 4)
    return run, [{"name": t, "backend": "column", "column": t} for t in ("a", "b")]


def test_mot_validation_selection_picks_a_round(tmp_path, problems_file, micro):
    run, teachers = two_imported_teachers(tmp_path)
    cfg = pipeline_cfg(tmp_path, problems_file, teachers, micro, method="mot", rounds=2, steps_per_round=1,
                       select="validation")
    code, out = run_cli("train", str(cfg), "problems.split=train", "problems.validation_fraction=0.5")
    assert code == 0, out
    res = json.loads((run / "train" / "mot" / "result.json").read_text())
    assert res["selected_round"] in (1, 2) and res["final"].endswith(f"round-{res['selected_round']}/merged")
    assert "validation greedy" in out and "warning" not in out


@pytest.mark.parametrize("merge", ["average", "ties"])
def test_mot_resumes_from_the_last_merged_round(tmp_path, micro, merge):
    from safetensors.torch import load_file

    def setup(name):
        run = tmp_path / name / "run"
        (run / "corpora").mkdir(parents=True)
        rows = {t: [{"messages": [{"role": "user", "content": f"{t} {i}"},
                                  {"role": "assistant", "content": f"\\boxed{{{i}}}"}]} for i in range(4)]
                for t in ("a", "b")}
        for t, r in rows.items():
            write_jsonl(run / "corpora" / f"{t}.jsonl", r)
        teachers = [{"name": t, "backend": "column", "column": t} for t in ("a", "b")]
        cfg = pipeline_cfg(tmp_path / name, "unused.jsonl", teachers, micro, method="mot", rounds=2,
                           steps_per_round=2, merge={"method": merge, "density": 0.5})
        return cfg, run

    cfg_ref, _ = setup("ref")
    cfg, run = setup("killed")
    for c in (cfg_ref, cfg):
        code, out = run_cli("train", str(c))
        assert code == 0, out
    # a kill after round 1: round 2 and the result record are gone
    shutil.rmtree(run / "train" / "mot" / "round-2")
    (run / "train" / "mot" / "result.json").unlink()
    code, out = run_cli("train", str(cfg))
    assert code == 0, out
    res = json.loads((run / "train" / "mot" / "result.json").read_text())
    assert res["resumed_from_round"] == 1
    a = load_file(run / "train" / "mot" / "round-2" / "merged" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "run" / "train" / "mot" / "round-2" / "merged" / "model.safetensors")
    for k in a:  # on a failure, how far and how much: ties' trim and sign election turn tiny differences into
        # whole elements (its [ties] case failed with CUDA visible in session 18, [average] passed)
        assert torch.allclose(a[k], b[k], atol=1e-6), (k, float((a[k] - b[k]).abs().max()),
                                                       f"{float((a[k] != b[k]).float().mean()):.2%} of elements differ")


def _two_column_teachers(run: Path, n: int) -> list[dict]:
    """Corpora a, b (``n`` rows each) and their union already collected in ``run``; the two teachers' entries."""
    (run / "corpora").mkdir(parents=True)
    rows = {t: [{"messages": [{"role": "user", "content": f"{t} {i}"}, {"role": "assistant", "content": f"{i}"}]}
                for i in range(n)] for t in ("a", "b")}
    for t, r in [*rows.items(), ("all", rows["a"] + rows["b"])]:
        write_jsonl(run / "corpora" / f"{t}.jsonl", r)
    return [{"name": t, "backend": "column", "column": t} for t in ("a", "b")]


def test_qlora_trains_mtd_and_mot_into_ordinary_float_checkpoints(tmp_path, micro):
    """``train.lora.quantize: nf4`` through the CLI: MTD's and MoT's checkpoints are ordinary float models (no
    quantization config, float32 safetensors); MTD's projections moved by a rank-r delta (nothing requantized);
    MoT quantizes its merged student again for every branch of round 2."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    run, teachers = tmp_path / "run", _two_column_teachers(tmp_path / "run", 6)
    cfg = pipeline_cfg(tmp_path, "unused.jsonl", teachers, micro, method=["mtd", "mot"], rounds=2, steps_per_round=2,
                       lr=5e-2, lora={"r": 2, "alpha": 4, "quantize": "nf4"})
    code, out = run_cli("train", str(cfg))
    assert code == 0, out
    assert "LoRA r=2 on a 4-bit NF4 base (QLoRA)" in out
    base = load_file(Path(micro) / "model.safetensors")
    for d in (run / "train" / "mtd" / "final", run / "train" / "mot" / "round-2" / "merged"):
        assert "quantization_config" not in json.loads((d / "config.json").read_text())
        w = load_file(d / "model.safetensors")
        assert set(w) == set(base) and all(v.dtype == torch.float32 for v in w.values())
        moved = {k for k in w if not torch.equal(w[k], base[k])}
        assert moved and all("proj" in k for k in moved), d
        if d.parent.name == "mtd":
            assert all(torch.linalg.matrix_rank(w[k] - base[k]) <= 2 for k in moved)


def test_lora_step_checkpoints_are_evaluated_through_a_merged_copy(tmp_path, problems_file, two_parrots, micro):
    """A LoRA run's step checkpoints hold only the adapter; evaluation (every checkpoint) reads each through its base
    with the adapter merged, written once beside it, and `accord eval --models` takes an adapter directory too."""
    cfg = pipeline_cfg(tmp_path, problems_file, two_parrots, micro, method="mtd", lora={"r": 2, "alpha": 4})
    code, out = run_cli("run", str(cfg))
    assert code == 0, out
    run = tmp_path / "run"
    ckpt = run / "train" / "mtd" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "config.json").exists()
    assert (ckpt / "merged" / "config.json").exists()
    assert json.loads((run / "eval" / "mtd" / "step-2" / "target.json").read_text())["n"] == 10
    from safetensors.torch import load_file

    merged, final = load_file(ckpt / "merged" / "model.safetensors"), load_file(run / "train" / "mtd" / "final" /
                                                                               "model.safetensors")
    assert set(merged) == set(final) and any(not torch.equal(merged[k], final[k]) for k in merged)  # step 2 ≠ step 4
    code, out = run_cli("eval", str(cfg), "--models", f"adapter={ckpt}")
    assert code == 0, out


def test_epochs_set_every_methods_steps_from_the_union_corpus(tmp_path, micro):
    """``train.epochs``: S = ⌈epochs × union rows / (batch × rounds)⌉ for every method (matched budgets), said by
    the plan and the run; a later change of epochs is a changed setting, not a finished result."""
    run, teachers = tmp_path / "run", _two_column_teachers(tmp_path / "run", 7)
    cfg = pipeline_cfg(tmp_path, "unused.jsonl", teachers, micro, method=["std:a", "mtd"], rounds=2, batch_size=4,
                       epochs=1.5)
    want = math.ceil(1.5 * 14 / (4 * 2))  # 3 steps per round, 6 in all: 1.7 epochs of the 14 union rows
    code, out = run_cli("train", str(cfg), "--plan")
    assert code == 0 and f"train.epochs 1.5: 2 round(s) × {want} steps" in out and f"mtd: to train — {2 * want} steps" \
        in out, out
    code, out = run_cli("train", str(cfg))
    assert code == 0, out
    assert f"2 round(s) × {want} steps for every method" in out
    assert "note: std-a asks for" in out and "note: mtd asks" not in out  # only a corpus smaller than the union repeats
    for name in ("std-a", "mtd"):
        res = json.loads((run / "train" / name / "result.json").read_text())
        assert res["branch_steps"] == 2 * want and res["trained_with"]["train"]["epochs"] == 1.5
    code, out = run_cli("train", str(cfg), "train.epochs=3")
    assert code == 2 and "train.epochs: 1.5 → 3" in out, out
    (tmp_path / "empty").mkdir()
    empty = pipeline_cfg(tmp_path / "empty", "unused.jsonl", teachers, micro, method="mtd", epochs=2)
    code, out = run_cli("train", str(empty), "--plan")  # nothing collected yet: the plan says when S is set
    assert code == 0 and "set from the union corpus once it is collected" in out, out


def test_validation_selection_on_a_lab_source_for_mot_std_and_mtd(tmp_path, micro):
    """A source that names its own split (lab:arith:train) still holds out its id-hash validation share,
    and STD/MTD record their best checkpoint beside the last one (issue 12, bug 5)."""
    from accord.config import ProblemsConfig
    from accord.problems import load_problems

    val = load_problems(ProblemsConfig(path="lab:arith:train", split="validation", limit=20))
    assert len(val) == 20 and {p.meta["source_split"] for p in val} == {"train"}
    run, teachers = two_imported_teachers(tmp_path)
    cfg = pipeline_cfg(tmp_path, "lab:arith:train", teachers, micro, method=["mtd", "mot"], rounds=2,
                       steps_per_round=1, select="validation")
    args = ("problems.split=train", "eval.limit=8", "eval.max_new_tokens=8")
    code, out = run_cli("train", str(cfg), *args)
    assert code == 0, out
    mot = json.loads((run / "train" / "mot" / "result.json").read_text())
    mtd = json.loads((run / "train" / "mtd" / "result.json").read_text())
    assert mot["selected_round"] in (1, 2)
    assert mtd["last"].endswith("final") and mtd["final"] in [c["path"] for c in mtd["curve"]]
    assert out.count("validation greedy") == 4 and "warning" not in out
    # no held-out problems at all: the last checkpoint is kept, with a warning, and nothing crashes
    shutil.rmtree(run / "train")
    code, out = run_cli("train", str(cfg), *args, "problems.validation_fraction=0", "train.method=mtd")
    assert code == 0, out
    assert "no validation problems; keeping the last checkpoint" in out


def test_method_table_shows_the_selected_and_the_last_checkpoint():
    from accord.analysis.report import method_table

    results = [{"name": "mtd", "final": "c-1", "last": "final", "branch_steps": 2},
               {"name": "mot", "final": "r-2", "last": "r-2", "branch_steps": 4}]
    rows = [{"model": "base", "split": "target", "final": True, "pass1": 0.1, "greedy": 0.1, "path": "b"},
            {"model": "mtd", "split": "target", "final": True, "pass1": 0.6, "greedy": 0.5, "path": "c-1"},
            {"model": "mtd", "split": "target", "pass1": 0.4, "greedy": 0.3, "path": "final"},
            {"model": "mot", "split": "target", "final": True, "pass1": 0.7, "greedy": 0.7, "path": "r-2"}]
    _, body = method_table(rows, results, ["target"])
    assert [r[0] for r in body] == ["base", "mtd (validation-selected)", "mtd (last)", "mot"]
    assert body[1][1] == 0.6 and body[2][1] == 0.4


def test_a_hub_id_student_is_read_from_the_cache_before_training(tmp_path, micro, monkeypatch):
    """The paper's own student is a hub id: merging (post-hoc here) must find its files (issue 12, bug 10)."""
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(micro, snap)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    run = tmp_path / "run"
    (run / "corpora").mkdir(parents=True)
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\boxed{7}"}]}
    for name in ("a", "b"):
        write_jsonl(run / "corpora" / f"{name}.jsonl", [good] * 4)
    teachers = [{"name": "a", "backend": "column", "column": "a"}, {"name": "b", "backend": "column", "column": "b"}]
    cfg = pipeline_cfg(tmp_path, "unused.jsonl", teachers, "org/tiny", method=["posthoc"], rounds=1,
                       steps_per_round=1)
    code, out = run_cli("train", str(cfg))
    assert code == 0, out
    merged = json.loads((run / "train" / "posthoc" / "final" / "merge.json").read_text())
    assert merged["base"] == str(snap)
    # a hub id that is not in the cache fails before any training starts
    shutil.rmtree(run / "train")
    code, out = run_cli("train", str(cfg), "student.model=org/missing")
    assert code == 2 and "cannot read 'org/missing'" in out and not (run / "train" / "std-a").exists()


def test_bring_your_own_file_runs_end_to_end_on_micro_models(tmp_path, micro):
    """configs/byo-columns.yaml on its shipped example file: columns imported and verified (wrong rows
    dropped), STD per teacher and MTD trained, evaluated on the held-out share, reported."""
    root = Path(__file__).resolve().parents[1]
    data = str(root / "examples" / "my-traces.jsonl")
    code, out = run_cli("run", str(root / "configs" / "byo-columns.yaml"), f"run_dir={tmp_path / 'run'}",
                        f"problems.path={data}", "problems.limit=60", f"student.model={micro}", "train.rounds=1",
                        "train.steps_per_round=2", "train.batch_size=4", "eval.k=1", "eval.limit=3",
                        "eval.max_new_tokens=8", f"eval.splits.mine.path={data}")
    assert code == 0, out
    summary = {r["teacher"]: r for r in json.loads((tmp_path / "run" / "collect_summary.json").read_text())}
    assert 0 < summary["a"]["kept"] < summary["a"]["samples"]  # the wrong rows of the column are dropped
    table = (tmp_path / "run" / "report" / "table.txt").read_text()
    assert all(m in table for m in ("base", "std-a", "std-b", "mtd")) and "mine pass@1" in table


def test_python_api_runs_the_stages_end_to_end(tmp_path, micro):
    """accord.api mirrors the CLI stages on the bring-your-own example (micro student)."""
    from accord import api

    root = Path(__file__).resolve().parents[1]
    data = str(root / "examples" / "my-traces.jsonl")
    cfg = api.load_config(root / "configs" / "byo-columns.yaml",
                          [f"run_dir={tmp_path / 'run'}", f"problems.path={data}", "problems.limit=40",
                           f"student.model={micro}", "train.rounds=1", "train.steps_per_round=2",
                           "train.batch_size=4", "eval.k=1", "eval.limit=2", "eval.max_new_tokens=8",
                           f"eval.splits.mine.path={data}"])
    lines = api.plan(cfg)
    assert any("a: imported from column" in x for x in lines) and any("std-a: to train" in x for x in lines)
    assert any("std-a-seed1: to train" in x for x in api.plan(cfg, ("train",), seeds=[0, 1]))
    summary = api.collect(cfg)
    assert [s["teacher"] for s in summary] == ["a", "b"] and all(s["kept"] > 0 for s in summary)
    results = api.train(cfg, method="std:a")
    assert [r["name"] for r in results] == ["std-a"]
    rows = api.evaluate(cfg)
    assert {r["model"] for r in rows} >= {"base", "std-a"}
    page = api.report(cfg)
    assert page.name == "index.html" and "std-a" in page.read_text()


def test_tensorboard_tracker_writes_the_losses(tmp_path, micro):
    """train.report_to: [tensorboard] for real, in a fresh process: the event file holds one loss per step."""
    import subprocess

    from conftest import accord_cmd

    run = tmp_path / "run"
    (run / "corpora").mkdir(parents=True)
    write_jsonl(run / "corpora" / "a.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                            {"role": "assistant", "content": "7"}]}
                                              for i in range(8)])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run), "problems": {"path": "x.jsonl"},
                                   "teachers": [{"name": "a", "backend": "column", "column": "a"}],
                                   "student": {"model": str(micro)},
                                   "train": {"method": "std:a", "rounds": 1, "steps_per_round": 3,
                                             "batch_size": 4, "report_to": ["tensorboard"]}}))
    p = subprocess.run([*accord_cmd(), "train", str(cfg)], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = run / "train" / "std-a" / "tracking" / "std-a"  # the hyper-parameters sit in a subdirectory
    assert list(logdir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]


def test_eval_repeats_give_a_standard_deviation_over_runs(parrot7, problems_file, tmp_path):
    """eval.repeats: R runs of k samples, pass@1 over all of them, the runs' own pass@1 and their sd."""
    from accord.analysis.report import _fmt, _with_se
    from accord.config import ProblemsConfig, TeacherConfig
    from accord.evaluate import evaluate
    from accord.problems import load_problems
    from accord.teachers.base import load_generator

    probs = load_problems(ProblemsConfig(path=str(problems_file)))
    gen = load_generator(TeacherConfig(name="p7", model=str(parrot7)))
    rows = tmp_path / "rows.jsonl"
    res = evaluate(gen, probs, k=2, greedy=False, temperature=1.0, max_new_tokens=24, repeats=3, rows_path=rows)
    assert res.repeats == 3 and len(res.pass1_runs) == 3
    assert res.pass1 == pytest.approx(sum(res.pass1_runs) / 3)
    m = sum(res.pass1_runs) / 3
    assert res.pass1_std == pytest.approx((sum((x - m) ** 2 for x in res.pass1_runs) / 2) ** 0.5)
    assert len(rows.read_text().splitlines()) == 10 * 2 * 3  # every (problem, sample) of every run stored
    again = evaluate(gen, probs, k=2, greedy=False, temperature=1.0, max_new_tokens=24, repeats=3, rows_path=rows)
    assert again.pass1_runs == res.pass1_runs  # resumed from the rows, nothing regenerated
    gen.close()
    assert "runs)" in _fmt(_with_se(res.as_dict(), "pass1"))


def _write_rows(run, key: str, split: str, verdicts: dict[tuple[str, int, str], bool]) -> dict:
    path = run / "eval" / key / f"{split}.rows.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"problem_id": p, "sample": i, "mode": m, "output": "",
                                        "verdict": "correct" if ok else "incorrect", "parsed": None}) + "\n"
                            for (p, i, m), ok in verdicts.items()))
    return {"key": key, "model": key.split("/")[0], "split": split, "final": True}


def test_paired_differences_match_a_by_hand_reference(tmp_path):
    """paired_table against the slow definition: per-problem pass@1 from the rows, differences on the shared
    problems, their mean and sample-SD/√n, the 95% flag; greedy verdicts when no samples were drawn; a QR
    student against its own base."""
    import random
    import statistics

    from accord.analysis.report import Z95, paired_table

    rng = random.Random(3)
    pids = [f"p{i}" for i in range(40)]

    def sampled(bias):
        v = {(p, 0, "greedy"): rng.random() < bias for p in pids}
        v.update({(p, i, "sample"): rng.random() < bias for p in pids for i in range(4)})
        return v

    v_mtd, v_mot = sampled(0.3), sampled(0.8)
    del v_mot[("p0", 2, "sample")]  # a problem with fewer samples still averages its own
    rows = [_write_rows(tmp_path, "mtd/step-8", "target", v_mtd), _write_rows(tmp_path, "mot/step-8", "target", v_mot)]
    head, body = paired_table(tmp_path, rows, [], ["target"], "mtd")
    assert head == ["model", "target Δ vs mtd", "target better / worse"]

    def pass1(v, p):
        xs = [ok for (q, _, m), ok in v.items() if q == p and m == "sample"]
        return sum(xs) / len(xs)

    d = [pass1(v_mot, p) - pass1(v_mtd, p) for p in pids]
    (name, diff, counts), = body
    assert name == "mot"
    assert abs(diff.mean - statistics.mean(d)) < 1e-12
    assert abs(diff.se - statistics.stdev(d) / len(d) ** 0.5) < 1e-12
    assert diff.significant == (abs(statistics.mean(d)) > Z95 * statistics.stdev(d) / len(d) ** 0.5)
    assert diff.significant  # 0.8 against 0.3 on 40 problems
    assert counts == f"{sum(x > 0 for x in d)} / {sum(x < 0 for x in d)}"

    # greedy only (eval.k = 0), problems not shared are left out, own bases for QR students
    g_base = {(p, 0, "greedy"): i % 2 == 0 for i, p in enumerate(pids)}
    g_qr = {(p, 0, "greedy"): True for p in pids[:30]}
    rows = [_write_rows(tmp_path, "base-student-b", "ood", g_base),
            _write_rows(tmp_path, "qr-student-b/final", "ood", g_qr),
            _write_rows(tmp_path, "base", "ood", {(p, 0, "greedy"): True for p in pids})]
    _, body = paired_table(tmp_path, rows, [{"name": "qr-student-b", "student": "student-b"}], ["ood"], "base")
    (name, diff, counts), = body
    d = [1.0 - float(i % 2 == 0) for i in range(30)]
    assert name == "qr-student-b" and abs(diff.mean - statistics.mean(d)) < 1e-12 and counts == "15 / 0"
    assert paired_table(tmp_path, rows, [], ["ood"], "mtd")[1] == []  # no reference evaluated: no table
    # the first QR student's own base is the run's base student ("base"), as in the method table
    rows.append(_write_rows(tmp_path, "qr-student/final", "ood", g_base))
    results = [{"name": "qr-student", "student": "student"}, {"name": "qr-student-b", "student": "student-b"}]
    _, body = paired_table(tmp_path, rows, results, ["ood"], "base")
    assert [(r[0], r[2]) for r in body] == [("qr-student", "0 / 20"), ("qr-student-b", "15 / 0")]


def test_report_cells_read_as_what_they_are():
    """Rates to three decimals, counts and scores to one (no sign on a token count); a paired difference signed,
    with its mark, and coloured in HTML only when its 95% interval excludes 0; wide tables scroll."""
    from accord.analysis.report import Diff, _fmt, _html_table

    assert (_fmt(0.5), _fmt(-0.849), _fmt(37.529), _fmt(None)) == ("0.500", "-0.849", "37.5", "–")
    up, flat, down = Diff(0.05, 0.01, True), Diff(0.02, 0.015, False), Diff(-0.09, 0.02, True)
    assert (_fmt(up), _fmt(flat), _fmt(down)) == ("+0.050 ± 0.010 *", "+0.020 ± 0.015", "-0.090 ± 0.020 *")
    page = _html_table(["model", "Δ"], [["a", up], ["b", flat], ["c", down]])
    assert '<td class="up">+0.050' in page and "<td>+0.020" in page and '<td class="down">-0.090' in page
    assert page.startswith("<div class='scroll'><table>") and page.endswith("</table></div>")


def test_curves_start_at_each_models_own_base():
    from accord.analysis.report import curve_series

    rows = [{"model": "base", "split": "target", "steps": 0, "pass1": 0.09},
            {"model": "base-student-b", "split": "target", "steps": 0, "pass1": 0.14},
            {"model": "mtd", "split": "target", "steps": 200, "pass1": 0.2},
            {"model": "mtd", "split": "target", "steps": 100, "pass1": 0.1},
            {"model": "qr-student-b", "split": "target", "steps": 100, "pass1": 0.12},
            {"model": "qr-student", "split": "target", "steps": 100, "pass1": 0.13}]
    results = [{"name": "qr-student", "student": "student"}, {"name": "qr-student-b", "student": "student-b"}]
    s = curve_series(rows, "target", results)
    assert s == {"mtd": [(0, 0.09), (100, 0.1), (200, 0.2)], "qr-student-b": [(0, 0.14), (100, 0.12)],
                 "qr-student": [(0, 0.09), (100, 0.13)]}


def test_report_smoothing_is_a_debiased_moving_average(tmp_path):
    """`smooth` against the explicit weighted mean Σ wⁿ⁻ⁱ yᵢ / Σ wⁿ⁻ⁱ; the plots draw it without error, a
    tiny first value (a replay batch's loss) not setting a log axis."""
    import random

    from accord.analysis.report import _plot_smoothed, smooth

    rng = random.Random(0)
    ys = [rng.uniform(0.1, 5) for _ in range(37)]
    span = 4.0
    w = 1 - 1 / span
    ref = [sum(w ** (n - i) * ys[i] for i in range(n + 1)) / sum(w ** (n - i) for i in range(n + 1))
           for n in range(len(ys))]
    assert smooth(ys, span) == pytest.approx(ref, rel=1e-12)
    assert smooth(ys, 1) == ys and smooth([2.0] * 5, 3) == pytest.approx([2.0] * 5)
    series = {"a": [(i, y) for i, y in enumerate([1e-4] + ys)], "b": [(i, 2 * y) for i, y in enumerate(ys)]}
    import matplotlib.pyplot as plt

    seen = []
    real = plt.Axes.set_ylim
    plt.Axes.set_ylim = lambda self, *a, **k: (seen.append(a), real(self, *a, **k))[1]
    try:
        assert _plot_smoothed(series, tmp_path / "p.png", "step", "loss", log=True).exists()
    finally:
        plt.Axes.set_ylim = real
    lows = [a[0] for a in seen if len(a) == 2 and isinstance(a[0], float)]
    assert lows and lows[-1] > 1e-3  # not 1e-4 / 3


def test_findings_say_only_what_the_paired_differences_show(tmp_path):
    """The report's words: the best model on the first split and its difference from MTD, every difference from
    the base and from MTD outside its 95% interval (forgetting named on the general split), the number of
    comparisons; nothing said for a base-only run; the same lines in the HTML and the printed summary."""
    from accord.analysis.report import findings, summary_text

    pids = [f"p{i}" for i in range(40)]

    def greedy(ok):
        return {(p, 0, "greedy"): ok(i) for i, p in enumerate(pids)}

    rows = [{**_write_rows(tmp_path, "base", s, greedy(lambda i: i % 2 == 0)), "greedy": 0.5}
            for s in ("target", "general")]
    assert findings(tmp_path, rows, [], ["target", "general"]) == []  # base only
    rows += [{**_write_rows(tmp_path, "mtd/step-4", "target", greedy(lambda i: i % 2 == 0 or i < 4)), "greedy": 0.55},
             {**_write_rows(tmp_path, "mtd/step-4", "general", greedy(lambda i: i % 2 == 0)), "greedy": 0.5},
             {**_write_rows(tmp_path, "mot/step-4", "target", greedy(lambda i: True)), "greedy": 1.0},
             {**_write_rows(tmp_path, "mot/step-4", "general", greedy(lambda i: False)), "greedy": 0.0}]
    said = findings(tmp_path, rows, [], ["target", "general"])
    assert said[0] == ("Best on target: mot (1.000); against mtd +0.450 ± 0.080, outside its 95% interval.", [])
    assert said[1] == ("Against the base student (4 paired comparisons; about 0.2 would cross by chance if none "
                       "differed):", ["above on target: mot +0.500 ± 0.080",  # not mtd's +0.050 ± 0.035 (inside)
                                      "below on general (forgetting): mot -0.500 ± 0.080"])
    assert said[2][1] == ["above on target: mot +0.450 ± 0.080", "below on general (forgetting): mot -0.500 ± 0.080"]
    text = summary_text(tmp_path, rows, [], ["target", "general"])
    assert f"- {said[1][0]}\n    above on target: mot +0.500 ± 0.080\n" in text


def test_where_they_differ_shows_the_largest_gaps_each_way(tmp_path):
    """The best model against MTD, problem by problem: the largest per-problem gaps each way (ties by id), a
    correct answer of the model that does better, the first answer of the other, all escaped."""
    from accord.analysis.report import _where_they_differ

    def rows(key, table):  # table: pid → list of (mode, ok, output)
        path = tmp_path / "eval" / key / "target.rows.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"problem_id": p, "sample": i, "mode": m, "output": out,
                                            "verdict": "correct" if ok else "incorrect", "parsed": None}) + "\n"
                                for p, rs in table.items() for i, (m, ok, out) in enumerate(rs)))
        return {"key": key, "model": key.split("/")[0], "split": "target", "final": True}

    best = {f"p{i}": [("greedy", False, f"best-g-{i}"), ("sample", True, f"<b>best-s-{i}</b>"),
                      ("sample", i < 3, f"best-t-{i}")] for i in range(6)}
    mtd = {f"p{i}": [("greedy", i >= 4, f"mtd-g-{i}"), ("sample", i >= 4, f"mtd-s-{i}"),
                     ("sample", i == 5, f"mtd-t-{i}")] for i in range(6)}
    # per-problem pass@1 over samples: best 1.0 (p0–p2), 0.5 (p3–p5); mtd 0 (p0–p3), 0.5 (p4), 1.0 (p5)
    ev = [{**rows("bestm/step-4", best), "pass1": 0.75}, {**rows("mtd/step-4", mtd), "pass1": 0.25}]
    parts = "\n".join(_where_they_differ(tmp_path, ev, ["target"], n=2))
    assert "Where bestm and mtd differ (target)" in parts and "5 problems have different per-problem pass@1" in parts
    order = [pid for pid in ("p0", "p1", "p2", "p3", "p4", "p5") if f"<code>{pid}</code>" in parts]
    assert order == ["p0", "p1", "p5"]  # +1.0 twice (p0, p1 before p2), then the one gap the other way (p5: −0.5)
    assert "&lt;b&gt;best-s-0&lt;/b&gt;" in parts and "best-g-0" not in parts  # the better model's correct answer
    assert "mtd-g-0" in parts  # the other's first answer
    assert "mtd-g-5" in parts and "best-g-5" in parts  # the other way round on p5 (its greedy row is correct)
    assert _where_they_differ(tmp_path, [ev[1]], ["target"]) == []  # only mtd: nothing to compare


def test_report_flags_results_from_different_stacks():
    from accord.analysis.report import _provenance_footer

    a = {"python": "3.11", "torch": "2.13", "device": "cpu"}
    b = {"python": "3.11", "torch": "2.14", "device": "NVIDIA H200"}
    assert _provenance_footer([{"name": "m"}], [{"key": "base"}]) == ""  # older runs recorded none
    one = _provenance_footer([{"provenance": a}], [{"provenance": a}, {"provenance": a}])
    assert one == ("<p><small>Made with python 3.11, torch 2.13 on cpu (1 trained model(s), 2 evaluation(s))."
                   "</small></p>")
    two = _provenance_footer([{"provenance": a}], [{"provenance": b}])
    assert "different software or hardware" in two and "torch 2.14 on NVIDIA H200 (0 trained model(s), 1 " in two


def test_a_finished_method_with_other_settings_stops_instead_of_being_skipped(tmp_path, problems_file, two_parrots,
                                                                               micro):
    """An ablation in the same run_dir (here train.lr, or a merge for post-hoc) is not "finished earlier": the
    run stops naming what changed; knobs that give the same model (packing) and other methods' settings do not
    count; the plan says the same.  A corpus changed since training counts too."""
    from accord.config import load_config
    from accord.train.common import corpus_digests

    cfg = pipeline_cfg(tmp_path, problems_file, two_parrots, micro, method=["std:seven"])
    code, out = run_cli("run", str(cfg))
    assert code == 0, out
    res = json.loads((tmp_path / "run" / "train" / "std-seven" / "result.json").read_text())
    assert res["trained_with"]["train"]["lr"] == 1e-3 and "merge" not in res["trained_with"]["train"]
    code, out = run_cli("train", str(cfg), "train.packing=false", "train.merge.method=ties")
    assert code == 0 and "std-seven: finished earlier, skipped" in out  # neither changes what std trains
    code, out = run_cli("train", str(cfg), "train.lr=0.002")
    assert code == 2 and "std-seven in" in out and "was trained with other settings" in out
    assert "train.lr: 0.001 → 0.002" in out and "train.tag=<word>" in out
    code, out = run_cli("train", str(cfg), "train.lr=0.002", "--plan")
    assert code == 0 and "std-seven: trained with other settings (train.lr: 0.001 → 0.002)" in out
    # the variant beside the default: same corpora, its own name, both in one table
    code, out = run_cli("run", str(cfg), "train.lr=0.002", "train.tag=lr2")
    assert code == 0, out
    assert json.loads((tmp_path / "run" / "train" / "std-seven-lr2" / "result.json").read_text())["name"] == \
        "std-seven-lr2"
    table = (tmp_path / "run" / "report" / "table.txt").read_text()
    assert "\nstd-seven " in table and "\nstd-seven-lr2 " in table
    code, out = run_cli("train", str(cfg), "train.lr=0.002", "train.tag=lr2", "--plan")
    assert "std-seven-lr2: finished, skipped" in out
    # a run killed before it finished is not resumed under other settings either
    d = tmp_path / "run" / "train" / "std-seven-lr2"
    (d / "result.json").unlink()
    code, out = run_cli("train", str(cfg), "train.lr=0.003", "train.tag=lr2", "--plan")
    assert "std-seven-lr2: started with other settings or corpora (train.lr: 0.002 → 0.003)" in out
    code, out = run_cli("train", str(cfg), "train.lr=0.003", "train.tag=lr2")
    assert code == 2 and f"{d} holds a run started with other settings" in out and "train.lr: 0.002 → 0.003" in out
    # nor is a model trained on a corpus that has changed since (more samples, verdicts checked again)
    corpus = tmp_path / "run" / "corpora" / "seven.jsonl"
    assert res["corpora"] == corpus_digests(load_config(cfg), ["seven"]) and list(res["corpora"]) == ["seven"]
    corpus.write_text(corpus.read_text().splitlines(keepends=True)[0])
    code, out = run_cli("train", str(cfg))
    assert code == 2 and "std-seven in" in out and f"corpora/seven.jsonl: {res['corpora']['seven']} → " in out
    assert "(collected, verified or selected again since)" in out
    code, out = run_cli("run", str(cfg))  # collecting builds the corpus again: as it was
    assert code == 0 and "std-seven: finished earlier, skipped" in out
    # a run killed before it finished resumes only on the corpora it started with
    assert json.loads((d / "corpora.json").read_text()) == res["corpora"]
    corpus.write_text(corpus.read_text().splitlines(keepends=True)[0])
    code, out = run_cli("train", str(cfg), "train.lr=0.002", "train.tag=lr2", "--plan")
    assert f"std-seven-lr2: started with other settings or corpora (corpora/seven.jsonl: {res['corpora']['seven']} → " \
        in out
    code, out = run_cli("train", str(cfg), "train.lr=0.002", "train.tag=lr2")
    assert code == 2 and f"{d} holds a run started with other settings or corpora" in out
    assert f"corpora/seven.jsonl: {res['corpora']['seven']} → " in out and not (d / "result.json").exists()


def test_a_tagged_variant_is_paired_against_its_default(tmp_path):
    """An ablation's question — does the variant differ from the result it varies? — on the same problems; a
    teacher whose name merely contains a dash is not taken for a variant."""
    from accord.analysis.report import default_of, findings, paired_table

    pids = [f"p{i}" for i in range(40)]
    rows = [_write_rows(tmp_path, k, "target", {(p, 0, "greedy"): ok(i) for i, p in enumerate(pids)})
            for k, ok in (("base", lambda i: False), ("compact/final", lambda i: i < 10),
                          ("compact-no-mi/final", lambda i: i < 30), ("std-a-b/final", lambda i: True))]
    results = [{"name": "compact"}, {"name": "compact-no-mi", "tag": "no-mi"}, {"name": "std-a-b"}]
    assert default_of("compact-no-mi", results) == "compact" and default_of("std-a-b", results) is None
    head, body = paired_table(tmp_path, rows, results, ["target"], "default")
    assert head[1] == "target Δ vs its default" and [r[0] for r in body] == ["compact-no-mi"]
    assert body[0][1].mean == pytest.approx(0.5) and body[0][1].significant and body[0][2] == "20 / 0"
    said = dict(findings(tmp_path, rows, results, ["target"]))
    assert said["Against their defaults (train.tag) (1 paired comparisons; about 0.1 would cross by chance if none "
                "differed):"] == ["above on target: compact-no-mi +0.500 ± 0.080"]
    # the report's table says what the variant changed, from the settings both results recorded
    import html as html_lib

    from accord.analysis.report import _paired_section

    results[0]["trained_with"] = {"compact": {"scores": ["mi", "cons", "ppl"]}, "train": {"lr": 0.001}}
    results[1]["trained_with"] = {"compact": {"scores": ["ppl", "cons"]}, "train": {"lr": 0.001}}
    page = html_lib.unescape("\n".join(_paired_section(tmp_path, rows, results, ["target"])))
    assert "what differs" in page and "compact.scores: ['mi', 'cons', 'ppl'] → ['ppl', 'cons']" in page


def test_an_evaluation_with_other_settings_runs_again(tmp_path, problems_file, two_parrots, micro, monkeypatch):
    """Stored evaluations answer the settings they were made with: another k (or temperature, token budget,
    number of problems) evaluates again — the old files kept aside, never reported as the new setting — and the
    plan counts them; a recipe's older `settings` field (its own section) is not read as what it trained with.
    One verified by another verifier revision is checked again from its stored outputs, generating nothing."""
    from accord.config import load_config
    from accord.train.common import settings_change

    cfg = pipeline_cfg(tmp_path, problems_file, two_parrots, micro, method=["std:seven"])
    code, out = run_cli("run", str(cfg))
    assert code == 0, out
    code, out = run_cli("eval", str(cfg), "eval.k=1", "--plan")
    assert "5 evaluation(s), 0 stored, 5 to run (5 stored with other settings or weights, run again)" in out
    code, out = run_cli("eval", str(cfg), "eval.k=1")
    assert code == 0 and "base target: evaluated earlier with other settings (k: 2 → 1)" in out
    ev = tmp_path / "run" / "eval" / "base"
    assert json.loads((ev / "target.json").read_text())["k"] == 1
    assert json.loads((ev / "target.stale-1.json").read_text())["k"] == 2
    assert (ev / "target.stale-1.rows.jsonl").exists()
    code, out = run_cli("eval", str(cfg), "eval.k=1")
    assert code == 0 and "evaluated earlier" not in out  # now they match
    assert settings_change(load_config(cfg), {"method": "compact", "settings": {"beta": [1, 1, 1]}}) == []

    # a summary from another verifier revision: its rows checked again from their outputs, no model loaded
    rows_path, summary = ev / "target.rows.jsonl", ev / "target.json"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    truth = [r["verdict"] for r in rows]
    rows[0]["verdict"] = "incorrect" if truth[0] == "correct" else "correct"  # what an older verifier said
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    old = json.loads(summary.read_text())
    summary.write_text(json.dumps({**old, "verified_with": "math r1", "pass1": -1.0}))
    code, out = run_cli("eval", str(cfg), "eval.k=1", "--plan")
    assert "1 stored evaluation(s) verified again from their outputs" in out, out
    monkeypatch.setattr("accord.evaluate.student_generator", lambda *a: pytest.fail("a model was loaded"))
    code, out = run_cli("eval", str(cfg), "eval.k=1")
    assert code == 0 and "checked the stored outputs of 1 evaluation(s) again" in out and "1 verdict(s) changed" in out
    assert [json.loads(line)["verdict"] for line in rows_path.read_text().splitlines()] == truth
    new = json.loads(summary.read_text())
    assert new["verified_with"] == old["verified_with"] != "math r1" and new["provenance"] == old["provenance"]
    assert {k: v for k, v in new.items() if k != "provenance"} == {k: v for k, v in old.items() if k != "provenance"}
    code, out = run_cli("eval", str(cfg), "eval.k=1")
    assert code == 0 and "checked the stored outputs" not in out

    # a summary from before weights were recorded takes them on; a model changed since is evaluated again
    from safetensors.torch import load_file, save_file

    from accord.models import weights_digest

    summary.write_text(json.dumps({k: v for k, v in new.items() if k != "weights"}))
    code, out = run_cli("eval", str(cfg), "eval.k=1")
    assert code == 0 and json.loads(summary.read_text())["weights"] == new["weights"]
    monkeypatch.undo()
    final = Path(json.loads((tmp_path / "run" / "train" / "std-seven" / "result.json").read_text())["final"])
    before = weights_digest(final)
    for f in final.glob("*.safetensors"):  # as if trained again under the same name
        save_file({k: v + 0.01 for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    code, out = run_cli("eval", str(cfg), "eval.k=1", "--plan")
    assert "(2 stored with other settings or weights, run again)" in out, out
    code, out = run_cli("eval", str(cfg), "eval.k=1")
    assert code == 0 and out.count(f"evaluated earlier with other settings (the model's weights: {before} → "
                                   f"{weights_digest(final)}, trained again or replaced since)") == 2, out
    code, out = run_cli("eval", str(cfg), "eval.k=1")
    assert code == 0 and "evaluated earlier" not in out

    # a killed evaluation (its rows and start record, no summary) resumes only under what it started with
    from accord.evaluate import started_file

    done = json.loads(summary.read_text())
    record = {k: done[k] for k in ("k", "repeats", "n", "temperature", "top_p", "max_new_tokens",
                                   "chat_template_kwargs", "verified_with", "weights")}
    started_file(summary).write_text(json.dumps(record))
    summary.unlink()
    code, out = run_cli("eval", str(cfg), "eval.k=1", "--plan")
    assert "4 stored, 1 to run (1 resume from a stopped evaluation's rows)" in out, out
    monkeypatch.setattr("accord.evaluate.student_generator", lambda *a: pytest.fail("a model was loaded"))
    code, out = run_cli("eval", str(cfg), "eval.k=1")  # the same settings: every row resumed, nothing generated
    assert code == 0 and "a stopped evaluation" not in out, out
    assert json.loads(summary.read_text())["pass1"] == done["pass1"] and not started_file(summary).exists()
    monkeypatch.undo()
    started_file(summary).write_text(json.dumps({**record, "weights": "0123456789ab"}))  # another model's rows
    summary.unlink()
    code, out = run_cli("eval", str(cfg), "eval.k=1", "--plan")
    assert "1 to run (1 stopped with other settings or weights: their rows set aside)" in out, out
    code, out = run_cli("eval", str(cfg), "eval.k=1")
    assert code == 0 and "base target: a stopped evaluation's outputs were made with other settings (the model's " \
        f"weights: 0123456789ab → {done['weights']}" in out and out.count("a stopped evaluation") == 1, out
    assert json.loads((ev / "target.stale-2.started.json").read_text())["weights"] == "0123456789ab"
    assert (ev / "target.stale-2.rows.jsonl").exists() and not (ev / "target.stale-2.json").exists()
    assert json.loads(summary.read_text())["weights"] == done["weights"] and not started_file(summary).exists()


def test_seed_replicas_are_pooled_against_a_by_hand_reference(tmp_path):
    """seed_table against the slow definition: results with the same settings apart from train.seed pooled (an
    ablation with other settings, a single run and a merge without a seed of its own are placed right), the rate
    as the mean over problems of seed-averaged scores with SE² = SE²(problems) + sd²/S, and Δ vs mtd's own seed
    group with both sides' seed spread; the findings and the printed summary say it."""
    import random
    import statistics

    from accord.analysis.report import Z95, SeedRate, findings, seed_groups, seed_table, summary_text

    rng = random.Random(7)
    pids = [f"p{i}" for i in range(30)]
    bias = {"mtd": 0.3, "mtd-seed1": 0.35, "mtd-seed2": 0.2, "compact": 0.7, "compact-seed1": 0.6,
            "compact-no-mi": 0.5, "posthoc": 0.4, "posthoc-seed1": 0.45}
    verdicts = {n: {(p, i, "sample"): rng.random() < b for p in pids for i in range(2)} for n, b in bias.items()}
    rows = [_write_rows(tmp_path, f"{n}/final", "target", v) for n, v in verdicts.items()]

    def res(name, seed, tag=None, **settings):
        train = {"lr": 1e-3, **({"seed": seed} if seed is not None else {})}
        return {"name": name, "method": name.split("-")[0], "seed": seed, "tag": tag,
                "trained_with": {"train": train, **settings}}

    results = [res("mtd", 0), res("mtd-seed1", 1, "seed1"), res("mtd-seed2", 2, "seed2"),
               res("compact", 0, compact={"scores": "all"}),
               res("compact-seed1", 1, "seed1", compact={"scores": "all"}),
               res("compact-no-mi", 0, "no-mi", compact={"scores": "ppl"}),
               res("posthoc", None), res("posthoc-seed1", None, "seed1"), res("std-a", 0)]
    assert seed_groups(results) == {"mtd": ["mtd", "mtd-seed1", "mtd-seed2"], "posthoc": ["posthoc", "posthoc-seed1"],
                                    "compact": ["compact", "compact-seed1"]}
    head, body = seed_table(tmp_path, rows, results, ["target"])
    assert head == ["model", "seeds", "target pass@1 over seeds", "target Δ vs mtd over seeds"]
    by = {r[0]: r for r in body}
    assert by["mtd"][1] == "0, 1, 2" and by["compact"][1] == "0, 1" and by["mtd"][3] is None

    def score(n, p):
        return (verdicts[n][(p, 0, "sample")] + verdicts[n][(p, 1, "sample")]) / 2

    def pooled(names):
        per = [statistics.mean(score(n, p) for n in names) for p in pids]
        rates = [statistics.mean(score(n, p) for p in pids) for n in names]
        return per, statistics.stdev(rates)

    mtd_per, mtd_sd = pooled(["mtd", "mtd-seed1", "mtd-seed2"])
    c_per, c_sd = pooled(["compact", "compact-seed1"])
    rate = by["compact"][2]
    assert isinstance(rate, SeedRate) and rate.n == 2
    assert rate.mean == pytest.approx(statistics.mean(c_per)) and rate.sd == pytest.approx(c_sd)
    assert rate.se == pytest.approx((statistics.variance(c_per) / 30 + c_sd ** 2 / 2) ** 0.5)
    d = [a - b for a, b in zip(c_per, mtd_per)]
    se = (statistics.variance(d) / 30 + c_sd ** 2 / 2 + mtd_sd ** 2 / 3) ** 0.5
    diff = by["compact"][3]
    assert diff.mean == pytest.approx(statistics.mean(d)) and diff.se == pytest.approx(se)
    assert diff.significant == (abs(statistics.mean(d)) > Z95 * se)
    said = dict(findings(tmp_path, rows, results, ["target"]))
    assert f"Best on target pooled over training seeds: compact ({rate.mean:.3f} ± {rate.se:.3f} (sd " in \
        next(k for k in said if k.startswith("Best on target pooled"))
    key = next(k for k in said if k.startswith("Against mtd, pooled over training seeds"))
    assert ("2 paired comparisons" in key) and (bool(said[key]) == any(r[3].significant for r in body if r[3]))
    text = summary_text(tmp_path, rows, results, ["target"])
    assert "over training seeds (" in text and "(sd " in text and "2 seeds)" in text
    # against the base student: its scores have no seed spread of their own
    base = {(p, i, "sample"): rng.random() < 0.1 for p in pids for i in range(2)}
    rows_b = rows + [_write_rows(tmp_path, "base", "target", base)]
    head, body = seed_table(tmp_path, rows_b, results, ["target"])
    assert head[2:] == ["target pass@1 over seeds", "target Δ vs mtd over seeds", "target Δ vs base over seeds"]
    d = [a - (base[(p, 0, "sample")] + base[(p, 1, "sample")]) / 2 for a, p in zip(c_per, pids)]
    diff = next(r for r in body if r[0] == "compact")[4]
    assert diff.mean == pytest.approx(statistics.mean(d))
    assert diff.se == pytest.approx((statistics.variance(d) / 30 + c_sd ** 2 / 2) ** 0.5)
    said = dict(findings(tmp_path, rows_b, results, ["target"]))
    assert any(k.startswith("Against the base student, pooled over training seeds (--seeds) (3 paired") for k in said)
    # run by run, only what was trained once (the tagged ablation); the seeded runs are pooled above
    (per_run,) = [k for k in said if k.startswith("Against the base student") and "pooled" not in k]
    assert per_run.startswith(("Against the base student (1 paired comparisons",
                               "Against the base student: no model differs beyond its 95% interval (1 paired"))
    assert not any("-seed" in x for k in said if "pooled" not in k and "first seed" not in k for x in said[k])
    assert "The 7 single runs of methods trained over several seeds are compared one by one in the paired tables " \
           "below, not here: the pooled lines speak for them." in said
    # no replicas: no table
    assert seed_table(tmp_path, rows, [r for r in results if "seed" not in r["name"]], ["target"]) == ([], [])


def test_a_later_seeds_method_figure_folds_under_the_first_seeds_section():
    from accord.analysis.report import _method_figure

    later = {"compact-seed1": "compact"}
    first = _method_figure("COMPACT: α", "compact", "<img src='compact-alpha.png'>", later)
    assert first == ["<h2>COMPACT: α</h2>", "<img src='compact-alpha.png'>"]
    (folded,) = _method_figure("COMPACT: α", "compact-seed1", "<img src='compact-seed1-alpha.png'>", later)
    assert folded.startswith("<details><summary>compact-seed1: the same for this training seed</summary><img")
    assert _method_figure("COMPACT: α", "compact-no-mi", "x", later)[0] == "<h2>COMPACT: α — compact-no-mi</h2>"


def test_replicas_name_each_seed():
    from accord.config import AccordConfig
    from accord.train.common import replicas, tagged

    cfg = AccordConfig.model_validate({"problems": {"path": "p.jsonl"}, "teachers": [{"name": "t", "model": "t"}],
                                       "student": {"model": "s"}, "train": {"seed": 3}})
    assert replicas(cfg) == [cfg] and replicas(cfg, [3]) == [cfg]
    reps = replicas(cfg, [3, 0, 5, 0])
    assert [(c.train.seed, tagged(c, "mtd")) for c in reps] == [(3, "mtd"), (0, "mtd-seed0"), (5, "mtd-seed5")]
    assert cfg.train.seed == 3 and cfg.train.tag is None  # the given config is left as it was
    tagged_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"tag": "no-mi"})})
    assert [tagged(c, "compact") for c in replicas(tagged_cfg, [3, 1])] == ["compact-no-mi", "compact-no-mi-seed1"]


def test_run_with_seeds_trains_evaluates_and_pools_each_seed(tmp_path, problems_file, two_parrots, micro):
    """`accord run --seeds`: every method once per seed, the config's own seed under the default names, the
    others tagged; each evaluated; the printed table pools them; --plan says what each seed would do; a re-run
    skips them all; bad seeds are a usage error."""
    cfg = pipeline_cfg(tmp_path, problems_file, two_parrots, micro, method=["std:seven"])
    code, out = run_cli("run", str(cfg), "--seeds", "0,1", "--plan")
    assert code == 0 and "std-seven: to train" in out and "std-seven-seed1: to train" in out
    code, out = run_cli("run", str(cfg), "--seeds", "0,1")
    assert code == 0, out
    train = tmp_path / "run" / "train"
    recs = {n: json.loads((train / n / "result.json").read_text()) for n in ("std-seven", "std-seven-seed1")}
    assert recs["std-seven"]["seed"] == 0 and recs["std-seven-seed1"]["seed"] == 1
    assert recs["std-seven-seed1"]["trained_with"]["train"]["seed"] == 1
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(recs[n]["final"]) / "model.safetensors")) for n in recs)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    table = (tmp_path / "run" / "report" / "table.txt").read_text()
    assert "\nstd-seven-seed1 " in table and "over training seeds (" in table and "\nstd-seven  0, 1  " in table
    assert "- Against the first seed of the same method (only train.seed differs)" in table
    assert "Against their defaults" not in table  # a seed replica is not an ablation
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "Over training seeds" in page
    (png,) = (tmp_path / "run" / "report").glob("seeds-*.png")  # the first split's dots per seed
    assert f"<img src='{png.name}'" in page and png.stat().st_size > 1000
    code, out = run_cli("train", str(cfg), "--seeds", "0,1")
    assert code == 0 and "std-seven-seed1: finished earlier, skipped" in out
    bad = subprocess.run([sys.executable, "-m", "accord.cli", "run", str(cfg), "--seeds", "0,x"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "--seeds: '0,x': seeds are integers separated by commas" in bad.stderr


def test_attention_setting_reaches_every_model_the_run_loads(tmp_path, problems_file, two_parrots, micro, monkeypatch):
    """``student.attention`` / a teacher's ``attention`` is transformers' ``attn_implementation``: the teacher
    collects with it, the student trains and is evaluated with it (each stage's first line says so); a kernel
    that is not installed is a clear error naming the setting, exit 2."""
    import accord.ui

    monkeypatch.setattr(accord.ui, "_SAID", set())  # what runs where is said once per process: as if this were one
    teachers = [{**two_parrots[0], "attention": "eager", "batch_size": 8}, two_parrots[1]]
    cfg = pipeline_cfg(tmp_path, problems_file, teachers, micro, method="mtd", rounds=1)
    code, out = run_cli("run", str(cfg), "student.attention=eager")
    assert code == 0, out
    from accord import models

    # where `auto` puts them here: the CPU in float32 (CI), a GPU in bf16 (ACCORD_TESTS_SEE_CUDA=1 on one); the
    # student trains over float32 weights either way (bf16 comes from autocast)
    dev = models.pick_device("auto")
    loaded = f"{dev.type}, weights {str(models.pick_dtype('auto', dev)).removeprefix('torch.')}"
    assert f"train: {dev.type}, weights float32, attention eager;" in out
    assert f"hf backend: {loaded}, attention eager; batch 8" in out  # teacher seven
    assert f"hf backend: {loaded}, attention sdpa; batch 16" in out  # teacher eight
    assert f"hf backend: {loaded}, attention eager; batch 16" in out  # the student's evaluations
    res = json.loads((tmp_path / "run" / "train" / "mtd" / "result.json").read_text())
    saved = json.loads((Path(res["final"]) / "config.json").read_text())
    assert saved.get("_attn_implementation", saved.get("attn_implementation")) in (None, "eager")
    code, out = run_cli("train", str(cfg), "student.attention=flash_attention_2", "train.method=std:seven")
    assert code == 2 and "attention 'flash_attention_2' cannot be used here" in out and "attention: auto" in out
    code, out = run_cli("train", str(cfg), "student.attention=flash2")
    assert code == 2 and "student.attention" in out and "flash_attention_2" in out  # the names it takes
