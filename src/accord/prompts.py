"""Prompt styles and the ``<think>…</think>`` reasoning format.

Styles:
- ``default``: the question alone (MoT §5 queries teachers with the bare problem).
- QR-Distill §2.2 / Fig. 2, the six path-diversity templates: ``vanilla``, ``cot``,
  ``tot``, ``program``, ``fact``, ``backward``.
- ``steps``: CoRD §4.1 / App. G.1 prompt-guided segmentation — the teacher is
  asked to open each reasoning step with a ``### Step N`` header.
- Any other string containing ``{question}`` is used as a template.

Every style asks for the final answer in ``\\boxed{}`` so that math-verify can
read it; the paper templates are silent on that, and a parsable answer is the
cheap, correct reading for verified collection.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

BOXED_HINT = "Put the final answer in \\boxed{}."

STYLES: dict[str, str] = {
    "default": "{question}\n\n" + BOXED_HINT,
    "vanilla": "Reason to solve the problem:\n{question}\n\n" + BOXED_HINT,
    "cot": "{question}\n\nLet's reason step by step, writing each reasoning step clearly before giving the final "
    "answer. " + BOXED_HINT,
    "tot": "Think in a tree of thoughts: outline multiple solution paths and choose the most promising one to derive "
    "the answer.\n{question}\n\n" + BOXED_HINT,
    "program": "Use code to solve the following problem and print the final answer.\n{question}\n\n" + BOXED_HINT,
    "fact": "First retrieve some relevant facts from your knowledge, then use them to reason to the final answer.\n"
    "{question}\n\n" + BOXED_HINT,
    "backward": "Use forward reasoning to propose a candidate answer, then backward reasoning to verify it and provide "
    "the final verified answer.\n{question}\n\n" + BOXED_HINT,
    "steps": "{question}\n\nThink step by step. Start every reasoning step with a header '### Step N' (N = 1, 2, ...). "
    + BOXED_HINT,
}


def check_style(style: str) -> None:
    """Raise ValueError unless ``style`` is a known name or a template with ``{question}``."""
    if style in STYLES:
        return
    if "{question}" in style:
        try:
            style.format(question="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"style template is not a valid format string: {e}") from None
        return
    raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)} or give a template with {{question}}")


def style_name(style: str) -> str:
    """A short, stable name for the store (templates are named by a hash)."""
    if style in STYLES:
        return style
    import hashlib

    return "custom-" + hashlib.sha1(style.encode()).hexdigest()[:8]


def render_prompt(style: str, question: str) -> str:
    template = STYLES.get(style, style)
    return template.replace("{question}", question)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# where a chat turn keeps its reasoning apart from its answer: DeepSeek's API, vLLM and Qwen3's template
# (reasoning_content), transformers' and TRL's thinking datasets (thinking), OpenAI-style servers (reasoning)
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def content_parts(content) -> tuple[str | None, str | None]:
    """(text, reasoning) of a turn's content: a string as it is, or a list of parts as OpenAI's and Anthropic's
    messages write it — ``{type: text, text}`` parts joined, a ``{type: thinking | reasoning, …}`` part's text the
    reasoning (every such part, in order); other parts (images, tool calls) are left out."""
    if not isinstance(content, list):
        return (content if content is None or isinstance(content, str) else str(content)), None
    text, thought = [], []
    for part in content:
        if isinstance(part, str):
            text.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif isinstance(part, dict) and part.get("type") in ("thinking", "reasoning"):
            said = next((part[k] for k in ("thinking", "reasoning", "text") if isinstance(part.get(k), str)), None)
            thought += [said] if said and said.strip() else []
    return "".join(text), ("\n\n".join(t.strip() for t in thought) or None)


def bos_text(tok) -> str:
    """The BOS token's text when ``tok`` adds one as it encodes (Llama, Mistral, Gemma), else "".  accord encodes
    every rendered prompt without special tokens, so a chat template writes its own BOS; a model without a
    template gets its plain prompt started with this, as its pretraining text was (before session 34 no BOS at
    all, in training and generation alike).  Worked out once per tokenizer."""
    known = getattr(tok, "_accord_bos", None)
    if known is None:
        bos = getattr(tok, "bos_token", None)
        try:
            adds = bool(bos) and tok("x")["input_ids"][:1] == [tok.bos_token_id]
        except Exception:  # noqa: BLE001 — a tokenizer that cannot say: no BOS, as before
            adds = False
        known = bos if adds else ""
        with contextlib.suppress(AttributeError):  # a tokenizer that takes no attribute: asked again next time
            tok._accord_bos = known
    return known


def opens_think(head: str) -> bool:
    """Whether a rendered generation prompt already opens the think block (QwQ-32B, DeepSeek-R1-Distill and
    Qwen3-thinking templates end with ``<think>\n``): the completion then starts *inside* it."""
    return head.rstrip().endswith(THINK_OPEN)


def join_prefix(head: str, prefix: str) -> str:
    """Generation prompt + assistant prefix, never opening ``<think>`` twice."""
    if prefix.lstrip().startswith(THINK_OPEN) and opens_think(head):
        prefix = prefix.lstrip()[len(THINK_OPEN):]
        if head.endswith("\n") and prefix.startswith("\n"):
            prefix = prefix[1:]
    return head + prefix


def canonical_completion(text: str) -> str:
    """The one stored form of a completion: a closed think block always opens with ``<think>``.

    A completion generated after a template that opened ``<think>`` itself starts inside the block
    (``reasoning</think> answer``); stored as is, it would train another format than Qwen3-style traces."""
    body = text.lstrip()
    if THINK_CLOSE in body and not body.startswith(THINK_OPEN):
        return f"{THINK_OPEN}\n{text}"
    return text


THOUGHT_MARKERS = (("<|begin_of_thought|>", THINK_OPEN), ("<|end_of_thought|>", THINK_CLOSE),
                   ("<|begin_of_solution|>", ""), ("<|end_of_solution|>", ""))


def normalize_thoughts(text: str) -> str:
    """Other corpora's reasoning markers in accord's form: OpenThoughts / Bespoke-Stratos write
    ``<|begin_of_thought|> … <|end_of_thought|> <|begin_of_solution|> … <|end_of_solution|>``; the thought
    becomes ``<think>…</think>`` and the solution the answer after it."""
    if "<|begin_of_thought|>" not in text and "<|end_of_thought|>" not in text:
        return text
    for marker, ours in THOUGHT_MARKERS:
        text = text.replace(marker, ours)
    return text.strip()


def training_target(head: str, target: str) -> str:
    """The target a student learns after its own generation prompt ``head``: the canonical completion,
    minus its opening ``<think>`` when the student's template already wrote it."""
    target = canonical_completion(target)
    if opens_think(head) and target.lstrip().startswith(THINK_OPEN):
        target = target.lstrip()[len(THINK_OPEN):]
        if head.endswith("\n") and target.startswith("\n"):
            target = target[1:]
    return target


