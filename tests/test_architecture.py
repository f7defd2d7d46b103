"""The joints (docs/architecture.md): no import cycles, the lab reached only through its scheme plugin and
the CLI's `lab` command, registries that import no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "accord"


def import_graph() -> dict[str, set[str]]:
    """Module → accord modules it imports anywhere in its source (function-level imports included)."""
    mods = {".".join(("accord",) + p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
            for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("accord"):
                graph[m] |= {t for t in [node.module, *(f"{node.module}.{a.name}" for a in node.names)] if t in mods}
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_cli_and_the_lab_itself_import_the_lab():
    graph = import_graph()
    outside = {m: sorted(t for t in ts if t.startswith("accord.lab")) for m, ts in graph.items()
               if not m.startswith("accord.lab")}
    assert {m: ts for m, ts in outside.items() if ts} == {"accord.cli": ["accord.lab", "accord.lab.build"]}


def test_config_and_registry_import_no_torch():
    code = "import sys, accord.config, accord.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_registry_entries_load():
    from accord.registry import BACKENDS, METHODS, SCHEMES, load

    for m in METHODS.values():
        assert callable(load(m.recipe)), m.name
    for b in BACKENDS.values():
        assert b.impl is None or callable(load(b.impl)), b.name
    import importlib

    for mod in SCHEMES.values():
        p = importlib.import_module(mod)
        assert all(callable(getattr(p, f)) for f in ("model_path", "problem_rows", "prepare"))


def test_every_step_scorer_has_its_method():
    from accord.cord.score import Scorer
    from accord.registry import STEP_SCORERS

    for name in STEP_SCORERS:
        assert callable(getattr(Scorer, "_" + name.replace("-", "_"), None)), name
