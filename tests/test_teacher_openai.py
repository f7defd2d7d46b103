"""The openai backend against a real `transformers serve` and against a scripted flaky server."""

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, write_jsonl

from accord.config import TeacherConfig
from accord.teachers.base import NotSupported, Request, SamplingParams, TeacherConfigError, TeacherUnavailable
from accord.teachers.openai import OpenAIGenerator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ a real server


def serve(model) -> tuple[subprocess.Popen, str]:
    """A `transformers serve` process for ``model`` on a free local port, once it accepts connections."""
    exe = Path(sys.executable).with_name("transformers")
    if not exe.exists():
        pytest.skip("transformers CLI with serving extras not installed")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), str(model)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if proc.poll() is not None:
                pytest.fail("transformers serve exited early")
            time.sleep(0.3)
    proc.kill()
    pytest.fail("transformers serve did not start")


@pytest.fixture(scope="module")
def served_parrot(parrot7):
    proc, url = serve(parrot7)
    yield url, str(parrot7)
    proc.terminate()
    proc.wait(timeout=20)


def test_collect_from_real_transformers_serve(tmp_path, served_parrot, monkeypatch):
    base_url, model = served_parrot
    monkeypatch.setenv("ACCORD_TEST_KEY", "sk-test-never-written")
    probs = write_jsonl(tmp_path / "p.jsonl", [{"question": "What is 3+4?", "answer": "7"},
                                               {"question": "What is 4+4?", "answer": "8"}])
    cfg = {"run_dir": str(tmp_path / "run"), "problems": {"path": str(probs)},
           "teachers": [{"name": "api", "backend": "openai", "model": model, "base_url": base_url,
                         "api_key_env": "ACCORD_TEST_KEY", "max_concurrency": 2}],
           "collect": {"samples": 2, "max_new_tokens": 40}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code, out = run_cli("collect", str(p))
    assert code == 0, out
    db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")
    rows = list(db.execute("select problem_id, verdict, text, token_count from traces"))
    assert len(rows) == 4 and all("\\boxed{7}" in r[2] and r[3] > 0 for r in rows)
    assert sorted(r[1] for r in rows) == ["correct", "correct", "incorrect", "incorrect"]
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert b"sk-test-never-written" not in f.read_bytes()


# ------------------------------------------------------------------ a scripted flaky server


class Script:
    def __init__(self, statuses, delay: float = 0.0, refuse: tuple[str, ...] = ()):
        self.statuses, self.calls, self.lock, self.delay = list(statuses), 0, threading.Lock(), delay
        self.refuse = refuse  # request parameters answered with OpenAI's 400 for a reasoning model
        self.spans: list[tuple[float, float]] = []  # (start, end) of every answered request
        self.bodies: list[dict] = []  # every request's JSON body

    def next(self):
        with self.lock:
            self.calls += 1
            return self.statuses.pop(0) if self.statuses else 200


def flaky_server(script: Script):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            script.bodies.append(body)
            t0 = time.perf_counter()
            time.sleep(script.delay)  # a server's latency
            status = script.next()
            if refused := [k for k in script.refuse if k in body]:  # as OpenAI answers for o-series / GPT-5
                k = refused[0]
                msg = (f"Unsupported parameter: '{k}' is not supported with this model." if k == "max_tokens" else
                       f"Unsupported value: '{k}' does not support {body[k]} with this model.")
                payload = json.dumps({"error": {"message": msg, "type": "invalid_request_error", "param": k,
                                                "code": "unsupported_parameter"}}).encode()
                self.send_response(400)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            user = next((m for m in reversed(body.get("messages", [])) if m["role"] == "user"), {})
            if status == "empty":  # a 200 with no content at all
                status, user["content"] = 200, ""
            if status == "drop":
                self.connection.close()  # a dropped connection mid-request
                return
            if status != 200 and status != "no-logprobs":
                payload = json.dumps({"error": {"message": "busy", "type": "x"}}).encode()
                self.send_response(status)
                self.send_header("retry-after-ms", "10")
            elif "prompt" in body:  # completions with echo: one token per character, log-prob −(offset mod 3) − 1
                text = body["prompt"]
                lp = None if status == "no-logprobs" else {
                    "tokens": list(text), "text_offset": list(range(len(text))),
                    "token_logprobs": [None] + [-(o % 3) - 1.0 for o in range(1, len(text))], "top_logprobs": None}
                payload = json.dumps({"id": "1", "object": "text_completion", "created": 0, "model": "m",
                                      "choices": [{"index": 0, "text": text, "finish_reason": "length",
                                                   "logprobs": lp}]}).encode()
                self.send_response(200)
            else:
                q = user["content"]  # the question, also when an assistant prefix follows it
                msg = {"role": "assistant", "content": None} if not q else {
                    "role": "assistant", "reasoning_content": "thinking about " + q[:10], "content": "\\boxed{7}"}
                payload = json.dumps({"id": "1", "object": "chat.completion", "created": 0, "model": "m",
                                      "choices": [{"index": 0, "finish_reason": "stop", "message": msg}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 5,
                                                "total_tokens": 6}}).encode()
                self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            with script.lock:
                script.spans.append((t0, time.perf_counter()))

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


def teacher(url, retries=3):
    return OpenAIGenerator(TeacherConfig(name="api", backend="openai", model="m", base_url=url, max_retries=retries,
                                       max_concurrency=1, timeout=5))


def test_retries_429_5xx_and_dropped_connections_then_succeeds():
    script = Script([429, 503, "drop"])
    srv, url = flaky_server(script)
    try:
        g = teacher(url).generate([Request("What is 3+4?")], SamplingParams(max_new_tokens=10))[0]
    finally:
        srv.shutdown()
    assert g.error is None and script.calls == 4
    assert g.text == "<think>\nthinking about What is 3+</think>\\boxed{7}" and g.token_count == 5


def test_chat_template_kwargs_reach_the_server_beside_a_continued_prefix():
    """``chat_template_kwargs`` go to the server as ``extra_body.chat_template_kwargs`` (vLLM and SGLang read them),
    also when a prefix asks to continue the final message; a teacher without them sends neither key."""
    script = Script([])
    srv, url = flaky_server(script)
    try:
        cfg = TeacherConfig(name="api", backend="openai", model="m", base_url=url, max_concurrency=1, timeout=5,
                            chat_template_kwargs={"enable_thinking": False})
        OpenAIGenerator(cfg).generate([Request("q1"), Request("q2", prefix="so far")], SamplingParams(max_new_tokens=5))
        teacher(url).generate([Request("q3")], SamplingParams(max_new_tokens=5))
    finally:
        srv.shutdown()
    by_q = {b["messages"][0]["content"]: b for b in script.bodies}
    off = {"enable_thinking": False}
    assert by_q["q1"]["chat_template_kwargs"] == off and "continue_final_message" not in by_q["q1"]
    assert by_q["q2"]["chat_template_kwargs"] == off and by_q["q2"]["continue_final_message"]
    assert "chat_template_kwargs" not in by_q["q3"]


def test_a_servers_reasoning_is_folded_back_as_the_model_wrote_the_continuation():
    """A reasoning parser strips the think tags; folded back, the text is what the hf backend returns for the same
    request: opened once (also inside a prefix's open block, as CoRD's steps are), closed only where an answer
    follows, untouched where the content has its own tags or the prefix already closed its block."""
    from accord.teachers.openai import fold_reasoning

    assert fold_reasoning("r", "\\boxed{7}") == "<think>\nr</think>\\boxed{7}"
    assert fold_reasoning("\nr", "a") == "<think>\nr</think>a"  # the model opened it itself: no second newline
    assert fold_reasoning("cut by the token limit", "") == "<think>\ncut by the token limit"  # never closed
    step = "<think>\n### Step 1\n3 + 4 = 7\n"
    assert fold_reasoning("### Step 2\nso 7\n", "", step) == "### Step 2\nso 7\n"  # stopped at the next step
    assert fold_reasoning("done\n", "\\boxed{7}", step) == "done\n</think>\\boxed{7}"
    assert fold_reasoning("\\boxed{7}", "", step + "</think>\n\n") == "\\boxed{7}"  # the answer, taken for reasoning
    assert fold_reasoning("aside", "<think>\ninline\n</think>\n7") == "<think>\ninline\n</think>\n7"
    assert fold_reasoning(None, "7") == fold_reasoning("", "7") == "7"
    script = Script([])
    srv, url = flaky_server(script)
    try:  # through the chat endpoint: the server's reasoning continues the prefix's open block
        g = teacher(url).generate([Request("q", prefix=step)], SamplingParams(max_new_tokens=5))[0]
    finally:
        srv.shutdown()
    assert g.text == "thinking about q</think>\\boxed{7}"


def test_parameters_a_reasoning_model_refuses_are_adapted_once_with_a_warning(capsys):
    """OpenAI's reasoning models answer 400 to ``max_tokens`` (they take ``max_completion_tokens``) and to a
    temperature or stop strings they do not support: the first refusal of each is adapted for the whole run and
    said once on stderr, the request sent again, and the texts are still cut at the stop strings; a refusal of
    a parameter accord cannot do without fails the sample as before."""
    script = Script([], refuse=("max_tokens", "temperature", "stop"))
    srv, url = flaky_server(script)
    try:
        t = teacher(url, retries=0)
        params = SamplingParams(max_new_tokens=9, temperature=0.6, stop=("{7",))
        gens = t.generate([Request("What is 3+4?"), Request("What is 4+3?")], params)
        again = t.generate([Request("What is 5+2?")], params)
    finally:
        srv.shutdown()
    assert [g.error for g in gens + again] == [None] * 3
    assert all(g.text.endswith("\\boxed") and g.stop_string == "{7" for g in gens + again)  # cut afterwards
    ok = [b for b in script.bodies if not set(script.refuse) & set(b)]
    assert len(ok) == 3 and all(b["max_completion_tokens"] == 9 for b in ok)
    assert len(script.bodies) == 6  # three refusals, once each, then every request goes through first time
    err = capsys.readouterr().err
    assert err.count("refused 'max_tokens'") == 1 and "sending max_completion_tokens instead" in err
    assert err.count("refused 'temperature'") == 1 and err.count("refused 'stop'") == 1
    assert "the server's default applies" in err
    script = Script([], refuse=("messages",))
    srv, url = flaky_server(script)
    try:
        g = teacher(url, retries=0).generate([Request("q")], params)[0]
    finally:
        srv.shutdown()
    assert g.failed and "BadRequestError" in g.error and script.calls == 1


def test_a_completions_prompt_leaves_out_the_bos_the_server_adds(tmp_path):
    """The completions endpoint tokenizes the prompt text with special tokens (vLLM, SGLang): a prompt rendered
    with a local tokenizer whose template writes the BOS that encoding adds too goes without it, so the server's
    tokens start with one BOS, not two; scoring's prompt too. A tokenizer without such a BOS sends the template
    as rendered."""
    from conftest import bos_tokenizer

    from accord.lab.tokenizer import build_tokenizer
    from accord.teachers.hf import render_chat

    tok, bos = bos_tokenizer(tmp_path / "tok")
    script = Script([])
    srv, url = flaky_server(script)
    try:
        cfg = TeacherConfig(name="api", backend="openai", model="m", base_url=url, endpoint="completions",
                            tokenizer=str(tmp_path / "tok"), max_retries=0, timeout=5)
        t = OpenAIGenerator(cfg)
        t.generate([Request("What is 3+4?")], SamplingParams(max_new_tokens=4))
        t.score([Request("What is 3+4?")], [" so 7"])
        plain = tmp_path / "plain"
        build_tokenizer().save_pretrained(plain)
        OpenAIGenerator(cfg.model_copy(update={"tokenizer": str(plain)})).generate([Request("q")],
                                                                                   SamplingParams(max_new_tokens=4))
    finally:
        srv.shutdown()
    text = render_chat(tok, "What is 3+4?", "")
    sent = [b["prompt"] for b in script.bodies]
    head = text.removeprefix(tok.bos_token)
    assert text.startswith(tok.bos_token) and sent[:2] == [head, head + " so 7"]
    assert tok(sent[0])["input_ids"].count(bos) == 1  # the server's own encoding: one BOS
    assert sent[2] == render_chat(build_tokenizer(), "q", "")


def test_chat_template_kwargs_need_a_template():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="chat_template_kwargs needs a chat template"):
        TeacherConfig(name="api", backend="openai", model="m", base_url="http://x/v1", endpoint="completions",
                      chat_template_kwargs={"enable_thinking": False})
    TeacherConfig(name="api", backend="openai", model="m", base_url="http://x/v1", endpoint="completions",
                  tokenizer="lab:student", chat_template_kwargs={"enable_thinking": False})


