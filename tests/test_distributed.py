"""Multi-process training on CPU (gloo) gives the single-process result: DDP's token normalisation, MoT's parallel
branches."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import run_cli, write_jsonl
from rich.console import Console


def setup(tmp_path, micro, name):
    run = tmp_path / name
    (run / "corpora").mkdir(parents=True)
    ans = ["<think>\n(1) 3>4\n</think>\n\n\\boxed{4}", "<think>\n(1) 5>1 (2) 1>9 (3) 9>2\n</think>\n\n\\boxed{2}",
           "\\boxed{0}"]

    def row(q, a):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    a = [row(f"Start at {i}.", ans[i % 3]) for i in range(6)]
    b = [row(f"Begin {i}", ans[(i + 1) % 3]) for i in range(7)]  # MTD's 13 rows: a one-row batch (one process idle)
    write_jsonl(run / "corpora" / "a.jsonl", a)
    write_jsonl(run / "corpora" / "b.jsonl", b)
    write_jsonl(run / "corpora" / "all.jsonl", a + b)
    cfg = {"run_dir": str(run), "problems": {"path": "unused.jsonl"}, "student": {"model": str(micro)},
           "teachers": [{"name": "a", "backend": "column", "column": "a"},
                        {"name": "b", "backend": "column", "column": "b"}],
           "train": {"method": ["mtd", "mot"], "rounds": 2, "steps_per_round": 2, "batch_size": 4, "lr": 1e-2,
                     "max_len": 64}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p, run


def launch(cfg: Path, nproc: int, tmp_path: Path, *overrides: str, worker: str = "dist_worker.py",
           env: dict | None = None, torchrun: bool = False, fails: bool = False) -> str:
    """Train ``cfg`` on ``nproc`` processes (torchrun over gloo; one process: plain python unless ``torchrun``)
    through ``worker``, with ``env`` added; its stderr.  ``fails``: the run must stop with an error.  The plain
    one-process float32 run of ``dist_worker.py`` (the references) trains in this process (:func:`_train_here`)."""
    from conftest import bf16_process

    if nproc == 1 and not (torchrun or fails or env) and worker == "dist_worker.py" and not bf16_process():
        from accord.config import load_config

        config = load_config(str(cfg), list(overrides))
        if not config.train.bf16:  # the same precision as this process's
            return _train_here(config)
    worker = Path(__file__).with_name(worker)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(worker), str(cfg), *overrides] if nproc > 1 or torchrun else [sys.executable, str(worker), str(cfg),
                                                                             *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
           "TMPDIR": str(tmp_path), **(env or {})}  # torchrun's torchelastic_* directories: pytest's to clean
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path, check=False)
    assert (out.returncode != 0) == fails, out.stderr[-3000:]
    return out.stderr


def _train_here(config) -> str:
    """What ``dist_worker.py`` does on one process, done in this one, whose imports are paid already (a launched
    one took ~9 s on 2 cores, most of it importing torch and transformers).  On one thread, as the launched process
    has (``OMP_NUM_THREADS=1``), so the reference is the same to the bit; its stderr."""
    import contextlib
    import io

    from accord.train import train_methods

    buf, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(buf):
            train_methods(config, Console(stderr=True, quiet=True))
    finally:
        torch.set_num_threads(threads)
    return buf.getvalue()


def shipped_env(name: str, **over: str) -> dict:
    """The variables ``accelerate launch --config_file configs/accelerate/NAME`` gives its processes, read by
    accelerate's own launcher code (it has no public function for this), with ``over`` on top: the CPU tests train
    through the files the README hands users."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = Path(__file__).parents[1] / "configs" / "accelerate" / name
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "2", "x.py"])
    args, defaults, precision_from_file = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(
            [*defaults.deepspeed_config, *(["mixed_precision"] if precision_from_file else [])])
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return {**{k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}, **over}


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def update_gap(a: dict, b: dict, base: dict) -> float:
    """|a − b| / |a − base| over all weights: how far two runs from ``base`` ended apart, as a part of the update.
    AdamW's normalised step turns a rounding-sized gradient difference (two processes add in another order) into a
    step of up to lr for a weight whose gradient is near zero, so a few weights may differ by ~lr while the rest
    agree to rounding: a bound on the largest difference fails on one CPU and passes on another."""
    diff = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    return diff / sum(float((a[k] - base[k]).norm() ** 2) for k in a) ** 0.5


