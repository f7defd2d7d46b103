
import json

import pytest
from conftest import write_jsonl

from accord.config import ProblemsConfig
from accord.problems import (
    ProblemSourceError,
    load_problems,
    normalize_answer,
    problem_id,
    split_of,
)


def test_answer_normalisation():
    assert normalize_answer("so 40 + 2\n#### 1,042") == "1042"
    assert normalize_answer("the answer is \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert normalize_answer(" 17 ") == "17"
    assert normalize_answer("#### 5", "raw") == "#### 5"


def test_jsonl_ids_are_stable_and_given_ids_win(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2",
                                                                                "uid": "X"}])
    ps = load_problems(ProblemsConfig(path=str(f), id_field="uid"))
    assert ps[0].id == problem_id("q1") and ps[1].id == "X"
    assert load_problems(ProblemsConfig(path=str(f)))[0].id == ps[0].id


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n')
    with pytest.raises(ProblemSourceError, match=r"p\.jsonl:2: malformed JSON"):
        load_problems(ProblemsConfig(path=str(f)))


@pytest.mark.parametrize("line, says", [
    ('not json at all', "Expecting value at column 1"),
    ('{"question": "b", "answer": ', "Expecting value at the end of the line (column 29): the object is cut short"),
    ('{"question": "b", "answer": "2"} {"x": 1}', "a second JSON value starts at column 34"),
    ("{'question': 'b'}", "Expecting property name enclosed in double quotes at column 2"),
])
def test_malformed_line_column_is_the_column_of_that_line(tmp_path, line, says):
    f = tmp_path / "p.jsonl"
    f.write_text('{"question": "a", "answer": "1"}\n' + line + "\n")
    with pytest.raises(ProblemSourceError) as e:
        load_problems(ProblemsConfig(path=str(f)))
    assert f"p.jsonl:2: malformed JSON — {says}" in str(e.value)
    assert "^" in str(e.value)


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes('\ufeff{"question": "a", "answer": "1"}\n'.encode())
    assert load_problems(ProblemsConfig(path=str(f)))[0].question == "a"


def test_missing_field_names_field_and_row(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"question": "a", "answer": "1"}, {"problem": "b", "solution": "2"}])
    with pytest.raises(ProblemSourceError, match=r"p\.jsonl:2: missing field 'question'"):
        load_problems(ProblemsConfig(path=str(f)))


def test_configurable_fields_parquet_and_hf_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = {"problem": ["p1", "p2"], "solution": ["x #### 3", "y #### 4"]}
    pq.write_table(pa.table(rows), tmp_path / "p.parquet")
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    for path in (tmp_path / "p.parquet", tmp_path / "ds"):
        ps = load_problems(ProblemsConfig(path=str(path), question_field="problem", answer_field="solution"))
        assert [(p.question, p.answer) for p in ps] == [("p1", "3"), ("p2", "4")]


def test_splits_are_deterministic_disjoint_and_sized(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(2000)]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    kw = dict(path=str(f), validation_fraction=0.1, test_fraction=0.2)
    parts = {s: {p.id for p in load_problems(ProblemsConfig(split=s, **kw))} for s in ("train", "validation", "test")}
    assert not (parts["train"] & parts["test"]) and not (parts["train"] & parts["validation"])
    assert sum(map(len, parts.values())) == 2000
    assert 130 < len(parts["validation"]) < 270 and 330 < len(parts["test"]) < 470
    # adding problems never moves existing ones
    assert split_of("abc", 0, 0.1, 0.2) == split_of("abc", 0, 0.1, 0.2)
    rows2 = rows + [{"question": "new", "answer": "0"}]
    f2 = write_jsonl(tmp_path / "p2.jsonl", rows2)
    test2 = {p.id for p in load_problems(ProblemsConfig(split="test", **{**kw, "path": str(f2)}))}
    assert parts["test"] <= test2


def test_missing_file_and_limit(tmp_path):
    with pytest.raises(ProblemSourceError, match="not found"):
        load_problems(ProblemsConfig(path=str(tmp_path / "nope.jsonl")))
    f = write_jsonl(tmp_path / "p.jsonl", [{"question": f"q{i}", "answer": "1"} for i in range(5)])
    assert len(load_problems(ProblemsConfig(path=str(f), limit=2))) == 2


def test_limit_stops_reading_with_the_last_problems_rows_whole(tmp_path):
    """A long corpus read up to ``limit`` problems of the split asked for: a malformed line past them is never
    read, and the last problem keeps all its (contiguous) sample rows; the same from parquet, a batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"q{i // 3}", "answer": "1", "sol": f"s{i}"} for i in range(12)]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    with f.open("a") as fh:
        fh.write("{not json\n")
    got = load_problems(ProblemsConfig(path=str(f), limit=2, on_duplicate="samples"))
    assert [p.question for p in got] == ["q0", "q1"] and [r["sol"] for r in got[1].rows] == ["s3", "s4", "s5"]
    with pytest.raises(ProblemSourceError, match="malformed JSON"):
        load_problems(ProblemsConfig(path=str(f), on_duplicate="samples"))
    train = load_problems(ProblemsConfig(path=str(f), limit=1, split="train", validation_fraction=0.5))
    assert len(train) == 1 and train[0].meta["split"] == "train"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet", row_group_size=4)
    got = load_problems(ProblemsConfig(path=str(tmp_path / "p.parquet"), limit=3, on_duplicate="samples"))
    assert [len(p.rows) for p in got] == [3, 3, 3]


def test_non_utf8_bytes_name_file_line_and_offset(tmp_path):
    from accord.config import ProblemsConfig
    from accord.problems import ProblemSourceError, load_problems

    p = tmp_path / "p.jsonl"
    p.write_bytes(b'{"question": "a", "answer": "1"}\n{"question": "b\xff", "answer": "2"}\n')
    with pytest.raises(ProblemSourceError) as e:
        load_problems(ProblemsConfig(path=str(p)))
    msg = str(e.value)
    assert f"{p}:2:" in msg and "0xff" in msg and "byte offset 48" in msg and "column 16" in msg


def test_duplicate_ids_are_counted_named_and_optionally_fatal(tmp_path, capsys):
    from accord.config import ProblemsConfig
    from accord.problems import ProblemSourceError, load_problems

    rows = [{"id": "x", "question": "a", "answer": "1"}, {"id": "y", "question": "b", "answer": "2"},
            {"id": "x", "question": "c", "answer": "3"}]
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_problems(ProblemsConfig(path=str(p)))
    assert [q.question for q in got] == ["a", "b"]
    err = capsys.readouterr().err
    assert "1 row(s) repeat a problem id" in err and f"{p}:3" in err and f"first at {p}:1" in err
    with pytest.raises(ProblemSourceError, match="repeat a problem id"):
        load_problems(ProblemsConfig(path=str(p), on_duplicate="error"))
