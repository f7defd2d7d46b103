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


def test_env_says_what_runs_here_and_never_a_secret(monkeypatch):
    """`accord env` (and --json): versions, devices, each optional package with what it turns on, the defaults
    resolved on this machine, and only the named steering variables — an API key in the environment never shows."""
    import json

    import torch
    from conftest import run_cli

    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-your-eyes")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out = run_cli("env", "--json")
    assert code == 0, out
    env = json.loads(out)
    assert env["versions"]["torch"] == torch.__version__ and "math-verify" in env["versions"]
    assert env["devices"]["cpu"].startswith(f"{__import__('os').cpu_count()} core(s)")
    assert env["optional"]["bitsandbytes"].startswith("installed ")  # a dev dependency, with its version
    assert env["optional"]["flash_attn"] == ("not installed: student.attention: flash_attention_2 (packed training "
                                             "rows in one row)")
    assert env["defaults"]["student.device: auto"] == ("cuda" if torch.cuda.is_available() else "cpu")
    from accord.models import SHOWN_ENV

    assert env["environment"]["HF_HUB_OFFLINE"] == "1" and set(env["environment"]) <= set(SHOWN_ENV)
    code, text = run_cli("env")
    assert code == 0 and "train.report_to: [tensorboard]" in text and "HF_HUB_OFFLINE" in text
    assert "sk-not-for-your-eyes" not in out + text and "OPENAI_API_KEY" not in out + text
    import importlib.metadata  # a broken install (on the H200: `datasets` missing) is reported, not a traceback

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: real(name) if name != "datasets" else
                        (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name)))
    code, out = run_cli("env", "--json")
    assert code == 0 and json.loads(out)["versions"]["datasets"].startswith("MISSING")


def test_deepspeeds_cpu_fallback_line_is_dropped_and_nothing_else():
    """DeepSpeed, imported by every ``save_pretrained`` where it is installed, warns on a machine without a GPU that
    it is "Setting accelerator to CPU"; ``quiet_libraries`` drops that line from its logger and nothing else, and
    DeepSpeed's own import keeps the filter (it reuses its logger by name)."""
    import logging
    import os
    import subprocess
    import sys
    from importlib.util import find_spec

    import pytest

    from accord.ui import quiet_libraries

    quiet_libraries()
    log, seen = logging.getLogger("DeepSpeed"), []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())
    log.addHandler(handler)
    try:
        log.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        log.warning("ZeRO: something else")
    finally:
        log.removeHandler(handler)
    assert seen == ["ZeRO: something else"]
    if find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"CUDA_VISIBLE_DEVICES": ""}
    code = "from accord.ui import quiet_libraries; {}; import deepspeed"
    said = [subprocess.run([sys.executable, "-c", code.format(q)], capture_output=True, text=True, env=env,
                           timeout=120, check=True) for q in ("quiet_libraries()", "pass")]
    assert "Setting accelerator to CPU" not in said[0].stdout + said[0].stderr
    assert "Setting accelerator to CPU" in said[1].stdout + said[1].stderr  # what the filter is for


def test_say_once_through_a_console_says_each_line_once(monkeypatch):
    """The lab's zoo warnings go through it (every stage of ``accord run`` checks the lab again: the demo said
    "teacher 'terse' is the best one nowhere" at each); rich markup is the console's."""
    from accord import ui

    monkeypatch.setattr(ui, "_SAID", set())
    said = []
    for lines in (["[yellow]warning:[/] a"], ["[yellow]warning:[/] a"], ["[yellow]warning:[/] a", "b"]):
        buf = io.StringIO()
        for line in lines:
            ui.say_once(line, Console(file=buf, width=200))
        said.append(buf.getvalue())
    assert said == ["warning: a\n", "", "b\n"]
