"""Importing the multi-teacher corpora people already have, each schema in a small file written here:
ShareGPT conversations with thought markers (OpenThoughts, Bespoke-Stratos), `messages` with inline
<think>, list-valued generations with the source's own verdicts (OpenR1-Math), s1K-1.1's grades,
NuminaMath's answer sentinels, one row per generation with the model in a column (OpenMathReasoning:
``on_duplicate: samples`` and ``where``), and `messages` whose reasoning sits in its own field."""

from __future__ import annotations

import json
import sqlite3

import yaml
from conftest import run_cli, write_jsonl


def _collect(tmp_path, rows, problems: dict, teachers: list[dict], **extra):
    write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = {"run_dir": str(tmp_path / "run"), "problems": {"path": str(tmp_path / "data.jsonl"), **problems},
           "teachers": teachers, **extra}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code, out = run_cli("collect", str(p))
    assert code == 0, out
    db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")
    db.row_factory = sqlite3.Row
    traces = [dict(r) for r in db.execute("SELECT * FROM traces ORDER BY problem_id, teacher, sample_idx")]
    return out, traces


def _corpus(tmp_path, teacher: str) -> list[dict]:
    path = tmp_path / "run" / "corpora" / f"{teacher}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_sharegpt_conversations_with_thought_markers(tmp_path):
    conv = lambda q, a: [{"from": "user", "value": q}, {"from": "assistant", "value": a}]
    rows = [{"system": "…", "conversations": conv("What is 3 plus 4?", "<|begin_of_thought|>\n\n3 + 4 = 7\n\n"
                                                  "<|end_of_thought|>\n\n<|begin_of_solution|>\n\nThe sum is "
                                                  "\\boxed{7}\n\n<|end_of_solution|>"),
             "ground_truth_solution": "3 + 4 = \\boxed{7}"},
            {"system": "…", "conversations": conv("What is 4 plus 4?", "<|begin_of_thought|>\nguess\n"
                                                  "<|end_of_thought|>\n<|begin_of_solution|>\\boxed{9}"
                                                  "<|end_of_solution|>"),
             "ground_truth_solution": "\\boxed{8}"}]
    _out, traces = _collect(tmp_path, rows, {"question_field": "conversations.0.value",
                                            "answer_field": "ground_truth_solution"},
                           [{"name": "ot", "backend": "column", "column": "conversations", "format": "sharegpt"}])
    assert [t["verdict"] for t in traces if "3 plus 4" in t["prompt"]] == ["correct"]
    assert len(traces) == 2 and sum(t["verdict"] == "correct" for t in traces) == 1
    (row,) = _corpus(tmp_path, "ot")
    text = row["messages"][-1]["content"]
    assert text.startswith("<think>") and "</think>" in text and "<|" not in text and text.endswith("\\boxed{7}")
    assert row["question"] == "What is 3 plus 4?"


def test_messages_rows_with_inline_think(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "What is 4 plus 4?"},
                          {"role": "assistant", "content": "<think>\n4 + 4 = 8\n</think>\n\n\\boxed{8}"}],
             "answer": "8"}]
    _, traces = _collect(tmp_path, rows, {"question_field": "messages.0.content"},
                         [{"name": "m", "backend": "column", "column": "messages", "format": "messages"}])
    assert [(t["verdict"], t["reasoning"].strip()) for t in traces] == [("correct", "4 + 4 = 8")]


def test_list_valued_generations_keep_the_sources_verdicts_and_count_disagreements(tmp_path):
    ok, wrong = "<think>\n3 + 4 = 7\n</think>\n\\boxed{7}", "<think>\n3 + 4 = 6\n</think>\n\\boxed{6}"
    rows = [{"problem": "What is 3 plus 4?", "answer": "7", "generations": [ok, wrong, ok],
             "correctness_math_verify": [True, True, False],  # the source is wrong twice
             "finish_reasons": ["stop", "stop", "length"]}]  # the third was cut off: never correct
    out, traces = _collect(tmp_path, rows, {"question_field": "problem"},
                           [{"name": "r1", "backend": "column", "column": "generations", "format": "list",
                             "verdict_column": "correctness_math_verify", "finish_column": "finish_reasons"}])
    assert [t["sample_idx"] for t in traces] == [0, 1, 2]
    assert [t["verdict"] for t in traces] == ["correct", "incorrect", "incorrect"]
    assert [t["source_verdict"] for t in traces] == ["correct", "correct", "incorrect"]
    summary = json.loads((tmp_path / "run" / "collect_summary.json").read_text())[0]
    assert summary["source_verdicts"] == 3 and summary["source_disagree"] == 1
    assert "disagree on 1 of 3 imported sample(s)" in out


