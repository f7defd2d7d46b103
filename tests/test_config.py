from pathlib import Path

import pytest
import yaml

from accord.config import ConfigError, dump_config, load_config

BASE = """
run_dir: {run_dir}
problems: {{path: data/problems.jsonl}}
teachers:
  - {{name: alpha, backend: hf, model: path/to/model}}
  - {{name: beta, backend: openai, model: served, base_url: "http://127.0.0.1:8000/v1", api_key_env: MY_KEY}}
collect: {{samples: 16, temperature: 0.6, max_new_tokens: 32768, style: default, select: random-correct}}
"""


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(BASE.format(run_dir=tmp_path / "run"))
    return p


def test_issue_shape_loads_with_defaults(cfg_file):
    cfg = load_config(cfg_file)
    assert cfg.collect.samples == 16 and cfg.teachers[1].backend == "openai"
    assert cfg.problems.question_field == "question" and cfg.problems.limit is None


def test_overrides_by_index_and_name_and_types(cfg_file):
    cfg = load_config(cfg_file, ["collect.samples=4", "teachers.beta.max_concurrency=2", "teachers.0.model=x/y",
                                 "collect.style=[cot, tot]", "problems.limit=3"])
    assert cfg.collect.samples == 4 and cfg.teachers[1].max_concurrency == 2
    assert cfg.teachers[0].model == "x/y" and cfg.collect.styles == ["cot", "tot"] and cfg.problems.limit == 3


def test_every_problem_reported_at_once_with_paths(cfg_file):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, ["collect.samples=0", "teachers.0.backend=nope", "collect.style=weird",
                               "collect.select=best", "teachers.1.base_url=null"])
    paths = {p for p, _ in e.value.problems}
    assert {"collect.samples", "teachers.0.backend", "collect.style", "collect.select"} <= paths
    assert any(p.startswith("teachers.1") for p in paths)
    assert "unknown teacher backend 'nope'" in str(e.value)


def test_secrets_are_refused_and_never_written(cfg_file, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="api_key_env"):
        load_config(cfg_file, ["teachers.beta.api_key=sk-123"])
    monkeypatch.setenv("MY_KEY", "sk-secret-value")
    cfg = load_config(cfg_file)
    text = dump_config(cfg).read_text()
    assert "sk-secret-value" not in text and "MY_KEY" in text
    assert yaml.safe_load(text)["collect"]["samples"] == 16


