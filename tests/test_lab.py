"""The lab: task generator, tokenizer, micro-profile build, cache and `lab:` resolution."""

import json
import time

import pytest
from conftest import run_cli

from accord.lab import tasks


def independent_walk(question: str) -> int:
    """Solve a chain question from its text alone (no access to the generator's structure)."""
    import re

    links = {int(a): int(b) for a, b in re.findall(r"(\d)>(\d)", question.split(".")[0])}
    start, hops = map(int, re.search(r"Start at (\d) and follow (\d+) links", question).groups())
    x = start
    for _ in range(hops):
        x = links[x]
    return x


def test_generator_is_deterministic_correct_and_splits_disjoint():
    a, b = tasks.generate("chain", "test"), tasks.generate("chain", "test")
    assert [r["question"] for r in a] == [r["question"] for r in b] and len(a) == tasks.SPLIT_SIZES["test"]
    for fam in ("chain", "chain-ood"):
        for r in tasks.generate(fam, "test")[:200]:
            assert independent_walk(r["question"]) == int(r["answer"])
    assert all(r["steps"] in (2, 3, 4) for r in a)
    assert all(r["steps"] >= 5 for r in tasks.generate("chain-ood", "test"))
    train = {r["question"] for r in tasks.generate("chain", "train")}
    assert not train & {r["question"] for r in a}
    for r in tasks.generate("last", "test")[:100]:
        assert r["question"].split(":")[1].split(".")[0].split()[-1] == r["answer"]


def test_every_style_trace_is_verified_correct_and_headers_segment():
    from accord.verify import check

    c = tasks.generate("chain", "train")[0]
    for style in tasks.STYLE_NAMES:
        for headers in (False, True):
            text = tasks.chain_trace(c["chain"], style, headers)
            assert check("math", c["answer"], text).verdict == "correct"
            assert ("### Step 1" in text) == headers


def test_tokenizer_chat_template_and_think_tokens(lab_tokenizer):
    text = lab_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert text == "<|user|>hi<|end|><|assistant|>"
    ids = lab_tokenizer("<think>\n(1) 3>4\n</think>\n\n\\boxed{4}", add_special_tokens=False)["input_ids"]
    assert lab_tokenizer.decode(ids, skip_special_tokens=True) == "<think>\n(1) 3>4\n</think>\n\n\\boxed{4}"


@pytest.fixture(scope="module")
def micro_lab(tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("accord_home")
    old = os.environ.get("ACCORD_HOME")
    os.environ["ACCORD_HOME"] = str(home)
    code, out = run_cli("lab", "build", "--profile", "micro")
    assert code == 0, out
    yield home
    if old is None:
        os.environ.pop("ACCORD_HOME")
    else:
        os.environ["ACCORD_HOME"] = old


def test_micro_build_status_and_roundtrip(micro_lab, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = run_cli("lab", "status", "--profile", "micro", "--json")
    st = json.loads(out)
    names = {m["name"]: m for m in st["models"]}
    assert set(names) == {"terse", "verbose", "verify", "shifted", "student"}
    assert names["student"]["role"] == "student" and names["terse"]["role"] == "teacher"
    for m in st["models"]:
        assert set(m["accuracy"]) == {"target_greedy", "target_pass1", "general_greedy"}
        assert all(0.0 <= v <= 1.0 for v in m["accuracy"].values())
        model = AutoModelForCausalLM.from_pretrained(m["path"], use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(m["path"])
        assert model.config.vocab_size == len(tok) and tok.chat_template


def test_rebuild_reuses_cache_and_detects_corruption(micro_lab):
    from accord.lab.build import lab_dir, read_manifest

    before = {m["name"]: m["sha256"] for m in read_manifest("micro")["models"]}
    t0 = time.perf_counter()
    assert run_cli("lab", "build", "--profile", "micro")[0] == 0
    assert time.perf_counter() - t0 < 10
    assert {m["name"]: m["sha256"] for m in read_manifest("micro")["models"]} == before
    # corrupt one checkpoint: it is detected, rebuilt, and the others are untouched
    f = lab_dir("micro") / "verbose" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    from accord.lab.build import valid_entry

    assert valid_entry("micro", "verbose") is None
    assert run_cli("lab", "build", "--profile", "micro")[0] == 0
    assert valid_entry("micro", "verbose") is not None


def test_lab_model_specs_resolve_and_collect_runs(micro_lab, tmp_path):
    import yaml

    from accord.teachers.base import TeacherConfigError, resolve_model

    assert resolve_model("lab:micro/terse").endswith("terse")
    with pytest.raises(TeacherConfigError, match="not built"):
        resolve_model("lab:terse")  # the full profile is never built in this temporary ACCORD_HOME
    with pytest.raises(TeacherConfigError, match="unknown lab model"):
        resolve_model("lab:micro/nobody")
    cfg = {"run_dir": str(tmp_path / "run"), "problems": {"path": "lab:chain:validation", "limit": 4},
           "teachers": [{"name": "terse", "model": "lab:micro/terse"}, {"name": "shifted", "model": "lab:micro/shifted"}],
           "collect": {"samples": 2, "max_new_tokens": 24}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code, out = run_cli("collect", str(p))
    assert code == 0, out
    assert json.loads((tmp_path / "run" / "collect_summary.json").read_text())[0]["samples"] == 8


def test_unknown_lab_source_is_clear():
    from accord.config import ProblemsConfig
    from accord.problems import ProblemSourceError, load_problems

    with pytest.raises(ProblemSourceError, match="unknown lab task"):
        load_problems(ProblemsConfig(path="lab:nope"))


def test_adaptive_base_and_teacher_stop_at_their_validation_target(monkeypatch):
    """The base trains until validation greedy accuracy reaches its target (checked every N steps),
    with its step count as the cap; teachers stop once every family in STOP_WHEN is at its target;
    unreachable → the cap (and a warning for the base)."""
    import dataclasses
    import io

    from rich.console import Console

    from accord.lab import build as B

    p = dataclasses.replace(B.PROFILES["micro"], base_steps=6, base_target=0.0, base_check_every=2,
                            base_check_from=4, base_check_n=4, teacher_steps=6, teacher_stop=True,
                            teacher_check_every=3)
    tok = B.lab_tokenizer()
    out = io.StringIO()
    console = Console(file=out)
    info = B._train_base(B._new_model(tok, p.d_teacher, p.layers_teacher, 0), tok, p, console)
    assert info["steps"] == 4 and list(info["checks"]) == ["4"]  # no check before base_check_from
    never = dataclasses.replace(p, base_target=1.01)
    info = B._train_base(B._new_model(tok, p.d_teacher, p.layers_teacher, 0), tok, never, console)
    assert info["steps"] == 6 and info["validation_greedy"] < 1.01 and "cap" in out.getvalue()
    monkeypatch.setattr(B, "STOP_WHEN", {"verbose": {"chain": 0.0}, "verify": {"chain": 0.0, "chain-ood": 1.01}})
    model = B._new_model(tok, p.d_teacher, p.layers_teacher, 0)
    assert B._train_teacher(model, tok, p, "verbose", 1, console)["steps"] == 3
    info = B._train_teacher(model, tok, p, "verify", 1, console)  # chain-ood never reaches 101%: the cap
    assert info["steps"] == round(6 * B.TEACHER_SCHEDULE["verify"][0])
    assert set(info["checks"]["3"]) == {"chain", "chain-ood"}
    assert "checks" not in B._train_teacher(model, tok, p, "terse", 1, console)  # not in STOP_WHEN: fixed