@pytest.mark.timeout(600)
def test_two_processes_match_one(tmp_path, micro):
    one_cfg, one = setup(tmp_path, micro, "one")
    two_cfg, two = setup(tmp_path, micro, "two")
    launch(one_cfg, 1, tmp_path)
    launch(two_cfg, 2, tmp_path)
    for rel in ("train/mtd/final", "train/mot/round-2/merged"):
        w1, w2 = weights(one / rel), weights(two / rel)
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=1e-5), (rel, k)
    assert not (two / "train" / "mot" / "round-1" / "branch-a").exists()  # branch files cleaned after the merge


@pytest.mark.timeout(600)
def test_compact_on_two_processes_matches_one(tmp_path, micro):
    """COMPACT shards whole problems across processes and normalises by the global problem count."""
    def setup_compact(name):
        run = tmp_path / name
        (run / "corpora").mkdir(parents=True)
        traces = ["<think>\n(1) 3>4\n</think>\n\n\\boxed{4}", "<think>\n(1) 5>1 (2) 1>4\n</think>\n\n\\boxed{4}"]
        for k, t in enumerate(("a", "b")):
            write_jsonl(run / "corpora" / f"{t}.jsonl",
                        [{"problem_id": f"p{i}", "answer": "4",
                          "messages": [{"role": "user", "content": f"Start at {i}."},
                                       {"role": "assistant", "content": traces[(i + k) % 2]}]} for i in range(6)])
        cfg = {"run_dir": str(run), "problems": {"path": "unused.jsonl"}, "student": {"model": str(micro)},
               "teachers": [{"name": "a", "backend": "column", "column": "a"},
                            {"name": "b", "backend": "column", "column": "b"}],
               "train": {"method": ["compact"], "rounds": 1, "steps_per_round": 2, "batch_size": 4, "lr": 1e-2,
                         "max_len": 64}}
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        return p, run

    one_cfg, one = setup_compact("one")
    two_cfg, two = setup_compact("two")
    launch(one_cfg, 1, tmp_path)
    launch(two_cfg, 2, tmp_path)
    w1, w2 = weights(one / "train/compact/final"), weights(two / "train/compact/final")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


@pytest.mark.timeout(600)
def test_master_weights_train_data_parallel(tmp_path, micro):
    """``train.master_weights`` under DDP (gloo, bf16 autocast on the CPU): each process's bf16 gradients are
    all-reduced, the float32 masters step, and two processes end where one does, to bf16 rounding."""
    runs = {}
    for n in (1, 2):
        cfg, run = setup(tmp_path, micro, f"mw{n}")
        c = yaml.safe_load(cfg.read_text())
        c["train"].update(method=["mtd"], bf16=True, master_weights=True, lr=1e-3)
        cfg.write_text(yaml.safe_dump(c))
        launch(cfg, n, tmp_path)
        runs[n] = weights(run / "train/mtd/final")
    assert all(v.dtype == torch.float32 for v in runs[2].values())
    gap = update_gap(runs[1], runs[2], weights(micro))  # the two runs' difference is a small part of the update
    print(f"master weights, 1 vs 2 processes: |difference| / |update| = {gap:.3f}")
    assert gap <= 0.1, gap


