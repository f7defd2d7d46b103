"""`accord demo` on the quick lab profile: lab → collect → diagnose → STD×4, MTD, post-hoc, MoT, COMPACT → drift →
eval → report (slow)."""

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
    assert all(s["samples"] == 800 for s in summary)  # 400 problems × 2 samples (configs/lab-quick.yaml)
    for name in ("std-terse", "std-shifted", "mtd", "posthoc", "mot", "compact"):
        assert (tmp_path / "run" / "train" / name / "result.json").exists(), name
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "<table>" in page
    assert "Teachers as the student saw them before training" in page and "COMPACT §4.3, Fig. 4" in page
    assert "mot" in out and "target pass@1" in out
    # the quick lab's student has the primitive (one step answered directly) but not the chain, and the
    # quick profile's own bands held (a miss would be a warning in the output and `weak` in the manifest)
    from accord.lab.cache import status

    st = {m["name"]: m for m in status("quick")["models"]}
    acc = st["student"]["accuracy"]
    assert acc["one_step_greedy"] >= 0.6 and acc["target_pass1"] <= 0.2 and acc["general_greedy"] >= 0.85
    assert not any(m["weak"] for m in st.values()), {n: m["weak"] for n, m in st.items()}


def _retarget(name, tmp_path):
    import yaml

    src = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = yaml.safe_load(src.read_text())
    cfg["run_dir"] = str(tmp_path / "run")
    out = tmp_path / name
    out.write_text(yaml.safe_dump(cfg))
    return out
