"""Post-training drift (``specs/diagnostics.md`` §6 item 7; COMPACT §4.3, Fig. 4): how far each trained model's
representations moved from the base student's, on the target task and off it.

``accord drift CONFIG`` takes the first ``--problems`` problems of every evaluation split, renders each prompt as
evaluation does (``render_prompt`` and the model's chat template with the generation prompt) and reads, at every
decoder layer, the hidden state of the last prompt token — the state the answer is generated from.  Per layer
and split a PCA of the base student's states (centred, top ``r`` components by SVD) gives U_r; a trained
model's drift there is U_rᵀ(mean H^θ − mean H⁰): its shift along PC1 and PC2, reported separately as the spec
asks, and their norm, each with a standard error (paired over the prompts, which both models read).
COMPACT reads a small shift on general data as less forgetting.

Choices where the paper is silent:

- One vector per prompt, the last prompt token's state (not a mean over tokens: the prompts' lengths differ by
  family, and that state is what decoding starts from).  Layers are the decoder blocks' outputs (transformers'
  ``hidden_states[1:]``, the embeddings left out).
- r = 2 by default (PC1/PC2, Fig. 4); the magnitudes are absolute values in the base's own units (no scaling by
  the PC's variance), so layers of one model compare, and models on one layer compare.
- The base of a QR student is its own base model (its result's ``base_model``); every other model's is
  ``student.model``.  Results go to ``<run_dir>/analysis/drift.json`` and ``drift.png``, with the weights each
  model's drift was read from (``weights``: the checkpoint's and its base's digests); the report shows them,
  leaving out (and naming) a model trained again since.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from accord.analysis.interpolate import pair_weights
from accord.errors import UsageError
from accord.evaluate import check_eval_splits, split_problems
from accord.models import load_model_and_tokenizer, local_model_dir
from accord.prompts import render_prompt
from accord.teachers.hf import render_chat
from accord.train.engine import length_mask, pad_rows
from accord.ui import progress


@torch.no_grad()
def prompt_states(model, tok, questions: list[str], batch: int = 16,
                  template_kwargs: dict | None = None) -> list[torch.Tensor]:
    """Per decoder layer, [N, d] float32: the hidden state of each question's last prompt token."""
    model.eval()
    dev = next(model.parameters()).device
    ids = [tok(render_chat(tok, render_prompt("default", q), template_kwargs=template_kwargs),
               add_special_tokens=False)["input_ids"]
           for q in questions]
    out: list[list[torch.Tensor]] = []
    for s in range(0, len(ids), batch):
        part = ids[s:s + batch]
        x = pad_rows(part, tok.pad_token_id if tok.pad_token_id is not None else 0)
        mask = length_mask([len(r) for r in part], x.shape[1])
        hs = model(input_ids=x.to(dev), attention_mask=mask.to(dev), output_hidden_states=True,
                   use_cache=False).hidden_states[1:]
        last = torch.tensor([len(r) - 1 for r in part], device=dev)
        rows = torch.arange(len(part), device=dev)
        for k, h in enumerate(hs):
            if len(out) <= k:
                out.append([])
            out[k].append(h[rows, last].float().cpu())
    return [torch.cat(x) for x in out]


def components(h0: torch.Tensor, r: int) -> torch.Tensor:
    """[d, r]: the base states' top ``r`` principal directions (orthonormal columns)."""
    _, _, vh = torch.linalg.svd(h0 - h0.mean(0), full_matrices=False)
    return vh[:r].T


def shift(h0: torch.Tensor, h: torch.Tensor, u: torch.Tensor) -> dict[str, list[float]]:
    """|U_rᵀ(mean H − mean H⁰)| per component, with its standard error — paired, as the two models read the
    same prompts: the sample standard deviation of the per-prompt projected differences over √N."""
    d = (h - h0) @ u  # [N, r]: each prompt's shift along each component
    se = d.std(0) / d.shape[0] ** 0.5 if d.shape[0] > 1 else torch.zeros(d.shape[1])
    return {"shift": d.mean(0).abs().tolist(), "se": se.tolist()}


