"""`accord run`: collect → train (every listed method) → eval → report, skipping finished stages.

Each stage reads the previous stage's files in ``run_dir`` and skips work already
on disk, so re-running after a kill (or after adding a method to
``train.method``) does only what is missing.  Scheme models named in the config
(the lab's ``lab:<model>``, ``lab:quick/<model>``) are built first when missing.
"""

from __future__ import annotations

from pathlib import Path

from accord.analysis.report import _order_key, summary_text, write_report
from accord.config import AccordConfig, dump_config
from accord.evaluate import evaluate_models
from accord.sources import prepare
from accord.train import train_methods


def model_specs(cfg: AccordConfig, student: bool = True) -> list[str]:
    """Every model spec the config names: teachers, and (``student``) the student and QR's students."""
    specs = [t.model for t in cfg.teachers if t.model]
    if student:
        specs += [cfg.student.model] + ([s.model for s in cfg.qr.students] if "qr" in cfg.train.methods else [])
    return specs


def prepare_models(cfg: AccordConfig, console, student: bool = True) -> None:
    """Make the scheme models the config names exist (the lab builds what is missing)."""
    prepare(model_specs(cfg, student), console)


def run(cfg: AccordConfig, console, stages: tuple[str, ...] = ("collect", "train", "eval", "report"),
        extra_results: list[dict] | None = None, seeds: list[int] | None = None) -> dict:
    """``seeds``: train every method once per training seed (:func:`accord.train.common.replicas`), each
    evaluated like any model; the report pools them over seeds."""
    from accord.collect import collect
    from accord.train.common import replicas

    if "train" in stages:
        from accord.train.engine import check_device, check_precision

        device = check_device(cfg.student.device)  # said before any model is built, loaded or collected from
        check_precision(cfg.train.bf16, cfg.train.master_weights, device)
    if "train" in stages and "collect" not in stages:
        from accord.train.common import check_corpora

        check_corpora(cfg)  # a missing or broken corpus is said before any model is built or loaded
    prepare_models(cfg, console)
    dump_config(cfg)
    out: dict = {}
    if "collect" in stages:
        collect(cfg, console)
    if "train" in stages:
        out["results"] = []
        configs = replicas(cfg, seeds)
        for i, c in enumerate(configs):
            if len(configs) > 1:
                console.print(f"[bold]training seed {c.train.seed}[/] ({i + 1} of {len(configs)})")
            out["results"] += train_methods(c, console)
        if {"eval", "report"} & set(stages):  # evaluated and reported beside any other model in run_dir (a variant)
            names = {r["name"] for r in out["results"]}
            out["results"] += [r for r in finished_results(cfg) if r["name"] not in names]
    else:
        out["results"] = finished_results(cfg)
    out["results"] += extra_results or []
    if "eval" in stages:
        out["eval"] = evaluate_models(cfg, out.get("results", []), console)
    if "report" in stages:
        out["report"] = write_report(cfg, out["results"], out["eval"])
        print(summary_text(Path(cfg.run_dir), out["eval"], out["results"], list(cfg.eval.splits)))
        console.print(f"report: {Path(out['report']).resolve()}")
    return out


def finished_results(cfg: AccordConfig) -> list[dict]:
    """Result records of every finished training stage in ``run_dir/train``."""
    import json


    root = Path(cfg.run_dir) / "train"
    res = [json.loads(p.read_text()) for p in root.glob("*/result.json")] if root.exists() else []
    return sorted(res, key=lambda r: _order_key(r["name"]))