@pytest.mark.timeout(600)
def test_validation_selection_is_shared_between_processes(tmp_path, micro, monkeypatch):
    """``train.select: validation`` on two processes: each evaluates every other checkpoint, the scores are gathered,
    and both pick what one process picks (before, each process evaluated every checkpoint)."""
    problems = write_jsonl(tmp_path / "problems.jsonl", [{"question": f"Start at {i}.", "answer": str(i % 3)}
                                                         for i in range(12)])
    picked = {}
    for n in (1, 2):
        cfg, run = setup(tmp_path, micro, f"sel{n}")
        c = yaml.safe_load(cfg.read_text())
        c["problems"] = {"path": str(problems), "split": "train", "validation_fraction": 0.5}
        c["train"].update(method=["mtd"], select="validation", steps_per_round=1, rounds=3)
        c["eval"] = {"max_new_tokens": 8}
        cfg.write_text(yaml.safe_dump(c))
        launch(cfg, n, tmp_path)
        picked[n] = json.loads((run / "train/mtd/result.json").read_text())["final"].replace(f"sel{n}", "")
    assert picked[1] == picked[2]

    from accord.train import common  # the sharing itself, as process 1 of 3 sees it

    seen = []
    monkeypatch.setattr(common, "_distributed", lambda: True)
    monkeypatch.setattr("torch.distributed.get_rank", lambda: 1)
    monkeypatch.setattr("torch.distributed.get_world_size", lambda: 3)
    monkeypatch.setattr(common, "load_problems", lambda _: ["p"])
    monkeypatch.setattr(common, "student_generator", lambda cfg, path, name: SimpleNamespace(path=path,
                                                                                            close=lambda: None))
    monkeypatch.setattr(common, "evaluate", lambda gen, *a, **k: seen.append(gen.path) or SimpleNamespace(greedy=0.1))
    monkeypatch.setattr(common, "gather", lambda mine: {**dict.fromkeys(range(7), 0.1), 3: 0.2, **mine})
    cfg, _ = setup(tmp_path, micro, "unit")
    from accord.config import load_config

    points = [{"steps": i, "path": f"ckpt-{i}"} for i in range(7)]
    assert common.select_checkpoint(load_config(cfg), points, "mtd", Console(quiet=True)) == 3
    assert seen == ["ckpt-1", "ckpt-4"]


@pytest.mark.timeout(600)
def test_collect_on_two_processes_deals_out_the_batches_and_stores_one_processs_samples(tmp_path, micro, parrot7,
                                                                                       problems_file):
    """`accord collect` under a launch: an hf teacher's batches (and an hf judge's) are dealt out between the
    processes (before, process 0 generated everything while the others left), into one store; the batches are
    formed from the same stored state everywhere, so the samples and verdicts are one process's, bit for bit — also
    when resuming a store that holds some."""
    import sqlite3

    from conftest import pipeline_cfg

    def rows(run: Path) -> list:
        with sqlite3.connect(run / "traces.sqlite") as db:
            return db.execute("SELECT teacher, problem_id, style, sample_idx, text, verdict, judge, judge_text "
                              "FROM traces ORDER BY teacher, problem_id, style, sample_idx").fetchall()

    teachers = [{"name": "sampler", "model": str(micro), "batch_size": 3},  # 20 requests: 7 batches
                {"name": "seven", "model": str(parrot7), "batch_size": 16}]
    runs = {}
    for n in (1, 2):
        (tmp_path / f"c{n}").mkdir()
        cfg = pipeline_cfg(tmp_path / f"c{n}", problems_file, teachers, micro)
        c = yaml.safe_load(cfg.read_text())
        c["collect"].update(max_new_tokens=12, temperature=1.0,  # the sampler judges all 40: two batches of 32
                            judge={"teacher": "sampler", "apply_to": "all", "max_new_tokens": 6})
        cfg.write_text(yaml.safe_dump(c))
        runs[n] = Path(c["run_dir"])
        if n == 1:
            assert run_cli("collect", str(cfg))[0] == 0
        else:
            out = _torchrun_cli(tmp_path, "collect", str(cfg))
            assert out.returncode == 0, out.stderr[-3000:]
            assert out.stderr.count("generated 40 new trace(s)") == 1  # said once, every process's count
    assert len(rows(runs[1])) == 40 and rows(runs[2]) == rows(runs[1])
    assert len({r[4] for r in rows(runs[1]) if r[0] == "sampler"}) > 5  # sampled text, not one fixed answer
    assert all(r[6] is not None for r in rows(runs[2]))  # every trace judged, the verdicts one process gives
    for name in ("sampler", "seven", "all"):
        assert (runs[2] / "corpora" / f"{name}.jsonl").read_text() == (runs[1] / f"corpora/{name}.jsonl").read_text()
    with sqlite3.connect(runs[2] / "traces.sqlite") as db:  # resumed: the missing rows, dealt out again
        db.execute("DELETE FROM traces WHERE teacher = 'sampler' AND sample_idx = 1")
    out = _torchrun_cli(tmp_path, "collect", str(tmp_path / "c2" / "cfg.yaml"))
    assert out.returncode == 0 and "generated 10 new trace(s)" in out.stderr, out.stderr[-3000:]
    assert len(rows(runs[2])) == 40


