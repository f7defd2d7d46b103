"""Base-to-checkpoint interpolation (MoT App. D, Fig. 6): the operator against its definition, the curve's
summary numbers, and `accord interpolate` end to end on micro models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import pipeline_cfg, run_cli

from accord.analysis.interpolate import grid, interpolated, max_dip


def test_interpolated_state_is_the_convex_combination():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(5, 7, generator=g), "b": torch.randn(7, generator=g),
            "steps": torch.tensor([3])}  # an integer buffer is the base's
    ckpt = {"w": torch.randn(5, 7, generator=g), "b": torch.randn(7, generator=g), "steps": torch.tensor([9])}
    for lam in (0.1, 0.5, 0.75):
        got = interpolated(base, ckpt, lam)
        for n in ("w", "b"):
            rows_b, rows_c = base[n].view(-1, base[n].shape[-1]), ckpt[n].view(-1, ckpt[n].shape[-1])
            ref = torch.tensor([[lam * float(x) + (1 - lam) * float(y) for x, y in zip(rb, rc)]
                                for rb, rc in zip(rows_b, rows_c)])
            assert torch.allclose(got[n], ref.view_as(got[n]), atol=1e-6), (n, lam)
        assert int(got["steps"]) == 3
    assert interpolated(base, ckpt, 0.0) is ckpt and interpolated(base, ckpt, 1.0) is base  # the ends, bit for bit


def test_grid_and_largest_dip():
    assert grid(3) == [0.0, 0.5, 1.0] and len(grid(11)) == 11 and grid(11)[3] == 0.3
    rising = [{"lambda": 1.0, "pass1": 0.1}, {"lambda": 0.5, "pass1": 0.2}, {"lambda": 0.0, "pass1": 0.4}]
    assert max_dip(rising) == 0.0
    bumpy = [{"lambda": 0.0, "pass1": 0.4}, {"lambda": 1.0, "pass1": 0.1}, {"lambda": 0.5, "pass1": 0.02},
             {"lambda": 0.75, "pass1": 0.15}]  # base → 0.15 → 0.02 (a dip of 0.13) → 0.4
    assert abs(max_dip(bumpy) - 0.13) < 1e-12
    greedy_only = [{"lambda": 1.0, "pass1": None, "greedy": 0.5}, {"lambda": 0.0, "pass1": None, "greedy": 0.25}]
    assert max_dip(greedy_only) == 0.25


def test_accord_interpolate_end_to_end(tmp_path, problems_file, two_parrots, micro):
    cfg = pipeline_cfg(tmp_path, problems_file, two_parrots, micro, method=["mtd"], rounds=1)
    code, out = run_cli("run", str(cfg))
    assert code == 0, out
    code, out = run_cli("interpolate", str(cfg), "--models", "mtd", "--points", "3", "--split", "target")
    assert code == 0, out
    run = tmp_path / "run"
    data = json.loads((run / "analysis" / "interpolation.json").read_text())
    assert data["split"] == "target" and [p["lambda"] for p in data["curves"]["mtd"]] == [0.0, 0.5, 1.0]
    ends = {r["model"]: r for r in json.loads((run / "eval" / "results.json").read_text())
            if r.get("final") and r["split"] == "target"}
    curve = data["curves"]["mtd"]
    assert curve[0]["pass1"] == ends["mtd"]["pass1"] and curve[-1]["pass1"] == ends["base"]["pass1"]  # the ends
    assert (run / "analysis" / "interpolation.png").exists()
    # finished points are not generated again; the report draws the figure
    rows = run / "analysis" / "interpolation" / "mtd" / "lambda-0.500" / "target.rows.jsonl"
    before = rows.read_text()
    code, out = run_cli("interpolate", str(cfg), "--models", "mtd", "--points", "3", "--split", "target")
    assert code == 0 and rows.read_text() == before
    code, out = run_cli("report", str(cfg))
    assert code == 0 and "MoT App. D, Fig. 6" in (run / "report" / "index.html").read_text()
    assert (run / "report" / "interpolation.png").exists()
    # a point made with other settings is set aside and made again; one verified otherwise is checked again
    point = rows.with_name("target.json")
    code, out = run_cli("interpolate", str(cfg), "--models", "mtd", "--points", "3", "--split", "target", "eval.k=1")
    assert code == 0 and json.loads(point.read_text())["k"] == 1 and (point.parent / "target.stale-1.json").exists()
    stored = json.loads(point.read_text())
    point.write_text(json.dumps({**stored, "verified_with": "math r1", "pass1": -1.0}))
    before = rows.read_text()
    code, out = run_cli("interpolate", str(cfg), "--models", "mtd", "--points", "3", "--split", "target", "eval.k=1")
    assert code == 0 and rows.read_text() == before and json.loads(point.read_text()) == stored
    # a killed point's rows resume only under what it started with (here: another model's weights)
    from accord.evaluate import started_file

    record = {k: stored[k] for k in ("k", "repeats", "n", "temperature", "top_p", "max_new_tokens",
                                     "chat_template_kwargs", "verified_with", "weights")}
    started_file(point).write_text(json.dumps({**record, "weights": "0123456789ab"}))
    point.unlink()
    code, out = run_cli("interpolate", str(cfg), "--models", "mtd", "--points", "3", "--split", "target", "eval.k=1")
    assert code == 0 and json.loads(point.read_text())["weights"] == stored["weights"], out
    assert json.loads((point.parent / "target.stale-2.started.json").read_text())["weights"] == "0123456789ab"
    assert (point.parent / "target.stale-2.rows.jsonl").read_text() == before and not started_file(point).exists()
    # a model that was not trained is named
    code, out = run_cli("interpolate", str(cfg), "--models", "mot")
    assert code == 2 and "no finished training for mot" in out
    # the report leaves out, and names, the curve of a model trained again since it was interpolated
    from safetensors.torch import load_file, save_file

    code, out = run_cli("report", str(cfg))
    page = (run / "report" / "index.html").read_text()
    assert code == 0 and "Left out of the interpolation figure" not in page and "MoT App. D, Fig. 6" in page
    final = Path(json.loads((run / "train" / "mtd" / "result.json").read_text())["final"])
    for f in final.glob("*.safetensors"):
        save_file({k: v + 0.01 for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    code, out = run_cli("report", str(cfg))
    page = (run / "report" / "index.html").read_text()
    assert code == 0 and "Left out of the interpolation figure: mtd — trained again" in page
    assert not (run / "report" / "interpolation.png").exists() and "interpolation.png" not in page