def test_s1k_grades_are_imported_as_judge_verdicts(tmp_path):
    rows = [{"question": f"What is {a} plus 4?", "solution": str(a + 4), "gemini_thinking_trajectory": f"{a} + 4",
             "gemini_attempt": f"\\boxed{{{a + 4}}}", "gemini_grade": g} for a, g in ((3, "Yes"), (4, "No"))]
    _, traces = _collect(tmp_path, rows, {"answer_field": "solution"},
                         [{"name": "gemini", "backend": "column", "column": "gemini_thinking_trajectory",
                           "answer_column": "gemini_attempt", "grade_column": "gemini_grade"}])
    assert [(t["verdict"], t["judge"]) for t in traces] in ([("correct", "valid"), ("correct", "invalid")],
                                                            [("correct", "invalid"), ("correct", "valid")])
    (row,) = _corpus(tmp_path, "gemini")  # the "No" grade filters like the judge
    assert row["answer"] == "7"


def test_answer_sentinels_are_skipped_and_counted(tmp_path):
    rows = [{"problem": "Prove it.", "answer": "proof", "sol": "x"},
            {"problem": "Find it.", "answer": "notfound", "sol": "x"},
            {"problem": "What is 3 plus 4?", "answer": "7", "sol": "<think>\n7\n</think>\n\\boxed{7}"}]
    out, traces = _collect(tmp_path, rows, {"question_field": "problem"},
                           [{"name": "n", "backend": "column", "column": "sol"}])
    assert "skipped 2 row(s) without a checkable answer (notfound: 1, proof: 1" in out
    assert len(traces) == 1 and traces[0]["verdict"] == "correct"


def _long_rows():
    """OpenMathReasoning's shape: one row per generation, the generating model in a column."""
    def row(q, a, model, sol):
        return {"problem": q, "expected_answer": a, "generation_model": model, "generated_solution": sol}
    return [row("What is 3 plus 4?", "7", "DeepSeek-R1", "<think>\n3 + 4 = 7\n</think>\n\\boxed{7}"),
            row("What is 3 plus 4?", "7", "QwQ-32B", "<think>\nhmm\n</think>\n\\boxed{8}"),
            row("What is 3 plus 4?", "7", "DeepSeek-R1", "<think>\nagain\n</think>\n\\boxed{6}"),
            row("What is 2 plus 2?", "4", "QwQ-32B", "<think>\n2 + 2 = 4\n</think>\n\\boxed{4}")]


def test_long_format_rows_are_samples_of_one_problem_and_where_picks_each_teachers_rows(tmp_path):
    problems = {"question_field": "problem", "answer_field": "expected_answer", "on_duplicate": "samples"}
    teachers = [{"name": "r1", "backend": "column", "column": "generated_solution",
                 "where": {"generation_model": "DeepSeek-R1"}},
                {"name": "qwq", "backend": "column", "column": "generated_solution",
                 "where": {"generation_model": ["QwQ-32B", "QwQ-32B-Preview"]}}]
    out, traces = _collect(tmp_path, _long_rows(), problems, teachers)
    assert "repeat a problem id" not in out
    got = {(t["teacher"], t["prompt"].split("What is ")[1][:8], t["sample_idx"], t["verdict"]) for t in traces}
    assert got == {("r1", "3 plus 4", 0, "correct"), ("r1", "3 plus 4", 1, "incorrect"),
                   ("qwq", "3 plus 4", 0, "incorrect"), ("qwq", "2 plus 2", 0, "correct")}
    db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")
    assert db.execute("SELECT COUNT(*) FROM problems").fetchone()[0] == 2
    assert json.loads(db.execute("SELECT params FROM traces WHERE teacher = 'r1'").fetchone()[0])["where"] == {
        "generation_model": "DeepSeek-R1"}
    code, again = run_cli("collect", str(tmp_path / "c.yaml"))  # resumes: every sample is stored already
    assert code == 0, again
    assert db.execute("SELECT COUNT(*) FROM traces").fetchone()[0] == 4
    code, plan = run_cli("collect", str(tmp_path / "c.yaml"), "--plan")
    assert code == 0 and "rows where {'generation_model': 'DeepSeek-R1'}" in plan, plan


