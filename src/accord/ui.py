"""Console helpers: progress bars (rich) shared by every long-running stage.

On a terminal, rich's live bars.  Elsewhere (CI logs, ``nohup``, notebooks) rich
can only print a bar when it finishes, so a long stage would be silent for
minutes: ``LineProgress`` prints one line per task at most every
``ACCORD_PROGRESS_EVERY`` seconds (default 30) — description, done/total, rate
and ETA — and a last line when the task completes.  Written by hand because rich
has no throttled plain-text mode; it implements only the part of rich's
``Progress`` API that accord uses (``add_task``, ``update``, ``advance``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_SAID: set[str] = set()


def _not_deepspeeds_cpu_fallback(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def quiet_libraries() -> None:
    """Silence, once per process (the CLI and the lab's pool workers), what libraries print that is noise where
    accord runs, or that accord's own first lines already say."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes (imported by peft whenever installed) warns on AVX-512 CPUs that a hub kernel is absent
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # DeepSpeed, where installed, is imported by every save_pretrained (transformers' unwrap_model → accelerate's,
    # for an isinstance check) and then warns on any machine without a GPU: "Setting accelerator to CPU. If you
    # have GPU …", on every CPU run, DeepSpeed or not (three times in a `make demo`: once per process).  A filter
    # on its logger, which DeepSpeed reuses by name, drops that one line; the device is on accord's first line.
    logging.getLogger("DeepSpeed").addFilter(_not_deepspeeds_cpu_fallback)
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def say_once(line: str, console: Console | None = None) -> None:
    """Print ``line`` the first time this process sees it (what runs where, a warning every stage would repeat: said
    once, not per call): to stderr, or through ``console`` (rich markup, its quietness) when given."""
    if line not in _SAID:
        _SAID.add(line)
        if console is not None:
            console.print(line)
            return
        import sys

        print(line, file=sys.stderr, flush=True)


LOG_WIDTH = 120  # columns when stderr is not a terminal (rich's 80 would wrap every table cell in a log)


def make_console(**kw) -> Console:
    """accord's console: stderr; on a terminal its own width, in a log (CI, ``nohup``, ``tee``) ``$COLUMNS`` or
    :data:`LOG_WIDTH` columns, so the collection and method tables stay one line per row, and text lines are not
    cut (one message, one line: what ``grep`` finds)."""
    c = Console(stderr=True, **kw)
    if not c.is_terminal:
        if "COLUMNS" not in os.environ and "width" not in kw:
            c.width = LOG_WIDTH
        if "soft_wrap" not in kw:
            c.soft_wrap = True
    return c


def progress(console: Console | None = None):
    console = console or make_console()
    if not console.is_terminal and not console.is_jupyter:
        return LineProgress(console, float(os.environ.get("ACCORD_PROGRESS_EVERY", "30")))
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)


class _Task:
    def __init__(self, description: str, total: float | None, completed: float):
        self.description, self.total, self.completed = description, total, completed
        self.start, self.start_done = time.monotonic(), completed
        self.printed_done, self.finished = None, False


class LineProgress:
    """Plain progress lines, throttled: for logs that are not a terminal."""

    def __init__(self, console: Console, every: float = 30.0):
        self.console, self.every, self.tasks = console, every, {}
        self._last = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for t in self.tasks.values():
            if t.completed != t.printed_done and t.completed > t.start_done:
                self._line(t)
        return False

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_) -> int:
        self.tasks[len(self.tasks)] = _Task(description, total, completed)
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, *, advance: float | None = None, completed: float | None = None,
               description: str | None = None, total: float | None = None, **_) -> None:
        t = self.tasks[task]
        if description is not None:
            t.description = description
        if total is not None:
            t.total = total
        if completed is not None:
            t.completed = completed
        if advance:
            t.completed += advance
        now = time.monotonic()
        done = t.total is not None and t.completed >= t.total
        if (done and not t.finished) or now - self._last >= self.every:
            t.finished = done
            self._last = now
            self._line(t)

    def _line(self, t: _Task) -> None:
        t.printed_done = t.completed
        el = time.monotonic() - t.start
        rate = (t.completed - t.start_done) / el if el > 0 else 0.0
        total = f"/{t.total:g}" if t.total is not None else ""
        eta = ""
        if t.total is not None and rate > 0 and t.completed < t.total:
            eta = f" eta {_hms((t.total - t.completed) / rate)}"
        self.console.print(f"{t.description} {t.completed:g}{total} {_hms(el)} {rate:.3g}/s{eta}",
                           markup=False, highlight=False, soft_wrap=True)


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@contextlib.contextmanager
def no_hf_bars(active: bool = True):
    """transformers' own tqdm bars ("Loading weights", "Writing model shards") off for the block: evaluation
    and checkpointing load and save dozens of small local checkpoints, and the bars bury accord's output."""
    if not active:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
