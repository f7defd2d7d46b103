import pytest
import torch

from accord.config import TeacherConfig
from accord.teachers.base import (
    Request,
    SamplingParams,
    TeacherConfigError,
    load_generator,
    truncate_at_stop,
)
from accord.teachers.hf import HFGenerator, render_chat


@pytest.fixture(scope="module")
def teacher(micro):
    return HFGenerator(TeacherConfig(name="m", model=str(micro), batch_size=4))


def direct_logprobs(model, tok, head: str, cont: str) -> list[float]:
    """Obviously-correct reference: one unpadded sequence, full logits, plain indexing."""
    h = tok(head, add_special_tokens=False)["input_ids"]
    c = tok(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([h + c], device=model.device)).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    return [lp[len(h) + i - 1, t].item() for i, t in enumerate(c)]


def test_chat_template_kwargs_reach_the_template(micro):
    """A generator's ``chat_template_kwargs`` are the chat template's variables (Qwen3's ``enable_thinking``):
    its prompts, for generating and for scoring, render with them; another generator's do not."""
    plain = HFGenerator(TeacherConfig(name="m", model=str(micro), batch_size=4))
    quiet = HFGenerator(TeacherConfig(name="q", model=str(micro), batch_size=4,
                                      chat_template_kwargs={"enable_thinking": False}))
    for g in (plain, quiet):  # a template that reads the variable, as Qwen3's does
        g.tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not "
                               "enable_thinking %}<think></think>{% endif %}{% endif %}")
    r = Request("What is 2+3?")
    assert plain._render(r) == "<user>What is 2+3?<assistant>"
    assert quiet._render(r) == "<user>What is 2+3?<assistant><think></think>"
    assert render_chat(quiet.tok, r.prompt, template_kwargs={"enable_thinking": False}) == quiet._render(r)
    out = quiet.generate([r], SamplingParams(max_new_tokens=3, temperature=0.0))[0]
    assert out.error is None and len(quiet.score([r], ["5"])[0]) == len(quiet.tok("5", add_special_tokens=False)
                                                                           ["input_ids"])


def test_score_equals_direct_transformers_logits(teacher):
    reqs = [Request("What is 2+3?", prefix="<think>\n"), Request("A much longer question about 17 and 25?"),
            Request("q", prefix="partial ")]
    conts = ["</think> The final answer is 5", "x", "hello world 123"]
    got = teacher.score(reqs, conts)
    for r, c, g in zip(reqs, conts, got):
        ref = direct_logprobs(teacher.model, teacher.tok, render_chat(teacher.tok, r.prompt, r.prefix), c)
        tol = 1e-4 if teacher.model.dtype == torch.float32 else 3e-2  # bf16 on a GPU: padded vs unpadded rounding
        assert len(g) == len(ref) and torch.allclose(torch.tensor(g), torch.tensor(ref), atol=tol)


def test_batched_greedy_equals_one_at_a_time(teacher):
    reqs = [Request("short?"), Request("a considerably longer prompt that needs padding?"), Request("mid length q")]
    p = SamplingParams(temperature=0, max_new_tokens=12)
    batched = [g.text for g in teacher.generate(reqs, p)]
    alone = [teacher.generate([r], p)[0].text for r in reqs]
    assert batched == alone


def test_sampling_is_seeded(teacher):
    reqs = [Request("q1", seed=1), Request("q2", seed=2)]
    p = SamplingParams(temperature=1.0, max_new_tokens=10, logprobs=True)
    a, b = teacher.generate(reqs, p), teacher.generate(reqs, p)
    assert [g.text for g in a] == [g.text for g in b]
    c = teacher.generate([Request("q1", seed=99), Request("q2", seed=98)], p)
    assert [g.text for g in a] != [g.text for g in c]
    assert all(g.token_logprobs is not None and len(g.token_logprobs) == g.token_count for g in a)


def test_generation_logprobs_equal_scoring_the_text(parrot7):
    t = HFGenerator(TeacherConfig(name="p", model=str(parrot7)))
    r = Request("some question")
    g = t.generate([r], SamplingParams(temperature=0, max_new_tokens=40, logprobs=True))[0]
    ref = t.score([r], [g.text])[0]  # the parrot's text re-tokenises to exactly the generated tokens
    assert len(ref) == g.token_count and torch.allclose(torch.tensor(g.token_logprobs), torch.tensor(ref), atol=1e-4)


