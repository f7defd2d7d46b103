"""CoRD's step-wise collaborative decoding (§3, §4.3) and the curation baseline (§5).

Beam search over steps: every beam's prefix is offered to every teacher, each
proposes its next step (through ``Generator.generate`` with an assistant prefix, so
``hf``, ``openai`` and ``vllm`` teachers mix); the B×K extended prefixes are
scored (``score.Scorer``, all beams of a step in one call) and the top B kept.  Identical extended prefixes are
merged (the step's credit is shared by the teachers that proposed it).  Greedy
is B = 1.  A trajectory ends at ``</think>`` or when its token budget is spent
(then ``</think>`` is appended); the teacher of its last step writes the final
answer.  Finished trajectories stay in the pool and compete on their score.

Choices where the paper is silent: a failed proposal is dropped for that step
and counted; if no proposal survives, the beam ends as if its budget were spent;
the returned trajectory is the finished one with the highest score; budgets are
counted in the proposing teachers' tokens; equal scores are ordered by a draw
seeded by (seed, problem, step) — list order would favour the first-listed
teacher and bias hit rates under binary judgment; every proposal's sampling
seed mixes (seed, problem, teacher, beam, step), so beams and problems never
share noise.  Curation is held to CoRD's budget: each roll-out reasons up to
``think_tokens`` (stopping at ``</think>``), is force-closed, and then writes its
answer greedily in ``answer_tokens``, exactly as a CoRD trajectory is finished.
Teachers behind a server (the ``openai`` backend) are asked at once, from threads
(``each_teacher``): a step waits for the slowest, not for their sum; in-process
teachers are asked one after another, and the results are the same either way.
"""

from __future__ import annotations

import random
import time
import zlib
from dataclasses import dataclass, field

from accord.cord.segment import step_lead, stop_strings
from accord.prompts import THINK_CLOSE, THINK_OPEN
from accord.teachers.base import Request, SamplingParams, served

THINK_PREFIX = THINK_OPEN + "\n"  # what a CoRD trajectory starts with: the think tag and its newline


@dataclass
class Beam:
    text: str = ""  # reasoning after "<think>\n", up to (not including) </think>
    steps: list[tuple[tuple[str, ...], str]] = field(default_factory=list)  # (teachers credited, step text)
    score: float = float("-inf")
    tokens: int = 0
    done: bool = False
    budget_hit: bool = False
    last_stop: str | None = None


@dataclass
class Trajectory:
    text: str  # the full completion: <think>…</think> + answer
    reasoning: str
    answer_text: str
    steps: list[tuple[tuple[str, ...], str]]
    score: float
    writer: str  # teacher of the last step, who wrote the answer
    budget_hit: bool
    tokens: int


@dataclass
class CordSettings:
    beam: int = 4
    segmentation: str = "prompt"
    max_steps: int = 32
    step_tokens: int = 256
    think_tokens: int = 4096
    answer_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Timing:
    generation_s: float = 0.0
    failures: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)  # per decoding step: [generation s, scoring s, candidates]


