"""The lab as a spec scheme (``accord.sources``): ``lab:[<profile>/]<model>`` names a lab checkpoint,
``lab:<task>[:<split>]`` a lab problem source.  The only place that reads the ``lab:`` prefix."""

from __future__ import annotations

import re
from collections.abc import Iterable

from accord.lab.tasks import lab_rows

MODEL_REF = re.compile(r"^lab:(?:(full|quick|micro)/)?([A-Za-z_-]+)$")  # a lab model, not a problem source


def model_path(spec: str, who: str = "model") -> str:
    from accord.lab.cache import lab_model_path

    return str(lab_model_path(spec[4:]))


def problem_rows(spec: str) -> Iterable[tuple[str, dict]]:
    return lab_rows(spec)


def _by_profile(specs: list[str]) -> dict[str, tuple[str, ...]]:
    by: dict[str, set[str]] = {}
    for s in specs:
        if m := MODEL_REF.match(s):
            by.setdefault(m.group(1) or "full", set()).add(m.group(2))
    return {p: tuple(sorted(names)) for p, names in by.items()}


def prepare(specs: list[str], console) -> None:
    """Build (or reuse) the lab models among ``specs``, profile by profile; a model outside its band is only
    warned about here (`accord lab build` fails on it)."""
    from accord.lab.build import build_lab

    for profile, names in _by_profile(specs).items():
        build_lab(profile=profile, console=console, allow_weak=True, extra=names)


def missing(specs: list[str]) -> list[str]:
    """What :func:`prepare` would build (``lab:<profile>/<model>``), without building it."""
    from accord.lab.build import EXTRAS, to_build

    return [f"lab:{profile}/{m}" for profile, names in _by_profile(specs).items()
            for m in to_build(profile, tuple(n for n in names if n in EXTRAS))]
