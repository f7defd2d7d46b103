"""Shared fixtures: micro models built in seconds, small problem files, a CLI runner."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def pytest_configure(config):
    """A run that deselects the ``gpu`` tests (``make test``: ``-m "not slow and not gpu"``) is the CPU suite:
    CUDA is hidden from it (before torch first asks), so on a GPU machine it trains, generates and compares on the
    CPU exactly as CI does — with CUDA visible, ``student.device: auto`` and the engine put every micro model on
    the GPU in bf16, and tests written against CPU float32 references fail there for that reason alone (10 did on
    the H200 in session 18).  ``ACCORD_TESTS_SEE_CUDA=1`` keeps CUDA visible, to look for device bugs on purpose
    (``bench/gpu.sh`` runs the CPU suite's engine, teacher, merge, pipeline and CoRD tests that way).
    ``ACCORD_TESTS_BF16=1`` (``make test-bf16``) configures the process as CUDA's defaults configure a run, on the
    CPU (:func:`gpu_defaults_on_cpu`); the tests compare to bf16 rounding there (:func:`bf16_process`) and read
    the defaults as resolved, and the whole suite passes so."""
    if "not gpu" in (config.getoption("markexpr") or "") and os.environ.get("ACCORD_TESTS_SEE_CUDA") != "1":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if os.environ.get("ACCORD_TESTS_BF16") == "1":
        gpu_defaults_on_cpu()


def gpu_defaults_on_cpu() -> None:
    """What ``auto`` and the unset engine settings resolve to on a GPU, in this CPU process: training under bf16
    autocast (the process's one accelerator), ``dtype: auto`` loading teachers and evaluated checkpoints in bf16,
    the head in chunks (``train.chunked_loss``), lean layers (``train.lean_layers``) and the fused AdamW
    (``engine.fused_adamw``).  Only the device stays the CPU — so a test that expects the CPU's defaults where it
    should read the resolved ones fails here as it would with CUDA visible (four did until session 32, which found
    them so).  Subprocesses start with the CPU's defaults."""
    import torch

    from accord import models
    from accord.train import engine, lean

    engine.get_accelerator(engine.TrainArgs(bf16=True, device="cpu"))
    pick_dtype, chunks_asked, use_lean = models.pick_dtype, engine.chunks_asked, lean.use_lean
    models.pick_dtype = lambda dtype, device: torch.bfloat16 if dtype == "auto" else pick_dtype(dtype, device)
    engine.chunks_asked = lambda setting, device: chunks_asked(True if setting is None else setting, device)
    engine.use_lean = lean.use_lean = lambda setting, device: use_lean(True if setting is None else setting, device)
    engine.fused_adamw = lambda device: True


PARROT_7 = "<think>\nadd the numbers\n</think>\n\n\\boxed{7}"
PARROT_8 = "<think>\n### Step 1\nadd them up\n</think>\n\nThe answer is \\boxed{8}"


@pytest.fixture(scope="session")
def lab_tokenizer():
    from accord.lab.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def parrot7(tmp_path_factory) -> Path:
    from accord.lab.micro import build_parrot

    path = tmp_path_factory.mktemp("parrot7")
    build_parrot(path, PARROT_7, seed=1)
    return path


@pytest.fixture(scope="session")
def parrot8(tmp_path_factory) -> Path:
    from accord.lab.micro import build_parrot

    path = tmp_path_factory.mktemp("parrot8")
    build_parrot(path, PARROT_8, seed=2)
    return path


@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> Path:
    from accord.lab.micro import build_micro

    path = tmp_path_factory.mktemp("micro")
    build_micro(path, seed=3)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def problems_file(tmp_path) -> Path:
    """Ten problems: even ones have answer 7 (parrot7 is right), odd ones 8 (parrot8 is right)."""
    rows = [{"question": f"What is {i} plus {7 - i if i % 2 == 0 else 8 - i}?", "answer": "7" if i % 2 == 0 else "8"}
            for i in range(10)]
    return write_jsonl(tmp_path / "problems.jsonl", rows)


def pipeline_cfg(tmp_path, problems, teachers, student, **train) -> Path:
    cfg = {"run_dir": str(tmp_path / "run"), "problems": {"path": str(problems)},
           "teachers": teachers, "student": {"model": str(student)},
           "collect": {"samples": 2, "max_new_tokens": 30, "temperature": 0.6},
           "train": {"method": ["std", "mtd", "posthoc", "mot"], "rounds": 2, "steps_per_round": 2,
                     "batch_size": 4, "lr": 1e-3, "max_len": 128, **train},
           "eval": {"splits": {"target": {"path": str(problems)}, "general": {"path": str(problems), "limit": 4}},
                    "k": 2, "max_new_tokens": 30, "batch_size": 16}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))  # the order written: target is the first split
    return p


def corpus_run(tmp_path, micro, name: str, **train) -> tuple[Path, Path]:
    """A config training ``micro`` on two column teachers' corpora already in its run directory (13 rows, 7
    problems: a batch of 4 leaves one row, or one problem, for the second of two processes); (config, run dir)."""
    run = tmp_path / name
    (run / "corpora").mkdir(parents=True)
    traces = ["<think>\n(1) 3>4\n</think>\n\n\\boxed{4}", "<think>\n(1) 5>1 (2) 1>4\n</think>\n\n\\boxed{4}"]
    rows = {t: [{"problem_id": f"p{i}", "answer": "4",
                 "messages": [{"role": "user", "content": f"Start at {i}."},
                              {"role": "assistant", "content": traces[(i + k) % 2]}]} for i in range(7 - k)]
            for k, t in enumerate(("a", "b"))}  # 13 rows, 7 problems: a batch with one row (or problem) for 2 processes
    for t, r in rows.items():
        write_jsonl(run / "corpora" / f"{t}.jsonl", r)
    write_jsonl(run / "corpora" / "all.jsonl", rows["a"] + rows["b"])
    cfg = {"run_dir": str(run), "problems": {"path": "unused.jsonl"}, "student": {"model": str(micro)},
           "teachers": [{"name": "a", "backend": "column", "column": "a"},
                        {"name": "b", "backend": "column", "column": "b"}],
           "train": {"method": ["mtd"], "rounds": 3, "steps_per_round": 2, "batch_size": 4, "lr": 1e-2,
                     "max_len": 64, **train}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p, run


@pytest.fixture
def two_parrots(parrot7, parrot8):
    return [{"name": "seven", "model": str(parrot7), "batch_size": 16},
            {"name": "eight", "model": str(parrot8), "batch_size": 16}]


@pytest.fixture(scope="session")
def micro_b(tmp_path_factory) -> Path:
    """A second micro student: Qwen2, width 24, a tokenizer that keeps digit runs and has 384 entries."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from accord.lab.tokenizer import build_tokenizer

    tok = build_tokenizer(vocab_size=384, split_digits=False)
    torch.manual_seed(5)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("micro_b")
    Qwen2ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def run_cli(*args: str) -> tuple[int, str]:
    """Run ``accord`` in-process; return (exit code, stderr+stdout text)."""
    import contextlib
    import io

    from accord.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
        code = main(list(args))
    return code, buf.getvalue()


def bf16_process() -> bool:
    """Whether this process trains under bf16 autocast (its accelerator, made once per process: with CUDA visible,
    ``ACCORD_TESTS_SEE_CUDA=1`` on a GPU machine), so that tests written against float32 arithmetic compare to
    bf16 rounding instead."""
    from accord.train.engine import get_accelerator

    return get_accelerator().mixed_precision == "bf16"


def accord_cmd() -> list[str]:
    return [sys.executable, "-m", "accord.cli"]


def bos_tokenizer(path):
    """The lab tokenizer with a BOS that encoding adds and the chat template writes too (as Llama 3's, Gemma's)."""
    from tokenizers import processors

    from accord.lab.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.bos_token = "<|pad|>"  # any special token serves as the BOS here
    bos = tok.convert_tokens_to_ids(tok.bos_token)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single=f"{tok.bos_token} $A",
                                                                         special_tokens=[(tok.bos_token, bos)])
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    tok.save_pretrained(path)
    return tok, bos
