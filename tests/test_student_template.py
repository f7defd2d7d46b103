"""``student.chat_template_kwargs``: the student's prompts rendered with its chat template's variables (Qwen3's
``enable_thinking``, gpt-oss's ``reasoning_effort``) wherever they are — training, evaluation, replay, diagnostics,
drift — and a change retrains and re-evaluates rather than passing for finished."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from accord.config import AccordConfig
from accord.train.common import engine_args, method_settings
from accord.train.compact import encode_trace
from accord.train.engine import encode_example
from accord.train.qr import encode_path

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}"
            "<assistant>{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
            "{% endif %}")
OFF = {"enable_thinking": False}


@pytest.fixture(scope="module")
def thinking_micro(micro, tmp_path_factory) -> Path:
    """The micro student with a template that reads ``enable_thinking``, as Qwen3's does."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("thinking") / "student"
    shutil.copytree(micro, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


def test_every_training_encoder_renders_the_variables(thinking_micro):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(thinking_micro)
    row = {"problem_id": "p", "answer": "4", "type": "a",
           "messages": [{"role": "user", "content": "Start at 1."},
                        {"role": "assistant", "content": "<think>\n1\n</think>\n\\boxed{4}"}]}

    def prompt(ids, labels):
        return tok.decode([i for i, y in zip(ids, labels) if y == -100])

    assert prompt(*encode_example(tok, row, 256)).endswith("<assistant>")
    assert prompt(*encode_example(tok, row, 256, OFF)).endswith("<assistant><think></think>")
    for kw, tail in ((None, "<assistant>"), (OFF, "<assistant><think></think>")):
        ex = encode_trace(tok, row, 256, group="p", teacher="a", template_kwargs=kw)
        assert prompt(ex["ids"], ex["labels"]).endswith(tail)
        ex = encode_path(tok, row, 256, template_kwargs=kw)
        assert prompt(ex["ids"], ex["labels"]).endswith(tail)


def test_the_settings_carry_the_variables_only_when_set():
    base = {"problems": {"path": "p.jsonl"}, "teachers": [{"name": "a", "backend": "column", "column": "a"}]}
    plain = AccordConfig.model_validate(base)
    off = AccordConfig.model_validate({**base, "student": {"chat_template_kwargs": OFF}})
    assert engine_args(off, 1).chat_template_kwargs == OFF and engine_args(plain, 1).chat_template_kwargs == {}
    assert "student" not in method_settings(plain, "mtd")  # results recorded before keep their settings
    assert method_settings(off, "mtd")["student"] == {"chat_template_kwargs": OFF}
    from accord.evaluate import student_config

    assert student_config(off, "ckpt", "mtd/final").chat_template_kwargs == OFF


def test_a_run_with_the_variables_records_them_and_a_change_is_not_taken_for_finished(tmp_path, thinking_micro):
    root = Path(__file__).resolve().parents[1]
    data = str(root / "examples" / "my-traces.jsonl")
    args = [str(root / "configs" / "byo-columns.yaml"), f"run_dir={tmp_path / 'run'}", f"problems.path={data}",
            "problems.limit=40", f"student.model={thinking_micro}", "train.rounds=1", "train.steps_per_round=2",
            "train.batch_size=4", "train.method=[mtd]", "eval.k=1", "eval.limit=3", "eval.max_new_tokens=8",
            f"eval.splits.mine.path={data}"]
    code, out = run_cli("run", *args, "student.chat_template_kwargs={enable_thinking: false}")
    assert code == 0, out
    run = tmp_path / "run"
    assert json.loads((run / "eval" / "base" / "mine.json").read_text())["chat_template_kwargs"] == OFF
    assert json.loads((run / "train" / "mtd" / "result.json").read_text())["trained_with"]["student"] == {
        "chat_template_kwargs": OFF}
    code, out = run_cli("eval", *args)  # the template's defaults now: evaluated again, the old files kept
    assert code == 0, out
    assert "student.chat_template_kwargs: {'enable_thinking': False} → {}" in out
    assert json.loads((run / "eval" / "base" / "mine.json").read_text())["chat_template_kwargs"] == {}
    code, out = run_cli("train", *args)
    assert code == 2 and "trained with other settings" in out and "student.chat_template_kwargs" in out, out


def test_diagnostics_and_drift_read_the_student_as_it_is_prompted(thinking_micro):
    """`accord diagnose` scores the traces after the prompt the student trains on, `accord drift` reads the
    hidden state of the prompt's last token: both change with the variables."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accord.analysis.diagnose import score_traces
    from accord.analysis.drift import prompt_states

    tok = AutoTokenizer.from_pretrained(thinking_micro)
    model = AutoModelForCausalLM.from_pretrained(thinking_micro)
    rows = [{"messages": [{"role": "user", "content": "Start at 2."},
                          {"role": "assistant", "content": "<think>\n2\n</think>\n\\boxed{3}"}]}]
    plain, off = (score_traces(model, tok, rows, 256, template_kwargs=kw)[0]["nll"] for kw in (None, OFF))
    assert plain != off
    a, b = (prompt_states(model, tok, ["Start at 2."], template_kwargs=kw)[-1] for kw in (None, OFF))
    assert not torch.allclose(a, b)


def test_a_model_without_a_chat_template_reads_its_prompts_after_its_bos(micro, tmp_path):
    """A base model with no template (Llama's, Mistral's) was pretrained on text that starts with BOS; prompts are
    encoded without special tokens everywhere, so the plain prompt writes it — in training (the engine, COMPACT,
    QR) and generation alike; a tokenizer that adds no BOS (the lab's) keeps its prompt as it was."""
    from conftest import bos_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accord.config import GeneratorConfig
    from accord.teachers.base import Request
    from accord.teachers.hf import HFGenerator, render_chat
    from accord.train.engine import chat_head

    tok, bos = bos_tokenizer(tmp_path / "tok")
    tok.chat_template = None
    row = {"messages": [{"role": "user", "content": "What is 3+4?"}, {"role": "assistant", "content": "7"}]}
    assert chat_head(tok, row["messages"][:1]) == render_chat(tok, "What is 3+4?") == tok.bos_token + "What is 3+4?\n"
    for ids in (encode_example(tok, row, 64)[0], encode_trace(tok, row, 64, group=0, teacher=0)["ids"],
                encode_path(tok, row, 64)["ids"]):
        assert ids[0] == bos and ids.count(bos) == 1
    gen = HFGenerator(GeneratorConfig(name="t", model=str(micro), device="cpu"),
                      model=AutoModelForCausalLM.from_pretrained(micro), tokenizer=tok)
    ids = tok(gen._render(Request("What is 3+4?")), add_special_tokens=False)["input_ids"]  # as generation encodes
    assert ids[0] == bos and ids.count(bos) == 1
    lab = AutoTokenizer.from_pretrained(micro)  # adds no BOS as it encodes
    lab.chat_template = None
    assert render_chat(lab, "x") == chat_head(lab, [{"role": "user", "content": "x"}]) == "x\n"