def run(cfg, console, finished: list[dict], models: list[str] | None = None, problems: int = 100,
        rank: int = 2) -> dict:
    """Drift of every finished model (``finished``: :func:`accord.run.finished_results`; or those of it named by
    ``models``) from its base on every evaluation split; writes and returns ``<run_dir>/analysis/drift.json`` (and
    ``drift.png``)."""
    if problems < 2 or rank < 1:
        raise UsageError("--problems must be at least 2 and --rank at least 1")
    results = {r["name"]: r for r in finished}
    if models:
        missing = [m for m in models if m not in results]
        if missing:
            raise UsageError(f"drift: no finished training for {', '.join(missing)} in "
                             f"{Path(cfg.run_dir) / 'train'} (trained: {', '.join(results) or 'none'})")
        results = {m: results[m] for m in models}
    if not results:
        raise UsageError(f"drift: nothing is trained in {Path(cfg.run_dir) / 'train'} (run `accord train` first)")
    check_eval_splits(cfg)  # the questions it reads states on are the evaluation's
    questions = {s: [p.question for p in split_problems(cfg, s)[:problems]] for s in cfg.eval.splits}
    student = str(local_model_dir(cfg.student.model, "student"))
    bases: dict[str, dict] = {}
    out: dict = {"problems": {s: len(q) for s, q in questions.items()}, "rank": rank, "models": {}, "weights": {}}
    with progress(console) as bar:
        task = bar.add_task("drift", total=len(results))
        for name, rec in results.items():
            base = rec.get("base_model") or student
            if base not in bases:  # each base's states and components, once
                bases[base] = {s: (h, [components(x, min(rank, *x.shape)) for x in h])
                               for s, h in _states(cfg, base, "base student", questions).items()}
            states = _states(cfg, rec["final"], f"{name} checkpoint", questions)
            out["weights"][name] = pair_weights(cfg, rec)
            out["models"][name] = {s: [shift(h0, h, u) for h0, h, u in zip(bases[base][s][0], states[s],
                                                                           bases[base][s][1])]
                                   for s in questions}
            bar.update(task, advance=1, description=f"drift {name}")
    splits = list(questions)
    out["table"] = {"head": ["model"] + [f"{s}: last-layer shift" for s in splits],  # for the report, as printed
                    "body": [[name] + ["{:.3f} ± {:.3f}".format(*norm(by[s][-1])) if by[s] else "–" for s in splits]
                             for name, by in out["models"].items()]}
    path = Path(cfg.run_dir) / "analysis" / "drift.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    plot(out, path.with_suffix(".png"))
    for line in summary(out):
        console.print(line)
    console.print(f"drift: {path} and {path.with_suffix('.png')} (and in the report: accord report CONFIG)")
    return out


def _states(cfg, path: str, who: str, questions: dict[str, list[str]]) -> dict[str, list[torch.Tensor]]:
    model, tok = load_model_and_tokenizer(path, cfg.student.device, "float32", cfg.student.trust_remote_code, who=who,
                                          attention=cfg.student.attention)
    try:
        return {s: prompt_states(model, tok, q, template_kwargs=cfg.student.chat_template_kwargs)
                for s, q in questions.items()}
    finally:
        del model


def norm(v: dict) -> tuple[float, float]:
    """A layer's shift as (‖shift‖ over the components, its standard error by the delta method)."""
    n = sum(x * x for x in v["shift"]) ** 0.5
    if n == 0:
        return 0.0, sum(e * e for e in v["se"]) ** 0.5
    return n, (sum((x / n * e) ** 2 for x, e in zip(v["shift"], v["se"]))) ** 0.5


def summary(out: dict) -> list[str]:
    """One line per model: each split's drift at the last layer, ± its standard error."""
    lines = []
    for name, by in out["models"].items():
        parts = ["{} {:.3f} ± {:.3f}".format(s, *norm(layers[-1])) for s, layers in by.items() if layers]
        lines.append(f"drift {name} (last layer): " + ", ".join(parts))
    return lines


def plot(out: dict, path: Path) -> Path | None:
    """One panel per split: each model's drift norm (PC1–PCr) against the layer."""
    if not out["models"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(out["problems"])
    fig, axes = plt.subplots(1, len(splits), figsize=(3.6 * len(splits) + 1.6, 3.4), dpi=110, squeeze=False)
    for ax, s in zip(axes[0], splits):
        for name, by in out["models"].items():
            ys, es = zip(*(norm(v) for v in by[s])) if by[s] else ((), ())
            ax.errorbar(range(1, len(ys) + 1), ys, yerr=es, marker="o", ms=3, lw=1.3, capsize=2, label=name)
            ax.set_xticks(range(1, len(ys) + 1))
        ax.set_title(f"{s} ({out['problems'][s]} prompts)", fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"‖shift along PC1–PC{out['rank']}‖")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
