"""Problems with reference answers, and their loaders.

Sources: ``.jsonl``, ``.parquet``, a directory written by ``datasets.save_to_disk``,
or ``lab:<task>[:<split>]`` (the offline lab, :mod:`accord.lab`).

- Ids are taken from ``id_field`` when given, else the first 12 hex digits of
  SHA-1 of the question: stable across runs, machines and row order.
- Splits are assigned from a hash of (seed, id), so adding problems never moves
  existing ones between train / validation / test; a row's own ``split`` field
  (the lab's sources carry one) is kept as ``source_split`` and never decides
  ``problems.split``: a train source still holds out its validation share.
- Answers are normalised per ``answer_format``: ``auto`` reads GSM8K's
  ``#### 42`` and ``\\boxed{42}``; ``raw`` keeps the text.
- Rows sharing an id: the first is kept (with a warning naming them), or an
  error (``on_duplicate: error``), or they are samples of one problem
  (``on_duplicate: samples``, a long-format corpus): the first row gives the
  question and answer, and every row is kept in ``Problem.rows`` for the
  column teachers to read (an answer that differs from the first row's is warned).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accord.config import ProblemsConfig
from accord.errors import UsageError
from accord.prompts import content_parts, last_boxed
from accord.sources import scheme_problem_rows
from accord.ui import make_console


class ProblemSourceError(UsageError):
    """A problem source that cannot be read; the message names the file, line or field."""


@dataclass
class Problem:
    id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)
    # every source row of the problem, in file order, each as its meta (``problems.on_duplicate: samples``: a
    # long-format corpus, one row per generation); empty when the problem is one row, ``meta``
    rows: list[dict[str, Any]] = field(default_factory=list)


def problem_id(question: str) -> str:
    return hashlib.sha1(question.encode("utf-8")).hexdigest()[:12]


def normalize_answer(raw: Any, fmt: str = "auto") -> str:
    text = str(raw).strip()
    if fmt == "raw":
        return text
    if fmt in ("auto", "gsm8k") and "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    if fmt in ("auto", "boxed"):
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed
    return text


def split_of(pid: str, seed: int, validation: float, test: float) -> str:
    """Deterministic split from a hash of (seed, id): uniform in [0, 1)."""
    h = int(hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()[:15], 16) / 16**15
    if h < test:
        return "test"
    if h < test + validation:
        return "validation"
    return "train"


# ------------------------------------------------------------------ raw row readers


def read_jsonl(path: Path, error: type[Exception] | None = None) -> Iterable[tuple[str, dict]]:
    """(``file:line``, object) per non-blank line; a bad line raises ``error`` naming file and line."""
    error = error or ProblemSourceError
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{lineno}: not UTF-8 — byte 0x{raw[e.start]:02x} at column {e.start + 1} "
                            f"(byte offset {offset + e.start} of the file); save the file as UTF-8") from None
            offset += len(raw)
            if not line.strip():
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark (Windows editors) is not an error
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: {_json_problem(line.rstrip(chr(13) + chr(10)), e)}") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{lineno}: each line must be a JSON object")
            yield f"{path}:{lineno}", row


def _json_problem(line: str, e: json.JSONDecodeError) -> str:
    """What is wrong with one JSONL line, at which column of *that line*, with the text around it."""
    col = e.pos + 1
    near = line[max(0, e.pos - 15):e.pos + 15]
    caret = " " * (min(e.pos, 15)) + "^"
    what = (f"a second JSON value starts at column {col} (one object per line)" if e.msg == "Extra data"
            else f"{e.msg} at column {col}" if e.pos < len(line)
            else f"{e.msg} at the end of the line (column {col}): the object is cut short")
    return f"malformed JSON — {what}\n    {near}\n    {caret}"


def _read_parquet(path: Path) -> Iterable[tuple[str, dict]]:
    """The rows a batch at a time: a reader that stops early (``problems.limit``) never holds the whole file."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path} row {i}", row
                i += 1
    except (OSError, ValueError, TypeError) as e:  # pyarrow's errors derive from these; said with the file's name
        raise ProblemSourceError(f"{path}: cannot read parquet: {e}") from None


