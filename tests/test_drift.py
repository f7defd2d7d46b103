"""Post-training drift (`accord drift`, COMPACT Fig. 4): the operator against a slow reference, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import pipeline_cfg, run_cli

from accord.analysis.drift import components, norm, shift


def test_shift_along_the_base_components_against_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(60, 6, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    u = components(h0, 2)
    assert torch.allclose(u.T @ u, torch.eye(2), atol=1e-5)
    # the top direction carries the most variance of any unit vector tried
    var = lambda v: float(((h0 - h0.mean(0)) @ v).var())
    assert all(var(u[:, 0]) >= var(v / v.norm()) - 1e-4 for v in torch.randn(50, 6, generator=g))
    h = h0 + 3.0 * u[:, 0] - 0.5 * u[:, 1] + torch.randn(60, 6, generator=g) * 0.01
    got = shift(h0, h, u)
    ref = []
    for k in range(2):  # slow: the mean projection of each state, one by one
        p0 = sum(float(sum(h0[i, j] * u[j, k] for j in range(6))) for i in range(60)) / 60
        p1 = sum(float(sum(h[i, j] * u[j, k] for j in range(6))) for i in range(60)) / 60
        ref.append(abs(p1 - p0))
    assert got["shift"] == pytest.approx(ref, abs=1e-4) and got["shift"] == pytest.approx([3.0, 0.5], abs=0.02)
    assert shift(h0, h0, u)["shift"] == [0.0, 0.0]
    n, se = norm(got)
    assert n == pytest.approx((3.0 ** 2 + 0.5 ** 2) ** 0.5, abs=0.02) and 0 < se < 1


def test_accord_drift_end_to_end(tmp_path, problems_file, two_parrots, micro):
    cfg = pipeline_cfg(tmp_path, problems_file, two_parrots, micro, method=["std", "mtd"], rounds=1)
    for cmd in ("collect", "train"):
        code, out = run_cli(cmd, str(cfg))
        assert code == 0, out
    code, out = run_cli("drift", str(cfg), "--problems", "6")
    assert code == 0, out
    run = tmp_path / "run"
    data = json.loads((run / "analysis" / "drift.json").read_text())
    assert set(data["models"]) == {"std-seven", "std-eight", "mtd"} and data["problems"] == {"target": 6, "general": 4}
    layers = json.loads((micro / "config.json").read_text())["num_hidden_layers"]
    for by in data["models"].values():
        assert all(len(by[s]) == layers and all(len(v["shift"]) == 2 for v in by[s]) for s in ("target", "general"))
    assert any(v["shift"][0] > 0 for v in data["models"]["mtd"]["target"])  # training moved something
    assert "drift mtd (last layer): " in out and (run / "analysis" / "drift.png").exists()
    code, out = run_cli("report", str(cfg))
    assert code == 0 and "COMPACT §4.3, Fig. 4" in (run / "report" / "index.html").read_text()
    code, out = run_cli("drift", str(cfg), "--models", "mot")
    assert code == 2 and "no finished training for mot" in out
    # a model trained again since drift ran is left out of the report's section, and named
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from accord.analysis.interpolate import pair_weights
    from accord.config import load_config

    rec = json.loads((run / "train" / "mtd" / "result.json").read_text())
    assert data["weights"]["mtd"] == pair_weights(load_config(cfg), rec)
    for f in Path(rec["final"]).glob("*.safetensors"):
        save_file({k: v + 0.01 for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    code, out = run_cli("report", str(cfg))
    page = (run / "report" / "index.html").read_text()
    assert code == 0 and "Left out: mtd — trained again" in page and "COMPACT §4.3, Fig. 4" in page, out
    section = page.split("COMPACT §4.3, Fig. 4")[1].split("<h2>")[0]
    assert "<td>std-seven</td>" in section and "<td>mtd</td>" not in section
    assert (run / "report" / "drift.png").exists()
