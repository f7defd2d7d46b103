"""The hf backend's prefix cache: one CoRD-style continuation call (4 beams, each continuing an earlier call's
text by one step) with the cache against without it, in the same run.

Two shapes: the lab's model (d = 64, 2 layers: a call is mostly per-call overhead) and a randomly initialised
d = 512, 8-layer Llama with ~640-token prefixes (where re-encoding the prefix is most of a call, as on real
teachers).  Ratios are without / with (higher is better).

    python bench/prefix_cache.py [--calls 10]
"""

from __future__ import annotations

import argparse
import time


def per_call_ms(model, tok, prefix: str, calls: int, mb: int, new_tokens: int) -> float:
    from accord.config import GeneratorConfig
    from accord.teachers.base import Request, SamplingParams
    from accord.teachers.hf import HFGenerator

    g = HFGenerator(GeneratorConfig(name="bench", model="in-memory", prefix_cache_mb=mb), model=model, tokenizer=tok)
    q = "Start at 3. Add 4. Times 2. Minus 1. Result?"
    params = SamplingParams(temperature=0.6, max_new_tokens=new_tokens, stop=("### Step", "</think>"))
    g.generate([Request(q, prefix=prefix + str(i), seed=i) for i in range(4)], params)  # the previous step
    reqs = [Request(q, prefix=prefix + str(i) + " and then (2) 7 * 2 = 4\n### Step 3\n", seed=i) for i in range(4)]
    g.generate(reqs, params)  # warm-up
    t0 = time.perf_counter()
    for _ in range(calls):
        g.generate(reqs, params)
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    from accord.lab.recipe import _new_model, lab_tokenizer

    logging.set_verbosity_error()
    tok = lab_tokenizer()
    torch.manual_seed(0)
    big = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1536,
                                       num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                       max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id)).eval()
    shapes = {"lab (d=64, 2 layers)": (_new_model(tok, 64, 2, seed=0).eval(), 6, 48),
              "d=512, 8 layers": (big, 20, 16)}
    for name, (model, repeat, new) in shapes.items():
        prefix = "<think>\n" + "### Step 1\n(1) 3 + 4 = 7, and now we check it again carefully\n" * repeat
        calls = args.calls * (10 if "lab" in name else 1)  # a lab call takes milliseconds
        off = per_call_ms(model, tok, prefix, calls, 0, new)
        on = per_call_ms(model, tok, prefix, calls, 1024, new)
        n = len(tok(prefix)["input_ids"])
        print(f"{name}, ~{n}-token prefixes: {off:.1f} ms/call without, {on:.1f} ms with; "
              f"prefix-cache speed-up: {off / on:.2f}")


if __name__ == "__main__":
    main()
