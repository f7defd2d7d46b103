"""`accord run`: collect → train (every listed method) → eval → report, skipping finished stages.

Each stage reads the previous stage's files in ``run_dir`` and skips work already
on disk, so re-running after a kill (or after adding a method to
``train.method``) does only what is missing.  Scheme models named in the config
(the lab's ``lab:<model>``, ``lab:quick/<model>``) are built first when missing.

Under several processes (``accelerate launch -m accord.cli run``), training uses them all, evaluation shares
its checkpoints among them (each process its own device; vLLM's on process 0 alone), collection deals out the
batches of ``hf`` teachers (:mod:`accord.collect`), and every other stage runs on process 0 alone while the
others wait (:func:`_together`): one store, one report.
"""

from __future__ import annotations

from pathlib import Path

from accord.analysis.report import _order_key, summary_text, write_report
from accord.config import AccordConfig, dump_config
from accord.evaluate import evaluate_models
from accord.launch import rank, world
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

    waits = _together(cfg) if {"collect", "train", "eval"} & set(stages) and world() > 1 else None  # a launch
    main = waits is None or rank() == 0
    if "train" in stages:
        from accord.train.engine import check_device, check_precision

        device = check_device(cfg.student.device)  # said before any model is built, loaded or collected from
        check_precision(cfg.train.bf16, cfg.train.master_weights, device)
    if "eval" in stages:
        from accord.evaluate import check_eval_splits

        check_eval_splits(cfg)  # nothing to evaluate on is said before anything is collected or trained
    if "train" in stages and "collect" not in stages:
        from accord.train.common import check_corpora

        check_corpora(cfg)  # a missing or broken corpus is said before any model is built or loaded
    out: dict = {}
    if main:
        prepare_models(cfg, console)
        dump_config(cfg)
    if "collect" in stages:  # the others wait inside while process 0 builds the models and the store
        collect(cfg, console, _share(waits))
    if waits is not None:
        _wait(waits)
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
    if "eval" in stages and waits is not None and cfg.eval.backend != "vllm":  # every process its share of
        evaluate_models(cfg, out["results"], console, share=(rank(), world()))  # the points, on its own device
        _wait(waits)  # (vLLM, which starts its own workers, evaluates on process 0 alone)
    if not main:
        _wait(waits)  # until process 0 has evaluated and reported
        return out
    if "eval" in stages:
        out["eval"] = evaluate_models(cfg, out.get("results", []), console)  # what the shares left: none
    if "report" in stages:
        out["report"] = write_report(cfg, out["results"], out["eval"])
        print(summary_text(Path(cfg.run_dir), out["eval"], out["results"], list(cfg.eval.splits)))
        console.print(f"report: {Path(out['report']).resolve()}")
    if waits is not None:
        _wait(waits)
    return out


def _together(cfg: AccordConfig):
    """Under several processes training and evaluation use them all; process 0 builds, collects and reports
    while the others wait, in a gloo group of its own whose timeout is a week (collecting, or process 0 evaluating
    alone under vLLM, takes hours; training keeps accelerate's timeouts, so a hung collective there still fails as
    it should).  The accelerator is made first, with the training's settings, as training would make it (it gives
    each process its device, which evaluation uses too)."""
    from datetime import timedelta

    import torch.distributed as dist

    from accord.train.common import engine_args
    from accord.train.engine import get_accelerator

    get_accelerator(engine_args(cfg, 1))
    return dist.new_group(backend="gloo", timeout=timedelta(days=7))


def launch_share(cfg: AccordConfig):
    """This process's :class:`accord.launch.Share` under a launch of several processes (:func:`_together`), else
    None."""
    return _share(_together(cfg)) if world() > 1 else None


def _share(group):
    from accord.launch import Share

    return None if group is None else Share(rank(), world(), lambda: _wait(group))


def _wait(group) -> None:
    import torch.distributed as dist

    dist.barrier(group=group)


def finished_results(cfg: AccordConfig) -> list[dict]:
    """Result records of every finished training stage in ``run_dir/train``."""
    import json


    root = Path(cfg.run_dir) / "train"
    res = [json.loads(p.read_text()) for p in root.glob("*/result.json")] if root.exists() else []
    return sorted(res, key=lambda r: _order_key(r["name"]))
