"""End-to-end `accord collect` on micro models the tests build."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, write_jsonl


def write_cfg(tmp_path, problems, teachers, **collect):
    cfg = {"run_dir": str(tmp_path / "run"), "problems": {"path": str(problems)}, "teachers": teachers,
           "collect": {"samples": 3, "max_new_tokens": 40, "temperature": 0.6, **collect}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def read_jsonl(p):
    return [json.loads(x) for x in Path(p).read_text().splitlines()]


def test_collect_two_teachers_verifies_selects_and_resumes(tmp_path, problems_file, parrot7, parrot8):
    cfg = write_cfg(tmp_path, problems_file, [{"name": "seven", "model": str(parrot7), "batch_size": 8},
                                              {"name": "eight", "model": str(parrot8), "batch_size": 8}])
    code, out = run_cli("collect", str(cfg))
    assert code == 0, out
    run = tmp_path / "run"
    seven, eight, union = (read_jsonl(run / "corpora" / f) for f in ("seven.jsonl", "eight.jsonl", "all.jsonl"))
    # one trace per problem the teacher got right; problems it never solved are dropped
    assert 0 < len(seven) <= 5 and all(r["answer"] == "7" for r in seven)
    assert 0 < len(eight) <= 5 and all(r["answer"] == "8" for r in eight)
    assert len({r["problem_id"] for r in seven}) == len(seven) and len(union) == len(seven) + len(eight)
    assert seven[0]["messages"][0]["content"].startswith(seven[0]["question"])
    assert "\\boxed{7}" in seven[0]["completion"]
    summary = {s["teacher"]: s for s in json.loads((run / "collect_summary.json").read_text())}
    assert summary["seven"]["samples"] == 30 and 0.2 <= summary["seven"]["accuracy"] <= 0.5
    db_rows = sqlite3.connect(run / "traces.sqlite").execute(
        "select problem_id, verdict from traces where teacher='seven'").fetchall()
    per = {}  # the SE is over problems: each problem's samples averaged first
    for pid, v in db_rows:
        per.setdefault(pid, []).append(v == "correct")
    means = [sum(v) / len(v) for v in per.values()]
    m = sum(means) / len(means)
    want = (sum((x - m) ** 2 for x in means) / (len(means) - 1) / len(means)) ** 0.5
    assert db_rows and summary["seven"]["accuracy_se"] == pytest.approx(want) and " ± " in out
    assert "ALL TEACHERS" in out and (run / "config.yaml").exists()
    db = sqlite3.connect(run / "traces.sqlite")
    assert db.execute("select count(*) from traces").fetchone()[0] == 60
    # re-running generates nothing; more samples generate only the missing ones
    code, out = run_cli("collect", str(cfg))
    assert code == 0 and "generated 0 new" in out
    code, out = run_cli("collect", str(cfg), "collect.samples=4", "collect.select=all-correct")
    assert code == 0 and "generated 20 new" in out
    assert db.execute("select count(*) from traces").fetchone()[0] == 80
    assert len(read_jsonl(run / "corpora" / "seven.jsonl")) > len(seven)
    code, out = run_cli("export", str(cfg))
    assert code == 0 and len(read_jsonl(run / "traces.jsonl")) == 80


def test_kill_and_resume_loses_at_most_a_batch_and_never_duplicates(tmp_path, parrot7):
    probs = write_jsonl(tmp_path / "p.jsonl", [{"question": f"What is {i}+0?", "answer": str(i)} for i in range(40)])
    cfg = write_cfg(tmp_path, probs, [{"name": "seven", "model": str(parrot7), "batch_size": 2}], samples=4)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "accord.cli", "collect", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db_path = tmp_path / "run" / "traces.sqlite"
    before = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if db_path.exists():
            try:
                before = sqlite3.connect(db_path).execute("select count(*) from traces").fetchone()[0]
            except sqlite3.OperationalError:
                before = 0
            if before >= 10:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 10 <= before < 160, "the run should have been killed mid-way"
    db = sqlite3.connect(db_path)
    kept = {tuple(r) for r in db.execute("select problem_id, sample_idx, text from traces")}
    assert len(kept) % 2 == 0  # batches of two: whole batches only
    code, out = run_cli("collect", str(cfg))
    assert code == 0, out
    assert f"{len(kept)} of 160 generations already stored, {160 - len(kept)} to go" in out  # says it resumes
    rows = list(db.execute("select problem_id, sample_idx, text from traces"))
    assert len(rows) == 160 and len({(r[0], r[1]) for r in rows}) == 160
    assert kept <= {tuple(r) for r in rows}  # nothing collected before the kill was lost or changed


def test_import_s1k_style_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = {"question": ["What is 2+2?", "What is 3+3?"], "solution": ["4", "6"],
             "deepseek_thinking_trajectory": ["2 and 2 make 4", "3 and 3 make 7"],
             "deepseek_attempt": ["\\boxed{4}", "\\boxed{7}"],
             "gemini_thinking_trajectory": ["<think>ok</think> \\boxed{4}", None]}
    pq.write_table(pa.table(table), tmp_path / "s1k.parquet")
    cfg = {"run_dir": str(tmp_path / "run"),
           "problems": {"path": str(tmp_path / "s1k.parquet"), "answer_field": "solution"},
           "teachers": [{"name": "deepseek", "backend": "column", "column": "deepseek_thinking_trajectory",
                         "answer_column": "deepseek_attempt"},
                        {"name": "gemini", "backend": "column", "column": "gemini_thinking_trajectory"}]}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code, out = run_cli("collect", str(p))
    assert code == 0, out
    ds = read_jsonl(tmp_path / "run" / "corpora" / "deepseek.jsonl")
    assert len(ds) == 1 and ds[0]["reasoning"] == "2 and 2 make 4" and ds[0]["final"] == "\\boxed{4}"
    assert len(read_jsonl(tmp_path / "run" / "corpora" / "gemini.jsonl")) == 1
    db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")
    assert sorted(db.execute("select teacher, verdict from traces")) == [
        ("deepseek", "correct"), ("deepseek", "incorrect"), ("gemini", "correct")]


def test_stored_verdicts_are_checked_again_when_the_verifier_or_an_answer_changes(tmp_path):
    """A store whose verdicts came from another verifier revision (here: an older store, without stamps, holding
    what the old reading of ``2\\sqrt{2}`` as 2 decided) is verified again from the stored text, once; an edited
    reference answer re-checks that problem's rows alone; a sample its source marks cut off stays incorrect."""
    problems = [{"question": "Q sqrt", "answer": "2\\sqrt{2}", "trace": "<think>x</think> \\boxed{2}", "fin": "stop"},
                {"question": "Q interval", "answer": "(-\\infty, 3)", "trace": "<think>x</think> \\boxed{(-\\infty,3)}",
                 "fin": "stop"},
                {"question": "Q cut", "answer": "5", "trace": "<think>x</think> \\boxed{5}", "fin": "length"}]
    data = write_jsonl(tmp_path / "p.jsonl", problems)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "problems": {"path": str(data)}, "teachers": [
        {"name": "t", "backend": "column", "column": "trace", "finish_column": "fin"}]}))
    code, out = run_cli("collect", str(p))
    assert code == 0 and "checked" not in out, out
    db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")

    def verdicts():
        return dict(db.execute("select p.question, t.verdict from traces t join problems p on p.id = t.problem_id"))

    right = {"Q sqrt": "incorrect", "Q interval": "correct", "Q cut": "incorrect"}
    assert verdicts() == right
    assert all(v for (v,) in db.execute("select verified_with from traces"))
    # as an older revision left it: no stamps, the bare 2 taken for 2√2 and the interval read as its last number
    db.execute("update traces set verified_with = null, verdict = case verdict when 'correct' then 'incorrect' "
               "else 'correct' end")
    db.commit()
    assert "3 stored verdict(s) checked again" in run_cli("collect", str(p), "--plan")[1]
    code, out = run_cli("collect", str(p))
    assert code == 0 and "checked 3 stored verdict(s) again" in out and ": 3 changed" in out, out
    assert verdicts() == right
    assert [r["question"] for r in read_jsonl(tmp_path / "run" / "corpora" / "t.jsonl")] == ["Q interval"]
    code, out = run_cli("collect", str(p))
    assert code == 0 and "checked" not in out  # once
    problems[1]["answer"] = "(-\\infty, 4)"  # an edited reference: that problem's row alone
    write_jsonl(data, problems)
    code, out = run_cli("collect", str(p))
    assert code == 0 and "checked 1 stored verdict(s) again" in out and ": 1 changed" in out, out
    assert verdicts() == {**right, "Q interval": "incorrect"}
    assert db.execute("select answer from problems where question = 'Q interval'").fetchone() == ("(-\\infty, 4)",)


