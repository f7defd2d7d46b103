"""`accord demo` on the quick lab profile (slow: trains the quick zoo; `make test-all`)."""

import json
from pathlib import Path

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_demo_quick_profile_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCORD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ACCORD_DEMO_PROFILE", "quick")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr("accord.demo.config_path", lambda name: _retarget(name, tmp_path))
    code, out = run_cli("demo")
    assert code == 0, out
    summary = json.loads((tmp_path / "run" / "collect_summary.json").read_text())
    assert {s["teacher"] for s in summary} == {"terse", "verbose", "verify", "shifted"}
    assert all(s["samples"] == 120 for s in summary)


def _retarget(name, tmp_path):
    import yaml

    src = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = yaml.safe_load(src.read_text())
    cfg["run_dir"] = str(tmp_path / "run")
    out = tmp_path / name
    out.write_text(yaml.safe_dump(cfg))
    return out
