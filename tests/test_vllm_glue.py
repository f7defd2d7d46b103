"""The vllm backend's glue on the CPU, with a stand-in for vLLM's engine (vLLM itself needs a GPU:
tests/test_teacher_vllm.py)."""

import sys
import types
from types import SimpleNamespace

from conftest import bos_tokenizer


def test_vllm_gets_the_rendered_templates_token_ids_with_one_bos(tmp_path, monkeypatch):
    """vLLM tokenizes a text prompt with the tokenizer's special tokens, so a template that writes its own BOS
    would start with two (a known few-points accuracy loss on Llama 3): accord hands it the template's token ids,
    tokenized as the hf backend tokenizes them."""
    from accord.config import TeacherConfig
    from accord.teachers.base import Request, SamplingParams
    from accord.teachers.hf import render_chat
    from accord.teachers.vllm import VLLMGenerator

    tok, bos = bos_tokenizer(tmp_path / "teacher")
    seen = {}

    class LLM:
        def __init__(self, model, **kw):
            seen["model"] = model

        def generate(self, prompts, sp, use_tqdm=False):
            seen["prompts"] = prompts
            done = SimpleNamespace(text="\\boxed{7}", token_ids=[5, 6], logprobs=None, stop_reason=None,
                                   finish_reason="stop")
            return [SimpleNamespace(outputs=[done]) for _ in prompts]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw))
    g = VLLMGenerator(TeacherConfig(name="v", backend="vllm", model=str(tmp_path / "teacher")))
    gens = g.generate([Request("What is 3+4?"), Request("q", prefix="so far")], SamplingParams(max_new_tokens=4))
    assert [x.text for x in gens] == ["\\boxed{7}"] * 2 and gens[0].token_count == 2
    text = render_chat(tok, "What is 3+4?", "")
    ids = seen["prompts"][0]["prompt_token_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"] and ids.count(bos) == 1 and ids[0] == bos
    assert tok(text)["input_ids"][:2] == [bos, bos]  # what the text prompt would have become
