"""The typed records between stages (``accord.rows``) match what the code really builds and stores."""

from __future__ import annotations

from accord.config import AccordConfig
from accord.rows import CorpusRow, EvalPoint, EvalRow, StoredTrace, TraceRow, TrainRecord


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


def test_eval_points_and_rows_are_their_contracts(tmp_path):
    """Every point ``eval_points`` builds (bases, curve steps, finals, a QR student's own base) holds only
    ``EvalPoint``'s fields, and an eval row is exactly a point + its split + ``EvalResult`` + the settings."""
    from accord.evaluate import EvalResult, eval_points

    cfg = AccordConfig.model_validate({"problems": {"path": "p.jsonl"}, "student": {"model": str(tmp_path)},
                                       "teachers": [{"name": "a", "model": "m"}],
                                       "eval": {"every_checkpoint": True}})
    results = [{"name": "mot", "final": "r2", "curve": [{"steps": 5, "path": "r1", "round": 1},
                                                       {"steps": 10, "path": "r2", "round": 2}]},
               {"name": "qr-b", "student": "b", "final": "q", "base_model": "bb"}]
    pts = eval_points(cfg, results)
    assert [p["key"] for p in pts] == ["base", "base-b", "mot/step-5", "mot/step-10", "qr-b/final"]
    assert all(set(p) <= _keys(EvalPoint) for p in pts)
    r = EvalResult(0.5, 0.25, 2, 4).as_dict()
    assert _keys(EvalRow) == _keys(EvalPoint) | {"split"} | set(r) | {"temperature", "top_p", "max_new_tokens",
                                                                        "provenance"}