@pytest.mark.timeout(600)
def test_cord_on_two_processes_deals_out_the_problems_and_writes_one_summary(tmp_path, problems_file, parrot7,
                                                                             parrot8):
    """`accord cord` under a launch: the problems are dealt out (before, process 0 decoded them all while the others
    left), each process with its own teachers, into one store; process 0 writes the corpus and a summary that
    counts every process's problems, skips and timings."""
    import sqlite3

    rows = [json.loads(x) for x in problems_file.read_text().splitlines()] + [{"question": "no gold", "answer": ""}]
    probs = write_jsonl(tmp_path / "p.jsonl", rows)
    runs = {}
    for n in (1, 2):
        cfg = {"run_dir": str(tmp_path / f"cord{n}"), "problems": {"path": str(probs)},
               "teachers": [{"name": "seven", "model": str(parrot7)}, {"name": "eight", "model": str(parrot8)}],
               "cord": {"beam": 2, "max_steps": 4, "step_tokens": 24, "think_tokens": 48, "answer_tokens": 16,
                        "meta_prover": "eight", "segmentation": "line-break", "baselines": ["curation"]}}
        path = tmp_path / f"cord{n}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        if n == 1:
            assert run_cli("cord", str(path))[0] == 0
        else:
            out = _torchrun_cli(tmp_path, "cord", str(path))
            assert out.returncode == 0, out.stderr[-3000:]
            assert out.stderr.count("CoRD traces:") == 1
        runs[n] = tmp_path / f"cord{n}"

    def stored(run):
        with sqlite3.connect(run / "traces.sqlite") as db:
            return db.execute("SELECT teacher, problem_id, text, verdict FROM traces ORDER BY teacher, problem_id"
                              ).fetchall()

    assert len(stored(runs[1])) == 20 and stored(runs[2]) == stored(runs[1])
    one, two = (json.loads((runs[n] / "cord" / "summary.json").read_text()) for n in (1, 2))
    for key in ("cord", "cord-curation"):
        assert two[key]["n"] == one[key]["n"] == 10 and two[key]["accuracy"] == one[key]["accuracy"]
    assert two["skipped_no_gold"] == 1 and two["hit_rates"] == one["hit_rates"]
    pc1, pc2 = one["timing_this_run"]["prefix_cache"], two["timing_this_run"]["prefix_cache"]
    assert set(pc2) == {"seven", "eight"} and all(pc2[t]["rows"] > 0 for t in pc2)  # both processes' caches
    assert (runs[2] / "corpora/cord.jsonl").read_text() == (runs[1] / "corpora/cord.jsonl").read_text()
    assert pc1 and two["timing_this_run"]["cord_generation_s"] > 0