def test_judge_filter_stores_verdict_beside_answer_check(tmp_path, problems_file, parrot7, parrot8):
    # parrot8 as judge says "... \boxed{8}" -- neither VALID nor INVALID, so "unclear": nothing passes the judge.
    cfg = write_cfg(tmp_path, problems_file, [{"name": "seven", "model": str(parrot7)},
                                              {"name": "judge", "model": str(parrot8)}],
                    judge={"teacher": "judge", "max_new_tokens": 30}, samples=2)
    code, out = run_cli("collect", str(cfg))
    assert code == 0, out
    db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")
    judged = list(db.execute("select verdict, judge from traces where teacher='seven' and verdict='correct'"))
    assert judged and all(j == "unclear" for _, j in judged)
    assert read_jsonl(tmp_path / "run" / "corpora" / "seven.jsonl") == []
    # each verdict is stamped with who judged, how, and the problem shown: a re-run asks nothing again ...
    stamps = lambda: dict(db.execute("select row_id, judged_with from traces where judge is not null"))
    first = stamps()
    assert len(first) >= len(judged) and all(w.startswith("judge r2 ") for w in first.values())
    code, out = run_cli("collect", str(cfg))
    assert code == 0 and "asked again" not in out and stamps() == first, out
    # ... other judge settings ask every verdict again (the plan says how many first)
    code, out = run_cli("collect", str(cfg), "collect.judge.max_new_tokens=31", "--plan")
    assert code == 0 and f"and {len(first)} stored now ({len(first)} of them again" in out, out
    code, out = run_cli("collect", str(cfg), "collect.judge.max_new_tokens=31")
    assert code == 0 and f"judge: {len(first)} stored verdict(s) reached by another judge" in out, out
    assert set(stamps()) == set(first) and not set(stamps().values()) & set(first.values())
    # a store from before verdicts were stamped is judged once more
    db.execute("update traces set judged_with = null")
    db.commit()
    code, out = run_cli("collect", str(cfg))
    assert code == 0 and f"judge: {len(first)} stored verdict(s)" in out and stamps() == first, out
    # without a judge in the config, an earlier judge's verdicts filter nothing
    code, out = run_cli("collect", str(cfg), "collect.judge=null")
    assert code == 0 and len(read_jsonl(tmp_path / "run" / "corpora" / "seven.jsonl")) > 0, out


