"""The CUDA configuration of every training method, run on the CPU: bf16 autocast with float32 weights, the chunked
head, lean layers and packing — what `student.device: auto` picks on a GPU, where CI never runs.  Two bugs of that
configuration were found only on reading (session 18: a float32 query kept the engine off PyTorch's varlen kernel;
COMPACT's and QR's chunked head multiplied in float32 in its backward); this runs it end to end on every push."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import yaml
from conftest import accord_cmd, write_jsonl
from test_qr import TRACES, _row

CUDA_DEFAULTS = {"bf16": True, "chunked_loss": True, "lean_layers": True}


def test_every_method_trains_in_the_cuda_configuration_on_cpu_autocast(tmp_path, micro, micro_b):
    run = tmp_path / "run"
    (run / "corpora").mkdir(parents=True)
    union = []
    for t, style in (("a", 0), ("b", 1), ("c", 2)):
        rows = [_row(f"Start at {i}.", TRACES[(style + i) % 3], pid=f"p{i}", teacher=t) for i in range(6)]
        write_jsonl(run / "corpora" / f"{t}.jsonl", rows)
        union += rows
    write_jsonl(run / "corpora" / "all.jsonl", union)  # MTD's corpus
    cfg = {"run_dir": str(run), "problems": {"path": "unused.jsonl"}, "student": {"model": str(micro)},
           "teachers": [{"name": t, "backend": "column", "column": t} for t in "abc"],
           "train": {"method": ["mtd", "mot", "compact", "qr"], "rounds": 2, "steps_per_round": 2, "batch_size": 6,
                     "lr": 1e-3, "max_len": 128, **CUDA_DEFAULTS},
           "compact": {"epsilon": 1.0},
           "qr": {"students": [{"model": str(micro), "name": "llama"}, {"model": str(micro_b), "name": "qwen"}],
                  "encoder": "hashing"},
           "eval": {"splits": {"target": {"path": "unused.jsonl"}}}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([*accord_cmd(), "train", str(p)], check=False, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    said = out.stdout + out.stderr
    assert out.returncode == 0, said
    first = next(line for line in said.splitlines() if line.startswith("train: "))
    assert "autocast bf16" in first and "lean RMSNorm/SwiGLU: " in first and "padding-free packing" in first, first
    assert "from the hidden states in chunks" in said  # plain SFT's head (COMPACT and QR say their own)
    for d in ("mtd", "mot", "compact", "qr-llama", "qr-qwen"):
        res = json.loads((run / "train" / d / "result.json").read_text())
        assert res["curve"], d
    for d in ("mtd", "compact", "qr"):
        events = [json.loads(x) for x in (run / "train" / d / "metrics.jsonl").read_text().splitlines()]
        losses = [e["loss"] for e in events if "loss" in e]
        assert losses and all(abs(x) < 1e4 for x in losses), (d, losses)  # finite, as the engine checks too
    # the same with float32 master weights and a bf16 model (train.master_weights): every activation bf16
    out = subprocess.run([*accord_cmd(), "train", str(p), "train.master_weights=true", "train.tag=master"],
                         check=False, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    said = out.stdout + out.stderr
    assert out.returncode == 0, said
    assert "bf16 weights, float32 master weights in the optimizer" in said
    for d in ("mtd-master", "mot-master", "compact-master", "qr-llama-master", "qr-qwen-master"):
        assert json.loads((run / "train" / d / "result.json").read_text())["curve"], d
    # QR with the mutual loss on routed paths only (a no-grad forward over the rest)
    out = subprocess.run([*accord_cmd(), "train", str(p), "train.method=qr", "qr.mutual_paths=routed",
                          "train.tag=routed"], check=False, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert out.returncode == 0, out.stdout + out.stderr
    # QLoRA (a 4-bit base under bf16 autocast, lean layers calling the adapted projections; bitsandbytes' CPU path)
    if importlib.util.find_spec("bitsandbytes") is None:  # a GPU machine without it (bench/gpu.sh runs this file)
        return
    out = subprocess.run([*accord_cmd(), "train", str(p), "train.method=[mtd,compact]", "train.lora.r=2",
                          "train.lora.quantize=nf4", "train.tag=qlora"], check=False, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    said = out.stdout + out.stderr
    assert out.returncode == 0, said
    assert "QLoRA" in said and all((run / "train" / d / "result.json").exists() for d in ("mtd-qlora", "compact-qlora"))


def test_collection_and_evaluation_run_in_bf16_weights_as_on_a_gpu(tmp_path, problems_file, two_parrots, micro,
                                                                  monkeypatch):
    """On a GPU, teachers and every evaluated checkpoint load in bf16 (``dtype: auto``): collect → train → eval →
    report with bf16 weights on the CPU — generation, scoring and verification in bf16 — finishes, and every
    evaluation says it ran in bf16."""
    import torch
    from conftest import pipeline_cfg, run_cli

    from accord import models, ui

    real = models.pick_dtype
    monkeypatch.setattr(models, "pick_dtype", lambda dtype, device: torch.bfloat16 if dtype == "auto" else
                        real(dtype, device))
    ui._SAID.clear()
    cfg = pipeline_cfg(tmp_path, problems_file, two_parrots, micro, method=["std", "mtd", "mot"])
    code, out = run_cli("run", str(cfg))
    assert code == 0, out
    assert f"hf backend: {models.pick_device('auto').type}, weights bfloat16" in out, out  # cuda where one is visible
    rows = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert {r["model"] for r in rows} >= {"base", "mtd", "mot", "std-seven"} and all(0 <= r["pass1"] <= 1 for r in rows)
    for argv in (["interpolate", str(cfg), "--models", "mtd", "mot", "--points", "3"],
                 ["diagnose", str(cfg), "--problems", "4"], ["drift", str(cfg), "--models", "mtd", "mot"]):
        code, out = run_cli(*argv)
        assert code == 0, (argv[0], out)


def test_cord_runs_in_bf16_weights_as_on_a_gpu(tmp_path, problems_file, parrot7, parrot8, monkeypatch):
    """CoRD's step generation, prefix-cached scoring and meta-prover with bf16 teachers (``dtype: auto`` on a GPU)
    on the CPU: it finishes, with every problem synthesised and its baselines beside it."""
    import torch
    import yaml
    from conftest import run_cli

    from accord import models

    real = models.pick_dtype
    monkeypatch.setattr(models, "pick_dtype", lambda dtype, device: torch.bfloat16 if dtype == "auto" else
                        real(dtype, device))
    cfg = {"run_dir": str(tmp_path / "run"), "problems": {"path": str(problems_file)},
           "teachers": [{"name": "seven", "model": str(parrot7)}, {"name": "eight", "model": str(parrot8)}],
           "cord": {"beam": 2, "max_steps": 4, "step_tokens": 24, "think_tokens": 48, "answer_tokens": 16,
                    "meta_prover": "eight", "segmentation": "line-break", "baselines": ["curation"]}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out = run_cli("cord", str(path))
    assert code == 0, out
    s = json.loads((tmp_path / "run" / "cord" / "summary.json").read_text())
    n = len(problems_file.read_text().splitlines())
    assert s["cord"]["n"] == n and s["cord-curation"]["n"] == n
