import json

from accord.store import TraceStore


def row(pid, idx, verdict="correct", text="t"):
    return dict(problem_id=pid, teacher="a", style="default", sample_idx=idx, params="{}", text=text, verdict=verdict)


def test_unique_key_failed_rows_are_retried_others_kept(tmp_path):
    s = TraceStore(tmp_path / "t.sqlite")
    s.put_traces([row("p", 0), row("p", 1, "failed", "")])
    assert s.done_keys("a") == {("p", "default", 0)}
    s.put_traces([row("p", 0, "incorrect", "NEW"), row("p", 1, "correct", "retried")])
    rows = {r["sample_idx"]: r for r in s.traces("a")}
    assert s.count() == 2
    assert rows[0]["text"] == "t" and rows[0]["verdict"] == "correct"  # final rows are never overwritten
    assert rows[1]["text"] == "retried" and rows[1]["verdict"] == "correct"
    s.close()
    s2 = TraceStore(tmp_path / "t.sqlite")  # reopens, WAL
    assert s2.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s2.count("a") == 2


def test_export_jsonl(tmp_path):
    from accord.problems import Problem

    s = TraceStore(tmp_path / "t.sqlite")
    s.put_problems([Problem("p", "q?", "1")])
    s.put_traces([row("p", 0)])
    n = s.export_jsonl(tmp_path / "out.jsonl")
    line = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert n == 1 and line["question"] == "q?" and line["params"] == {} and line["verdict"] == "correct"
