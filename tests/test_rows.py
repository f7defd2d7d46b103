"""The typed records between stages (``accord.rows``) match what the code really builds and stores."""

from __future__ import annotations

from accord.config import AccordConfig
from accord.rows import CorpusRow, StoredTrace, TraceRow, TrainRecord


def _keys(td) -> set[str]:
    return set(td.__required_keys__) | set(td.__optional_keys__)


def _row():
    from accord.collect import make_row
    from accord.problems import Problem
    from accord.teachers.base import Generation

    cfg = AccordConfig.model_validate({"problems": {"path": "p.jsonl"},
                                       "teachers": [{"name": "a", "model": "m"}]})
    p = Problem("p1", "What is 3+4?", "7", {"split": "test", "level": 2})
    g = Generation(text="<think>\n3+4=7\n</think>\n\n\\boxed{7}", token_count=12, token_logprobs=[-0.1] * 12)
    return make_row(cfg, "a", "default", p, 0, "What is 3+4?", g, "{}"), p


def test_a_trace_row_is_exactly_its_contract_and_the_store_keeps_every_field(tmp_path):
    from accord.store import TRACE_COLUMNS, TraceStore

    row, _ = _row()
    assert set(row) == _keys(TraceRow)
    assert set(TRACE_COLUMNS) | {"row_id"} == _keys(StoredTrace)  # the table's columns are the contract's fields
    store = TraceStore(tmp_path / "t.sqlite")
    store.put_traces([row])
    got = store.traces()[0]
    assert _keys(TraceRow) <= set(got) <= _keys(StoredTrace)
    assert {k: got[k] for k in row} == row


def test_a_corpus_row_is_exactly_its_contract():
    from accord.collect import corpus_row

    row, p = _row()
    out = corpus_row({**row, "judge": None}, p)
    assert set(out) == _keys(CorpusRow)
    assert [m["role"] for m in out["messages"]] == ["user", "assistant"] and out["level"] == 2


def test_train_records_name_what_evaluation_and_the_report_read():
    assert {"name", "method", "final", "last", "curve", "branch_steps", "teachers"} <= _keys(TrainRecord)
