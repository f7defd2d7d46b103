"""The trace store: one SQLite file (WAL) per run, one row per generation.

The unique key ``(problem_id, teacher, style, sample_idx)`` makes collection
resumable: a re-run asks only for missing keys.  Each batch is written in one
transaction, so a kill loses at most the batch in flight and never leaves half a
batch or a duplicate.  A row whose generation *failed* (server error after
retries) is replaced when a later run retries it; every other row is final.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accord.rows import StoredTrace, TraceRow

SCHEMA = """
CREATE TABLE IF NOT EXISTS problems (
  id TEXT PRIMARY KEY, question TEXT NOT NULL, answer TEXT NOT NULL, split TEXT, meta TEXT);
CREATE TABLE IF NOT EXISTS traces (
  row_id INTEGER PRIMARY KEY,
  problem_id TEXT NOT NULL, teacher TEXT NOT NULL, style TEXT NOT NULL, sample_idx INTEGER NOT NULL,
  params TEXT NOT NULL, prompt TEXT, text TEXT NOT NULL, reasoning TEXT, answer_text TEXT,
  parsed_answer TEXT, verdict TEXT NOT NULL, judge TEXT, judge_text TEXT,
  token_count INTEGER, char_count INTEGER, finish_reason TEXT,
  mean_logprob REAL, min_window_logprob REAL,
  elapsed_s REAL, error TEXT, created_at REAL NOT NULL, source_verdict TEXT, verified_with TEXT, judged_with TEXT,
  UNIQUE (problem_id, teacher, style, sample_idx));
