"""Every "chosen by name" list, once: training methods, teacher backends, merge operators, selection
policies, CoRD step scorers, spec schemes.  Each entry is a named record with keyword fields and its paper (mergekit's
``merge_methods/registry.py`` is the model); this module imports no torch, so ``config`` validates
against it cheaply.  Implementations are named as ``"module:attribute"`` and loaded on use
(:func:`load`), so the registry depends on nothing it lists.

Adding a method, backend, merge operator or selection policy is one implementation file plus one line
here; ``docs/architecture.md`` walks through it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


def load(ref: str):
    """``"package.module:attr"`` → the attribute (imported on first use)."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Method:
    name: str
    recipe: str  # "module:function", called as recipe(cfg, console, arg) → list of result records
    paper: str
    summary: str
    # "module:function", called as plan(cfg, arg) → [(result name, working dir, budget)]: what the recipe would
    # write and spend, read without loading anything (``accord run --plan``)
    plan: str = ""
    title: str = ""  # the paper's title, for what a trained model says of itself (its model card)


MOT = "Merge-of-Thought Distillation"
METHODS = {m.name: m for m in (
    Method("std", "accord.train.sft:std", "MoT §5 (single-teacher baseline)",
           "SFT on one teacher's corpus (std:<teacher>), or on each teacher in turn", "accord.train.sft:plan_std", MOT),
    Method("mtd", "accord.train.sft:mtd", "MoT §5 (multi-teacher baseline)", "SFT on the union of the corpora",
           "accord.train.sft:plan_mtd", MOT),
    Method("posthoc", "accord.train.posthoc:run", "MoT Table 4 (post-hoc merge)",
           "merge the finished STD students once", "accord.train.posthoc:plan", MOT),
    Method("mot", "accord.train.mot:run", "MoT §4", "teacher branches merged every round",
           "accord.train.mot:plan", MOT),
    Method("compact", "accord.train.compact:run", "COMPACT §3",
           "per-problem teacher weights from the student's own scores", "accord.train.compact:plan",
           '"The Whole Is Greater Than the Sum of Its Parts": A Compatibility-Aware Multi-Teacher CoT '
           "Distillation Framework"),
    Method("qr", "accord.train.qr:run", "QR-Distill §2",
           "a router sends paths to S cooperating students with their own tokenizers", "accord.train.qr:plan",
           "Learning from Diverse Reasoning Paths with Routing and Collaboration"),
)}


def method_choices() -> str:
    """The names ``train.method`` takes, for help texts and errors (``std:<teacher>`` after ``std``)."""
    return ", ".join(n + (", std:<teacher>" if n == "std" else "") for n in METHODS)


@dataclass(frozen=True)
class Backend:
    name: str
    impl: str | None  # "module:Class" of the generating backend; None: data only (imported columns)
    summary: str
    remote: bool = False  # behind a server: calls from several threads at once are safe and seeded per request


BACKENDS = {b.name: b for b in (
    Backend("hf", "accord.teachers.hf:HFGenerator", "transformers models in this process (accord's decoding loop)"),
    Backend("openai", "accord.teachers.openai:OpenAIGenerator", "any OpenAI-compatible server (vLLM, SGLang, APIs)",
            remote=True),
    Backend("vllm", "accord.teachers.vllm:VLLMGenerator", "vLLM's offline engine in this process"),
    Backend("column", None, "an existing corpus column (s1K-style tables), verified like generations"),
)}


@dataclass(frozen=True)
class MergeMethod:
    name: str
    sparsify: str | None  # None | "magnitude" (TIES) | "random" (DARE)
    sign_consensus: bool  # TIES' elected sign per entry
    normalize: bool  # default: divide by the sum of weights
    rescale: bool  # default: DARE's 1/density
    paper: str


MERGE_METHODS = {m.name: m for m in (
    MergeMethod("average", None, False, True, False, "MoT §4.3 Eq. 2 (weight averaging)"),
    MergeMethod("linear", None, False, True, False, "alias of average (mergekit's linear, normalised)"),
    MergeMethod("task_arithmetic", None, False, False, False, "Ilharco et al. 2023, arXiv:2212.04089"),
    MergeMethod("ties", "magnitude", True, True, False, "Yadav et al. 2023, arXiv:2306.01708"),
    MergeMethod("dare_linear", "random", False, False, True, "Yu et al. 2024, arXiv:2311.03099"),
    MergeMethod("dare_ties", "random", True, False, True, "Yu et al. 2024, arXiv:2311.03099"),
)}
LINEAR_METHODS = ("average", "linear", "task_arithmetic")


@dataclass(frozen=True)
class SelectPolicy:
    name: str
    summary: str


SELECT_POLICIES = {s.name: s for s in (
    SelectPolicy("random-correct", "one random verified trace per problem and teacher (MoT §5)"),
    SelectPolicy("all-correct", "every verified trace (QR-Distill's paths)"),
    SelectPolicy("first-correct", "the first verified trace by (style, sample index)"),
)}


@dataclass(frozen=True)
class StepScorer:
    name: str
    meta_prover: bool  # scores with the meta-prover model
    whole_trajectory: bool  # a baseline that picks among finished traces rather than step by step (§5.2.2)
    paper: str


STEP_SCORERS = {s.name: s for s in (
    StepScorer("predictive-perplexity", True, False, "CoRD §4.2 (the meta-prover's PP of the gold answer)"),
    StepScorer("random", False, True, "CoRD §5.2.2 (Random)"),
    StepScorer("max-length", False, True, "CoRD §5.2.2 (Max-length)"),
    StepScorer("binary-judgment", True, False, "CoRD §5.2.2 (the meta-prover judges each step, 4 runs)"),
)}


# scheme → plugin module for ``<scheme>:<rest>`` model specs and problem sources (see ``accord.sources``)
SCHEMES = {"lab": "accord.lab.sources"}