def test_persistent_errors_mark_the_sample_failed_and_go_on():
    script = Script([500, 500, 500])  # first request exhausts 1 try + 2 retries; the second succeeds
    srv, url = flaky_server(script)
    try:
        gens = teacher(url, retries=2).generate([Request("a"), Request("b")], SamplingParams(max_new_tokens=10))
    finally:
        srv.shutdown()
    assert gens[0].failed and "500" in gens[0].error and not gens[1].failed


def test_unreachable_server_is_a_clear_error_and_keeps_what_was_collected(tmp_path, parrot7):
    port = free_port()  # nothing listens here
    probs = write_jsonl(tmp_path / "p.jsonl", [{"question": "What is 3+4?", "answer": "7"}])
    cfg = {"run_dir": str(tmp_path / "run"), "problems": {"path": str(probs)},
           "teachers": [{"name": "local", "model": str(parrot7)},
                        {"name": "api", "backend": "openai", "model": "m", "base_url": f"http://127.0.0.1:{port}/v1",
                         "max_retries": 1, "timeout": 2}],
           "collect": {"samples": 2, "max_new_tokens": 40}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code, out = run_cli("collect", str(p))
    assert code == 1 and f"cannot reach http://127.0.0.1:{port}/v1" in out and "re-run to resume" in out
    db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")
    assert db.execute("select count(*) from traces where teacher='local'").fetchone()[0] == 2


def test_failed_samples_are_retried_on_rerun(tmp_path):
    script = Script([500, 500])  # with retries=1, the first sample fails; the second succeeds
    srv, url = flaky_server(script)
    probs = write_jsonl(tmp_path / "p.jsonl", [{"question": "What is 3+4?", "answer": "7"}])
    cfg = {"run_dir": str(tmp_path / "run"), "problems": {"path": str(probs)},
           "teachers": [{"name": "api", "backend": "openai", "model": "m", "base_url": url, "max_retries": 1,
                         "max_concurrency": 1}],
           "collect": {"samples": 2}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    try:
        assert run_cli("collect", str(p))[0] == 0
        db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")
        assert sorted(r[0] for r in db.execute("select verdict from traces")) == ["correct", "failed"]
        code, out = run_cli("collect", str(p))
        assert code == 0 and "generated 1 new" in out
        assert sorted(r[0] for r in db.execute("select verdict from traces")) == ["correct", "correct"]
    finally:
        srv.shutdown()


def test_missing_api_key_variable(monkeypatch):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    with pytest.raises(TeacherConfigError, match="NOPE_KEY is not set"):
        OpenAIGenerator(TeacherConfig(name="a", backend="openai", model="m", base_url="http://x/v1",
                                    api_key_env="NOPE_KEY"))


def test_empty_output_is_stored_as_incorrect_not_a_crash(tmp_path):
    srv, url = flaky_server(Script(["empty"]))
    probs = write_jsonl(tmp_path / "p.jsonl", [{"question": "What is 3+4?", "answer": "7"}])
    cfg = {"run_dir": str(tmp_path / "run"), "problems": {"path": str(probs)},
           "teachers": [{"name": "api", "backend": "openai", "model": "m", "base_url": url, "max_concurrency": 1}],
           "collect": {"samples": 2}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    try:
        assert run_cli("collect", str(p))[0] == 0
    finally:
        srv.shutdown()
    db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")
    assert sorted(tuple(r) for r in db.execute("select text, verdict from traces")) == [
        ("", "incorrect"), ("<think>\nthinking about What is 3+</think>\\boxed{7}", "correct")]


def test_replicas_share_the_requests_and_a_dead_one_is_dropped_mid_collection(tmp_path):
    """One teacher on two replicas: requests alternate; replica B stops after its 3rd request (killed
    mid-collection); the rest goes to A; every sample is stored once, none lost, the run ends cleanly."""
    a, b = Script([]), Script([])
    srv_a, url_a = flaky_server(a)
    srv_b, url_b = flaky_server(b)

    def kill_b_after_three():
        while b.calls < 3:
            time.sleep(0.01)
        srv_b.shutdown()
        srv_b.server_close()  # connections are now refused

    killer = threading.Thread(target=kill_b_after_three, daemon=True)
    killer.start()
    probs = write_jsonl(tmp_path / "p.jsonl", [{"question": f"What is {i}+7?", "answer": "7"} for i in range(6)])
    cfg = {"run_dir": str(tmp_path / "run"), "problems": {"path": str(probs)},
           "teachers": [{"name": "api", "backend": "openai", "model": "m", "base_url": [url_a, url_b],
                         "max_retries": 1, "max_concurrency": 1, "timeout": 5}],
           "collect": {"samples": 4, "max_new_tokens": 10}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    try:
        code, out = run_cli("collect", str(p))
    finally:
        srv_a.shutdown()
    assert code == 0, out
    assert f"replica {url_b} unreachable" in out and "1 of 2 left" in out
    db = sqlite3.connect(tmp_path / "run" / "traces.sqlite")
    rows = db.execute("select problem_id, sample_idx, verdict from traces").fetchall()
    assert len(rows) == 24 and len({(r[0], r[1]) for r in rows}) == 24  # nothing lost, nothing duplicated
    assert all(r[2] == "correct" for r in rows)
    assert b.calls >= 3 and a.calls >= 24 - b.calls


def test_every_replica_gone_is_unavailable():
    port1, port2 = free_port(), free_port()
    t = OpenAIGenerator(TeacherConfig(name="api", backend="openai", model="m", max_retries=0, timeout=2,
                                    base_url=[f"http://127.0.0.1:{port1}/v1", f"http://127.0.0.1:{port2}/v1"]))
    with pytest.raises(TeacherUnavailable, match=f"127.0.0.1:{port1}/v1, http://127.0.0.1:{port2}/v1"):
        t.generate([Request("a"), Request("b")], SamplingParams(max_new_tokens=4))


def test_scoring_goes_round_the_replicas_and_an_unreachable_server_is_unavailable_not_unsupported(capsys):
    """CoRD's meta-prover scores through ``completions`` with echo + logprobs: the continuation's log-probs come
    back (the prompt's dropped); the requests share the replicas, a dead one is dropped as in generation; a server
    that cannot be reached is :class:`TeacherUnavailable` (it was reported as "cannot return prompt log-probs");
    one that answers without log-probs is :class:`NotSupported`."""
    script = Script([])
    srv, url = flaky_server(script)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    try:
        t = OpenAIGenerator(TeacherConfig(name="api", backend="openai", model="m", base_url=[dead, url],
                                          max_retries=0, timeout=5))
        req, cont = Request("What is 3+4?"), " so 7"
        head = req.prompt + "\n"  # no tokenizer: the prompt, a newline, then the continuation
        want = [-(o % 3) - 1.0 for o in range(len(head), len(head) + len(cont))]
        assert t.score([req, req, req], [cont] * 3) == [want] * 3
        assert script.calls == 3 and all(b["echo"] and b["prompt"] == head + cont for b in script.bodies)
        assert f"replica {dead} unreachable" in capsys.readouterr().err
        with pytest.raises(TeacherUnavailable, match="cannot reach"):
            OpenAIGenerator(TeacherConfig(name="api", backend="openai", model="m", base_url=dead, max_retries=0,
                                          timeout=5)).score([req], [cont])
        script.statuses = ["no-logprobs"]
        with pytest.raises(NotSupported, match="cannot return prompt log-probs"):
            teacher(url, retries=0).score([req], [cont])
    finally:
        srv.shutdown()


@pytest.mark.slow
def test_two_transformers_serve_replicas_one_killed_mid_collection(tmp_path, parrot7):
    """Two real `transformers serve` processes behind one teacher; replica B is killed once 8 rows are stored:
    the collection finishes on A with every sample stored exactly once."""
    (pa, url_a), (pb, url_b) = serve(parrot7), serve(parrot7)
    probs = write_jsonl(tmp_path / "p.jsonl", [{"question": f"What is {i}+7?", "answer": "7"} for i in range(8)])
    cfg = {"run_dir": str(tmp_path / "run"), "problems": {"path": str(probs)},
           "teachers": [{"name": "api", "backend": "openai", "model": str(parrot7), "base_url": [url_a, url_b],
                         "max_retries": 1, "max_concurrency": 1, "timeout": 30}],
           "collect": {"samples": 4, "max_new_tokens": 24}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    db_path = tmp_path / "run" / "traces.sqlite"

    def kill_b_midway():
        while True:
            try:
                if sqlite3.connect(db_path).execute("select count(*) from traces").fetchone()[0] >= 8:
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.2)
        pb.kill()

    threading.Thread(target=kill_b_midway, daemon=True).start()
    try:
        code, out = run_cli("collect", str(p))
    finally:
        pa.terminate()
        pb.kill()
    assert code == 0, out
    assert f"replica {url_b} unreachable" in out
    rows = sqlite3.connect(db_path).execute("select problem_id, sample_idx, verdict from traces").fetchall()
    assert len(rows) == 32 and len({(r[0], r[1]) for r in rows}) == 32
    assert all(r[2] == "correct" for r in rows)


def test_teachers_behind_servers_are_collected_at_once(tmp_path):
    """Two server teachers (a latency each, one request in flight per teacher): their requests overlap in time,
    the stored rows equal a one-teacher-at-a-time collection's, and a teacher whose server is gone is reported
    while the other's traces are kept."""
    probs = write_jsonl(tmp_path / "p.jsonl", [{"question": f"What is {i}+4?", "answer": "7"} for i in range(3)])
    scripts = [Script([], delay=0.1), Script([], delay=0.1)]
    servers = [flaky_server(sc) for sc in scripts]

    def config(run, teachers):
        cfg = {"run_dir": str(tmp_path / run), "problems": {"path": str(probs)}, "collect": {"samples": 2},
               "teachers": [{"name": n, "backend": "openai", "model": "m", "base_url": u, "max_concurrency": 1,
                             "max_retries": 0, "timeout": 5} for n, u in teachers]}
        p = tmp_path / f"{run}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        return p

    def rows(run):
        db = sqlite3.connect(tmp_path / run / "traces.sqlite")
        return sorted(db.execute("select teacher, problem_id, sample_idx, text, verdict from traces"))

    try:
        urls = [u for _, u in servers]
        assert run_cli("collect", str(config("both", [("a", urls[0]), ("b", urls[1])])))[0] == 0
        a, b = scripts[0].spans, scripts[1].spans
        assert len(a) == len(b) == 6
        assert max(s for s, _ in a) > min(s for s, _ in b) and max(s for s, _ in b) > min(s for s, _ in a)
        for run, (n, u) in (("one-a", ("a", urls[0])), ("one-b", ("b", urls[1]))):
            assert run_cli("collect", str(config(run, [(n, u)])))[0] == 0
        assert rows("both") == sorted(rows("one-a") + rows("one-b"))
        dead = f"http://127.0.0.1:{free_port()}/v1"
        code, out = run_cli("collect", str(config("half", [("a", urls[0]), ("gone", dead)])))
        assert code == 1 and "cannot reach" in out and "re-run to resume" in out
        assert [r[0] for r in rows("half")] == ["a"] * 6
    finally:
        for srv, _ in servers:
            srv.shutdown()
