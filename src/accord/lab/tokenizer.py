"""The lab tokenizer: byte-level BPE built locally with ``tokenizers``.

By default digits are split one per token (as Llama does).  The lab's own
tokenizer keeps a space and a digit together (``" 8"`` is one token, ``"8"``
another): in ``Links: 4>3 8>7`` a link's source and its target are then different
tokens, so following a link is one unambiguous look-up for a tiny model;
``<think>``/``</think>`` are added as *non-special* tokens so they survive ``decode(skip_special_tokens=True)`` like
Qwen3's; the chat template is a plain ``<|role|>content<|end|>`` format and ``<|end|>`` is the EOS token.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from accord.prompts import STYLES
from accord.verify import JUDGE_PROMPT

SPECIAL = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
THINK = ["<think>", "</think>"]
CHAT_TEMPLATE = (
    "{%- for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _base_corpus() -> list[str]:
    printable = "".join(chr(c) for c in range(32, 127))
    return [printable, JUDGE_PROMPT, *STYLES.values(), "### Step 1\n### Step 2\n\\boxed{42}\nThe final answer is"]


def build_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 512, split_digits: bool = True):
    """Train a byte-level BPE on ``corpus`` (plus the prompt texts) and wrap it for ``transformers``."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if split_digits:
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*_base_corpus(), *corpus], trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|end|>", pad_token="<|pad|>",
                                   unk_token=None, additional_special_tokens=SPECIAL[2:])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def save_tokenizer(tok, path: str | Path) -> None:
    tok.save_pretrained(str(path))
