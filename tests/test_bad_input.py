"""The bad-input catalogue (README "Bad input: what accord says"): every case exits 2 with a message that
names the file, line or field, and loses nothing already on disk.  The README's table is checked against
this list, so the two cannot drift apart."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, write_jsonl

README = Path(__file__).resolve().parents[1] / "README.md"
GOOD = [{"question": "What is 3 plus 4?", "answer": "7"}, {"question": "What is 4 plus 4?", "answer": "8"}]


def _cfg(tmp: Path, **over) -> dict:
    cfg = {"run_dir": str(tmp / "run"), "problems": {"path": str(tmp / "p.jsonl")},
           "teachers": [{"name": "a", "backend": "column", "column": "a"}]}
    for k, v in over.items():
        cfg[k] = v
    return cfg


def _write(tmp: Path, cfg: dict, name: str = "c.yaml") -> str:
    p = tmp / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _problems(tmp: Path, text: str | bytes) -> None:
    f = tmp / "p.jsonl"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())


def _lines(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# (input, the message names …, setup(tmp) -> argv)
def c_non_utf8(t):
    _problems(t, _lines(GOOD[:1]).encode() + b'{"question": "caf\xe9", "answer": "1"}\n')
    return ["collect", _write(t, _cfg(t))]


def c_malformed(t):
    _problems(t, _lines(GOOD[:1]) + '{"question": "b", "answer": \n')
    return ["collect", _write(t, _cfg(t))]


def c_missing_field(t):
    _problems(t, _lines(GOOD[:1]) + '{"question": "b", "solution": "2"}\n')
    return ["collect", _write(t, _cfg(t))]


def c_no_problems(t):
    return ["collect", _write(t, _cfg(t))]


def c_duplicate_ids(t):
    _problems(t, _lines([{**GOOD[0], "id": "x"}, {**GOOD[1], "id": "x"}]))
    return ["collect", _write(t, _cfg(t, problems={"path": str(t / "p.jsonl"), "on_duplicate": "error"}))]


def c_no_config(t):
    return ["config", str(t / "nowhere.yaml")]


def c_config_typo(t):
    (t / "configs").mkdir(exist_ok=True)
    (t / "configs" / "lab-quick.yaml").write_text("{}\n")
    return ["run", str(t / "configs" / "lab-quik.yaml")]


def c_yaml_syntax(t):
    (t / "c.yaml").write_text("run_dir: r\nproblems: {path: p.jsonl\nteachers: []\n")
    return ["config", str(t / "c.yaml")]


def c_unknown_key(t):
    return ["config", _write(t, _cfg(t, colect={"samples": 2}))]


def c_override_typo(t):
    return ["config", _write(t, _cfg(t)), "colect.samples=2"]


def c_wrong_type(t):
    return ["config", _write(t, _cfg(t)), "collect.samples=abc"]


def c_run_dir_file(t):
    (t / "run").write_text("my notes\n")
    return ["config", _write(t, _cfg(t))]


def c_backend(t):
    return ["config", _write(t, _cfg(t, teachers=[{"name": "a", "backend": "tgi", "model": "m"}]))]


def c_base_url(t):
    return ["config", _write(t, _cfg(t, teachers=[{"name": "a", "backend": "openai", "model": "m"}]))]


def c_api_key(t):
    _problems(t, _lines(GOOD))
    return ["collect", _write(t, _cfg(t, teachers=[{"name": "a", "backend": "openai", "model": "m",
                                                   "base_url": "http://127.0.0.1:9/v1",
                                                   "api_key_env": "ACCORD_TEST_UNSET_KEY"}]))]


def c_model_path(t):
    _problems(t, _lines(GOOD))
    return ["collect", _write(t, _cfg(t, teachers=[{"name": "a", "backend": "hf", "model": "./no/such/model"}]))]


def c_dup_teachers(t):
    return ["config", _write(t, _cfg(t, teachers=[{"name": "a", "backend": "column", "column": "a"}] * 2))]


def c_script_name(t):
    return ["config", _write(t, _cfg(t, teachers=[{"name": "<script>", "backend": "column", "column": "a"}]))]


def c_judge(t):
    return ["config", _write(t, _cfg(t, collect={"judge": {"teacher": "gpt"}}))]


def c_method(t):
    return ["config", _write(t, _cfg(t, train={"method": "dpo"}))]


def c_std_teacher(t):
    return ["config", _write(t, _cfg(t, train={"method": "std:b"}))]


def c_merge(t):
    return ["config", _write(t, _cfg(t, train={"merge": {"method": "slerp"}}))]


def c_weights(t):
    return ["config", _write(t, _cfg(t, train={"merge": {"weights": [1, 2]}}))]


def c_qr_one(t):
    return ["config", _write(t, _cfg(t, train={"method": "qr"}, qr={"students": [{"model": "lab:student"}]}))]


def c_no_corpus(t):
    return ["train", _write(t, _cfg(t, student={"model": "lab:student"}))]


def c_corpus_line(t):
    (t / "run" / "corpora").mkdir(parents=True)
    write_jsonl(t / "run" / "corpora" / "a.jsonl", [{"prompt": "q", "completion": "a"}])
    return ["train", _write(t, _cfg(t, train={"method": "std:a"}))]


def c_device(t):
    return ["train", _write(t, _cfg(t, train={"method": "std:a"}, student={"model": "lab:student",
                                                                        "device": "cuda:7"}))]


def c_master(t):
    return ["train", _write(t, _cfg(t, train={"method": "std:a", "master_weights": True, "bf16": False},
                                    student={"model": "lab:student"}))]


def c_lab_model(t):
    _problems(t, _lines(GOOD))
    return ["collect", _write(t, _cfg(t, teachers=[{"name": "a", "model": "lab:micro/nobody"}]))]


def c_lab_task(t):
    return ["collect", _write(t, _cfg(t, problems={"path": "lab:nope"}))]


def c_split(t):
    return ["config", _write(t, _cfg(t, problems={"path": str(t / "p.jsonl"), "split": "dev"}))]


def c_nothing_held_out(t):
    _problems(t, _lines(GOOD))
    return ["run", _write(t, _cfg(t))]


CASES = [
    ("problems file with a non-UTF-8 byte", ["p.jsonl:2", "not UTF-8", "byte 0xe9", "column"], c_non_utf8),
    ("problems file with a malformed JSON line", ["p.jsonl:2", "malformed JSON", "column 29"], c_malformed),
    ("problem row without the answer field", ["p.jsonl:2", "missing field 'answer'"], c_missing_field),
    ("problems file that does not exist", ["p.jsonl", "not found"], c_no_problems),
    ("duplicate problem ids with `on_duplicate: error`", ["p.jsonl:2", "repeat a problem id", "'x'"],
     c_duplicate_ids),
    ("config file that does not exist", ["nowhere.yaml", "file not found", "looked for"], c_no_config),
    ("config file name with a typo", ["lab-quik.yaml", "did you mean", "configs/lab-quick.yaml"], c_config_typo),
    ("YAML syntax error", ["c.yaml", "line"], c_yaml_syntax),
    ("unknown key in the config file", ["colect", "did you mean collect"], c_unknown_key),
    ("override typo `colect.samples=2`", ["command line", "colect", "did you mean collect"], c_override_typo),
    ("value of the wrong type `collect.samples=abc`", ["collect.samples", "integer", "got 'abc'"], c_wrong_type),
    ("`run_dir` that is an existing file", ["run_dir", "existing file"], c_run_dir_file),
    ("unknown teacher backend", ["teachers.0.backend", "unknown teacher backend 'tgi'"], c_backend),
    ("`openai` teacher without `base_url`", ["needs: base_url"], c_base_url),
    ("API-key variable that is not set", ["ACCORD_TEST_UNSET_KEY", "not set"], c_api_key),
    ("teacher model path that does not exist", ["./no/such/model", "does not exist"], c_model_path),
    ("two teachers with one name", ["duplicate names", "'a'"], c_dup_teachers),
    ("teacher name `<script>`", ["'<script>'", "not a valid name"], c_script_name),
    ("judge teacher name that names no teacher", ["collect.judge.teacher 'gpt'", "collect.judge.model"], c_judge),
    ("unknown training method", ["unknown train method 'dpo'", "compact"], c_method),
    ("`std:<name>` for no teacher", ["'std:b'", "not one of the teachers"], c_std_teacher),
    ("unknown merge operator", ["unknown merge method 'slerp'", "ties"], c_merge),
    ("merge weights for the wrong number of teachers", ["train.merge.weights has 2 value(s) for 1"], c_weights),
    ("QR-Distill with one student", ["at least two students", "train.method=std"], c_qr_one),
    ("`train` before `collect`", ["corpora/a.jsonl", "run `accord collect` first"], c_no_corpus),
    ("corpus line without `messages`", ["a.jsonl:1", "field 'messages'"], c_corpus_line),
    ("`student.device` that is not visible here", ["student.device: cuda:7", "no such CUDA device is visible"],
     c_device),
    ("`train.master_weights` without bf16", ["train.master_weights: true needs bf16 mixed precision"], c_master),
    ("lab model that does not exist", ["lab:micro/nobody", "unknown lab model"], c_lab_model),
    ("lab task that does not exist", ["lab:nope", "unknown lab task"], c_lab_task),
    ("problem split that does not exist", ["problems.split", "'validation'", "got 'dev'"], c_split),
    ("your own problems, all trained on, and no `eval.splits`",
     ["eval.splits: nothing to evaluate on", "problems.split: train"], c_nothing_held_out),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("title, says, setup", CASES, ids=[c[2].__name__ for c in CASES])
def test_bad_input_exits_2_names_the_culprit_and_loses_nothing(tmp_path, monkeypatch, title, says, setup):
    monkeypatch.delenv("ACCORD_TEST_UNSET_KEY", raising=False)
    monkeypatch.setenv("ACCORD_HOME", str(tmp_path / "home"))
    argv = setup(tmp_path)
    run = tmp_path / "run"
    if not run.exists():
        run.mkdir()
        (run / "notes.txt").write_text("collected earlier\n")  # something on disk that must survive
    before = _snapshot(tmp_path)
    code, out = run_cli(*argv)
    assert code == 2, out
    assert "Traceback" not in out
    for s in says:
        assert s in out, (s, out)
    after = _snapshot(tmp_path)
    assert {k: v for k, v in before.items() if k in after and after[k] != v} == {}
    assert set(before) <= set(after)


def test_readme_catalogue_matches_this_list():
    text = README.read_text()
    section = text.split("### Bad input: what accord says", 1)[1].split("\n#", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| input") and "---" not in r]
    got = [tuple(c.strip() for c in r.strip("|").split("|"))[:2] for r in rows]
    want = [(title, " · ".join(f"`{s}`" for s in says)) for title, says, _ in CASES]
    assert got == want


def readme_table() -> str:
    """The README's table, from the list (``python -c 'import test_bad_input as t; print(t.readme_table())'``)."""
    out = ["| input | the message names |", "| --- | --- |"]
    out += [f"| {title} | " + " · ".join(f"`{s}`" for s in says) + " |" for title, says, _ in CASES]
    return "\n".join(out)