def test_a_judge_that_is_not_a_teacher_only_judges(tmp_path, problems_file, parrot7, parrot8):
    """``collect.judge.model``: its own model entry grades the teachers' traces and is never sampled itself —
    no traces, no corpus, no row in the collection table."""
    cfg = write_cfg(tmp_path, problems_file, [{"name": "seven", "model": str(parrot7)}],
                    judge={"model": {"name": "grader", "model": str(parrot8)}, "max_new_tokens": 30}, samples=2)
    code, out = run_cli("collect", str(cfg), "--plan")
    assert code == 0 and "judge: grader (judges only)" in out, out
    code, out = run_cli("collect", str(cfg))
    assert code == 0, out
    db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")
    assert {t for (t,) in db.execute("select distinct teacher from traces")} == {"seven"}
    judged = list(db.execute("select judge from traces where verdict='correct'"))
    assert judged and all(j == "unclear" for (j,) in judged)  # graded by parrot8, which never says VALID
    assert not (tmp_path / "run" / "corpora" / "grader.jsonl").exists()
    summary = json.loads((tmp_path / "run" / "collect_summary.json").read_text())
    assert [s["teacher"] for s in summary] == ["seven"]


def test_confidence_scores_stored_and_filter(tmp_path, problems_file, parrot7):
    cfg = write_cfg(tmp_path, problems_file, [{"name": "seven", "model": str(parrot7)}], samples=2,
                    confidence={"enabled": True, "window": 4})
    assert run_cli("collect", str(cfg))[0] == 0
    db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")
    vals = list(db.execute("select mean_logprob, min_window_logprob from traces"))
    assert vals and all(m is not None and w is not None and w <= m + 1e-9 for m, w in vals)
    n_all = len(read_jsonl(tmp_path / "run" / "corpora" / "seven.jsonl"))
    assert run_cli("collect", str(cfg), "collect.confidence.min_window_logprob=0.0")[0] == 0
    assert n_all > 0 and read_jsonl(tmp_path / "run" / "corpora" / "seven.jsonl") == []


