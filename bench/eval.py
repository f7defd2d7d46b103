"""accord's evaluation against a plain batched ``model.generate`` loop on the same prompts (issue 14).

A lab model that writes traces (``--model``, default ``lab:verbose``: the lab student fine-tuned on verbose
traces, the shape of a distilled student; a micro model when the lab is not built) on 200 target problems ×
(greedy + k = 4 samples at T = 0.6), the same batch size (64) and token budget.  The reference renders the
same chat prompts, left-pads them in batches of the same size in the given order, calls
``model.generate`` and decodes the outputs (no verification, no rows written); accord runs ``evaluate()`` through its
hf backend (length-sorted batches, verification, rows written for resume).  Greedy outputs are checked equal; the
ratio is reference time / accord time (≥ 1.0: accord is no slower than the plain loop).

    python bench/eval.py [--n 200] [--k 4] [--batch 64] [--repeats 5] [--model lab:verbose]
    python bench/eval.py --device cuda --shape qwen3-0.6b --n 64 --k 1 --max-new-tokens 256 --repeats 2

``--shape`` replaces the model by a randomly initialised one of that shape (``bench/engine.py``'s shapes; the lab
tokenizer; nothing downloaded): it never writes EOS, so every row decodes ``--max-new-tokens`` tokens — a
throughput test of the generation path on a GPU (bf16 there), not of verification.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def setup(n: int, batch: int, spec: str, shape: str | None = None, device: str = "auto"):
    from accord.config import ProblemsConfig, TeacherConfig
    from accord.problems import load_problems
    from accord.teachers.base import load_generator

    if shape:
        model = random_checkpoint(shape)
    else:
        try:
            from accord.models import resolve_model

            model = resolve_model(spec)
        except (OSError, ValueError):  # not in the cache: a micro model of the shape instead
            from accord.lab.micro import build_micro

            model = tempfile.mkdtemp()
            build_micro(model, seed=0)
    gen = load_generator(TeacherConfig(name="bench", model=model, batch_size=batch, device=device))
    return gen, load_problems(ProblemsConfig(path="lab:arith:test", limit=n))


def random_checkpoint(shape: str) -> str:
    """A checkpoint directory: ``bench/engine.py``'s random ``shape`` with the lab tokenizer's special ids."""
    from engine import new_qwen3  # bench/engine.py (this script's directory is on sys.path)

    from accord.lab.tokenizer import build_tokenizer

    tok, model = build_tokenizer(), new_qwen3(shape, "cpu")
    for c in (model.config, model.generation_config):
        c.eos_token_id, c.pad_token_id = tok.eos_token_id, tok.pad_token_id
    path = tempfile.mkdtemp()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_accord(gen, probs, args) -> tuple[float, dict]:
    from accord.evaluate import evaluate
    from accord.verify import _check_math, _parse_gold

    _check_math.cache_clear()  # every run verifies from scratch (no answer cached by an earlier repeat)
    _parse_gold.cache_clear()
    with tempfile.TemporaryDirectory() as d:
        rows = Path(d) / "rows.jsonl"
        t0 = time.perf_counter()
        evaluate(gen, probs, k=args.k, temperature=0.6, greedy=True, max_new_tokens=args.max_new_tokens,
                 rows_path=rows)
        dt = time.perf_counter() - t0
        greedy = {}
        for line in rows.read_text().splitlines():
            r = json.loads(line)
            if r["mode"] == "greedy":
                greedy[r["problem_id"]] = r["output"]
    return dt, greedy


@torch.inference_mode()
def run_reference(gen, probs, args) -> tuple[float, dict]:
    from accord.prompts import render_prompt
    from accord.teachers.hf import render_chat

    model, tok = gen.model, gen.tok
    texts = [render_chat(tok, render_prompt("default", p.question)) for p in probs]
    t0 = time.perf_counter()
    greedy = {}
    for mode, reps in (("greedy", 1), ("sample", args.k)):
        jobs = [(p, t) for p, t in zip(probs, texts) for _ in range(reps)]
        for s in range(0, len(jobs), args.batch):
            part = jobs[s:s + args.batch]
            enc = tok([t for _, t in part], return_tensors="pt", padding=True, add_special_tokens=False
                      ).to(model.device)
            kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None) if mode == "greedy" else \
                dict(do_sample=True, temperature=0.6, top_p=1.0, top_k=0)
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
            texts_out = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)  # any
            if mode == "greedy":  # evaluation loop must read its outputs; only the greedy ones are compared
                for (p, _), text in zip(part, texts_out):
                    greedy[p.id] = text
    return time.perf_counter() - t0, greedy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="lab:verbose")
    ap.add_argument("--shape", choices=["qwen3-tiny", "qwen3-0.6b"], help="a random model of this shape instead")
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    args = ap.parse_args()
    gen, probs = setup(args.n, args.batch, args.model, args.shape, args.device)
    print(f"model: {args.shape or args.model} on {gen.device}, {next(gen.model.parameters()).dtype}")
    best_a = best_r = float("inf")
    for _ in range(args.repeats):
        ta, ga = run_accord(gen, probs, args)
        tr, gr = run_reference(gen, probs, args)
        best_a, best_r = min(best_a, ta), min(best_r, tr)
    same = sum(ga[p.id].strip() == gr[p.id].strip() for p in probs)
    print(f"greedy outputs equal: {same}/{len(probs)}")
    print(f"accord eval: {best_a:.1f} s, reference generate loop: {best_r:.1f} s "
          f"({len(probs)} problems × (greedy + k={args.k}))")
    print(f"eval/reference throughput ratio: {best_r / best_a:.2f}  (goal ≥ 1.0)")


if __name__ == "__main__":
    main()
