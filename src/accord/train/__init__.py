"""Training: the engine, merge operators and one recipe file per method.

``accord.registry.METHODS`` names each ``train.method`` and its recipe entry point
(``recipe(cfg, console[, arg])`` returns the result records it wrote; see
``accord.train.common``).
"""

from __future__ import annotations

from accord.registry import METHODS, load


def train_methods(cfg, console) -> list[dict]:
    """Run every method in ``train.method`` in order; finished ones are skipped.

    The student is resolved to a local checkpoint first (a hub id → its cached snapshot), so a base that
    merging (post-hoc, MoT's TIES/DARE) cannot read fails here, before any training."""
    from accord.models import local_model_dir
    from accord.train.common import resolve_budget

    local = str(local_model_dir(cfg.student.model, "student"))
    cfg = resolve_budget(cfg.model_copy(update={"student": cfg.student.model_copy(update={"model": local})}), console)
    results = []
    for m in cfg.train.methods:
        name, _, arg = m.partition(":")
        recipe = load(METHODS[name].recipe)
        results += recipe(cfg, console, arg) if arg else recipe(cfg, console)
    return results
