"""What lean layers (``train.lean_layers``) and master weights (``train.master_weights``) save: bytes autograd
keeps for the backward per token per layer, with and without each, at a Qwen3 shape's layer widths under bf16
autocast (as on a GPU), on the CPU.

The figure is the slope between two sequence lengths, so autocast's bf16 copies of the weights — a fixed cost of
a forward, the same either way — drop out.  Two layers and a small vocabulary keep it quick; the per-layer
activations do not depend on either.

    python bench/lean.py [--shape qwen3-0.6b] [--tokens 256 1280]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from engine import SHAPES  # bench/engine.py's shapes
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from accord.train import lean
    from accord.train.master import MasterWeights

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--tokens", type=int, nargs=2, default=[256, 1280])
    args = ap.parse_args()
    layers = 2
    shape = {**SHAPES[args.shape], "vocab_size": 256, "num_hidden_layers": layers}
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**shape, max_position_embeddings=8192, tie_word_embeddings=True))
    per = {}
    for master in (False, True):
        for on in (False, True):
            got = []
            masters = MasterWeights([model], master)  # float32 weights → bf16 copies (their masters kept)
            for n in args.tokens:
                ids = torch.randint(0, 256, (1, n))

                def run(ids=ids):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        return model(input_ids=ids, labels=ids).loss

                with lean.lean_layers(model, on):
                    got.append(lean.saved_bytes(model, run))
            masters.close()
            per[master, on] = (got[1] - got[0]) / (args.tokens[1] - args.tokens[0]) / layers / 1024
            fixed = (got[0] - per[master, on] * 1024 * layers * args.tokens[0]) / 2**20
            print(f"master_weights {str(master).lower():5s} lean_layers {str(on).lower():5s}: "
                  f"{per[master, on]:6.1f} KiB per token per layer (+ {fixed:.1f} MiB fixed)")
    print(f"shape {args.shape} (hidden {shape['hidden_size']}, MLP {shape['intermediate_size']}), bf16 autocast")
    print(f"lean/plain saved-bytes-per-token ratio: {per[False, True] / per[False, False]:.3f}")
    print(f"master/plain saved-bytes-per-token ratio: {per[True, False] / per[False, False]:.3f}")
    print(f"master+lean/plain saved-bytes-per-token ratio: {per[True, True] / per[False, False]:.3f}")


if __name__ == "__main__":
    main()
