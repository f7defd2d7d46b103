"""Templates that open ``<think>`` themselves (QwQ, DeepSeek-R1-Distill): never twice, truncation still seen,
one stored format, and a training target that fits the student's own template (issue 12, bugs 1 and 11)."""

from __future__ import annotations

import pytest

from accord.prompts import canonical_completion, join_prefix, training_target
from accord.verify import CORRECT, INCORRECT, check

# A QwQ-style template written for the lab tokenizer: the generation prompt ends by opening the think block.
THINKING_TEMPLATE = ("{%- for m in messages %}{%- if m.role == 'user' %}<|user|>{{ m.content }}<|end|>"
                     "{%- elif m.role == 'assistant' %}<|assistant|>{{ m.content }}<|end|>{%- endif %}{%- endfor %}"
                     "{%- if add_generation_prompt %}<|assistant|><think>\n{% endif %}")


@pytest.fixture
def thinking(micro, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro)
    tok.chat_template = THINKING_TEMPLATE
    return AutoModelForCausalLM.from_pretrained(micro).eval(), tok


def test_a_think_prefix_is_not_opened_twice(thinking):
    from accord.teachers.hf import render_chat

    _, tok = thinking
    text = render_chat(tok, "Start at 3.", "<think>\n(1) 3 + 4 = 7\n")
    assert text.count("<think>") == 1 and text.endswith("<|assistant|><think>\n(1) 3 + 4 = 7\n")
    plain = render_chat(tok, "Start at 3.", "")
    assert plain.endswith("<think>\n") and plain.count("<think>") == 1
    assert join_prefix("<|assistant|>", "<think>\nx") == "<|assistant|><think>\nx"  # templates that do not open it


def test_completions_inside_the_block_get_their_think_back_and_truncation_is_seen(thinking):
    from accord.config import TeacherConfig
    from accord.teachers.base import Request, SamplingParams
    from accord.teachers.hf import HFGenerator

    model, tok = thinking
    t = HFGenerator(TeacherConfig(name="qwq", model="unused"), model=model, tokenizer=tok)
    g = t.generate([Request("Start at 3.")], SamplingParams(temperature=0.0, max_new_tokens=4))[0]
    assert g.text.startswith("<think>\n")
    cord = t.generate([Request("Start at 3.", prefix="<think>\n(1)")], SamplingParams(temperature=0.0,
                                                                                    max_new_tokens=4))[0]
    assert not cord.text.startswith("<think>")  # a continuation of the caller's prefix stays a continuation
    # a trace cut by the budget, with a stray \boxed{} in its reasoning, is not an answer
    assert check("math", "7", "<think>\nmaybe \\boxed{7} but let me check").verdict == INCORRECT
    assert check("math", "7", "<think>\nmaybe\n</think>\n\n\\boxed{7}").verdict == CORRECT


def test_one_stored_format_and_targets_fit_the_students_template(micro):
    from transformers import AutoTokenizer

    from accord.train.engine import encode_example

    inside = "(1) 3 + 4 = 7\n</think>\n\n\\boxed{7}"
    opened = "<think>\n" + inside
    assert canonical_completion(inside) == opened and canonical_completion(opened) == opened
    assert canonical_completion("\\boxed{7}") == "\\boxed{7}"  # no think block: nothing to add
    assert training_target("<|assistant|><think>\n", opened) == inside
    assert training_target("<|assistant|>", inside) == opened

    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": c}]}
            for c in (inside, opened)]  # a corpus mixing both forms
    for template, n_think in ((None, 1), (THINKING_TEMPLATE, 0)):
        tok = AutoTokenizer.from_pretrained(micro)
        if template:
            tok.chat_template = template
        targets = []
        for r in rows:
            ids, labels = encode_example(tok, r, 256)
            targets.append(tok.decode([y for y in labels if y != -100]))
            assert tok.decode(ids).count("<think>") == 1  # exactly one opening, prompt or target
        assert targets[0] == targets[1] and targets[0].count("<think>") == n_think
