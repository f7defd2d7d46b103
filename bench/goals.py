"""Issue 13's GPU goals against what ``bench/gpu.sh`` measured: one line per goal, met / missed / not measured.

    python bench/goals.py $OUT          # the directory bench/gpu.sh wrote (bench-engine.txt, bench-memory.txt)

It only reads the benches' printed lines (no torch), so it runs anywhere, after the fact too.  With
``train.compile`` measured beside the engine (and the engine bench run again with ``--attention flash_attention_2``
where flash-attn is installed: ``bench-engine-fa2.txt``), the throughput, MFU and memory goals are read for every
configuration; a goal is met when one of them meets it (the line says which figure is whose).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import NamedTuple


class Goal(NamedTuple):
    what: str
    file: str  # the bench's output under OUT
    pattern: str  # a regex whose group 1 is the figure; {engine} is replaced by each engine configuration
    bound: float
    at_least: bool  # True: figure ≥ bound; False: figure ≤ bound


ENGINES = ("engine", "engine[master]", "engine+compile")  # bench/engine.py's CONFIGS
GOALS = [
    Goal("engine / plain autocast loop, tokens/s", "bench-engine.txt",
         r"^{engine}/plain throughput ratio: ([\d.]+)", 1.5, True),
    Goal("model-FLOPs utilisation", "bench-engine.txt", r"^{engine} +\d+ tokens/s, MFU ([\d.]+)%", 35.0, True),
    Goal("peak memory / the plain loop's", "bench-engine.txt",
         r"^{engine}/plain peak memory ratio: ([\d.]+)", 0.6, False),
    Goal("engine / TRL padding-free (+ Liger where installed), tokens/s", "bench-engine.txt",
         r"^{engine}/TRL padding-free(?: \+ Liger)? throughput ratio: ([\d.]+)", 1.0, True),
    Goal("memory after N train() calls / after 1", "bench-memory.txt",
         r"^memory after \d+ train\(\) calls / after 1: ([\d.]+)", 1.05, False),
]


# the same bench run again under another attention kernel (bench/gpu.sh, where flash-attn is installed): its
# figures count as further configurations, labelled with the kernel
ALSO = {"bench-engine.txt": {"bench-engine-fa2.txt": "flash_attention_2 "}}


def read(goal: Goal, out: Path) -> dict[str, float]:
    """Configuration → figure, for each configuration the bench printed it for."""
    engines = ENGINES if "{engine}" in goal.pattern else ("",)
    found = {}
    for file, label in {goal.file: "", **ALSO.get(goal.file, {})}.items():
        path = out / file
        text = path.read_text(errors="replace") if path.exists() else ""
        for e in engines:
            m = re.search(goal.pattern.replace("{engine}", re.escape(e)), text, re.MULTILINE)
            if m:
                found[(label + e) or "-"] = float(m.group(1))
    return found


def verdicts(out: Path) -> list[str]:
    lines = []
    for g in GOALS:
        found = read(g, out)
        sign = "≥" if g.at_least else "≤"
        if not found:
            lines.append(f"not measured  {g.what} (goal {sign} {g.bound:g}; nothing in {g.file})")
            continue
        ok = {k: (v >= g.bound if g.at_least else v <= g.bound) for k, v in found.items()}
        figures = ", ".join(f"{k} {v:g}" if k != "-" else f"{v:g}" for k, v in found.items())
        lines.append(f"{'met' if any(ok.values()) else 'missed':12s}  {g.what}: {figures} (goal {sign} {g.bound:g})")
    return lines


# lines read beside the goals: the MFU ceilings no engine configuration exceeds (bench/engine.py), how busy the GPU
# was in a profiled step and where the host waited for it (bench/engine.py --profile: a GPU that waits on the host
# gains nothing from faster kernels), and what the parts measured alone say about the defaults (bench/norm.py: the
# fused RMSNorm; bench/head.py: the compiled head); each with the label its line is read under
CONTEXT = [("bench-engine.txt", r"^(?:matrix products|products \+ attention \+ AdamW) alone .*$", ""),
           ("bench-profile.txt", r"^GPU busy .*$", "engine: "),
           ("bench-profile-master.txt", r"^GPU busy .*$", "engine[master]: "),
           ("bench-profile.txt", r"^host syncs in an engine step: .*$", "engine: "),
           ("bench-profile-master.txt", r"^host syncs in an engine step: .*$", "engine[master]: "),
           ("bench-norm.txt", r"^fused/eager lean RMSNorm time ratio .*$", ""),
           ("bench-head.txt", r"^compiled/eager chunked head time ratio: .*$", "")]


def context(out: Path) -> list[str]:
    """Lines that bound what the goals can reach or say what the parts gave, read beside them (:data:`CONTEXT`)."""
    found = []
    for file, pattern, label in CONTEXT:
        path = out / file
        text = path.read_text(errors="replace") if path.exists() else ""
        found += [label + m for m in re.findall(pattern, text, re.MULTILINE)]
    return [f"context       {m}" for m in found]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the directory bench/gpu.sh wrote")
    out = ap.parse_args().out
    print("\n".join(verdicts(out) + context(out)))


if __name__ == "__main__":
    main()
