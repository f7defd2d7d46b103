import threading

import pytest

from accord.prompts import last_boxed, split_think
from accord.verify import (
    CORRECT,
    INCORRECT,
    INVALID,
    REVISION,
    UNCLEAR,
    UNPARSEABLE,
    VALID,
    GoldAnswerError,
    check,
    parse_judgement,
    stamp,
)


def test_split_think_and_boxed():
    p = split_think("<think>a\nb</think>\n\nSo \\boxed{\\frac{1}{2}}")
    assert p.closed and p.reasoning == "a\nb" and p.answer.startswith("So")
    assert last_boxed("x \\boxed{1} then \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"
    assert split_think("reasoning without open</think> ans").reasoning == "reasoning without open"
    assert not split_think("<think>never closed").closed


@pytest.mark.parametrize("gold,text,verdict", [
    ("7", "<think>3+4</think> \\boxed{7}", CORRECT),
    ("7", "<think>3+4</think> \\boxed{8}", INCORRECT),
    ("\\frac{1}{2}", "<think>.</think> The answer is \\boxed{0.5}", CORRECT),
    ("7", "<think>3+4 and then I ran out of tok", INCORRECT),  # truncated
    ("7", "", INCORRECT),  # empty
    ("7", "<think>x</think>", INCORRECT),  # nothing after reasoning
    ("7", "<think>x</think> I do not know", UNPARSEABLE),
])
def test_math_verdicts(gold, text, verdict):
    assert check("math", gold, text).verdict == verdict


@pytest.mark.parametrize("gold,right,wrong", [
    ("2\\sqrt{2}", "\\sqrt{8}", "2"),  # read as plain text, the reference was 2
    ("(-\\infty, 3)", "(-\\infty,3)", "3"),
    ("3 + 2i", "3+2i", "2"),
    ("1, 2, 3", "1,2,3", "3"),
    ("4\\pi", "4\\pi", "4"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "2"),
    ("1,000", "1000", "1"),
    ("\\$18.90", "18.9", "19"),
    ("$\\frac{1}{2}$", "0.5", "2"),  # delimiters of its own
    ("\\boxed{7}", "7", "8"),
])
def test_the_whole_reference_is_read(gold, right, wrong):
    assert check("math", gold, f"<think>.</think> \\boxed{{{right}}}").verdict == CORRECT
    assert check("math", gold, f"<think>.</think> \\boxed{{{wrong}}}").verdict == INCORRECT


def test_a_stamp_names_verifier_revision_tolerance_and_reference():
    a = stamp("math", "2\\sqrt{2}")
    assert a == stamp("math", "2\\sqrt{2}") and f"r{REVISION}" in a
    assert len({a, stamp("numeric", "2\\sqrt{2}"), stamp("math", "2\\sqrt{3}"), stamp("math", "2\\sqrt{2}", 1e-3)}) == 4


def test_math_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(check("math", "12", "<think>.</think>\\boxed{12}").verdict))
    t.start()
    t.join()
    assert out == [CORRECT]


def test_numeric_choice_exact():
    assert check("numeric", "3.14159", "\\boxed{3.14159}").verdict == CORRECT
    assert check("numeric", "100", "answer 100.00000001", 1e-6).verdict == CORRECT
    assert check("numeric", "100", "answer 101", 1e-6).verdict == INCORRECT
    assert check("numeric", "1,000", "\\boxed{1000}").verdict == CORRECT
    for shown in ("1{,}000", "1\\,000", "1\\!000"):  # LaTeX's thousands separators (revision 4: read as 0 before)
        assert check("numeric", "1000", f"\\boxed{{{shown}}}").parsed == "1000.0"
        assert check("math", "1000", f"\\boxed{{{shown}}}").verdict == CORRECT
    assert check("numeric", "1000000", "\\boxed{1{,}000{,}000}").verdict == CORRECT
    assert check("choice", "C", "<think>..</think> The answer is (C)").verdict == CORRECT
    assert check("choice", "(b)", "\\boxed{B}").verdict == CORRECT
    assert check("choice", "B", "The answer is A").verdict == INCORRECT
    assert check("exact", "Paris", "\\boxed{paris}").verdict == CORRECT
    for shown in ("\\boxed{\\text{Paris}}", "**Paris**", "\\boxed{\\textbf{ Paris }}."):  # revision 5
        assert check("exact", "Paris", shown).verdict == CORRECT
    assert check("exact", "A} and \\text{B", "\\boxed{\\text{A} and \\text{B}}").verdict == INCORRECT
    with pytest.raises(GoldAnswerError):
        check("choice", "42", "\\boxed{A}")


