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

LAB_REF = re.compile(r"^lab:(?:(full|quick|micro)/)?[A-Za-z_-]+$")  # a lab model, not a lab problem source


def lab_models(cfg: AccordConfig, student: bool = True) -> dict[str, set[str]]:
    """Lab profile → the lab model names the config uses (teachers, the student, QR's students); problem
    sources like lab:arith:train are not models."""
    specs = [t.model for t in cfg.teachers if t.model]
    if student:
        specs += [cfg.student.model] + ([s.model for s in cfg.qr.students] if "qr" in cfg.train.methods else [])
    out: dict[str, set[str]] = {}
    for s in specs:
        m = LAB_REF.match(s or "")
        if m:
            out.setdefault(m.group(1) or "full", set()).add(s.split("/")[-1].removeprefix("lab:"))
    return out


def build_lab_models(cfg: AccordConfig, console, student: bool = True) -> None:
    """Build (or reuse) the lab models the config names; a model outside its band is only warned about
    here (`accord lab build` fails on it)."""
    from accord.lab.build import build_lab

    for profile, names in lab_models(cfg, student).items():
        build_lab(profile=profile, console=console, allow_weak=True, extra=tuple(sorted(names)))


def run(cfg: AccordConfig, console, stages: tuple[str, ...] = ("collect", "train", "eval", "report"),
        extra_results: list[dict] | None = None) -> dict:
    from accord.collect import collect
    from accord.evaluate import evaluate_models
    from accord.report import method_table, text_table, write_report
    from accord.train import run_training

    build_lab_models(cfg, console)
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