def each_teacher(teachers: dict, fn) -> list:
    """``[fn(k, name, teacher) for the teachers in order]``.  Teachers behind a server (``Backend.remote``) are
    called at once, from threads, so a step waits for the slowest of them rather than their sum; in-process
    ones (hf, vllm) run one after another in this thread — they share this process's compute and the torch
    generator their sampling is seeded on."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = list(enumerate(teachers.items()))  # (k, (name, teacher))
    remote = [k for k, (_, t) in jobs if served(getattr(t, "cfg", None))]
    if len(remote) < 2:
        return [fn(k, name, t) for k, (name, t) in jobs]
    out: list = [None] * len(jobs)
    with ThreadPoolExecutor(max_workers=len(remote)) as pool:
        futures = {k: pool.submit(fn, k, *jobs[k][1]) for k in remote}
        for k, (name, t) in jobs:
            if k not in futures:
                out[k] = fn(k, name, t)
        for k, f in futures.items():
            out[k] = f.result()
    return out


def _temperature(teacher, cs: CordSettings) -> float:
    """The teacher's own sampling temperature (the homogeneous-teacher setup), else CoRD's."""
    t = getattr(getattr(teacher, "cfg", None), "temperature", None)
    return cs.temperature if t is None else t


def _propose(teachers: dict, prompt: str, beams: list[Beam], cs: CordSettings, step_no: int, timing: Timing,
             seed: int) -> list[tuple[int, str, str, object]]:
    """(beam index, teacher, step text, generation) for every successful proposal."""
    stops = tuple(stop_strings(cs.segmentation))
    leads = [step_lead(cs.segmentation, step_no, b.last_stop) for b in beams]

    def ask(k, name, teacher):
        reqs = [Request(prompt, prefix=THINK_PREFIX + b.text + lead, seed=mix_seed(seed, prompt, k, i, step_no))
                for i, (b, lead) in enumerate(zip(beams, leads))]
        params = SamplingParams(temperature=_temperature(teacher, cs), top_p=cs.top_p,
                                max_new_tokens=cs.step_tokens, stop=stops)
        try:
            return teacher.generate(reqs, params), None
        except Exception as e:  # noqa: BLE001 — a teacher down mid-decoding: drop its proposals, go on
            return None, e

    t0 = time.perf_counter()
    answers = each_teacher(teachers, ask)
    timing.generation_s += time.perf_counter() - t0
    out = []
    for (name, _), (gens, err) in zip(teachers.items(), answers):
        if err is not None:
            timing.failures[name] = timing.failures.get(name, 0) + len(beams)
            timing.failures.setdefault("_errors", []).append(f"{name}: {err}")
            continue
        for i, g in enumerate(gens):
            if g.failed:
                timing.failures[name] = timing.failures.get(name, 0) + 1
                continue
            out.append((i, name, leads[i] + g.text, g))
    return out


def _extend(b: Beam, teachers: tuple[str, ...], step: str, g, cs: CordSettings, score: float) -> Beam:
    nb = Beam(text=b.text + step, steps=b.steps + [(teachers, step)], score=score, tokens=b.tokens + g.token_count,
              last_stop=g.stop_string)
    if g.stop_string == THINK_CLOSE:
        nb.done = True
    elif nb.tokens >= cs.think_tokens or len(nb.steps) >= cs.max_steps:
        nb.done = nb.budget_hit = True
    return nb


def beam_search(teachers: dict, scorer, prompt: str, answer: str, cs: CordSettings, timing: Timing) -> Beam:
    beams = [Beam()]
    for step_no in range(1, cs.max_steps + 1):
        active = [b for b in beams if not b.done]
        if not active:
            break
        g0, s0 = timing.generation_s, getattr(scorer, "seconds", 0.0)
        props = _propose(teachers, prompt, active, cs, step_no, timing, cs.seed)
        merged: dict[str, tuple[int, list[str], str, object]] = {}
        for i, name, step, g in props:  # identical extended prefixes are one candidate
            key = active[i].text + step
            if key in merged:
                merged[key][1].append(name)
            else:
                merged[key] = (i, [name], step, g)
        cands = [[(names, step, g) for (j, names, step, g) in merged.values() if j == i] for i in range(len(active))]
        scores = iter(score_groups(scorer, prompt, [(THINK_PREFIX + b.text, [c[1] for c in cs_])
                                                    for b, cs_ in zip(active, cands) if cs_], answer))
        pool = [b for b in beams if b.done]
        for b, cs_ in zip(active, cands):
            if not cs_:
                b.done = b.budget_hit = True  # nothing survived: end this beam here
                pool.append(b)
                continue
            pool += [_extend(b, tuple(n), step, g, cs, s) for (n, step, g), s in zip(cs_, next(scores))]
        tie = random.Random(mix_seed(cs.seed, prompt, step_no))  # equal scores: a seeded draw, not list order
        beams = sorted(pool, key=lambda x: (-x.score, tie.random()))[:cs.beam]
        timing.steps.append([round(timing.generation_s - g0, 4), round(getattr(scorer, "seconds", 0.0) - s0, 4),
                             len(merged)])
    for b in beams:
        if not b.done:
            b.done = b.budget_hit = True
    return beams[0] if beams else Beam()  # sorted by score, ties already drawn


def score_groups(scorer, prompt: str, groups: list[tuple[str, list[str]]], answer: str) -> list[list[float]]:
    """Scores of every beam's candidates: in one call when the scorer takes groups (``Scorer.many``), else one
    call per beam (a plain ``(prompt, prefix, candidates, answer)`` callable)."""
    if not groups:
        return []
    many = getattr(scorer, "many", None)
    return many(prompt, groups, answer) if many else [scorer(prompt, p, c, answer) for p, c in groups]


def mix_seed(*parts) -> int:
    """A 31-bit seed from several parts (base seed, problem prompt, teacher, beam, step): no two beams or
    problems share their sampling noise on the seeded backends (vllm, openai)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def finish(teachers: dict, prompt: str, b: Beam, cs: CordSettings, timing: Timing) -> Trajectory:
    """Close the reasoning and let the teacher of the last step write the answer."""
    writer = b.steps[-1][0][0] if b.steps else next(iter(teachers))
    reasoning = THINK_PREFIX + b.text + THINK_CLOSE
    t0 = time.perf_counter()
    g = teachers[writer].generate([Request(prompt, prefix=reasoning, seed=cs.seed)],
                                  SamplingParams(temperature=0.0, max_new_tokens=cs.answer_tokens))[0]
    timing.generation_s += time.perf_counter() - t0
    answer = "" if g.failed else g.text
    return Trajectory(reasoning + answer, reasoning, answer, b.steps, b.score, writer, b.budget_hit,
                      b.tokens + g.token_count)