def test_parrot_continues_prefix_and_stops_exclusive(parrot8):
    t = HFGenerator(TeacherConfig(name="p", model=str(parrot8)))
    full = t.generate([Request("any")], SamplingParams(temperature=0, max_new_tokens=40))[0]
    assert "\\boxed{8}" in full.text and full.finish_reason == "stop"
    cut = t.generate([Request("any")], SamplingParams(temperature=0, max_new_tokens=40, stop=("add",)))[0]
    assert cut.stop_string == "add" and "add" not in cut.text and full.text.startswith(cut.text)
    cont = t.generate([Request("any", prefix=cut.text)], SamplingParams(temperature=0, max_new_tokens=40))[0]
    assert (cut.text + cont.text) == full.text
    again = t.generate([Request("any")], SamplingParams(temperature=0, max_new_tokens=40, stop=("add",)))[0]
    assert again.text == cut.text and again.stop_string == "add"  # the stop criterion, built once, is reused
    assert list(t._stops) == [("add",)]


def test_truncate_and_missing_model_path(tmp_path):
    assert truncate_at_stop("a### Step 2b", ["### Step", "zz"]) == ("a", "### Step")
    with pytest.raises(TeacherConfigError, match="does not exist"):
        load_generator(TeacherConfig(name="x", model=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherConfigError, match="Hugging Face checkpoint"):
        load_generator(TeacherConfig(name="x", model=str(tmp_path / "empty")))


def test_continuations_reuse_cached_prefixes_with_the_same_results(micro):
    """CoRD-style steps (every call continues the last one's text, rows of different lengths): with the prefix
    cache the greedy text and token log-probs equal a fresh encoding's, and the cache is really hit."""
    on = HFGenerator(TeacherConfig(name="on", model=str(micro)))
    off = HFGenerator(TeacherConfig(name="off", model=str(micro), prefix_cache_mb=0))
    qs = ["Start at 3. Add 4.", "Start at 5. Times 3. Add 9. Minus 2. Result?", "Start at 1."]
    prefixes = ["<think>\n", "<think>\n(1) 5 * 3 = 5\n", "<think>\n"]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, logprobs=True)
    for _ in range(3):
        a = on.generate([Request(q, prefix=p) for q, p in zip(qs, prefixes)], params)
        b = off.generate([Request(q, prefix=p) for q, p in zip(qs, prefixes)], params)
        for x, y in zip(a, b):
            assert x.text == y.text and x.token_count == y.token_count
            assert torch.allclose(torch.tensor(x.token_logprobs), torch.tensor(y.token_logprobs), atol=1e-4)
        prefixes = [p + g.text + " " for p, g in zip(prefixes, a)]
    assert on._prefix.hits >= 6 and on._prefix.reused_tokens > 0 and off._prefix is None
    plain = on.generate([Request(q) for q in qs], params)  # no assistant prefix: never cached
    assert [g.text for g in plain] == [g.text for g in off.generate([Request(q) for q in qs], params)]


def test_prefix_cache_evicts_least_recently_used_within_its_budget():
    from accord.teachers.prefix_cache import PrefixCache

    states = lambda n: ([torch.zeros(2, n, 4)], [torch.zeros(2, n, 4)])
    c = PrefixCache(budget_bytes=64 * 25)
    c.put(list(range(10)), *states(10))
    c.put(list(range(10, 20)), *states(10))
    assert c.longest(list(range(10)) + [99])[0] == 10  # the first entry, now the most recently used… after a batch
    c.batch([list(range(10)) + [99]], width=11)
    c.put(list(range(20, 30)), *states(10))  # over budget: the least recently used (the second) goes
    assert c.longest(list(range(10, 20)))[1] is None and c.longest(list(range(10)) + [5])[0] == 10
    assert c.bytes <= c.budget


