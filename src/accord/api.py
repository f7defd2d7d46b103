"""accord from Python (a notebook, a script): the CLI's stages as functions, same files, same skipping.

    from accord.api import load_config, collect, train, evaluate, report

    cfg = load_config("configs/lab-quickstart.yaml", ["train.method=[std,mot]"])
    print("\n".join(plan(cfg)))      # what the stages below would do, doing none of it
    collect(cfg)                      # → per-teacher summary rows (collect_summary.json)
    results = train(cfg)              # → result records, one per trained model (train/<name>/result.json)
    rows = evaluate(cfg)              # → evaluation rows (eval/results.json), every checkpoint and split
    page = report(cfg)                # → path of report/index.html
    curves = interpolate(cfg)         # → MoT Fig. 6: pass@1 from the base to each trained model (analysis/)
    teachers = diagnose(cfg)          # → before training: how the student sees each teacher's traces

``train(cfg, method="compact")`` runs one method without editing the config; ``seeds=[0, 1, 2]`` (``run``,
``train``, ``plan``) trains every method once per training seed, as ``accord run --seeds``.  Each function is the stage
of ``accord run`` (``run(cfg)`` does all four): finished work in ``run_dir`` is skipped, lab models the
config names are built first, and errors are the CLI's (:class:`accord.errors.AccordError`; ``exit_code``
says whether the input or the run was at fault).  These are functions of a module rather than of the
``accord`` package because ``accord.collect``, ``accord.train``, … name the stages' own modules.
"""

from __future__ import annotations

from pathlib import Path

from accord.config import load_config as _load
from accord.plan import plan as _plan
from accord.run import prepare_models
from accord.run import run as _run


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None):
    """A validated config from YAML (or a ``base`` dict) and ``key.sub=value`` overrides."""
    return _load(path, list(overrides), base=base)


def _console(console):
    from accord.ui import make_console

    return console or make_console()


def plan(cfg, stages: tuple[str, ...] = ("collect", "train", "eval", "report"), seeds: list[int] | None = None
         ) -> list[str]:
    """``accord run --plan``: the lines saying what each stage would build, generate, train and evaluate."""
    return _plan(cfg, stages, seeds)


def run(cfg, console=None, stages: tuple[str, ...] = ("collect", "train", "eval", "report"),
        seeds: list[int] | None = None) -> dict:
    """``accord run [--seeds]``: ``seeds`` trains every method once per training seed (the report pools them)."""
    return _run(cfg, _console(console), stages=stages, seeds=seeds)


def collect(cfg, console=None) -> list[dict]:
    from accord.collect import collect as _collect

    prepare_models(cfg, _console(console), student=False)
    return _collect(cfg, _console(console)).summary


def train(cfg, method: str | list[str] | None = None, console=None, seeds: list[int] | None = None) -> list[dict]:
    if method is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"method": method})})
    return run(cfg, console, stages=("train",), seeds=seeds)["results"]


def evaluate(cfg, console=None) -> list[dict]:
    return run(cfg, console, stages=("eval",))["eval"]


def report(cfg, console=None) -> Path:
    return Path(run(cfg, console, stages=("eval", "report"))["report"])


def interpolate(cfg, models: list[str] | None = None, points: int = 11, split: str | None = None, console=None) -> dict:
    """``accord interpolate``: pass@1 at θ = λ·base + (1 − λ)·checkpoint on a λ grid (MoT App. D)."""
    from accord.analysis import interpolate as _interpolate

    prepare_models(cfg, _console(console))
    return _interpolate.run(cfg, _console(console), models, points, split)


def diagnose(cfg, problems: int = 200, console=None, student_samples: int = 0) -> dict:
    """``accord diagnose``: the student before training scores each teacher's traces (analysis/teachers.json)."""
    from accord.analysis import diagnose as _diagnose

    prepare_models(cfg, _console(console))
    return _diagnose.run(cfg, _console(console), problems, student_samples=student_samples)