@dataclass(frozen=True)
class Parsed:
    reasoning: str  # text inside <think>…</think> ("" when absent)
    answer: str  # text after </think> (the whole text when no think block)
    closed: bool  # whether </think> was seen


def split_think(text: str) -> Parsed:
    """Split a completion into reasoning and final answer; tolerant of a missing ``<think>``.

    Chat templates such as Qwen3's open ``<think>`` in the prompt, so a completion
    may start inside the block; anything before ``</think>`` is reasoning.
    """
    close = text.find(THINK_CLOSE)
    if close < 0:
        if THINK_OPEN in text:
            return Parsed(text.split(THINK_OPEN, 1)[1].strip(), "", False)
        return Parsed("", text.strip(), False)
    head, tail = text[:close], text[close + len(THINK_CLOSE):]
    if THINK_OPEN in head:
        head = head.split(THINK_OPEN, 1)[1]
    return Parsed(head.strip(), tail.strip(), True)


_BOXED = re.compile(r"\\boxed\s*\{")


def last_boxed_span(text: str) -> tuple[int, int] | None:
    """Character range ``[start, end)`` of the content of the last ``\\boxed{…}`` (balanced braces), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth = 1
    for j in range(starts[-1], len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return starts[-1], j
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (balanced braces), or None."""
    span = last_boxed_span(text)
    return text[span[0]:span[1]].strip() if span else None
