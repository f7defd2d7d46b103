"""Answer extraction and checking, plus the LLM-judge prompt (QR-Distill §2.3).

Verdicts:
- ``correct`` / ``incorrect``: the answer was read and compared with the reference;
- ``unparseable``: an answer section exists but no answer could be read from it
  (kept apart from ``incorrect``: it says more about the verifier than the teacher);
- ``failed``: the generation itself failed (server error after retries).

An empty or truncated output (``<think>`` opened but never closed, or nothing
after it) is ``incorrect``: the teacher gave no answer.

``math`` uses math-verify with the gold answer first (``verify(gold, pred)``).
math-verify bounds its own time with SIGALRM, which only works in the main
thread, so elsewhere we pass ``None`` and the caller bounds time.  A reference
answer is read as LaTeX first (inside ``\\boxed{}``, as the completion's own
answer is): read as plain text, math-verify keeps only a number of it —
``2\\sqrt{2}`` became 2, ``(-\\infty, 3)`` 3, ``3 + 2i`` 2 — so a wrong ``\\boxed{2}``
passed and the right answer failed.

Every stored verdict carries :func:`stamp` (the verifier, its :data:`REVISION`,
tolerance and the reference answer): the trace store and the evaluation rows
check a verdict again, from the stored text, when its stamp is not today's.
A judge verdict carries :func:`judge_stamp` the same way (who judged, how, and the problem it was shown): one
under another stamp is asked again, and only the configured judge's verdicts filter traces.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from accord.errors import UsageError
from accord.prompts import THINK_OPEN, last_boxed, split_think

CORRECT, INCORRECT, UNPARSEABLE, FAILED = "correct", "incorrect", "unparseable", "failed"
# Raised whenever some (reference, completion) pair gets another verdict than before, so verdicts stored under an
# earlier revision are checked again (never regenerated).  2: references read as LaTeX first; 3: a choice letter
# only from an answer statement or a line of its own; 4: LaTeX thousands separators inside a number; 5: an exact
# answer wrapped whole in \text{} or bold; 6: ``numeric`` reads fractions (3/4, \frac{3}{4}) and a × 10^n whole.
REVISION = 6


def stamp(verifier: str, gold: str, tolerance: float = 1e-6) -> str:
    """What a verdict was reached with: the verifier, its revision and tolerance, and the reference answer (a
    digest) — a stored verdict under another stamp is out of date."""
    digest = hashlib.sha1(gold.encode("utf-8")).hexdigest()[:12]
    return f"{verifier} r{REVISION} tol={tolerance:g} {digest}"


class GoldAnswerError(UsageError):
    """The reference answer itself cannot be read by the chosen verifier."""


@dataclass(frozen=True)
class Check:
    verdict: str
    parsed: str | None  # the answer as read from the completion


def _timeout() -> int | None:
    return 5 if threading.current_thread() is threading.main_thread() else None


def answer_section(text: str) -> str | None:
    """The part of a completion that holds the final answer; None when truncated or empty."""
    parsed = split_think(text)
    if not parsed.closed and "<think>" in text:
        return None  # reasoning never finished
    return parsed.answer or None


# ------------------------------------------------------------------ math (math-verify)


@lru_cache(maxsize=65536)
def _parse_gold(gold: str):
    from math_verify import parse

    latex_first = not re.search(r"(?<!\\)\$|\\boxed", gold)  # else it has its own delimiters
    readings = (f"\\boxed{{{gold}}}", f"${gold}$", gold) if latex_first else (gold, f"\\boxed{{{gold}}}", f"${gold}$")
    for candidate in readings:
        parsed = parse(candidate, parsing_timeout=_timeout())
        if parsed:
            return parsed
    raise GoldAnswerError(f"math-verify cannot read the reference answer {gold!r}")


def check_math(gold: str, answer: str, tolerance: float = 0.0) -> Check:
    boxed = last_boxed(answer)
    shown = f"\\boxed{{{boxed}}}" if boxed is not None else answer
    return _check_math(gold, _THOUSANDS.sub("", shown))  # math-verify reads 1\,000 as wrong for 1000


@lru_cache(maxsize=65536)
def _check_math(gold: str, shown: str) -> Check:
    """The verdict of one (reference, extracted answer) pair; cached — k samples of a problem often give the
    same answer, and evaluation checks thousands (the reference is parsed once, not once per sample)."""
    from math_verify import parse, verify

    g = _parse_gold(gold)
    pred = parse(shown, parsing_timeout=_timeout())
    if not pred:
        return Check(UNPARSEABLE, None)
    shown = str(pred[-1]) if isinstance(pred[-1], str) else str(pred[0])
    ok = verify(g, pred, timeout_seconds=_timeout())
    return Check(CORRECT if ok else INCORRECT, shown)


# ------------------------------------------------------------------ numeric / choice / exact

# LaTeX's thousands separators between digits (1{,}000, 1\,000, 1\!000): before revision 4 they split a number,
# and 1{,}000 read as 0
_THOUSANDS = re.compile(r"(?<=\d)(?:\{,\}|\\[,!;: ])(?=\d{3}(?!\d))")
# A number as a teacher writes one (revision 6; before, only the last run of digits counted, so 3/4 and
# \frac{3}{4} read as 4, 1.5 \times 10^{3} as 3 — a right answer failed, and a reference of 3/4 passed a 4):
# \frac{a}{b} (also \dfrac, \tfrac, \frac34, a sign before it), a/b, a × 10^n (\times, \cdot, ×), else a number.
_N = r"(?:[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_VALUE = re.compile(
    rf"(?P<fs>[-+]?)\s*\\[dt]?frac\s*(?:\{{\s*(?P<fn>{_N})\s*\}}|(?P<fn1>\d))\s*(?:\{{\s*(?P<fd>{_N})\s*\}}|(?P<fd1>\d))"
    rf"|(?P<m>{_N})\s*(?:\\times|\\cdot|×|\*)\s*10\s*\^\s*(?:\{{\s*(?P<e>[-+]?\d+)\s*\}}|(?P<e1>[-+]?\d+))"
    rf"|(?P<sn>{_N})\s*/\s*(?P<sd>{_N})(?![\d/])"
    r"|(?P<symbolic>\\[dt]?frac\s*\{[^{}]*\}\s*\{[^{}]*\})"  # \frac{\pi}{2}: no number (not 2)
    rf"|(?P<n>{_N})")


def _value(m: re.Match) -> float:
    """The value of one :data:`_VALUE` match (ValueError / ZeroDivisionError when it has none)."""
    def num(s: str) -> float:
        return float(s.replace(",", ""))

    if m["fn"] is not None or m["fn1"] is not None:
        v = num(m["fn"] or m["fn1"]) / num(m["fd"] or m["fd1"])
        return -v if m["fs"] == "-" else v
    if m["m"] is not None:
        return num(m["m"]) * 10.0 ** int(m["e"] or m["e1"])
    if m["sn"] is not None:
        return num(m["sn"]) / num(m["sd"])
    return num(m["n"])


def _last_number(text: str) -> float | None:
    for m in reversed(list(_VALUE.finditer(_THOUSANDS.sub("", text).replace("\\!", "")))):
        if m["symbolic"] is not None:
            return None
        try:
            return _value(m)
        except (ValueError, ZeroDivisionError):
            continue
    return None


def answer_key(parsed: str) -> str:
    """What a parsed answer votes for in maj@k: its value when it is one number, fraction or power of ten whole
    (``0.5``, ``\\frac{1}{2}`` and ``1/2`` are one vote), else its text without surrounding space."""
    text = _THOUSANDS.sub("", parsed.strip())
    if "," in text and not re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?", text):
        return parsed.strip()  # a list (2,3), not a number with thousands separators (23)
    m = _VALUE.fullmatch(text)
    if m is not None and m["symbolic"] is None:
        try:
            return repr(_value(m))
        except (ValueError, ZeroDivisionError):
            pass
    return parsed.strip()


def check_numeric(gold: str, answer: str, tolerance: float = 1e-6) -> Check:
    g = _last_number(gold)
    if g is None:
        raise GoldAnswerError(f"no number in the reference answer {gold!r}")
    boxed = last_boxed(answer)
    p = _last_number(boxed if boxed is not None else answer)
    if p is None:
        return Check(UNPARSEABLE, None)
    ok = abs(p - g) <= tolerance * max(1.0, abs(g))
    return Check(CORRECT if ok else INCORRECT, repr(p))


# A choice is read from an answer statement ("the answer is (C)", "**Answer:** B", "correct option: D") or a line
# holding only the letter — never from a line that merely starts with a capital ("A quick check…", "I think…"),
# which read as A and I before revision 3.  The letter is a capital, or a small one ending the statement's line:
# "the answer is a bit tricky" names none, "answer: b" names B.
_CHOICE = re.compile(r"(?i:\b(?:answer|option|choice)\b)(?:\s+(?i:is|would\s+be))?[\s:*]*\(?([A-J])\)?(?![A-Za-z0-9])"
                     r"|^[\s*]*\(?([A-J])\)?\.?[\s*]*$"
                     r"|(?i:\b(?:answer|option|choice)\b(?:\s+is)?)[\s:*]*\(?([a-j])\)?[.*\s]*$", re.M)


def _letter(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None and re.fullmatch(r"\(?[A-Ja-j]\)?\.?", boxed.strip()):
        return boxed.strip("(). ").upper()
    hits = [next(g for g in m.groups() if g) for m in _CHOICE.finditer(text)]
    return hits[-1].upper() if hits else None


def check_choice(gold: str, answer: str, tolerance: float = 0.0) -> Check:
    g = _letter(gold) or gold.strip().strip("()").upper()
    if not re.fullmatch(r"[A-J]", g):
        raise GoldAnswerError(f"the reference answer {gold!r} is not a choice letter A-J")
    p = _letter(answer)
    if p is None:
        return Check(UNPARSEABLE, None)
    return Check(CORRECT if p == g else INCORRECT, p)


_WRAPPED = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\{(.*)\}|\*\*(.*)\*\*", re.S)


def _norm(s: str) -> str:
    """Case, surrounding space and a final period aside; a whole answer in ``\\text{}`` (or ``\\textbf``,
    ``\\mathrm``, …) or markdown bold is read without it — ``\\boxed{\\text{Paris}}`` is Paris (revision 5)."""
    s = s.strip()
    while (m := _WRAPPED.fullmatch(s)) and _balanced(inner := m.group(1) if m.group(1) is not None else m.group(2)):
        s = inner.strip()
    return " ".join(s.strip(".").split()).lower()


def _balanced(s: str) -> bool:
    """Whether braces never close more than they opened (``\\text{A} and \\text{B}`` is not one wrapped answer)."""
    depth = 0
    for c in s:
        depth += (c == "{") - (c == "}")
        if depth < 0:
            return False
    return depth == 0


def check_exact(gold: str, answer: str, tolerance: float = 0.0) -> Check:
    boxed = last_boxed(answer)
    p = boxed if boxed is not None else answer
    return Check(CORRECT if _norm(p) == _norm(gold) else INCORRECT, p.strip())


VERIFIERS: dict[str, Callable[[str, str, float], Check]] = {
    "math": check_math,
    "numeric": check_numeric,
    "choice": check_choice,
    "exact": check_exact,
}


def check(verifier: str, gold: str, completion: str, tolerance: float = 1e-6) -> Check:
    """Verify a full completion (reasoning + answer) against the reference answer."""
    answer = answer_section(completion)
    if answer is None:
        return Check(INCORRECT, None)
    try:
        return VERIFIERS[verifier](gold, answer, tolerance)
    except GoldAnswerError:
        raise
    except Exception:  # noqa: BLE001 — a verifier crash on odd teacher text is not the teacher being wrong
        return Check(UNPARSEABLE, None)


def gold_is_readable(verifier: str, gold: str) -> bool:
    try:
        VERIFIERS[verifier](gold, f"\\boxed{{{gold}}}", 1e-6)
        return True
    except GoldAnswerError:
        return False


# ------------------------------------------------------------------ LLM judge (QR-Distill §2.3 step 2)

JUDGE_PROMPT = (
    "You are checking a worked solution for spurious reasoning.\n\n"
    "Problem:\n{question}\n\nReference answer: {answer}\n\nSolution to check:\n<solution>\n{solution}\n</solution>\n\n"
    "Does the solution contain hallucinated, unjustified or spurious intermediate steps, even though its final "
    "answer may be right? Reply with one word on the last line: VALID if every step is logically sound, "
    "INVALID otherwise."
)
VALID, INVALID, UNCLEAR = "valid", "invalid", "unclear"
# how :func:`parse_judgement` reads a reply; 2: a reply cut by the token limit, or a think block never closed, is
# unclear (revision 1 took the last VALID/INVALID its reasoning tried)
JUDGE_REVISION = 2
IMPORTED = "imported"  # the stamp of a grade imported with a corpus (a column teacher's grade_column)


def judge_stamp(judge: dict, question: str, answer: str) -> str:
    """What a judge verdict was reached with: who judged and how (``judge``: its model, backend and the settings
    that shape its reply), the prompt, :data:`JUDGE_REVISION`, and the problem it was shown (a digest) — a stored
    verdict under another stamp is out of date, and the trace is judged again."""
    how = hashlib.sha1(json.dumps([judge, JUDGE_PROMPT], sort_keys=True, default=str).encode()).hexdigest()[:12]
    what = hashlib.sha1(f"{question}\0{answer}".encode()).hexdigest()[:12]
    return f"judge r{JUDGE_REVISION} {how} {what}"


def judge_prompt(question: str, answer: str, solution: str) -> str:
    return JUDGE_PROMPT.format(question=question, answer=answer, solution=solution)


def parse_judgement(text: str, finish_reason: str = "stop") -> str:
    """The judge's verdict: the last VALID/INVALID word of its reply after any think block.  A reply cut by the
    token limit never reached the last line the prompt asks for, and one whose think block never closed never
    left its reasoning: both are unclear, whatever words the reasoning tried on the way."""
    parsed = split_think(text)
    if finish_reason == "length" or (THINK_OPEN in text and not parsed.closed):
        return UNCLEAR
    words = re.findall(r"\b(INVALID|VALID)\b", parsed.answer.upper())
    if not words:
        return UNCLEAR
    return VALID if words[-1] == "VALID" else INVALID
