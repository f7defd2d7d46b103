"""Step segmentation for CoRD (§4.1, App. G.1).

Three step units:

- ``prompt``: teachers are asked (the ``steps`` prompt style) to open every step
  with a ``### Step N`` header inside ``<think>``; a step is a header and what
  follows it up to the next header.  During decoding the header is written into
  the shared prefix, so every teacher continues the same step number and stops
  at the next header.
- ``line-break``: a step ends at a blank line (``\\n\\n``).
- ``prefix``: a new step starts at a reflection marker (App. G.1's lists:
  self-verification, multi-method validation, self-correction); matching is
  case-insensitive and only at the start of a line or sentence.

Choice where the paper is silent: the text before the first boundary (e.g. a
preamble before ``### Step 1``) is a step of its own, and boundaries stay with the
step they open, so ``"".join(split_steps(t)) == t`` for every mode.
"""

from __future__ import annotations

import itertools
import re

MODES = ("prompt", "line-break", "prefix")
HEADER = "### Step"
MARKERS = ("let me check", "let me verify", "double-check", "going back to", "wait",
           "alternatively", "another way", "let's try a different approach", "using another method",
           "we can also verify",
           "this is wrong", "the mistake was", "that's impossible", "this contradicts", "the error is")
_MARKER_RE = re.compile(r"(?:(?<=\n)|(?<=[.!?] )|^)(?=(?:" + "|".join(re.escape(m) for m in MARKERS) + r")\b)",
                        re.IGNORECASE)


def split_steps(text: str, mode: str) -> list[str]:
    """Cut a reasoning text into steps; the pieces concatenate back to ``text``."""
    if mode == "prompt":
        cuts = [m.start() for m in re.finditer(re.escape(HEADER), text)]
    elif mode == "line-break":
        cuts = [m.end() for m in re.finditer(r"\n\n", text)]
    elif mode == "prefix":
        cuts = [m.start() for m in _MARKER_RE.finditer(text)]
    else:
        raise ValueError(f"unknown segmentation {mode!r}; choose one of {', '.join(MODES)}")
    bounds = sorted({0, *[c for c in cuts if 0 < c < len(text)], len(text)})
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def stop_strings(mode: str) -> list[str]:
    """Where a teacher's step proposal ends (``</think>`` ends the whole reasoning)."""
    if mode == "prompt":
        return [HEADER, "</think>"]
    if mode == "line-break":
        return ["\n\n", "</think>"]
    if mode == "prefix":
        variants = {v for m in MARKERS for v in (m, m.capitalize())}
        return sorted(f"{sep}{v}" for v in variants for sep in ("\n", ". ")) + ["</think>"]
    raise ValueError(f"unknown segmentation {mode!r}; choose one of {', '.join(MODES)}")


def step_lead(mode: str, step_no: int, last_stop: str | None) -> str:
    """Text written into the shared prefix before teachers propose step ``step_no`` (1-based)."""
    if mode == "prompt":
        return f"{HEADER} {step_no}\n"
    if mode == "line-break":
        return "\n\n" if step_no > 1 else ""
    if last_stop and last_stop != "</think>":  # prefix: the marker that ended the last step opens this one
        return last_stop
    return ""