def test_where_that_matches_no_row_names_the_values_there(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", _long_rows())
    cfg = {"run_dir": str(tmp_path / "run"),
           "problems": {"path": str(tmp_path / "data.jsonl"), "question_field": "problem",
                        "answer_field": "expected_answer", "on_duplicate": "samples"},
           "teachers": [{"name": "r1", "backend": "column", "column": "generated_solution",
                         "where": {"generation_model": "R1"}}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out = run_cli("collect", str(tmp_path / "c.yaml"))
    assert code == 2, out
    assert "where {'generation_model': 'R1'} matches no row" in out and "'DeepSeek-R1', 'QwQ-32B'" in out


def test_rows_of_one_problem_with_another_answer_are_warned(tmp_path):
    rows = _long_rows()
    rows[2]["expected_answer"] = "6"
    out, traces = _collect(tmp_path, rows, {"question_field": "problem", "answer_field": "expected_answer",
                                           "on_duplicate": "samples"},
                           [{"name": "every", "backend": "column", "column": "generated_solution"}])
    assert "1 row(s) give their problem another answer than its first row" in out
    assert sorted(t["verdict"] for t in traces if "3 plus 4" in t["prompt"]) == ["correct", "incorrect", "incorrect"]


def test_messages_with_the_reasoning_in_its_own_field(tmp_path):
    def chat(q, **assistant):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", **assistant}]}
    rows = [{**chat("What is 1 plus 1?", content="\\boxed{2}", reasoning_content="1 + 1 = 2"), "answer": "2"},
            {**chat("What is 2 plus 1?", content="\\boxed{3}", thinking="2 + 1 = 3"), "answer": "3"},
            {**chat("What is 5 plus 1?", content="<think>\ninline\n</think>\n\\boxed{6}", reasoning="aside"),
             "answer": "6"},
            {**chat("What is 6 plus 1?", content="\\boxed{7}", reasoning_content=None), "answer": "7"}]
    _, traces = _collect(tmp_path, rows, {"question_field": "messages.0.content"},
                         [{"name": "m", "backend": "column", "column": "messages", "format": "messages"}])
    got = {t["prompt"].split("What is ")[1][:1]: (t["verdict"], t["reasoning"].strip()) for t in traces}
    assert got == {"1": ("correct", "1 + 1 = 2"), "2": ("correct", "2 + 1 = 3"), "5": ("correct", "inline"),
                   "6": ("correct", "")}


def test_where_needs_a_column_teacher():
    import pytest
    from pydantic import ValidationError

    from accord.config import TeacherConfig

    with pytest.raises(ValidationError, match="where selects rows of an imported corpus"):
        TeacherConfig(name="t", backend="hf", model="m", where={"generation_model": "x"})


def test_messages_whose_content_is_a_list_of_parts(tmp_path):
    """OpenAI- and Anthropic-style content: a list of typed parts (text joined, a thinking part the reasoning,
    an image part left out), in the question as in the answer; before, both were read as the list's repr."""
    q = [{"type": "text", "text": "What is 2 plus 2?"}, {"type": "image_url", "image_url": {"url": "x"}}]
    a = [{"type": "thinking", "thinking": "2 + 2 = 4"}, {"type": "text", "text": "The sum is "},
         {"type": "text", "text": "\\boxed{4}"}]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "answer": "4"}]
    _, traces = _collect(tmp_path, rows, {"question_field": "messages.0.content"},
                         [{"name": "m", "backend": "column", "column": "messages", "format": "messages"}])
    assert [(t["verdict"], t["reasoning"].strip()) for t in traces] == [("correct", "2 + 2 = 4")]
    (row,) = _corpus(tmp_path, "m")
    assert row["question"] == "What is 2 plus 2?"
    assert row["messages"][-1]["content"].endswith("The sum is \\boxed{4}")


def test_content_parts():
    from accord.prompts import content_parts

    assert content_parts("plain") == ("plain", None) and content_parts(None) == (None, None)
    assert content_parts(["a", {"text": "b"}, {"type": "reasoning", "text": " r1 "},
                          {"type": "thinking", "thinking": "r2"}, {"type": "tool_use", "id": 1}]) == ("ab", "r1\n\nr2")