@pytest.mark.parametrize("override,needle", [
    ("teachers.0.backend=quantum", "unknown teacher backend 'quantum'"),
    ("collect.style=nonsense", "unknown style 'nonsense'"),
    ("teachers.0.model=./does/not/exist", "does not exist"),
])
def test_bad_input_is_a_clear_error(tmp_path, problems_file, parrot7, override, needle):
    cfg = write_cfg(tmp_path, problems_file, [{"name": "seven", "model": str(parrot7)}])
    code, out = run_cli("collect", str(cfg), override)
    assert code == 2 and needle in out


def test_bad_problem_file_is_a_clear_error(tmp_path, parrot7):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "1"}\n{oops\n')
    cfg = write_cfg(tmp_path, bad, [{"name": "seven", "model": str(parrot7)}])
    code, out = run_cli("collect", str(cfg))
    assert code == 2 and "bad.jsonl:2" in out


def test_a_teacher_that_keeps_almost_nothing_is_warned_about(tmp_path, parrot7):
    probs = write_jsonl(tmp_path / "p.jsonl", [{"question": f"What is {i}+8?", "answer": "8"} for i in range(3)])
    cfg = write_cfg(tmp_path, probs, [{"name": "seven", "model": str(parrot7), "batch_size": 4}], samples=1)
    code, out = run_cli("collect", str(cfg))
    assert code == 0, out
    assert "teacher 'seven' kept 0 verified trace(s): too few to train on" in out


def test_samples_cut_at_the_token_limit_are_counted_warned_about_and_never_kept(tmp_path, parrot7):
    """A generation that reached ``collect.max_new_tokens`` never finished: the summary counts it (the CLI's ``cut``
    column, the report's), a warning names the setting, and it is incorrect even when its last number matches."""
    from accord.collect import verdict_of
    from accord.config import AccordConfig
    from accord.problems import Problem

    probs = write_jsonl(tmp_path / "p.jsonl", [{"question": f"What is {i}+4?", "answer": "7"} for i in range(3)])
    cfg = write_cfg(tmp_path, probs, [{"name": "seven", "model": str(parrot7), "batch_size": 4}], samples=2,
                    max_new_tokens=6)
    code, out = run_cli("collect", str(cfg))
    assert code == 0, out
    (s,) = json.loads((tmp_path / "run" / "collect_summary.json").read_text())
    assert s["cut"] == 6 and s["accuracy"] == 0
    assert "6 of 6 sample(s) (100%) reached collect.max_new_tokens=6" in " ".join(out.split())
    assert "cut" in out.split("ALL TEACHERS")[0]
    c = AccordConfig.model_validate({"problems": {"path": str(probs)}, "teachers": [
        {"name": "t", "backend": "column", "column": "x"}], "collect": {"verifier": "numeric"}})
    p = Problem("p", "What is 3+4?", "7")
    assert verdict_of(c, p, "3 + 4 = 7, and then", "default", "length")[0] == "incorrect"
    assert verdict_of(c, p, "3 + 4 = 7", "default", "stop")[0] == "correct"


def test_a_larger_max_new_tokens_continues_the_cut_samples_and_keeps_the_finished_ones(tmp_path, parrot7):
    """Raising collect.max_new_tokens: each sample cut at the old limit is continued from its stored text (the
    tokens it lacked, not a new draw), finished ones stand, no other-settings warning; --plan counts them first; a
    continuation that fails keeps the cut sample."""
    probs = write_jsonl(tmp_path / "p.jsonl", [{"question": f"What is {i}+4?", "answer": "7"} for i in range(3)])
    teachers = [{"name": "seven", "model": str(parrot7), "batch_size": 4}]
    cfg = write_cfg(tmp_path, probs, teachers, samples=2, max_new_tokens=6)
    assert run_cli("collect", str(cfg))[0] == 0
    db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")

    def stored():
        return {(p, i): (t, n, f, v, json.loads(par)["max_new_tokens"]) for p, i, t, n, f, v, par in db.execute(
            "select problem_id, sample_idx, text, token_count, finish_reason, verdict, params from traces")}

    cut = stored()
    assert len(cut) == 6 and all(f == "length" and n == 6 for _, n, f, _, _ in cut.values())
    code, out = run_cli("collect", str(cfg), "collect.max_new_tokens=40", "--plan")
    assert code == 0 and "6 of them cut at a smaller max_new_tokens, continued from their text" in out, out
    code, out = run_cli("collect", str(cfg), "collect.max_new_tokens=40")
    assert code == 0 and "6 stored sample(s) cut at a smaller max_new_tokens continue" in " ".join(out.split()), out
    assert "other settings" not in out and "generated 6 new" in out
    grown = stored()
    for k, (text, n, f, v, limit) in grown.items():
        assert text.startswith(cut[k][0]) and len(text) > len(cut[k][0]) and n > 6 and limit == 40, (k, grown[k])
        assert f == "stop" and v == "correct" and text.endswith("\\boxed{7}")
    code, out = run_cli("collect", str(cfg), "collect.max_new_tokens=40")
    assert code == 0 and "generated 0 new" in out and stored() == grown
    # a finished sample under the old limit stands; another limit change with a finished store: nothing to do
    code, out = run_cli("collect", str(cfg), "collect.max_new_tokens=50")
    assert code == 0 and "generated 0 new" in out and "other settings" not in out


def test_a_failed_continuation_keeps_the_cut_sample(tmp_path):
    from accord.collect import Prior, _store
    from accord.config import AccordConfig
    from accord.problems import Problem
    from accord.store import TraceStore
    from accord.teachers.base import Generation

    cfg = AccordConfig.model_validate({"problems": {"path": "p.jsonl"}, "teachers": [{"name": "t", "model": "m"}]})
    store = TraceStore(tmp_path / "s.sqlite")
    p = Problem("p", "What is 3+4?", "7")
    _store(cfg, store, "t", [(p, "default", 0, None)], ["q"], [Generation("3 + 4", 2, "length")], '{"a": 1}')
    _store(cfg, store, "t", [(p, "default", 0, Prior("3 + 4", 2, 0.0))], ["q"],
           [Generation("", error="down", finish_reason="error")], '{"a": 2}')
    (row,) = store.traces("t")
    assert (row["text"], row["finish_reason"], row["params"]) == ("3 + 4", "length", '{"a": 1}')
    _store(cfg, store, "t", [(p, "default", 0, Prior("3 + 4", 2, 0.0))], ["q"],
           [Generation(" = \\boxed{7}", 3, "stop")], '{"a": 2}')
    (row,) = store.traces("t")
    assert (row["text"], row["token_count"], row["verdict"], row["params"]) == ("3 + 4 = \\boxed{7}", 5, "correct",
                                                                                '{"a": 2}')


def test_the_prompt_settings_are_stored_with_each_row_and_a_change_is_warned_about(tmp_path, problems_file, parrot7):
    """A teacher's ``system_prompt`` and ``chat_template_kwargs`` change what it generates: they are recorded in each
    row's settings (only when set, so rows stored before keep theirs), and more samples after a change warn that
    the stored rows were made with other settings."""
    cfg = write_cfg(tmp_path, problems_file, [{"name": "seven", "model": str(parrot7), "batch_size": 8}], samples=1)
    code, out = run_cli("collect", str(cfg))
    assert code == 0 and "other settings" not in out, out
    db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")
    (params,) = {json.loads(r[0]).get("chat_template_kwargs", "unset") for r in db.execute("select params from traces")}
    assert params == "unset"
    code, out = run_cli("collect", str(cfg), "collect.samples=2",
                        "teachers.seven.chat_template_kwargs={enable_thinking: false}")
    assert code == 0 and "teacher 'seven': 10 stored rows were generated with other settings " \
        "(chat_template_kwargs: None → {'enable_thinking': False})" in out, out
    stored = [json.loads(r[0]) for r in db.execute("select params from traces where sample_idx = 1")]
    assert stored and all(p["chat_template_kwargs"] == {"enable_thinking": False} for p in stored)
    # a change with nothing left to generate (another model under the same name) is said too, and planned
    code, out = run_cli("collect", str(cfg), "collect.samples=2", f"teachers.seven.model={parrot7}/")
    assert code == 0 and "teacher 'seven': 20 stored rows were generated with other settings (chat_template_kwargs:" \
        f" {{'enable_thinking': False}} → None; model: '{parrot7}' → '{parrot7}/')" in out, out
    assert "they are kept and used" in out
    code, out = run_cli("collect", str(cfg), "collect.samples=2", "--plan")
    assert "10 stored rows were generated with other settings (chat_template_kwargs: {'enable_thinking': False} → " \
        "None): kept and used" in out, out


def test_which_stored_judge_verdicts_count_and_which_are_asked_again(tmp_path):
    """A verdict counts under today's judge stamp only; an imported grade always counts and is never asked again —
    also in a store from before verdicts were stamped, where only its judge text says it was imported; with no
    judge configured, an LLM verdict filters nothing. The judge's to-do list is read without any trace text."""
    from accord.collect import judge_stamps, judge_verdict, keep, to_judge
    from accord.config import AccordConfig
    from accord.problems import Problem
    from accord.store import TraceStore
    from accord.verify import IMPORTED

    problems = [Problem(f"p{i}", f"What is {i} + 1?", str(i + 1)) for i in range(2)]
    base = {"problems": {"path": "p.jsonl"}, "run_dir": str(tmp_path),
            "teachers": [{"name": "t", "model": "t"}, {"name": "j", "model": "j"}]}
    cfg = AccordConfig.model_validate({**base, "collect": {"judge": {"teacher": "j"}}})
    other = AccordConfig.model_validate({**base, "collect": {"judge": {"teacher": "j", "max_new_tokens": 64}}})
    none = AccordConfig.model_validate(base)
    now = judge_stamps(cfg, problems)
    assert judge_stamps(none, problems) is None and set(now) == {"p0", "p1"} and now["p0"] != now["p1"]
    assert judge_stamps(other, problems)["p0"] != now["p0"]  # the judge's settings are in the stamp
    cases = {  # sample_idx: (judge, judge_text, judged_with) → (counts under cfg, asked again under cfg)
        0: (("valid", "… VALID", now["p0"]), ("valid", False)),
        1: (("invalid", "… INVALID", "judge r1 0123 4567"), (None, True)),  # an older revision
        2: (("invalid", "imported grade", IMPORTED), ("invalid", False)),
        3: (("invalid", "imported grade", None), ("invalid", False)),  # imported before stamps
        4: (("invalid", "… INVALID", None), (None, True)),  # judged before stamps
        5: ((None, None, None), (None, True)),  # never judged
    }
    store = TraceStore(tmp_path / "traces.sqlite")
    rows = []
    for i, ((judge, text, stamp), _) in cases.items():
        rows.append({"problem_id": "p0", "teacher": "t", "style": "default", "sample_idx": i, "params": "{}",
                     "text": "\\boxed{1}", "verdict": "correct", "judge": judge, "judge_text": text,
                     "judged_with": stamp})
    store.put_traces(rows)
    stored = {r["sample_idx"]: r for r in store.traces("t")}
    assert {i: judge_verdict(stored[i], now) for i in cases} == {i: want[0] for i, (_, want) in cases.items()}
    todo = to_judge(cfg, store, now)
    asked = {i for i, r in stored.items() if r["row_id"] in {t["row_id"] for t in todo}}
    assert asked == {i for i, (_, want) in cases.items() if want[1]} and all("text" not in t for t in todo)
    assert [i for i in cases if keep(cfg, stored[i], now)] == [0]  # a judge configured: only its VALID passes
    assert [i for i in cases if keep(none, stored[i])] == [0, 1, 4, 5]  # no judge: only the imported grades filter
    store.close()