def curate(teachers: dict, scorer, prompt: str, answer: str, cs: CordSettings, timing: Timing,
           rollouts: int) -> tuple[Trajectory | None, list[Trajectory]]:
    """Curation (s1/LIMO): each teacher writes ``rollouts`` complete traces; the same score picks one."""
    def write(k, name, teacher):
        reqs = [Request(prompt, prefix=THINK_PREFIX, seed=mix_seed(cs.seed, prompt, k, r)) for r in range(rollouts)]
        try:  # the same budget as CoRD: think_tokens of reasoning, forced close, then the answer
            gens = teacher.generate(reqs, SamplingParams(temperature=_temperature(teacher, cs), top_p=cs.top_p,
                                                         max_new_tokens=cs.think_tokens, stop=(THINK_CLOSE,)))
            failed = sum(g.failed for g in gens)
            gens = [g for g in gens if not g.failed]
            thinks = [g.text.partition(THINK_CLOSE)[0] for g in gens]
            answers = teacher.generate([Request(prompt, prefix=THINK_PREFIX + t + THINK_CLOSE, seed=cs.seed)
                                        for t in thinks],
                                       SamplingParams(temperature=0.0, max_new_tokens=cs.answer_tokens)) if gens else []
        except Exception:  # noqa: BLE001 — the answering teacher down: these rollouts score as failed
            return None, rollouts
        return list(zip(gens, thinks, answers)), failed

    t0 = time.perf_counter()
    written = each_teacher(teachers, write)
    timing.generation_s += time.perf_counter() - t0
    done: list[Trajectory] = []
    for name, (traces, failed) in zip(teachers, written):
        if failed:
            timing.failures[name] = timing.failures.get(name, 0) + failed
        for g, think, a in traces or []:
            ans = "" if a.failed else a.text
            hit = g.finish_reason == "length"  # the think budget ran out: force-closed, as in CoRD
            done.append(Trajectory(THINK_PREFIX + think + THINK_CLOSE + ans, THINK_PREFIX + think + THINK_CLOSE, ans,
                                   [((name,), think)], 0.0, name, hit, g.token_count + a.token_count))
    if not done:
        return None, []
    # every trace scored in one call (its reasoning is the candidate; one group per teacher)
    mine = [[t for t in done if t.writer == name] for name in teachers]
    mine = [m for m in mine if m]
    for ts, scores in zip(mine, score_groups(scorer, prompt, [(THINK_PREFIX, [t.steps[0][1] for t in ts])
                                                              for ts in mine], answer)):
        for t, s in zip(ts, scores):
            t.score = s
    return max(done, key=lambda t: t.score), done


