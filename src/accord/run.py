"""`accord run`: collect → train (every listed method) → eval → report, skipping finished stages.

Each stage reads the previous stage's files in ``run_dir`` and skips work already
on disk, so re-running after a kill (or after adding a method to
``train.method``) does only what is missing.  Lab models named in the config
(``lab:<model>``, ``lab:quick/<model>``) are built first when missing.
"""

from __future__ import annotations

import re
from pathlib import Path

from accord.config import AccordConfig, dump_config

LAB_REF = re.compile(r"^lab:(?:(full|quick|micro)/)?[A-Za-z_-]+$")


def lab_profiles(cfg: AccordConfig, student: bool = True) -> list[str]:
    """Lab profiles whose models the config names (problem sources like lab:chain:train are not models)."""
    specs = [t.model for t in cfg.teachers if t.model] + ([cfg.student.model] if student else [])
    out = []
    for s in specs:
        m = LAB_REF.match(s or "")
        if m and (m.group(1) or "full") not in out:
            out.append(m.group(1) or "full")
    return out


def run(cfg: AccordConfig, console, stages: tuple[str, ...] = ("collect", "train", "eval", "report"),
        extra_results: list[dict] | None = None) -> dict:
    from accord.collect import collect
    from accord.evaluate import evaluate_models
    from accord.lab.build import build_lab
    from accord.report import method_table, text_table, write_report
    from accord.train import run_training

    for profile in lab_profiles(cfg):
        build_lab(profile=profile, console=console, allow_weak=True)  # warned; `accord lab build` fails on it
    dump_config(cfg)
    out: dict = {}
    if "collect" in stages:
        collect(cfg, console)
    out["results"] = run_training(cfg, console) if "train" in stages else finished_results(cfg)
    out["results"] += extra_results or []
    if "eval" in stages:
        out["eval"] = evaluate_models(cfg, out.get("results", []), console)
    if "report" in stages:
        out["report"] = write_report(cfg, out["results"], out["eval"])
        head, body = method_table(out["eval"], out["results"], list(cfg.eval.splits))
        print(text_table(head, body))
        console.print(f"report: {Path(out['report']).resolve()}")
    return out


def finished_results(cfg: AccordConfig) -> list[dict]:
    """Result records of every finished training stage in ``run_dir/train``."""
    import json

    from accord.report import _order_key

    root = Path(cfg.run_dir) / "train"
    res = [json.loads(p.read_text()) for p in root.glob("*/result.json")] if root.exists() else []
    return sorted(res, key=lambda r: _order_key(r["name"]))