def _qr_setup(tmp_path, micro, micro_b, name: str, **qr) -> tuple[Path, Path]:
    from test_qr import TRACES, _row

    run = tmp_path / name
    (run / "corpora").mkdir(parents=True)
    for t, shift in (("a", 0), ("b", 1), ("c", 2)):  # 7 questions, 20 paths: batches of 6 split unevenly
        write_jsonl(run / "corpora" / f"{t}.jsonl",
                    [_row(f"Start at {i}.", TRACES[(shift + i) % 3], pid=f"p{i}", teacher=t)
                     for i in range(7) if (t, i) != ("c", 5)])
    cfg = {"run_dir": str(run), "problems": {"path": "unused.jsonl"}, "student": {"model": str(micro)},
           "teachers": [{"name": t, "backend": "column", "column": t} for t in "abc"],
           "train": {"method": "qr", "rounds": 2, "steps_per_round": 3, "batch_size": 6, "lr": 1e-3, "max_len": 128},
           "qr": {"students": [{"model": str(micro), "name": "llama"},
                               {"model": str(micro_b), "name": "qwen", "lr": 2e-3}], "encoder": "hashing", **qr}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p, run


@pytest.mark.timeout(600)
def test_qr_on_two_processes_matches_one_and_routes_apart(tmp_path, micro, micro_b):
    """QR-Distill's students and router on two processes.  Under DDP it failed at once (the loss read the router's
    projections through DDP's wrapper), and with ``mutual_paths: routed`` the processes ran different forwards
    and backwards, so DDP's per-forward buffer broadcasts and per-model all-reduces paired wrongly (a hang, then
    a gloo size mismatch).  Now its gradients are averaged by hand after each step: with every path to every
    student (no sampled gates) two processes give one process's weights; with learned routing they finish."""
    final = {}
    for n in (1, 2):
        cfg, run = _qr_setup(tmp_path, micro, micro_b, f"all{n}", route="all")
        launch(cfg, n, tmp_path)
        final[n] = {s: weights(run / f"train/qr-{s}/final") for s in ("llama", "qwen")}
    for s in ("llama", "qwen"):
        assert max(float((final[1][s][k] - final[2][s][k]).abs().max()) for k in final[1][s]) < 1e-5, s
    cfg, run = _qr_setup(tmp_path, micro, micro_b, "routed", mutual_paths="routed")
    err = launch(cfg, 2, tmp_path)
    assert "2 process(es) (data-parallel)" in err
    steps = [json.loads(x) for x in (run / "train/qr/metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 6 and all(0 <= ev["sel/qwen"] <= 1 for ev in steps)
    assert (run / "train/qr-qwen/final/model.safetensors").exists()


def _torchrun_cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "accord.cli",
           *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
           "TMPDIR": str(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path, check=False)


@pytest.mark.timeout(600)
def test_accord_run_on_two_processes_trains_on_both_and_does_the_rest_once(tmp_path, micro):
    """`accelerate launch -m accord.cli run`: process 0 collects (one store, no second import racing it),
    evaluates and reports while the other waits; training uses both.  A one-process command leaves the others."""
    import json
    import sqlite3

    root = Path(__file__).resolve().parents[1]
    data = str(root / "examples" / "my-traces.jsonl")
    run = tmp_path / "run"
    out = _torchrun_cli(tmp_path, "run", str(root / "configs" / "byo-columns.yaml"), f"run_dir={run}",
                        f"problems.path={data}", "problems.limit=60", f"student.model={micro}", "train.rounds=1",
                        "train.steps_per_round=2", "train.batch_size=4", "eval.k=1", "eval.limit=3",
                        "eval.max_new_tokens=8", f"eval.splits.mine.path={data}")
    assert out.returncode == 0, out.stderr[-3000:]
    err = out.stderr
    assert err.count("Collected traces per teacher") == 1 and err.count("report: ") == 1, err[-3000:]
    assert "2 process(es) (data-parallel)" in err and err.count("train: ") == 1
    assert sqlite3.connect(run / "traces.sqlite").execute("SELECT COUNT(*) FROM traces").fetchone()[0] == 120
    assert {json.loads((run / "train" / m / "result.json").read_text())["name"] for m in ("std-a", "std-b", "mtd")} \
        == {"std-a", "std-b", "mtd"}
    assert (run / "report" / "index.html").exists()
    assert err.count("hf backend: ") == 2  # each process evaluated its share of the checkpoints
    rows = json.loads((run / "eval" / "results.json").read_text())
    assert {r["model"] for r in rows} == {"base", "std-a", "std-b", "mtd"}
    shutil.rmtree(run / "eval")  # `accord eval` alone on two processes: shared the same way, one table
    out = _torchrun_cli(tmp_path, "eval", str(root / "configs" / "byo-columns.yaml"), f"run_dir={run}",
                        f"problems.path={data}", "problems.limit=60", f"student.model={micro}", "eval.k=1",
                        "eval.limit=3", "eval.max_new_tokens=8", f"eval.splits.mine.path={data}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("hf backend: ") == 2 and out.stdout.count("paired against mtd") == 1
    assert json.loads((run / "eval" / "results.json").read_text()) == rows  # the same numbers, rows and order
    out = _torchrun_cli(tmp_path, "export", str(root / "configs" / "byo-columns.yaml"), f"run_dir={run}",
                        f"problems.path={data}", f"student.model={micro}", "--out", str(tmp_path / "t.jsonl"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("accord export runs on one process; this launch's 1 other process(es) left at once") == 1
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 120
    # `accord interpolate` on two processes: the points dealt out, one curve, as one process draws it
    common = [f"problems.path={data}", "problems.limit=60", f"student.model={micro}", "train.rounds=1",
              "train.steps_per_round=2", "train.batch_size=4",
              "eval.k=1", "eval.limit=3", "eval.max_new_tokens=8", f"eval.splits.mine.path={data}", "--models",
              "mtd", "--points", "3"]
    shutil.copytree(run, tmp_path / "one")
    cfg = str(root / "configs" / "byo-columns.yaml")
    out = _torchrun_cli(tmp_path, "interpolate", cfg, f"run_dir={run}", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("hf backend: ") == 2 and out.stderr.count("interpolate mtd: mean pass@1") == 1
    code, one = run_cli("interpolate", cfg, f"run_dir={tmp_path / 'one'}", *common)
    assert code == 0, one
    two, one = (json.loads((r / "analysis" / "interpolation.json").read_text()) for r in (run, tmp_path / "one"))
    assert [p["lambda"] for p in two["curves"]["mtd"]] == [0.0, 0.5, 1.0] and two == one


def test_shipped_accelerate_configs_turn_on_what_they_are_named_for():
    """``configs/accelerate/``, as accelerate's launcher reads each file (the FSDP and DeepSpeed tests train
    through them): bf16, and data-parallel, FSDP 2 by decoder layer, or ZeRO-2/3 with models loaded whole."""
    ddp = shipped_env("ddp.yaml")
    assert ddp["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert "ACCELERATE_USE_FSDP" not in ddp and "ACCELERATE_USE_DEEPSPEED" not in ddp
    fsdp = shipped_env("fsdp2.yaml")
    assert (fsdp["ACCELERATE_USE_FSDP"], fsdp["FSDP_VERSION"], fsdp["FSDP_AUTO_WRAP_POLICY"],
            fsdp["FSDP_STATE_DICT_TYPE"]) == ("true", "2", "TRANSFORMER_BASED_WRAP", "FULL_STATE_DICT")
    for zero in (2, 3):
        ds = shipped_env(f"deepspeed-zero{zero}.yaml")
        assert (ds["ACCELERATE_USE_DEEPSPEED"], ds["ACCELERATE_DEEPSPEED_ZERO_STAGE"]) == ("true", str(zero))
        assert ds["ACCELERATE_MIXED_PRECISION"] == "bf16" and "ACCELERATE_USE_FSDP" not in ds
    assert shipped_env("deepspeed-zero3.yaml")["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"
