"""Progress output when stdout is not a terminal: throttled lines, a last line per task."""

from __future__ import annotations

import io

from rich.console import Console

from accord.ui import LineProgress, progress


def test_not_a_terminal_prints_throttled_lines_and_the_end(monkeypatch):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False)
    monkeypatch.setenv("ACCORD_PROGRESS_EVERY", "3600")
    with progress(console) as bar:
        assert isinstance(bar, LineProgress)
        t = bar.add_task("train", total=100)
        for i in range(100):
            bar.update(t, advance=1, description=f"train loss {1 / (i + 1):.3f}")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train loss 0.010 100/100")  # only the finish, once

    buf = io.StringIO()
    with LineProgress(Console(file=buf, force_terminal=False), every=0) as bar:
        t = bar.add_task("collect", total=4)
        bar.advance(t)
        bar.advance(t)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("collect 1/4") and "eta" in lines[0] and lines[1].startswith("collect 2/4")
    assert len(lines) == 2  # unfinished at exit: its last state was already printed


def test_a_terminal_keeps_rich_bars():
    console = Console(file=io.StringIO(), force_terminal=True)
    assert not isinstance(progress(console), LineProgress)


def test_console_in_a_log_is_wide_enough_for_the_tables(monkeypatch):
    """Not a terminal: $COLUMNS or LOG_WIDTH columns (rich's 80 wrapped every cell of the collection table)."""
    from accord.ui import LOG_WIDTH, make_console

    monkeypatch.delenv("COLUMNS", raising=False)
    c = make_console()
    assert not c.is_terminal and c.width == LOG_WIDTH
    monkeypatch.setenv("COLUMNS", "90")
    assert make_console().width == 90
    assert make_console(width=70).width == 70
    import io

    buf = io.StringIO()
    c = make_console(file=buf)
    c.print("word " * 60)  # 300 characters: one line in a log, not three
    assert buf.getvalue().count("\n") == 1
