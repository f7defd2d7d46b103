"""Scheme specs: ``<scheme>:<rest>`` in a ``model:`` field or a problem source (the offline lab's
``lab:terse``, ``lab:arith:test``).  The loaders ask here and know no scheme themselves; each scheme
is a plugin module named in :data:`accord.registry.SCHEMES` with three functions:

- ``model_path(spec, who) -> str``: the checkpoint a model spec names (a clear error when absent);
- ``problem_rows(spec) -> Iterable[(where, row)]``: the rows a problem source names;
- ``prepare(specs, console)``: make the models among ``specs`` exist (the lab builds them);
- optionally ``missing(specs) -> list[str]``: what ``prepare`` would make, without making it (``--plan``).

A spec without a registered scheme (a path, ``C:\\…``, a hub id) is not a scheme spec.
"""

from __future__ import annotations

from collections.abc import Iterable

from accord.registry import SCHEMES


def plugin(spec: str | None):
    """The plugin module of ``spec``'s scheme, or None."""
    import importlib


    if not spec or ":" not in spec:
        return None
    ref = SCHEMES.get(spec.split(":", 1)[0])
    return importlib.import_module(ref) if ref else None


def scheme_model_path(spec: str, who: str = "model") -> str | None:
    p = plugin(spec)
    return p.model_path(spec, who) if p else None


def scheme_problem_rows(spec: str) -> Iterable[tuple[str, dict]] | None:
    p = plugin(spec)
    return p.problem_rows(spec) if p else None


def _by_plugin(specs: list[str]) -> dict:
    by: dict = {}
    for s in specs:
        p = plugin(s)
        if p is not None:
            by.setdefault(p, []).append(s)
    return by


def missing(specs: list[str]) -> list[str]:
    """The models among ``specs`` (and what their scheme builds with them) that :func:`prepare` would make."""
    return [m for p, group in _by_plugin(specs).items() if hasattr(p, "missing") for m in p.missing(group)]


def prepare(specs: list[str], console) -> None:
    """Let every scheme make the models it is named for (``accord run`` calls this before any stage)."""
    for p, group in _by_plugin(specs).items():
        p.prepare(group, console)