def _generate_reference(model, enc, temperature, top_p, n, stop, pad):
    """transformers' own ``generate`` with the settings the hf backend asks for."""
    kw = dict(do_sample=temperature > 0, max_new_tokens=n, pad_token_id=pad, stopping_criteria=stop)
    kw.update(dict(temperature=temperature, top_p=top_p, top_k=0) if temperature else
              dict(temperature=None, top_p=None, top_k=None))
    return model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:]


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_decoding_loop_equals_transformers_generate(teacher, temperature, top_p):
    """accord's loop draws exactly the tokens ``generate`` draws: left padding, stop strings, end ids, the same
    seeded multinomial draws (greedy, temperature, temperature + top-p)."""
    from accord.teachers.hf import _seed
    from accord.teachers.sampling import decode, supports

    assert teacher._fast and supports(teacher.model, teacher._cache_kw)
    texts = [render_chat(teacher.tok, q, "<think>\n") for q in ("Start at 3. Add 4.", "q", "a longer one: 5 * 3 + 2?")]
    enc = teacher.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(teacher.model.device)
    stop = teacher._stop_criteria(("\n", "3"))
    for n, every in ((1, 1), (5, 1), (30, 1), (30, 4), (30, 7)):  # every > 1: the accelerator's deferred check
        _seed(teacher.device, 11)
        ref = _generate_reference(teacher.model, enc, temperature, top_p, n, stop, teacher.tok.pad_token_id)
        _seed(teacher.device, 11)
        got, cache = decode(teacher.model, enc["input_ids"], enc["attention_mask"], max_new_tokens=n,
                            temperature=temperature, top_p=top_p, end_ids=teacher._end_ids(),
                            pad_id=teacher.tok.pad_token_id, stop=stop, cache_kw=teacher._cache_kw,
                            check_every=every)
        assert torch.equal(got, ref), (n, every)
        assert cache.get_seq_length() == enc["input_ids"].shape[1] + got.shape[1] - 1  # all but the last token fed


def test_top_p_filter_equals_a_per_row_reference():
    """Reference: per row, walk the tokens from the most probable, keeping each until the kept mass reaches p
    (a token is dropped only if the mass below it, in ascending order, is at most 1 − p)."""
    from accord.teachers.sampling import top_p_filter

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    for p in (0.1, 0.5, 0.9, 0.999):
        got = top_p_filter(logits.clone(), p)
        for row, out in zip(logits, got):
            probs = row.softmax(-1)
            keep = set()
            for i in sorted(range(50), key=lambda i: (probs[i].item(), i)):  # ascending, as the warper sorts
                below = sum(probs[j].item() for j in range(50) if (probs[j].item(), j) <= (probs[i].item(), i))
                if below > 1 - p + 1e-6 or i == int(row.argmax()):
                    keep.add(i)
            assert {i for i in range(50) if out[i] > -float("inf")} == keep
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_models_configured_beyond_the_loop_keep_generate(micro):
    """A generation config that turns on something the loop does not do (here a repetition penalty) sends the
    model to transformers' ``generate``, whose result the backend reads the same way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(micro))
    model.generation_config.repetition_penalty = 1.3
    t = HFGenerator(TeacherConfig(name="rp", model=str(micro)), model=model,
                    tokenizer=AutoTokenizer.from_pretrained(str(micro), padding_side="left"))
    assert not t._fast
    reqs = [Request("Start at 3. Add 4.", prefix="<think>\n"), Request("q", prefix="<think>\n")]
    a = t.generate(reqs, SamplingParams(temperature=0.0, max_new_tokens=8, logprobs=True))
    b = t.generate(reqs, SamplingParams(temperature=0.0, max_new_tokens=8, logprobs=True))  # from the prefix cache
    assert [g.text for g in a] == [g.text for g in b] and all(g.token_count <= 8 for g in a)
    again = t.generate(reqs[:1], SamplingParams(temperature=0.0, max_new_tokens=8))  # a prompt long enough to cache
    assert again[0].text == a[0].text and t._prefix.hits == 1  # generate's own cache was kept (``output_cache``)
    model.generation_config.repetition_penalty = 1.0
    assert HFGenerator(TeacherConfig(name="plain", model=str(micro)), model=model, tokenizer=t.tok)._fast


@pytest.mark.gpu
def test_decoding_loop_equals_generate_on_cuda_in_bf16(micro):
    """On a CUDA device with bf16 weights: the loop's greedy and seeded samples equal ``generate``'s."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from accord.teachers.hf import _seed
    from accord.teachers.sampling import decode

    t = HFGenerator(TeacherConfig(name="g", model=str(micro), device="cuda", dtype="bfloat16"))
    texts = [render_chat(t.tok, q, "<think>\n") for q in ("Start at 3. Add 4.", "q")]
    enc = t.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(t.device)
    for temperature in (0.0, 0.8):
        _seed(t.device, 5)
        ref = _generate_reference(t.model, enc, temperature, 0.9, 20, None, t.tok.pad_token_id)
        _seed(t.device, 5)
        got, _ = decode(t.model, enc["input_ids"], enc["attention_mask"], max_new_tokens=20, temperature=temperature,
                        top_p=0.9, end_ids=t._end_ids(), pad_id=t.tok.pad_token_id, cache_kw=t._cache_kw)
        assert torch.equal(got, ref)