def test_bad_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run_dir: x\nproblems: [unclosed\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(p)


def test_a_missing_config_says_where_it_looked_and_names_close_files(tmp_path, monkeypatch):
    """One line about the file (no ``1 problem(s)`` list), its absolute path, and YAML files with close names in its
    folder or ``configs/`` — none when nothing is close."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "lab-quick.yaml").write_text("{}")
    (tmp_path / "mine.yml").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config("configs/lab-quik.yaml")
    assert str(e.value) == (f"configs/lab-quik.yaml: file not found (looked for {tmp_path}/configs/lab-quik.yaml); "
                            "did you mean configs/lab-quick.yaml?")
    with pytest.raises(ConfigError, match=r"did you mean mine\.yml\?$"):
        load_config("mine.yaml")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: file not found \(looked for [^)]*\)$"):
        load_config("nowhere.yaml")


def test_a_run_directory_stands_for_the_config_it_holds(cfg_file, tmp_path):
    """``accord report runs/x``: the directory's ``config.yaml`` (what a stage wrote there), with ``run_dir`` the
    directory as given — also after the run was moved; overrides apply on top; a directory without one is refused
    in one line."""
    from accord.config import dump_config

    cfg = load_config(cfg_file, ["collect.samples=3"])
    written = dump_config(cfg)
    moved = tmp_path / "moved"
    written.parent.rename(moved)
    again = load_config(moved, ["eval.k=7"])
    assert again.run_dir == str(moved) and again.collect.samples == 3 and again.eval.k == 7
    assert again.model_dump(exclude={"run_dir", "eval"}) == cfg.model_dump(exclude={"run_dir", "eval"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty: a directory, not a config file \(.*this one has none\)$"):
        load_config(tmp_path / "empty")


def test_duplicate_teacher_names_and_unknown_judge(cfg_file):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, ["teachers.1.name=alpha", "collect.judge={teacher: zed}"])
    assert "duplicate" in str(e.value) or "zed" in str(e.value)


def test_override_errors(cfg_file):
    with pytest.raises(ConfigError, match="no list item named"):
        load_config(cfg_file, ["teachers.gamma.model=x"])
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        load_config(cfg_file, ["collect.samples"])


@pytest.mark.parametrize("name", ["mot-paper.yaml", "cord-paper.yaml", "compact-paper.yaml", "qr-paper.yaml",
                                  "lab-quickstart.yaml", "lab-quick.yaml"])
def test_shipped_configs_validate(name):
    """The paper-scale configs validate offline (`accord config`; nothing downloads)."""
    from conftest import run_cli

    code, out = run_cli("config", str(Path(__file__).parents[1] / "configs" / name))
    assert code == 0, out
    if name == "mot-paper.yaml":
        assert "mot_schedule: per-round" in out and "steps_per_round: 50" in out and "k: 16" in out
    if name == "compact-paper.yaml":  # Table 8: 8 epochs of 497 × 4 traces at 32 per step, lr 5e-5
        cfg = load_config(Path(__file__).parents[1] / "configs" / name)
        t = cfg.train
        assert (t.rounds, t.epochs, t.batch_size) == (8, 8, 32)
        assert (t.lr, t.lora.target_modules, cfg.compact.scores) == (5e-5, "all-linear", ["mi", "cons", "ppl"])
    if name == "qr-paper.yaml":  # §3.2: QLoRA rank 32, batch 8, lr 5e-6 / 2e-4
        cfg = load_config(Path(__file__).parents[1] / "configs" / name)
        assert (cfg.train.lora.r, cfg.train.lora.quantize, cfg.train.batch_size) == (32, "nf4", 8)
        assert [(s.label(), s.lr) for s in cfg.qr.students] == [("mistral", 5e-6), ("gemma", 2e-4)]
        assert cfg.collect.style == ["cot", "tot", "program", "fact", "backward"] and cfg.collect.judge.teacher


def test_a_judge_is_a_teacher_or_its_own_model_entry(cfg_file):
    with pytest.raises(ConfigError, match=r"give either teacher .* or model"):
        load_config(cfg_file, ["collect.judge={max_new_tokens: 30}"])
    cfg = load_config(cfg_file, ["collect.judge={model: {name: grader, backend: openai, model: m, "
                                 "base_url: 'http://127.0.0.1:9/v1'}}"])
    assert cfg.collect.judge.name == "grader" and cfg.collect.judge.teacher is None
    with pytest.raises(ConfigError, match="backend 'column' only reads stored text"):
        load_config(cfg_file, ["collect.judge={model: {name: g, backend: column}}"])


def test_results_recorded_before_a_new_option_are_still_finished(cfg_file):
    """A result written before ``train.epochs`` and ``train.lora.quantize`` existed records neither; left at their
    defaults they are no change (a finished run stays finished after an upgrade)."""
    from accord.train.common import method_settings, settings_change

    cfg = load_config(cfg_file)
    old = method_settings(cfg, "mtd")
    del old["train"]["epochs"], old["train"]["lora"]["quantize"]
    assert settings_change(cfg, {"method": "mtd", "trained_with": old}) == []
    assert settings_change(load_config(cfg_file, ["train.lora.r=4", "train.lora.quantize=nf4"]),
                           {"method": "mtd", "trained_with": old}) == ["train.lora.quantize: None → 'nf4'",
                                                                       "train.lora.r: 0 → 4"]


def test_qlora_needs_a_lora_rank(cfg_file):
    with pytest.raises(ConfigError, match=r"train.lora.quantize: nf4 quantizes the frozen base of a LoRA run; set "
                                          r"train.lora.r"):
        load_config(cfg_file, ["train.lora.quantize=nf4"])
    assert load_config(cfg_file, ["train.lora.quantize=nf4", "train.lora.r=8"]).train.lora.quantize == "nf4"


def test_an_evaluation_that_measures_nothing_is_refused(cfg_file):
    with pytest.raises(ConfigError, match=r"eval.k is 0 and eval.greedy is false: the evaluation would measure "
                                          r"nothing"):
        load_config(cfg_file, ["eval.k=0", "eval.greedy=false"])
    assert load_config(cfg_file, ["eval.k=0"]).eval.greedy  # greedy only
    assert load_config(cfg_file, ["eval.greedy=false"]).eval.k == 16  # samples only


def test_override_typos_say_command_line_and_suggest(cfg_file, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, ["colect.samples=2", "train.stesp_per_round=3"])
    msg = str(e.value)
    assert "colect: unknown field (did you mean collect?) — from the command line" in msg
    assert "train.stesp_per_round: unknown field (did you mean steps_per_round?) — from the command line" in msg
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is an existing file, not a directory"):
        load_config(cfg_file, [f"run_dir={f}"])


def test_engine_args_carry_every_training_option():
    """`train:` → the engine's arguments: every shared field by name (a new option cannot be forgotten in a
    hand-written copier), `lora.*` as `lora_*`, and the run's own schedule."""
    import dataclasses

    from accord.train.common import engine_args
    from accord.train.engine import TrainArgs

    cfg = load_config("configs/lab-quickstart.yaml", [
        "train.packing=false", "train.chunked_loss=true", "train.grad_accum=2", "train.clip=0.5", "train.bf16=false",
        "train.lora.r=4", "train.lora.alpha=8", "train.lora.target_modules=[q_proj]", "train.keep_checkpoints=2",
        "train.seed=7", "train.report_to=[tensorboard]", "train.compile=true"])
    a = engine_args(cfg, 30, checkpoint_every=10, seed_offset=1)
    assert (a.packing, a.chunked_loss, a.grad_accum, a.clip, a.bf16, a.compile) == (False, True, 2, 0.5, False, True)
    assert (a.lora_r, a.lora_alpha, a.lora_targets, a.keep_checkpoints) == (4, 8, ["q_proj"], 2)
    assert (a.steps, a.checkpoint_every, a.seed, a.report_to) == (30, 10, 8, ["tensorboard"])
    shared = {f.name for f in dataclasses.fields(TrainArgs)} & set(type(cfg.train).model_fields)
    assert {"lr", "batch_size", "max_len", "packing", "warmup_ratio"} <= shared
    assert all(getattr(a, n) == (getattr(cfg.train, n) if n != "seed" else 8) or n in ("betas", "report_to")
               for n in shared)


