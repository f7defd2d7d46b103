"""`accord run --plan` (and collect/train/eval --plan): counts taken from the functions the stages use, and
nothing built, generated, trained or written."""

from __future__ import annotations

import json

from conftest import pipeline_cfg, run_cli


def _plan_text(cfg_path, *extra) -> str:
    code, out = run_cli("run", str(cfg_path), "--plan", *extra)
    assert code == 0, out
    return out


def test_plan_counts_what_the_run_then_does_and_writes_nothing(tmp_path, problems_file, two_parrots, micro):
    from accord.collect import collect
    from accord.config import load_config

    cfg_path = pipeline_cfg(tmp_path, problems_file, two_parrots, micro, method=["std", "mtd", "mot"])
    run = tmp_path / "run"
    out = _plan_text(cfg_path)
    assert not run.exists()  # nothing written, not even the run directory
    assert "models   every model loaded here is on this machine" in out
    # 10 problems × 1 style × 2 samples per teacher
    assert "seven (hf): 20 generations = 10 problems × 1 style(s) (default) × 2 sample(s); 0 stored, 20 to " \
           "generate" in out
    assert "in all: 40 generations to make" in out
    for name in ("std-seven", "std-eight", "mtd", "mot"):
        assert f"{name}: to train" in out
    assert "mot: to train — 2 rounds × 2 branches × 2 steps = 8 branch-steps" in out
    assert "the base student and 0 finished model(s): 2 evaluation(s), 0 stored, 2 to run; the 4 model(s) " \
           "still to train add theirs" in out

    res = collect(load_config(cfg_path))
    assert res.generated == 40  # what the plan said
    # a finished method, a resumable one (a complete step checkpoint), a kept store
    (run / "train" / "std-seven").mkdir(parents=True)
    (run / "train" / "std-seven" / "result.json").write_text(json.dumps(
        {"name": "std-seven", "final": str(micro), "curve": [], "branch_steps": 4}))
    ck = run / "train" / "mtd" / "checkpoint-2"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{}")
    (run / "train" / "mtd" / "checkpoint-3").mkdir()  # incomplete (no trainer_state.json): not resumed from
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    out = _plan_text(cfg_path)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # still nothing written
    assert "seven (hf): 20 generations = 10 problems × 1 style(s) (default) × 2 sample(s); 20 stored, 0 to " \
           "generate" in out and "in all: 0 generations to make" in out
    assert "std-seven: finished, skipped" in out and "mtd: resumes from checkpoint-2" in out
    assert "std-eight: to train" in out
    # the base and std-seven's final, on both splits (target, general)
    assert "the base student and 1 finished model(s): 4 evaluation(s), 0 stored, 4 to run; the 3 model(s)" in out


def test_plan_per_stage_and_bad_sources(tmp_path, problems_file, two_parrots, micro):
    cfg_path = pipeline_cfg(tmp_path, problems_file, two_parrots, micro)
    code, out = run_cli("train", str(cfg_path), "--plan")
    assert code == 0 and "train    std-seven: to train" in out and "collect" not in out and "eval " not in out
    code, out = run_cli("collect", str(cfg_path), "--plan")
    assert code == 0 and "collect  seven (hf)" in out and "train " not in out
    code, out = run_cli("eval", str(cfg_path), "--plan")
    assert code == 0 and "eval     2 split(s) (target, general), k = 2 samples" in out  # the file's order
    assert "eval     2 split(s) (target, general), greedy only" in _plan_text(cfg_path, "eval.k=0")
    # a problem source that cannot be read is said, and the rest of the plan still shown
    out = _plan_text(cfg_path, f"problems.path={tmp_path / 'nope.jsonl'}")
    assert "collect  cannot read the problems — the run would stop here:" in out and "nope.jsonl" in out
    assert "train    std-seven: to train" in out
    assert not (tmp_path / "run").exists()


def test_every_method_has_a_plan_entry(tmp_path, problems_file, two_parrots, micro):
    """Each registered method names a plan function that returns (result, working dir, budget) without loading
    a model — a new method without one would break `--plan`."""
    from accord.config import load_config
    from accord.registry import METHODS, load

    cfg = load_config(pipeline_cfg(tmp_path, problems_file, two_parrots, micro),
                      ["qr.students=[{model: a}, {model: b}]"])
    for m in METHODS.values():
        assert m.plan, m.name
        rows = load(m.plan)(cfg, "")
        assert rows and all(len(r) == 3 and all(isinstance(x, str) and x for x in r) for r in rows), m.name


def test_cord_plan(tmp_path, problems_file, two_parrots, micro):
    cfg_path = pipeline_cfg(tmp_path, problems_file, two_parrots, micro)
    code, out = run_cli("cord", str(cfg_path), "--plan", "cord.limit=4", "cord.beam=2", "cord.max_steps=3")
    assert code == 0, out
    assert "cord     4 problems (cord.limit 4): 0 decoded and stored, 4 to decode" in out
    assert "2 teacher(s) propose each step (seven, eight); seven scores them (predictive-perplexity)" in out
    assert "at most 3 steps × 2 prefixes × 2 teachers = 12 step generations" in out and "(48 at most" in out
    assert not (tmp_path / "run").exists()
