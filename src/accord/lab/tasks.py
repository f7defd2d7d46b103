"""Lab tasks: seeded generators of verifiable multi-step problems, and reasoning styles.

Lab v2 families (the lab's models are trained on these):
- ``arith`` (the *target* family): a running value mod 10 through 2–4 operations, one per sentence
  (``Start at 3. Add 4. Times 2. Minus 1. Result?``; Add/Minus 1–9, Times 2,3,4,6,7,8,9); each step
  is a copy of the previous result plus one table fact.  ``arith-ood``: 5–6 operations.
  ``arith-1``: one operation, i.e. one of the 250 table facts (the student's primitive).
- ``last`` (the *general* family): the last number of a list.
- Styles (:func:`arith_trace`): ``terse`` ``(1) 3 + 4 = 7``; ``verbose`` ``(1) We have 3; adding 4
  gives 7.``; ``verify`` terse, but a share of its steps is written wrong first and corrected
  (``wait, …``); ``shifted`` ``[1] 3 plus 4 makes 7``.  A teacher's private wrong facts enter its
  traces through ``facts``.

The link-following families of lab v1 are kept as a second task (``chain``):
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache

NODES = 10  # node names are the digits 0-9
SPLIT_SIZES = {"train": 4000, "validation": 200, "test": 300}
# arith train: the first 4,000 problems are the users' (the demo collects from them), the next 4,000
# train the lab's teachers, so no teacher has seen the problems it is asked about.
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


# ------------------------------------------------------------------ arithmetic chains (lab v2 target family)

MOD = 10
OPS = ("Add", "Minus", "Times")
TIMES = (2, 3, 4, 6, 7, 8, 9)
SYMBOL = {"Add": "+", "Minus": "-", "Times": "*"}
WORD = {"Add": "plus", "Minus": "minus", "Times": "times"}


def apply_op(op: str, b: int, x: int) -> int:
    return (x + b) % MOD if op == "Add" else (x - b) % MOD if op == "Minus" else (x * b) % MOD


def operands(op: str) -> tuple[int, ...]:
    return TIMES if op == "Times" else tuple(range(1, MOD))


FACT_KINDS = tuple(f"{SYMBOL[o]}{b}" for o in OPS for b in operands(o))  # "+1" … "*9": 25 op-operand kinds


@dataclass(frozen=True)
class Arith:
    """``Start at A. Add B. Times C. Minus D. Result?`` — a running value mod 10, one operation per sentence."""

    start: int
    ops: tuple[tuple[str, int], ...]

    def values(self, facts: dict | None = None) -> list[int]:
        """The running values; ``facts`` maps (op, b, x) to a (possibly wrong) result a teacher believes."""
        out = [self.start]
        for op, b in self.ops:
            x = out[-1]
            out.append(facts.get((op, b, x), apply_op(op, b, x)) if facts else apply_op(op, b, x))
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    @property
    def hops(self) -> int:
        return len(self.ops)

    def kinds(self) -> list[str]:
        return [f"{SYMBOL[o]}{b}" for o, b in self.ops]

    def question(self) -> str:
        return f"Start at {self.start}. " + " ".join(f"{o} {b}." for o, b in self.ops) + " Result?"


def random_arith(rng: random.Random, hops: int) -> Arith:
    ops = []
    for _ in range(hops):
        op = rng.choice(OPS)
        ops.append((op, rng.choice(operands(op))))
    return Arith(rng.randrange(MOD), tuple(ops))


def _arith_step(style: str, i: int, op: str, b: int, x: int, y: int) -> str:
    if style == "terse" or style == "verify":
        return f"({i}) {x} {SYMBOL[op]} {b} = {y}"
    if style == "verbose":
        verb = {"Add": "adding", "Minus": "taking away", "Times": "multiplying by"}[op]
        return f"({i}) We have {x}; {verb} {b} gives {y}."
    if style == "shifted":
        return f"[{i}] {x} {WORD[op]} {b} makes {y}"
    raise ValueError(f"unknown lab style {style!r}")


def arith_trace(a: Arith, style: str, headers: bool = False, facts: dict | None = None,
                rng: random.Random | None = None, slip: float = 0.0) -> str:
    """A completion in ``style`` computed with ``facts`` (a teacher's beliefs; None: the true table).

    ``verify`` writes, at a share ``slip`` of its steps (drawn from ``rng``), a wrong result first and
    then corrects itself: ``(2) 7 * 2 = 6 wait, 7 * 2 = 4`` (a self-correcting teacher).
    """
    vals = a.values(facts)
    steps = []
    for i, ((op, b), x, y) in enumerate(zip(a.ops, vals, vals[1:]), start=1):
        line = _arith_step(style, i, op, b, x, y)
        if style == "verify" and rng is not None and rng.random() < slip:
            wrong = (y + rng.randrange(1, MOD)) % MOD
            line = f"({i}) {x} {SYMBOL[op]} {b} = {wrong} wait, {x} {SYMBOL[op]} {b} = {y}"
        steps.append(f"### Step {i}\n{line}" if headers else line)
    return "<think>\n" + "\n".join(steps) + "\n</think>\n\n" + f"\\boxed{{{vals[-1]}}}"


# ------------------------------------------------------------------ general family


def random_last(rng: random.Random) -> tuple[str, int]:
    """General family: the last number of a list (a skill the student has and SFT may erode)."""
    nums = [rng.randrange(NODES) for _ in range(rng.randint(3, 7))]
    return f"List: {' '.join(map(str, nums))}. Which number comes last?", nums[-1]


# ------------------------------------------------------------------ splits

_SEEDS = {"train": 11, "validation": 22, "test": 33}


def _arith(lo: int, hi: int):
    def make(rng: random.Random) -> dict:
        a = random_arith(rng, rng.randint(lo, hi))
        return {"question": a.question(), "answer": str(a.answer), "arith": a, "steps": a.hops}
    return make


def _chain(lo: int, hi: int):
    def make(rng: random.Random) -> dict:
        c = random_chain(rng, rng.randint(lo, hi), rng.randint(1, 3))
        return {"question": c.question(), "answer": str(c.answer), "chain": c, "steps": c.hops}
    return make


def _last(rng: random.Random) -> dict:
    q, a = random_last(rng)
    return {"question": q, "answer": str(a)}


@dataclass(frozen=True)
class Task:
    """A lab problem family: ``make(rng)`` draws one problem (question, answer, structure), or ``table(split)``
    lists a fixed set; ``sizes`` overrides a split's size.  A new task is one function and one line here;
    it is then ``lab:<name>[:<split>]`` everywhere a problem source is accepted."""
    name: str
    summary: str
    make: Callable[[random.Random], dict] | None = None
    table: Callable[[str], list[dict]] | None = None
    sizes: dict = field(default_factory=dict)


def _one_step_table(split: str) -> list[dict]:
    return one_step_facts(split)


TASKS = {t.name: t for t in (
    # arith train: the first 4,000 problems are the users' (the demo collects from them), the next 4,000
    # train the lab's teachers, so no teacher has seen the problems it is asked about.
    Task("arith", "a running value mod 10 through 2–4 operations (the target family)", _arith(2, 4),
         sizes={"train": 8000}),
    Task("arith-ood", "the same with 5–6 operations (length generalisation)", _arith(5, 6)),
    Task("arith-1", "every one-operation question: the table the student knows", table=_one_step_table),
    Task("chain", "follow 2–4 links through a small graph (lab v1)", _chain(2, 4)),
    Task("chain-ood", "the same with 5–6 links", _chain(5, 6)),
    Task("last", "the last number of a list (the general family: forgetting)", _last),
)}
FAMILIES = tuple(TASKS)


def one_step_facts(split: str = "test") -> list[dict]:
    """``arith-1``: every one-operation question (the 250-entry table), in a seeded order per split.

    A one-step question *is* a table fact, and the student is meant to know the whole table
    (the primitive), so this family's splits are the same 250 facts in different orders: its
    test split measures whether the table is known, not generalisation to unseen questions.
    """
    facts = [Arith(x, ((op, b),)) for op in OPS for b in operands(op) for x in range(MOD)]
    random.Random(f"arith-1:{_SEEDS[split]}").shuffle(facts)
    return [{"question": a.question(), "answer": str(a.answer), "family": "arith-1", "arith": a, "steps": 1,
             "id": f"arith-1-{split}-{i:05d}", "split": split} for i, a in enumerate(facts)]


def generate(family: str, split: str, n: int | None = None) -> list[dict]:
    """Deterministic problems of a family/split: dicts with id, question, answer and the structure."""
    task = TASKS.get(family)
    if task is None:
        raise ValueError(f"unknown lab task {family!r}; choose one of {', '.join(TASKS)}")
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown lab split {split!r}; choose one of {', '.join(SPLIT_SIZES)}")
    if task.table is not None:
        return task.table(split)[:n]
    n = n or task.sizes.get(split) or SPLIT_SIZES[split]
    taken = _texts_of_other_splits(family, split)
    rng = random.Random(f"{family}:{_SEEDS[split]}")
    rows, seen = [], set(taken)
    while len(rows) < n:
        row = {**task.make(rng), "family": family}
        if row["question"] in seen:
            continue
        seen.add(row["question"])
        row["id"] = f"{family}-{split}-{len(rows):05d}"
        row["split"] = split
        rows.append(row)
    return rows


@cache
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
        yield f"{spec} #{r['id']}", {k: v for k, v in r.items() if k not in ("chain", "arith")}