def test_every_merge_setting_reaches_the_merge_operator():
    from accord.train.merge import spec_from

    cfg = load_config("configs/lab-quickstart.yaml", ["train.merge.method=dare_ties", "train.merge.density=0.3",
                                                       "train.merge.normalize=false", "train.merge.seed=11"])
    s = spec_from(cfg.train.merge, [0.5, 0.5])
    assert (s.method, s.density, s.normalize, s.seed, s.weights) == ("dare_ties", 0.3, False, 11, [0.5, 0.5])


def test_run_takes_overrides_without_a_config_and_others_say_config_first(tmp_path, cfg_file):
    """`accord run run_dir=X` overrides the lab quickstart (no config needed); `accord train run_dir=X` says the
    config goes first instead of "file not found"."""
    import argparse

    from conftest import run_cli

    from accord.cli import _run_config

    args = argparse.Namespace(config=f"run_dir={tmp_path / 'q'}", overrides=["train.steps_per_round=3"],
                              profile="quick")
    cfg = _run_config(args)
    assert cfg.run_dir == str(tmp_path / "q") and cfg.train.steps_per_round == 3
    assert "lab" in cfg.problems.path  # the quick lab's config, overridden
    code, out = run_cli("train", f"run_dir={tmp_path / 'q'}")
    assert code != 0 and "looks like a key=value override" in out and "accord train CONFIG" in out
    real = tmp_path / "a=b.yaml"  # a config file whose name holds '=' is still a file
    real.write_text(Path(cfg_file).read_text())
    args = argparse.Namespace(config=str(real), overrides=["run_dir=elsewhere"], profile=None)
    assert _run_config(args).run_dir == "elsewhere"