CREATE INDEX IF NOT EXISTS traces_teacher ON traces (teacher, verdict);
"""

TRACE_COLUMNS = ("problem_id", "teacher", "style", "sample_idx", "params", "prompt", "text", "reasoning",
                 "answer_text", "parsed_answer", "verdict", "judge", "judge_text", "token_count", "char_count",
                 "finish_reason", "mean_logprob", "min_window_logprob", "elapsed_s", "error", "created_at",
                 "source_verdict", "verified_with", "judged_with")
_KEY = ("problem_id", "teacher", "style", "sample_idx")


class TraceStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(traces)")}
        for col in ("source_verdict", "verified_with", "judged_with"):  # a store written before these were kept
            if col not in cols:
                self.db.execute(f"ALTER TABLE traces ADD COLUMN {col} TEXT")

    @classmethod
    def reader(cls, path: str | Path) -> TraceStore | None:
        """An existing store opened read-only (``accord run --plan`` writes nothing), or None when there is none."""
        path = Path(path)
        if not path.exists():
            return None
        store = cls.__new__(cls)
        store.path = path
        # immutable: no lock or shared-memory file is made — only when no write-ahead log is pending (a killed
        # collection leaves one; then a plain read-only open reads it)
        mode = "ro" if Path(f"{path}-wal").exists() else "ro&immutable=1"
        store.db = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, timeout=60, check_same_thread=False)
        store.db.row_factory = sqlite3.Row
        return store

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- problems -----------------------------------------------------------------------------------
    def put_problems(self, problems: Iterable[Any]) -> None:
        rows = [(p.id, p.question, p.answer, p.meta.get("split"), json.dumps(_jsonable(p.meta))) for p in problems]
        with self.transaction() as db:
            db.executemany("INSERT INTO problems VALUES (?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET "
                           "question=excluded.question, answer=excluded.answer, split=excluded.split, "
                           "meta=excluded.meta", rows)  # an edited reference answer replaces the stored one

    # -- traces -------------------------------------------------------------------------------------
    def done_keys(self, teacher: str) -> set[tuple[str, str, int]]:
        """(problem_id, style, sample_idx) already collected for a teacher (failed rows do not count)."""
        cur = self.db.execute("SELECT problem_id, style, sample_idx FROM traces WHERE teacher=? AND verdict!='failed'",
                              (teacher,))
        return {(r[0], r[1], r[2]) for r in cur}

    def cut_rows(self, teacher: str) -> list[sqlite3.Row]:
        """A teacher's generated samples cut at the token limit (finish_reason ``length``), with their text and
        settings: those :func:`accord.collect.regrowable` may continue."""
        return self.db.execute("SELECT problem_id, style, sample_idx, params, text, token_count, elapsed_s FROM traces "
                               "WHERE teacher=? AND finish_reason='length' AND verdict!='failed' AND style!='import'",
                               (teacher,)).fetchall()

    def put_traces(self, rows: list[TraceRow]) -> None:
        """Insert a batch atomically; an existing failed row is replaced, and a cut one (finish_reason ``length``)
        by a row made with other settings (its continuation to a larger limit); any other is kept."""
        cols = ",".join(TRACE_COLUMNS)
        marks = ",".join("?" * len(TRACE_COLUMNS))
        update = ",".join(f"{c}=excluded.{c}" for c in TRACE_COLUMNS if c not in _KEY)
        sql = (f"INSERT INTO traces ({cols}) VALUES ({marks}) ON CONFLICT ({','.join(_KEY)}) "
               f"DO UPDATE SET {update} WHERE traces.verdict='failed' "
               "OR (traces.finish_reason='length' AND traces.params!=excluded.params)")
        now = time.time()
        values = [tuple(now if c == "created_at" else r.get(c) for c in TRACE_COLUMNS) for r in rows]
        with self.transaction() as db:
            db.executemany(sql, values)

    def set_judgements(self, items: list[tuple[int, str, str, str]]) -> None:
        """(row_id, verdict, the judge's reply, :func:`accord.verify.judge_stamp`) for each judged trace."""
        with self.transaction() as db:
            db.executemany("UPDATE traces SET judge=?, judge_text=?, judged_with=? WHERE row_id=?",
                           [(v, t, w, i) for i, v, t, w in items])

    def verification_stamps(self) -> list[sqlite3.Row]:
        """Every verified row's (row_id, problem_id, style, finish_reason, verdict, verified_with): what
        :func:`accord.collect.reverify` compares with today's stamps before it reads any text."""
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(traces)")}  # a read-only older store lacks it
        stamp = "verified_with" if "verified_with" in cols else "NULL AS verified_with"
        return self.db.execute(f"SELECT row_id, problem_id, style, finish_reason, verdict, {stamp} FROM traces "
                               "WHERE verdict!='failed'").fetchall()

    def judgement_stamps(self, where: str) -> list[dict]:
        """The (row_id, problem_id, judge, judged_with, imported_text) of the rows ``where`` selects, no text:
        what :func:`accord.collect.to_judge` compares with today's judge stamps before it reads any trace
        (``imported_text``: the judge text marks an imported grade, in a store from before verdicts were stamped)."""
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(traces)")}  # a read-only older store lacks it
        stamp = "judged_with" if "judged_with" in cols else "NULL AS judged_with"
        return [dict(r) for r in self.db.execute(f"SELECT row_id, problem_id, judge, {stamp}, judge_text LIKE "
                                                 f"'imported %' AS imported_text FROM traces WHERE {where}")]

    def texts(self, row_ids: list[int]) -> dict[int, str]:
        out = {}
        for i in range(0, len(row_ids), 500):  # under SQLite's limit on bound parameters
            part = row_ids[i:i + 500]
            out.update(self.db.execute(f"SELECT row_id, text FROM traces WHERE row_id IN ({','.join('?' * len(part))})",
                                       part).fetchall())
        return out

    def set_verdicts(self, items: list[tuple[int, str, str | None, str]]) -> None:
        """(row_id, verdict, parsed_answer, verified_with) for rows checked again; one transaction."""
        with self.transaction() as db:
            db.executemany("UPDATE traces SET verdict=?, parsed_answer=?, verified_with=? WHERE row_id=?",
                           [(v, a, st, i) for i, v, a, st in items])

    def traces(self, teacher: str | None = None, where: str = "", args: tuple = ()) -> list[StoredTrace]:
        sql = "SELECT * FROM traces WHERE 1=1"
        params: tuple = ()
        if teacher is not None:
            sql, params = sql + " AND teacher=?", (teacher,)
        if where:
            sql, params = sql + f" AND ({where})", params + tuple(args)
        return [dict(r) for r in self.db.execute(sql + " ORDER BY problem_id, style, sample_idx", params)]

    def take_out(self, row_ids: list[int]) -> list[dict]:
        """Remove the rows ``row_ids`` in one transaction and return them as they were (the caller keeps a copy:
        ``accord cord --force``)."""
        out = []
        with self.transaction() as db:
            for i in range(0, len(row_ids), 500):  # under SQLite's limit on bound parameters
                part, marks = row_ids[i:i + 500], ",".join("?" * len(row_ids[i:i + 500]))
                out += [dict(r) for r in db.execute(f"SELECT * FROM traces WHERE row_id IN ({marks})", part)]
                db.execute(f"DELETE FROM traces WHERE row_id IN ({marks})", part)
        return out

    def count(self, teacher: str | None = None) -> int:
        if teacher is None:
            return self.db.execute("SELECT COUNT(*) FROM traces").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM traces WHERE teacher=?", (teacher,)).fetchone()[0]

    def other_params(self, teacher: str, params: str) -> list[tuple[str, int, int]]:
        """The other settings (their JSON) a teacher's stored rows were generated with, how many rows each, and how
        many of those were cut at the token limit."""
        return self.db.execute("SELECT params, COUNT(*), SUM(finish_reason='length') FROM traces WHERE teacher=? "
                               "AND params!=? AND verdict!='failed' GROUP BY params ORDER BY params",
                               (teacher, params)).fetchall()

    def export_jsonl(self, out: str | Path) -> int:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        with out.open("w", encoding="utf-8") as fh:
            for r in self.db.execute("SELECT t.*, p.question, p.answer FROM traces t JOIN problems p "
                                     "ON p.id=t.problem_id ORDER BY t.teacher, t.problem_id, t.style, t.sample_idx"):
                row = dict(r)
                row["params"] = json.loads(row["params"])
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        return n

    def close(self) -> None:
        self.db.close()


def _jsonable(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
            out[k] = v
        except (TypeError, ValueError):
            out[k] = str(v)
    return out