def _read_hf_dir(path: Path) -> Iterable[tuple[str, dict]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 — datasets' many error types, said with the directory's name
        raise ProblemSourceError(f"{path}: not a saved Hugging Face dataset ({e})") from None
    if isinstance(ds, DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{path} row {i}", row


def read_rows(spec: str) -> Iterable[tuple[str, dict]]:
    if (rows := scheme_problem_rows(spec)) is not None:
        yield from rows
        return
    path = Path(spec)
    if not path.exists():
        raise ProblemSourceError(f"{path}: problem file not found")
    if path.is_dir():
        yield from _read_hf_dir(path)
    elif path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        yield from read_jsonl(path)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise ProblemSourceError(f"{path}: unsupported problem file (use .jsonl, .parquet or a saved dataset dir)")


# ------------------------------------------------------------------ the loader


def field(row: dict, path: str):
    """``row[path]``, or a dotted path inside it (``conversations.0.value``: list items by index); None if absent."""
    if path in row:
        return row[path]
    node = row
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _to_problem(where: str, row: dict, cfg: ProblemsConfig) -> Problem:
    values = {}
    for fld in (cfg.question_field, cfg.answer_field):
        values[fld] = field(row, fld)
        if values[fld] is None:
            raise ProblemSourceError(
                f"{where}: missing field {fld!r} (available: {', '.join(sorted(map(str, row))) or 'none'}); "
                f"set problems.question_field / problems.answer_field")
    raw = values[cfg.question_field]
    question = content_parts(raw)[0] if isinstance(raw, list) else str(raw)  # a chat turn's list of parts
    pid = str(row[cfg.id_field]) if row.get(cfg.id_field) is not None else problem_id(question)
    meta = {k: v for k, v in row.items() if k not in (cfg.question_field, cfg.answer_field)}
    return Problem(pid, question, normalize_answer(values[cfg.answer_field], cfg.answer_format), meta)


def _split(pid: str, cfg: ProblemsConfig) -> str:
    return split_of(pid, cfg.split_seed, cfg.validation_fraction, cfg.test_fraction)


def load_problems(cfg: ProblemsConfig) -> list[Problem]:
    """Read, normalise, de-duplicate by id, split and limit the configured problems; with a ``limit``, reading
    stops at the first problem past it (a multi-gigabyte corpus is read only as far as needed)."""
    seen: dict[str, tuple[Problem, str]] = {}
    dupes: list[tuple[str, str, str]] = []  # (id, where, first seen where)
    other: list[tuple[str, str, str, str]] = []  # samples of a problem whose answer differs: (id, where, it, first's)
    sentinels = {s.lower() for s in cfg.skip_answers}
    skipped: dict[str, int] = {}
    wanted = 0  # problems so far in the split asked for: reading stops at the first one past problems.limit
    for where, row in read_rows(cfg.path):
        ans = field(row, cfg.answer_field)
        if isinstance(ans, str) and ans.strip().lower() in sentinels:  # no checkable answer (a proof, …)
            skipped[ans.strip().lower()] = skipped.get(ans.strip().lower(), 0) + 1
            continue
        p = _to_problem(where, row, cfg)
        if p.id not in seen:
            if cfg.split == "all" or _split(p.id, cfg) == cfg.split:
                wanted += 1
                if cfg.limit is not None and wanted > cfg.limit:
                    break  # the first `limit` problems are whole (a long corpus's rows of one problem come together)
            seen[p.id] = (p, where)
        elif cfg.on_duplicate == "samples":
            first = seen[p.id][0]
            first.rows = first.rows or [first.meta]
            first.rows.append(p.meta)
            if p.answer != first.answer:
                other.append((p.id, where, p.answer, first.answer))
        else:
            dupes.append((p.id, where, seen[p.id][1]))
    if other:
        i, w, a, f = other[0]
        make_console().print(f"[yellow]warning[/]: {cfg.path}: {len(other)} row(s) give their problem another "
                             f"answer than its first row (id {i!r} at {w}: {a!r}, first {f!r}); the first row's "
                             "is kept", highlight=False, soft_wrap=True)
    if dupes:
        first = "; ".join(f"id {i!r} at {w} (first at {f})" for i, w, f in dupes[:3])
        msg = f"{cfg.path}: {len(dupes)} row(s) repeat a problem id: {first}"
        if cfg.on_duplicate == "error":
            raise ProblemSourceError(msg)
        make_console().print(f"[yellow]warning[/]: {msg}; the first of each is kept "
                                   "(problems.on_duplicate: error stops instead; samples reads each row as one "
                                   "sample of its problem, for a corpus with one row per generation)",
                                   highlight=False, soft_wrap=True)
    if skipped:
        make_console().print(f"{cfg.path}: skipped {sum(skipped.values())} row(s) without a checkable answer ("
                                   + ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
                                   + "; problems.skip_answers)", highlight=False, soft_wrap=True)
    problems = [p for p, _ in seen.values()]
    for p in problems:  # the id hash decides; a source's own split (lab:arith:train) is kept beside it
        if "split" in p.meta:
            p.meta["source_split"] = p.meta["split"]
        p.meta["split"] = _split(p.id, cfg)
    if cfg.split != "all":
        problems = [p for p in problems if p.meta["split"] == cfg.split]
    if cfg.limit is not None:
        problems = problems[: cfg.limit]
    if not problems:
        raise ProblemSourceError(f"{cfg.path}: no problems (split={cfg.split!r})")
    return problems