def test_schema_prints_every_description_verbatim():
    """`accord config --schema`: each field's description as written — brackets included ([ppl,cons],
    lab:<task>[:<split>] once read as console markup and vanished)."""
    from conftest import run_cli

    from accord.config import AccordConfig

    code, out = run_cli("config", "--schema")
    assert code == 0
    flat = " ".join(out.split())

    def descriptions(model):
        for f in model.model_fields.values():
            inner = [a for a in getattr(f.annotation, "__args__", (f.annotation,))
                     if isinstance(a, type) and hasattr(a, "model_fields")]
            if inner:
                yield from descriptions(inner[0])
            elif f.description:
                yield f.description

    missing = [d for d in descriptions(AccordConfig) if " ".join(d.split()) not in flat]
    assert missing == [], missing
    # and every field has one: a line ending in "): " told a user nothing
    bare = [line for line in out.splitlines() if line.rstrip().endswith("):")]
    assert bare == [], bare
    assert "compact.scores=[ppl,cons] train.tag=no-mi" in flat


def test_own_problems_are_evaluated_on_what_training_held_out(tmp_path):
    """``eval.splits`` unset with problems that are not the lab's: their held-out split, read with the problems'
    own ids, seed and fractions (the very problems training left out); nothing when every problem is trained on."""
    import json

    from accord.evaluate import split_problems
    from accord.problems import load_problems

    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"uid": f"u{i}", "q": f"{i} + 1?", "a": str(i + 1)}) + "\n" for i in range(60)))
    mine = {"path": str(f), "id_field": "uid", "question_field": "q", "answer_field": "a", "split": "train",
            "validation_fraction": 0.3, "split_seed": 7}
    base = {"run_dir": str(tmp_path / "run"), "teachers": [{"name": "t", "backend": "column", "column": "q"}]}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**base, "problems": mine}))
    cfg = load_config(p)
    assert list(cfg.eval.splits) == ["validation"] and cfg.eval.curve_splits == ["validation"]
    held = {q.id for q in split_problems(cfg, "validation")}
    trained = {q.id for q in load_problems(cfg.problems)}
    assert held and trained and not held & trained and len(held | trained) == 60  # id_field and split_seed kept
    assert load_config(p, ["problems.test_fraction=0.2"]).eval.splits["test"].split == "test"  # test, when there is one
    # an explicit split of the same file is read the same way (it used to take the default id field and seed)
    p.write_text(yaml.safe_dump({**base, "problems": mine,
                                 "eval": {"splits": {"mine": {"path": str(f), "split": "validation"}}}}))
    assert {q.id for q in split_problems(load_config(p), "mine")} == held
    # every problem trained on: nothing held out, said before anything runs (exit 2), and by --plan
    p.write_text(yaml.safe_dump({**base, "problems": {**mine, "split": "all"}}))
    assert load_config(p).eval.splits == {}
    from conftest import run_cli

    code, out = run_cli("run", str(p))
    assert code == 2 and "eval.splits: nothing to evaluate on" in out and "problems.split: train" in out, out
    assert not (tmp_path / "run" / "corpora").exists()
    code, out = run_cli("run", str(p), "--plan")
    assert code == 0 and "stops before anything runs: eval.splits: nothing to evaluate on" in out
    code, out = run_cli("interpolate", str(p))  # it evaluates on eval.splits too
    assert code == 2 and "eval.splits: nothing to evaluate on" in out, out
    code, out = run_cli("collect", str(p), "--plan")  # collecting needs no evaluation
    assert code == 0 and "nothing to evaluate on" not in out
    p.write_text(yaml.safe_dump({**base, "problems": mine, "eval": {"splits": {}}}))  # emptied by hand
    code, out = run_cli("eval", str(p))
    assert code == 2 and "eval.splits is empty: name the problems to evaluate on" in out, out
    # the lab's problems keep the lab's splits; splits set in the config stay as they are
    p.write_text(yaml.safe_dump({**base, "problems": {"path": "lab:arith:train"}}))
    assert list(load_config(p).eval.splits) == ["target", "ood", "general"]
