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
    assert set(names) == {"terse", "verbose", "verify", "shifted", "student", "random"}
    assert names["student"]["role"] == "student" and names["terse"]["role"] == "teacher"
    # lab:random: the student's architecture and initialisation, untrained (for the prior's share)
    assert names["random"]["role"] == "random-init" and names["random"]["training"]["steps"] == 0
    for m in st["models"]:
        assert {"target_greedy", "target_pass1", "general_greedy", "one_step_greedy"} <= set(m["accuracy"])
        assert all(0.0 <= v <= 1.0 for v in m["accuracy"].values())
        model = AutoModelForCausalLM.from_pretrained(m["path"], use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(m["path"])
        assert model.config.vocab_size == len(tok) and tok.chat_template


def test_rebuild_reuses_cache_and_detects_corruption(micro_lab):
    from accord.lab.cache import lab_dir, read_manifest

    before = {m["name"]: m["sha256"] for m in read_manifest("micro")["models"]}
    t0 = time.perf_counter()
    assert run_cli("lab", "build", "--profile", "micro")[0] == 0
    assert time.perf_counter() - t0 < 10
    assert {m["name"]: m["sha256"] for m in read_manifest("micro")["models"]} == before
    # corrupt one checkpoint: it is detected, rebuilt, and the others are untouched
    f = lab_dir("micro") / "verbose" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    from accord.lab.cache import valid_entry

    assert valid_entry("micro", "verbose") is None
    assert run_cli("lab", "build", "--profile", "micro")[0] == 0
    assert valid_entry("micro", "verbose") is not None


def test_lab_model_specs_resolve_and_collect_runs(micro_lab, tmp_path):
    import yaml

    from accord.models import resolve_model
    from accord.teachers.base import TeacherConfigError

    assert resolve_model("lab:micro/terse").endswith("terse")
    with pytest.raises(TeacherConfigError, match="not built"):
        resolve_model("lab:terse")  # the full profile is never built in this temporary ACCORD_HOME
    with pytest.raises(TeacherConfigError, match="unknown lab model"):
        resolve_model("lab:micro/nobody")
    cfg = {"run_dir": str(tmp_path / "run"), "problems": {"path": "lab:chain:validation", "limit": 4},
           "teachers": [{"name": "terse", "model": "lab:micro/terse"},
                        {"name": "shifted", "model": "lab:micro/shifted"}],
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


def test_models_train_until_their_validation_target_and_bands_are_enforced(monkeypatch):
    """Every model trains until its validation accuracy reaches its targets (checked every N steps
    from ``check_from``), with its step count as the cap; a model outside its band is reported and
    the build raises unless weak models are allowed."""
    import dataclasses
    import io

    from rich.console import Console

    from accord.lab import build as B
    from accord.lab import recipe as R

    p = dataclasses.replace(B.PROFILES["micro"], check_every=2, check_from=4, check_n=4)
    tok = B.lab_tokenizer()
    console = Console(file=io.StringIO())
    rows = B.student_rows(p)
    info = B._train_until(B._new_model(tok, p.d, p.layers, 0), tok, rows, p, {"last": 0.0}, 6, 1e-3, 0, "s", console)
    assert info["steps"] == 4 and info["reached"] and list(info["checks"]) == ["4"]  # no check before check_from
    info = B._train_until(B._new_model(tok, p.d, p.layers, 0), tok, rows, p, {"last": 1.01}, 6, 1e-3, 0, "s", console)
    assert info["steps"] == 6 and not info["reached"] and "6" in info["checks"]  # the cap, final state recorded
    acc = {"target_pass1": 0.3, "one_step_greedy": 0.9, "general_greedy": 0.9}
    assert B.band_misses("teacher", acc, dataclasses.replace(p, teacher_band=(0.55, 0.95))) == [
        "target_pass1 30.0% outside [55%, 95%]"]
    assert B.band_misses("student", acc, dataclasses.replace(p, student_band=R.STUDENT_BAND)) == [
        "target_pass1 30.0% outside [0%, 20%]"]


def test_unreachable_band_warns_and_exits_nonzero(tmp_path, monkeypatch):
    """A micro build whose teacher band cannot be met: warning naming the model, exit 1; --allow-weak: 0."""
    import dataclasses

    from accord.lab import build as B

    monkeypatch.setenv("ACCORD_HOME", str(tmp_path))
    monkeypatch.setitem(B.PROFILES, "micro", dataclasses.replace(B.PROFILES["micro"], teacher_band=(0.99, 1.0)))
    code, out = run_cli("lab", "build", "--profile", "micro")
    assert code == 1 and "missed its band" in out and "'terse'" in out and "--allow-weak" in out
    weak = {m["name"]: m["weak"] for m in B.read_manifest("micro")["models"]}
    assert weak["terse"] and not weak["student"] and not weak["random"]  # no band for the untrained model
    code, out = run_cli("lab", "build", "--profile", "micro", "--allow-weak")
    assert code == 0


def solve_arith(question: str) -> int:
    """Solve an arithmetic-chain question from its text alone."""
    import re

    x = int(re.match(r"Start at (\d)\.", question).group(1))
    for op, b in re.findall(r"(Add|Minus|Times) (\d)\.", question):
        x = {"Add": x + int(b), "Minus": x - int(b), "Times": x * int(b)}[op] % 10
    return x


def test_arith_generator_solver_splits_and_styles():
    from accord.verify import check

    for fam, hops in (("arith", (2, 3, 4)), ("arith-ood", (5, 6))):
        rows = tasks.generate(fam, "test")
        assert all(solve_arith(r["question"]) == int(r["answer"]) and r["steps"] in hops for r in rows)
        train = {r["question"] for r in tasks.generate(fam, "train")}
        assert not train & {r["question"] for r in rows}
        assert not train & {r["question"] for r in tasks.generate(fam, "validation")}
    one = tasks.generate("arith-1", "test")
    assert len({r["question"] for r in one}) == 250 and all(solve_arith(r["question"]) == int(r["answer"]) for r in one)
    r = tasks.generate("arith", "train")[0]
    for style in tasks.STYLE_NAMES:
        for headers in (False, True):
            text = tasks.arith_trace(r["arith"], style, headers, rng=__import__("random").Random(0), slip=0.5)
            assert check("math", r["answer"], text).verdict == "correct"
            assert ("### Step 1" in text) == headers


def test_arith_has_no_shortcut():
    """Solvers that ignore the reasoning score at chance (10%) on the target test split."""
    import re

    rows = tasks.generate("arith", "test")

    def rate(f):
        return sum(f(r["question"]) == int(r["answer"]) for r in rows) / len(rows)

    nums = [lambda q: int(re.findall(r"\d", q)[-1]), lambda q: int(re.findall(r"\d", q)[0]),
            lambda q: sum(map(int, re.findall(r"\d", q))) % 10,
            lambda q: solve_arith(re.sub(r"(Add|Minus|Times) (\d)\. Result", "Result", q))]  # all but the last op
    for f in nums:
        assert rate(f) < 0.2, f


def test_wrong_facts_make_a_teacher_wrong_only_where_it_believes_them():
    from accord.lab import recipe as R

    facts = R.wrong_facts(R.TEACHERS["terse"], "terse", seed=0)
    assert facts and all(op == "Times" for op, _, _ in facts)
    assert all(v != tasks.apply_op(*f) for f, v in facts.items())
    a = tasks.Arith(3, (("Add", 4), ("Times", 2)))
    wrong = {("Times", 2, 7): 6}
    assert a.values(wrong) == [3, 7, 6] and a.values() == [3, 7, 4]
    assert "\\boxed{6}" in tasks.arith_trace(a, "terse", facts=wrong)


def test_a_second_builder_waits_for_the_first_and_reuses_its_models(tmp_path, monkeypatch):
    """Two builds of one profile at once: the second waits on the lock, says so, and rebuilds nothing."""
    import fcntl
    import io
    import threading

    from rich.console import Console

    from accord.lab import build as B

    monkeypatch.setenv("ACCORD_HOME", str(tmp_path))
    B.build_lab(profile="micro", console=Console(file=io.StringIO()))
    before = {m["name"]: m["built_at"] + m["sha256"] for m in B.read_manifest("micro")["models"]}
    fh = (B.lab_dir("micro") / ".lock").open("a")
    fcntl.flock(fh, fcntl.LOCK_EX)  # "another process" is building
    out = io.StringIO()
    t = threading.Thread(target=B.build_lab, kwargs={"profile": "micro", "console": Console(file=out)})
    t.start()
    t.join(timeout=3)
    assert t.is_alive() and "waiting" in out.getvalue()  # blocked, and said why
    fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()
    t.join(timeout=60)
    assert not t.is_alive()
    assert {m["name"]: m["built_at"] + m["sha256"] for m in B.read_manifest("micro")["models"]} == before


def test_accord_run_qr_on_two_lab_students_builds_student_b_and_reports_each(micro_lab, tmp_path):
    """`accord run` with QR on the micro lab: student-b (Qwen2, another tokenizer) is built on demand, each
    student gets its row and its base row, and the report draws the routing plots."""
    import yaml

    from accord.lab.cache import valid_entry

    assert valid_entry("micro", "student-b") is None  # optional: not part of the plain build
    run = tmp_path / "run"
    cfg = {"run_dir": str(run), "problems": {"path": "lab:arith:train", "limit": 4},
           "teachers": [{"name": "terse", "model": "lab:micro/terse"},
                        {"name": "shifted", "model": "lab:micro/shifted"}],
           "collect": {"samples": 2, "max_new_tokens": 24, "select": "all-correct"},
           "student": {"model": "lab:micro/student"},
           "train": {"method": "qr", "rounds": 1, "steps_per_round": 2, "batch_size": 8, "max_len": 96},
           "qr": {"students": [{"model": "lab:micro/student"}, {"model": "lab:micro/student-b"}],
                  "encoder": "hashing", "filter": "off"},  # micro teachers are rarely right: keep every path
           "eval": {"k": 1, "limit": 2, "max_new_tokens": 8, "splits": {"target": {"path": "lab:arith:test"},
                                                                         "general": {"path": "lab:last:test"}}}}
    p = tmp_path / "qr.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code, out = run_cli("run", str(p))
    assert code == 0, out
    assert valid_entry("micro", "student-b") is not None
    table = (run / "report" / "table.txt").read_text()
    for row in ("base ", "base-student-b", "qr-student ", "qr-student-b"):
        assert row in table, table
    assert (run / "report" / "qr-routing-type.png").exists() and (run / "report" / "qr-selection.png").exists()
    from transformers import AutoTokenizer

    a, b = (AutoTokenizer.from_pretrained(run / "train" / f"qr-{n}" / "final") for n in ("student", "student-b"))
    assert a("Start at 31")["input_ids"] != b("Start at 31")["input_ids"]  # two tokenizers really
    # each student's model card names the student it started from as the config does, and its own base
    card = (run / "train" / "qr-student-b" / "final" / "README.md").read_text()
    assert "**Started from:** `lab:micro/student-b`" in card and "base student (`base-student-b`)" in card, card
