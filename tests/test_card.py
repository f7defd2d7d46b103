"""The model card (``README.md``) beside every trained model: accord/card.py."""

from __future__ import annotations

import json

from conftest import pipeline_cfg


def _cfg(tmp_path, student: str, teachers: list[dict]):
    from accord.config import load_config

    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    return load_config(pipeline_cfg(tmp_path, problems, teachers, student))


def test_card_says_method_teachers_settings_and_keeps_secrets_out(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from accord.card import card_text, hub_id, write_card

    monkeypatch.setenv("MY_KEY", "sk-secret-value")
    teachers = [{"name": "alpha", "model": "org/Teacher-7B"},
                {"name": "beta", "backend": "openai", "model": "served|name", "base_url": "http://10.0.0.1:8000/v1",
                 "api_key_env": "MY_KEY"}]
    cfg = _cfg(tmp_path, "Qwen/Qwen3-0.6B", teachers)
    final = tmp_path / "final"
    final.mkdir()
    rec = {"name": "mtd", "method": "mtd", "final": str(final), "last": str(final), "teachers": ["alpha", "beta"],
           "examples": 1234, "branch_steps": 300, "seed": 0, "trained_with": {"train": {"lr": 1e-5, "epochs": 2}},
           "provenance": {"python": "3.11.9", "torch": "2.13.0", "device": "x86_64 cpu"}}
    path = write_card(cfg, rec)
    assert path == final / "README.md"
    card = ModelCard.load(path)
    assert card.data.base_model == "Qwen/Qwen3-0.6B" and card.data.pipeline_tag == "text-generation"
    assert {"accord", "distillation", "mtd"} <= set(card.data.tags)
    text = card.text
    assert "Merge-of-Thought Distillation" in text and "1,234 training examples" in text and "300" in text
    assert "| alpha | hf | org/Teacher-7B |" in text and "| beta | openai | served\\|name |" in text  # one cell
    assert "lr: 1.0e-05" in text and "torch 2.13.0" in text and "x86_64 cpu" in text
    assert "Not evaluated yet" in text
    full = path.read_text()
    assert "10.0.0.1" not in full and "MY_KEY" not in full and "sk-secret" not in full
    assert "validation split" not in text  # the last checkpoint is the final one here
    # a lab or local student is not a Hub id: no base_model in the header
    assert hub_id("lab:student") is None and hub_id(str(tmp_path)) is None and hub_id("a/b/c") is None
    local = card_text(_cfg(tmp_path, str(tmp_path), teachers), {**rec, "last": "elsewhere"}, "EVAL TABLE")
    assert "base_model" not in local.split("---")[1] and "EVAL TABLE" in local and "Not evaluated" not in local
    assert "best greedy accuracy on the validation split" in local
    # no directory, no card (a result whose model was moved away)
    assert write_card(cfg, {**rec, "final": str(tmp_path / "gone")}) is None
    # a model accord did not train (`accord eval --models NAME=PATH`): its directory is left as it is
    other = tmp_path / "someone-elses"
    other.mkdir()
    assert write_card(cfg, {"name": "other", "final": str(other), "curve": []}) is None and not any(other.iterdir())
    assert list(final.iterdir()) == [final / "README.md"]  # written atomically: no temporary left
