"""Micro models for tests: seconds to build, accuracy irrelevant.

``build_micro`` saves a random-weight Llama with the lab tokenizer as a standard
HF checkpoint (safetensors).  ``build_parrot`` additionally overfits it on one
fixed completion, so it answers every question with the same reasoning and
boxed answer: a teacher whose correctness the tests control.
"""

from __future__ import annotations

from pathlib import Path

import torch

from accord.lab.tokenizer import build_tokenizer


def micro_config(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, max_pos: int = 1024):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       max_position_embeddings=max_pos, tie_word_embeddings=True, rms_norm_eps=1e-5,
                       bos_token_id=None, eos_token_id=1, pad_token_id=0)


def build_micro(path: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2, tokenizer=None):
    from transformers import LlamaForCausalLM

    tok = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    cfg = micro_config(len(tok), hidden=hidden, layers=layers)
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    Path(path).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return model, tok


def build_parrot(path: str | Path, completion: str, seed: int = 0, steps: int = 120, prompt: str = "What is 3+4?"):
    """A micro model overfitted to answer with ``completion`` whatever the question."""
    model, tok = build_micro(path, seed=seed)
    torch.manual_seed(seed)
    head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    h = tok(head, add_special_tokens=False)["input_ids"]
    t = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([h + t])
    labels = torch.tensor([[-100] * len(h) + t])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(path), safe_serialization=True)
    return model, tok
