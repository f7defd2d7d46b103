"""Post-hoc merge: merge the finished STD students once (MoT §3 baseline, Table 2 "post-hoc weight merge").

The STD students (trained first if missing; finished ones are reused) are merged
onto the original student with ``train.merge`` — the same operator MoT applies
every round, applied once at the end.  Compute: the sum of the STD runs.
"""

from __future__ import annotations

from accord.config import AccordConfig
from accord.models import local_model_dir
from accord.train.common import read_result, train_dir, write_result
from accord.train.merge import merge_checkpoints, spec_from
from accord.train.sft import std


def run(cfg: AccordConfig, console) -> list[dict]:
    if (done := read_result(cfg, "posthoc", console)) is not None:
        return [done]
    stds = std(cfg, console)
    m = cfg.train.merge
    weights = _weights_for(cfg, [s["teachers"][0] for s in stds])
    spec = spec_from(m, weights)
    final = train_dir(cfg, "posthoc") / "final"
    merge_checkpoints(local_model_dir(cfg.student.model, "student"), [s["final"] for s in stds], spec, final)
    console.print(f"posthoc: merged {len(stds)} STD students with {m.method} → {final}")
    return [write_result(cfg, "posthoc", method="posthoc", final=str(final), curve=[],
                        branch_steps=sum(s["branch_steps"] for s in stds), teachers=[s["teachers"][0] for s in stds])]


def plan(cfg: AccordConfig, _arg: str = "") -> list[tuple[str, str, str]]:
    n = len(cfg.teachers)
    return [("posthoc", "posthoc", f"one merge ({cfg.train.merge.method}) of the {n} STD students (trained "
             "first where missing)")]


def _weights_for(cfg: AccordConfig, teachers: list[str]) -> list[float] | None:
    w = cfg.train.merge.weights
    if w is None:
        return None
    by_name = dict(zip([t.name for t in cfg.teachers], w))
    return [by_name[t] for t in teachers]
