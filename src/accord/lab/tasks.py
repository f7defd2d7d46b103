"""Lab tasks: seeded generators of verifiable multi-step problems, and reasoning styles.

Families (DESIGN.md §4):
- ``chain`` (the *target* family): follow 2–4 links of a partial map on the digits
  (``Links: 4>3 8>7 3>9. Start at 8 and follow 2 links. Where do you end?``), with
  distractor links that start off the path; the answer is the node reached.
  ``chain-ood`` has 5–6 links, more than any training problem (the
  out-of-distribution split).
- ``last`` (the *general* family the student already knows): the last number of
  a list; used to measure forgetting, like MoT's general-reasoning sets.

Splits are fixed: each (family, split) has its own seed and size, and a problem's
text is unique across the train / validation / test splits of a family.

Reasoning styles (one per teacher, each can also write CoRD ``### Step N`` headers):
- ``terse``:   ``(1) 8>7``;
- ``verbose``: ``(1) at 8, the link goes to 7.``;
- ``verify``:  terse forward pass, then a backward check ``check: 9<7 7<8 ok``;
- ``shifted``: another notation and layout (``[1] 8 => 7``), the
  distribution-shifted teacher (the R1 analogue of MoT): nothing the student or
  the other teachers write looks like it.  (A result-first ``7<8`` notation was
  not learnable in the CPU budget: it asks for the link's target before its
  source is written down; 21% greedy at best.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

NODES = 10  # node names are the digits 0-9
SPLIT_SIZES = {"train": 4000, "validation": 200, "test": 300}
FAMILIES = ("chain", "chain-ood", "last")
STYLE_NAMES = ("terse", "verbose", "verify", "shifted")


@dataclass(frozen=True)
class Chain:
    """A walk along ``links`` (a partial function on digits) from ``start`` for ``len(path)-1`` hops."""

    path: tuple[int, ...]  # start, then each node reached
    links: tuple[tuple[int, int], ...]  # every link in the question, in question order (path links + distractors)

    @property
    def answer(self) -> int:
        return self.path[-1]

    @property
    def hops(self) -> int:
        return len(self.path) - 1

    def question(self) -> str:
        links = " ".join(f"{a}>{b}" for a, b in self.links)
        return f"Links: {links}. Start at {self.path[0]} and follow {self.hops} links. Where do you end?"


def random_chain(rng: random.Random, hops: int, distractors: int = 0) -> Chain:
    nodes = rng.sample(range(NODES), min(NODES, hops + 1 + distractors))
    path = tuple(nodes[: hops + 1])
    links = [(path[i], path[i + 1]) for i in range(hops)]
    for src in nodes[hops + 1:]:  # distractor links start at nodes off the path, so the walk stays unique
        links.append((src, rng.choice([n for n in range(NODES) if n != src])))
    rng.shuffle(links)
    return Chain(path, tuple(links))


# ------------------------------------------------------------------ reasoning styles


def _step_lines(c: Chain, style: str) -> list[str]:
    lines = []
    for i in range(c.hops):
        a, b, tag = c.path[i], c.path[i + 1], f"({i + 1})"
        if style in ("terse", "verify"):
            lines.append(f"{tag} {a}>{b}")
        elif style == "verbose":
            lines.append(f"{tag} at {a}, the link goes to {b}.")
        elif style == "shifted":
            lines.append(f"[{i + 1}] {a} => {b}")
        elif style == "shifted-v5":  # the old notation: only in the frozen tokenizer corpus
            lines.append(f"{tag} {b}<{a}")
        else:
            raise ValueError(f"unknown lab style {style!r}")
    return lines


def _check_lines(c: Chain) -> list[str]:
    back = [f"{c.path[i + 1]}<{c.path[i]}" for i in range(c.hops - 1, -1, -1)]
    return ["check: " + " ".join(back) + " ok"]


def chain_trace(c: Chain, style: str, headers: bool = False) -> str:
    """A correct completion in ``style``; with ``headers`` each step opens with ``### Step N``."""
    steps = _step_lines(c, style)
    if headers:
        steps = [f"### Step {i + 1}\n{s}" for i, s in enumerate(steps)]
    body = steps + (_check_lines(c) if style == "verify" else [])
    return "<think>\n" + "\n".join(body) + "\n</think>\n\n" + f"\\boxed{{{c.answer}}}"


def answer_only(answer: int | str) -> str:
    return f"<think>\n</think>\n\n\\boxed{{{answer}}}"


# ------------------------------------------------------------------ general family


def random_last(rng: random.Random) -> tuple[str, int]:
    """General family: the last number of a list (a skill the student has and SFT may erode)."""
    nums = [rng.randrange(NODES) for _ in range(rng.randint(3, 7))]
    return f"List: {' '.join(map(str, nums))}. Which number comes last?", nums[-1]


# ------------------------------------------------------------------ splits

_SEEDS = {"train": 11, "validation": 22, "test": 33}


def _steps_for(family: str, rng: random.Random) -> int:
    return rng.randint(5, 6) if family == "chain-ood" else rng.randint(2, 4)


def generate(family: str, split: str, n: int | None = None, distractor_rate: float = 0.3) -> list[dict]:
    """Deterministic problems of a family/split: dicts with id, question, answer and the structure."""
    if family not in FAMILIES:
        raise ValueError(f"unknown lab task {family!r}; choose one of {', '.join(FAMILIES)}")
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown lab split {split!r}; choose one of {', '.join(SPLIT_SIZES)}")
    n = n or SPLIT_SIZES[split]
    taken = _texts_of_other_splits(family, split)
    rng = random.Random(f"{family}:{_SEEDS[split]}")
    rows, seen = [], set(taken)
    while len(rows) < n:
        if family == "last":
            q, a = random_last(rng)
            row = {"question": q, "answer": str(a), "family": family}
        else:
            c = random_chain(rng, _steps_for(family, rng), rng.randint(1, 3))
            row = {"question": c.question(), "answer": str(c.answer), "family": family, "chain": c,
                   "steps": c.hops}
        if row["question"] in seen:
            continue
        seen.add(row["question"])
        row["id"] = f"{family}-{split}-{len(rows):05d}"
        row["split"] = split
        rows.append(row)
    return rows


@lru_cache(maxsize=None)
def _texts_of_other_splits(family: str, split: str) -> frozenset[str]:
    """Evaluation splits must never overlap training: later splits exclude earlier ones' texts."""
    order = ["test", "validation", "train"]
    out: set[str] = set()
    for other in order[: order.index(split)]:
        out |= {r["question"] for r in generate(family, other)}
    return frozenset(out)


def lab_rows(spec: str) -> Iterable[tuple[str, dict]]:
    """Problem source ``lab:<task>[:<split>]`` (default split: test)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        from accord.problems import ProblemSourceError

        raise ProblemSourceError(f"{spec}: lab sources look like lab:<task>[:<split>], e.g. lab:chain:test")
    family, split = parts[1], parts[2] if len(parts) == 3 else "test"
    try:
        rows = generate(family, split)
    except ValueError as e:
        from accord.problems import ProblemSourceError

        raise ProblemSourceError(f"{spec}: {e}") from None
    for r in rows:
        yield f"{spec} #{r['id']}", {k: v for k, v in r.items() if k != "chain"}