@pytest.mark.parametrize(("shown", "value"), [
    ("3/4", 0.75), ("\\frac{3}{4}", 0.75), ("\\dfrac34", 0.75), ("-\\frac{3}{4}", -0.75), ("\\tfrac{-3}{4}", -0.75),
    ("-3 / 4", -0.75), ("1{,}000/8", 125.0), ("1.5 \\times 10^{3}", 1500.0), ("2.5\\cdot10^-2", 0.025),
    ("7 × 10^3", 7000.0), ("x = 12", 12.0), ("12.", 12.0),
    ("\\frac{\\pi}{2}", None), ("1/0", None),  # no number: unparseable, not 2 or 0
])
def test_numeric_reads_fractions_and_powers_of_ten_whole(shown, value):
    """Revision 6: only the last run of digits used to count — 3/4 and \\frac{3}{4} read as 4, so the right answer
    failed and a reference of 3/4 passed a wrong 4; 1.5 × 10^3 read as 3."""
    got = check("numeric", "1", f"\\boxed{{{shown}}}")
    assert got.parsed == (None if value is None else repr(value))
    assert got.verdict == (UNPARSEABLE if value is None else INCORRECT)
    if value is not None:
        assert check("numeric", repr(value), f"\\boxed{{{shown}}}").verdict == CORRECT
    assert check("numeric", "3/4", "\\boxed{4}").verdict == INCORRECT
    assert check("numeric", "\\frac{3}{4}", "The answer is 0.75.").verdict == CORRECT
    with pytest.raises(GoldAnswerError):
        check("numeric", "\\frac{\\pi}{2}", "\\boxed{2}")


@pytest.mark.parametrize(("completion", "letter"), [
    ("The answer is (C).\nA quick check confirms it.", "C"),  # a line starting "A " is not a choice
    ("Answer: B\nI hope this helps.", "B"),
    ("Options:\nA. 12\nB. 42\nC. 7\nSo the answer is B.", "B"),  # the options listed are not answers
    ("the answer is a bit tricky, but C", None),
    ("**Answer:** D", "D"),
    ("The correct option is (D).", "D"),
    ("Therefore, the answer is D) 42", "D"),
    ("answer: b", "B"),
    ("We compare them.\n\n(B)", "B"),
    ("I think so.", None),
])
def test_a_choice_is_read_only_from_an_answer_statement_or_a_line_of_its_own(completion, letter):
    """Revision 3: before, a line that began with a capital A-J ("A quick check", "I hope") was read as the choice,
    so a right answer followed by such a line was marked wrong."""
    assert check("choice", "B", completion).parsed == letter


def test_judge_parsing():
    assert parse_judgement("Looks fine.\nVALID") == VALID
    assert parse_judgement("<think>is it VALID?</think> INVALID") == INVALID
    assert parse_judgement("no idea") == UNCLEAR
    # a judge that never finished gave no verdict, whatever its reasoning tried on the way
    assert parse_judgement("<think>\nStep 2 looks VALID, but step 3") == UNCLEAR  # think block never closed
    assert parse_judgement("<think>\nall VALID</think>\n\n") == UNCLEAR  # closed, nothing after it
    assert parse_judgement("Step 1 is VALID. Step 2", "length") == UNCLEAR  # cut before its last line
    assert parse_judgement("<think>\nhmm INVALID?</think>\nVALID", "stop") == VALID
