"""The README's promises a newcomer reads first: the two commands, the conditions of every timing, the
quick profile's purpose, and the architecture page it links."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_first_screen_has_the_two_commands_and_says_how_timings_were_taken():
    first = ROOT.joinpath("README.md").read_text().split("\n---", 1)[0]
    assert "make demo" in first and "make test" in first
    assert "2-core" in first and "idle cores" in first  # the machine, and that timings assume idle cores
    assert "smoke version" in first and "deliberately weak" in first  # the quick profile's purpose


def test_architecture_page_is_linked_and_names_every_top_level_room():
    readme = ROOT.joinpath("README.md").read_text()
    assert "docs/architecture.md" in readme
    page = ROOT.joinpath("docs", "architecture.md").read_text()
    rooms = [p.stem for p in (ROOT / "src" / "accord").glob("*.py") if p.stem not in ("__init__",)]
    rooms += [p.name for p in (ROOT / "src" / "accord").iterdir() if p.is_dir() and not p.name.startswith("_")]
    missing = [r for r in rooms if r not in page]
    assert missing == [], missing


def test_help_and_schema_name_every_training_method():
    """``accord train --help``, the schema and the error for an unknown method all list the registry's methods
    (they once stopped at ``mot`` after COMPACT and QR had landed)."""
    import pytest

    from accord.cli import build_parser
    from accord.config import AccordConfig
    from accord.registry import METHODS

    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    help_text = sub.choices["train"].description
    schema = AccordConfig.model_json_schema()["$defs"]["TrainConfig"]["properties"]["method"]["description"]
    with pytest.raises(ValueError) as err:
        AccordConfig.model_validate({"train": {"method": "nope"}})
    for name in METHODS:
        assert name in help_text and name in schema and name in str(err.value), name


def test_the_code_is_lint_clean():
    """`make lint` (ruff, with pyproject's rules) passes: style is checked on every CI run, not by hand."""
    import shutil
    import subprocess
    import sys

    import pytest

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    out = subprocess.run([ruff, "check", "--no-cache", "src", "tests", "bench"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_link_inside_the_readme_lands_on_a_heading_or_an_anchor():
    """The contents lines and every ``(#…)`` link reach a heading (GitHub's slug: lower case, punctuation dropped,
    spaces as hyphens) or an ``<a id>``: a renamed heading must not leave a dead link."""
    import re

    text = ROOT.joinpath("README.md").read_text()
    targets = {re.sub(r"[^\w\- ]", "", t.lower()).replace(" ", "-") for t in re.findall(r"^#+ (.+)$", text, re.M)}
    targets |= set(re.findall(r'<a id="([^"]+)"', text))
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) >= 10 and sorted(set(links) - targets) == []
