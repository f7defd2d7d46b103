"""The CUDA configuration of every training method, run on the CPU: bf16 autocast with float32 weights, the chunked
head, lean layers and packing — what `student.device: auto` picks on a GPU, where CI never runs.  Two bugs of that
configuration were found only on reading (session 18: a float32 query kept the engine off PyTorch's varlen kernel;
COMPACT's and QR's chunked head multiplied in float32 in its backward); this runs it end to end on every push."""

from __future__ import annotations

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
