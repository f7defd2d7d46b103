"""bench/gpu.sh, checked here before a GPU session spends its minutes on it.

A GPU is lent for about 15 minutes a session, machine start included, and one device call runs the whole script:
a bench flag renamed since the script was written, or a test file moved, costs that step's figures until the next
GPU session. These tests read the script as bash would (continuation lines joined, comments dropped) and check
every bench command's arguments against that bench's own parser, without running it, and that every test file
and pytest option it names exists.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.sh"


def _arrays(text: str) -> dict[str, list[str]]:
    """The script's bash arrays, ``NAME=(word … # comment …)`` over one or more lines."""
    return {m[1]: shlex.split(m[2], comments=True) for m in re.finditer(r"^(\w+)=\(([^)]*)\)", text, re.M)}


def _expand(word: str, arrays: dict[str, list[str]]) -> list[str]:
    """``${NAME[@]}`` as its items, ``${NAME[@]/#/P}`` as its items with P in front; any other word as it is."""
    m = re.fullmatch(r"\$\{(\w+)\[@\](?:/#/([^}]*))?\}", word)
    return [(m[2] or "") + w for w in arrays[m[1]]] if m else [word]


def _commands() -> list[list[str]]:
    """The script's logical lines as words, comments dropped (shlex reads `#` as bash does outside quotes), its
    arrays expanded."""
    text = SCRIPT.read_text()
    arrays = _arrays(text)
    return [[x for w in words for x in _expand(w, arrays)] for line in text.replace("\\\n", " ").splitlines()
            if (words := shlex.split(line, comments=True))]


def _python_calls(target: str) -> list[list[str]]:
    """Every `python3 TARGET ...` in the script: the words from TARGET up to the first pipe or separator."""
    calls = []
    for words in _commands():
        for i, w in enumerate(words[:-1]):
            if w == "python3" and words[i + 1].startswith(target):
                rest = words[i + 1:]
                cut = next((j for j, x in enumerate(rest) if x in {"|", "||", "&&", ";", "2>/dev/null"}), len(rest))
                calls.append(rest[:cut])
    return calls


# Runs each bench's main() with its argv as far as its parser, which then ends the run: exit 0 when the parser
# took every argument, 2 (argparse's usage error) when it did not. Benches import bench/engine.py by name, as
# they do when run as scripts, so their directory goes first on the path.
_PARSE_ONLY = """
import argparse, json, runpy, sys
calls = json.loads(sys.argv[1])
sys.path.insert(0, "bench")
real = argparse.ArgumentParser.parse_args
def parse_then_stop(self, *a, **k):
    real(self, *a, **k)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_then_stop
codes = []
for call in calls:
    sys.argv = call
    try:
        runpy.run_path(call[0], run_name="__main__")
        codes.append("ran to the end")  # a bench without a parser would run: it must not get here
    except SystemExit as e:
        codes.append(e.code or 0)
print(json.dumps(codes))
"""


def test_every_bench_command_in_the_gpu_script_parses_with_that_bench():
    calls = _python_calls("bench/")
    names = {Path(c[0]).name for c in calls}
    assert {"engine.py", "memory.py", "norm.py", "head.py", "qlora.py", "eval.py", "goals.py"} <= names, names
    for call in calls:
        assert (ROOT / call[0]).is_file(), f"bench/gpu.sh runs {call[0]}, which does not exist"
    out = subprocess.run([sys.executable, "-c", _PARSE_ONLY, json.dumps(calls)], cwd=ROOT, check=False,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    codes = json.loads(out.stdout.strip().splitlines()[-1])
    bad = [(" ".join(c), code) for c, code in zip(calls, codes) if code != 0]
    assert not bad, f"bench/gpu.sh commands their bench's parser refuses: {bad}\n{out.stderr[-3000:]}"


def test_every_test_file_and_marker_the_gpu_script_names_exists():
    calls = _python_calls("-m")  # python3 -m pytest …, python3 -m accord.cli env
    pytest_calls = [c for c in calls if c[:2] == ["-m", "pytest"]]
    assert len(pytest_calls) >= 4, pytest_calls
    known = next(c for c in pytest_calls if any("::" in w for w in c))
    assert len([w for w in known if "::" in w]) == 4  # the array reached the command
    markers = (ROOT / "pyproject.toml").read_text()
    for call in pytest_calls:
        paths = [w.removeprefix("--deselect=") for w in call if w.startswith(("tests", "--deselect=tests"))]
        assert paths, call
        for p in paths:
            file, _, test = p.partition("::")
            assert (ROOT / file).exists(), f"bench/gpu.sh runs pytest on {file}, which does not exist"
            assert not test or f"def {test}(" in (ROOT / file).read_text(), f"bench/gpu.sh names {p}: no such test"
        for i, w in enumerate(call[:-1]):
            if w == "-m" and call[i + 1] != "pytest":
                for name in call[i + 1].replace("(", " ").replace(")", " ").split():
                    if name not in {"not", "and", "or"}:
                        assert f'"{name}:' in markers, f"bench/gpu.sh selects pytest marker {name!r}, not declared"
    assert ["-m", "accord.cli", "env"] in calls