# ------------------------------------------------------------------------------------ MCTS baseline (§5.2.3)


@dataclass
class _Node:
    beam: Beam
    parent: _Node | None = None
    children: list[_Node] = field(default_factory=list)
    visits: int = 0
    value: float = 0.0
    expanded: bool = False


def _ucb(n: _Node, c: float) -> float:
    import math

    if n.visits == 0:
        return float("inf")
    return n.value / n.visits + c * math.sqrt(math.log(max(1, n.parent.visits)) / n.visits)


def mcts_search(teachers: dict, scorer, prompt: str, answer: str, cs: CordSettings, timing: Timing,
                rollouts: int | None = None, c: float = 1.0) -> Beam:
    """MCTS over steps with UCB (the paper's baseline): select → expand (one step per teacher) → roll the best
    child out to a complete trajectory with its teacher → back up S of that trajectory.  The budget is
    ``rollouts`` complete trajectories (default B, as beam search produces B)."""
    root = _Node(Beam())
    best: Beam | None = None
    for it in range(rollouts or cs.beam):
        node = root
        while node.expanded and node.children:
            node = max(node.children, key=lambda ch: _ucb(ch, c))
        if not node.beam.done and not node.expanded:
            node.expanded = True
            step_no = len(node.beam.steps) + 1
            props = _propose(teachers, prompt, [node.beam], cs, step_no, timing, mix_seed(cs.seed, it))
            if props:
                scores = scorer(prompt, THINK_PREFIX + node.beam.text, [p[2] for p in props], answer)
                node.children = [_Node(_extend(node.beam, (name,), step, g, cs, s), node)
                                 for (_, name, step, g), s in zip(props, scores)]
                node = max(node.children, key=lambda ch: ch.beam.score)
        final = node.beam if node.beam.done else _rollout(teachers, prompt, node.beam, cs, timing)
        final.score = scorer(prompt, THINK_PREFIX, [final.text], answer)[0]
        if best is None or final.score > best.score:
            best = final
        while node is not None:
            node.visits += 1
            node.value += final.score
            node = node.parent
    return best if best is not None else Beam(done=True, budget_hit=True)


def _rollout(teachers: dict, prompt: str, b: Beam, cs: CordSettings, timing: Timing) -> Beam:
    """Let the teacher of the last step finish the reasoning in one go (to ``</think>`` or the budget)."""
    name = b.steps[-1][0][0] if b.steps else next(iter(teachers))
    left = max(1, cs.think_tokens - b.tokens)
    t0 = time.perf_counter()
    req = Request(prompt, prefix=THINK_PREFIX + b.text, seed=mix_seed(cs.seed, prompt, len(b.steps)))
    g = teachers[name].generate([req], SamplingParams(temperature=_temperature(teachers[name], cs), top_p=cs.top_p,
                                                      max_new_tokens=left, stop=(THINK_CLOSE,)))[0]
    timing.generation_s += time.perf_counter() - t0
    if g.failed:
        timing.failures[name] = timing.failures.get(name, 0) + 1
        return Beam(b.text, list(b.steps), b.score, b.tokens, True, True, b.last_stop)
    closed = g.stop_string == THINK_CLOSE
    return Beam(b.text + g.text, b.steps + [((name,), g.text)], b.score, b.tokens + g.token_count, True,
                not closed, g.stop_string)
