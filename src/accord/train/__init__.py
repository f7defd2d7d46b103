"""Training: the engine, merge operators and one recipe file per method.

``RECIPES`` maps ``train.method`` names to recipe entry points (each returns the
result records it wrote; see ``accord.train.common``).
"""

from __future__ import annotations


def _std(cfg, console, arg):
    from accord.train.sft import run_std

    return run_std(cfg, console, arg)


def _mtd(cfg, console, arg):
    from accord.train.sft import run_mtd

    return run_mtd(cfg, console)


def _posthoc(cfg, console, arg):
    from accord.train.posthoc import run

    return run(cfg, console)


def _mot(cfg, console, arg):
    from accord.train.mot import run

    return run(cfg, console)


def _compact(cfg, console, arg):
    from accord.train.compact import run

    return run(cfg, console)


def _qr(cfg, console, arg):
    from accord.train.qr import run

    return run(cfg, console)


RECIPES = {"std": _std, "mtd": _mtd, "posthoc": _posthoc, "mot": _mot, "compact": _compact, "qr": _qr}


def run_training(cfg, console) -> list[dict]:
    """Run every method in ``train.method`` in order; finished ones are skipped.

    The student is resolved to a local checkpoint first (a hub id → its cached snapshot), so a base that
    merging (post-hoc, MoT's TIES/DARE) cannot read fails here, before any training."""
    from accord.teachers.base import local_model_dir

    local = str(local_model_dir(cfg.student.model, "student"))
    cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"model": local})})
    results = []
    for m in cfg.train.methods:
        name, _, arg = m.partition(":")
        results += RECIPES[name](cfg, console, arg or None)
    return results
