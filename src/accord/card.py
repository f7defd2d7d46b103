"""A model card (``README.md`` in the Hugging Face Hub's format) in every trained model's directory, as TRL's
trainers write one when they save: what the model is, how it was trained — the method and its paper, the student
it started from, the teachers whose traces it learned, every setting a re-run must match, the versions — and,
once ``accord report`` has run, how it scored, each rate with its standard error and its paired difference from
the base student.  A user who uploads the directory (``huggingface-cli upload``) uploads the card with it.

Choices:

- The YAML header is huggingface_hub's :class:`~huggingface_hub.ModelCardData` (``library_name``,
  ``pipeline_tag``, ``tags``); ``base_model`` only when the student is named by a Hub id (``org/name`` and not a
  path on this machine): a local path or a lab model would fail the Hub's check of that field.
- No results in the header's ``model-index``: the Hub's schema has no place for a standard error, and accord
  prints no rate without one.  The evaluation is a table in the text.
- :func:`accord.train.common.write_result` writes the card when a method finishes; ``accord report`` writes it
  again with the evaluation (:func:`accord.analysis.report.card_evaluations`).  Written atomically, by process 0.
- Nothing secret: teachers by name, backend and model — never a ``base_url``, a key or its variable's name; the
  problems by their source path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from accord.registry import METHODS

CARD = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(model: str) -> str | None:
    """``model`` when it names a Hub repository (``org/name``) rather than a path here or a lab model."""
    return model if _HUB_ID.match(model) and not Path(model).exists() else None


def student_spec(cfg, rec: dict) -> str:
    """The student ``rec``'s model started from, as the config names it (a QR student's own entry of
    ``qr.students``; its record keeps the resolved local path)."""
    own = [s.model for s in cfg.qr.students if s.label() == rec.get("student")] if rec.get("student") else []
    return own[0] if own else rec.get("base_model") or cfg.student.model


def md_cell(x) -> str:
    """A config-given string in a Markdown table cell: pipes escaped, one line."""
    return str(x).replace("|", "\\|").replace("\n", " ")


def card_text(cfg, rec: dict, evaluation: str | None = None) -> str:
    """The card of the model that ``rec`` (a ``result.json`` record) names, with ``evaluation`` (Markdown, from
    the report) as its evaluation section."""
    from huggingface_hub import ModelCardData

    method = METHODS.get(rec.get("method", ""))
    base = student_spec(cfg, rec)
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", base_model=hub_id(base),
                         tags=["accord", "distillation", "reasoning", *([method.name] if method else [])])
    teachers = {t.name: (t.backend, t.model or t.column or "–") for t in cfg.teachers}
    rows = ["| " + " | ".join(md_cell(c) for c in (n, *teachers.get(n, ("–", "–")))) + " |"
            for n in rec.get("teachers", [])]
    facts = [f"- **Method:** `{rec.get('method', '?')}`"
             + (f" — {method.summary} ({method.paper} of *{method.title}*)" if method else ""),
             f"- **Started from:** `{base}`",
             f"- **Problems:** `{cfg.problems.path}`"
             + (f", {rec['examples']:,} training examples" if rec.get("examples") else ""),
             f"- **Optimizer steps:** {rec['branch_steps']:,} (summed over branches)" if rec.get("branch_steps")
             else None,
             f"- **Seed:** {rec['seed']}" if "seed" in rec else None,
             f"- **Variant:** `train.tag: {rec['tag']}`" if rec.get("tag") else None,
             "- **Checkpoint:** the one with the best greedy accuracy on the validation split"
             if rec.get("last") and rec.get("last") != rec.get("final") else None]
    prov = rec.get("provenance") or {}
    parts = [f"---\n{data.to_yaml()}\n---\n",
             f"# {rec.get('name', 'model')}\n",
             "A student model distilled from the reasoning traces of "
             f"{len(rows) or 'several'} teacher{'s' if len(rows) != 1 else ''} with accord "
             "(multi-teacher reasoning distillation).\n",
             "## Training\n", "\n".join(f for f in facts if f) + "\n"]
    if rows:
        parts += ["| teacher | backend | model |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n"]
    if rec.get("trained_with"):
        parts += ["Settings (what a re-run must match to count as the same model; `accord config --schema` explains "
                  "each):\n", "```yaml\n" + yaml.safe_dump(rec["trained_with"], sort_keys=True).rstrip() + "\n```\n"]
    if prov:
        parts += ["Trained with " + ", ".join(f"{k} {v}" for k, v in prov.items() if k != "device")
                  + (f" on {prov['device']}" if prov.get("device") else "") + ".\n"]
    parts += ["## Evaluation\n", (evaluation.rstrip() + "\n") if evaluation else
              "Not evaluated yet: `accord eval CONFIG` then `accord report CONFIG` write the figures here.\n"]
    parts += ["## Use\n", "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
              "path = \"<this directory or its Hub id>\"\ntok = AutoTokenizer.from_pretrained(path)\n"
              "model = AutoModelForCausalLM.from_pretrained(path)\n```\n"]
    return "\n".join(parts)


def write_card(cfg, rec: dict, evaluation: str | None = None) -> Path | None:
    """The card in ``rec["final"]`` (written atomically); None when that directory is not here, or when accord did
    not train the model (``accord eval --models NAME=PATH`` evaluates a directory it must leave as it is)."""
    final = Path(rec.get("final") or "")
    if rec.get("method") not in METHODS or not rec.get("final") or not final.is_dir():
        return None
    tmp = final / f".{CARD}.tmp.{os.getpid()}"
    tmp.write_text(card_text(cfg, rec, evaluation), encoding="utf-8")
    tmp.replace(final / CARD)
    return final / CARD
