"""Evaluation core: greedy accuracy and pass@1 averaged over k samples.

pass@1 over k samples is the mean, over problems, of the fraction of the k
samples that are correct (MoT §5 reports AIME as 16-run averages; the same
estimator).  Generation goes through the teacher backends, so a vLLM backend
evaluates on GPU and an hf backend on CPU.  Optionally every (problem, sample)
row is written to a JSONL file, and a re-run skips rows already there, so a
killed evaluation resumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from accord.problems import Problem
from accord.prompts import render_prompt
from accord.teachers.base import Request, SamplingParams
from accord.verify import CORRECT, check


@dataclass
class EvalResult:
    greedy: float | None
    pass1: float | None
    n: int
    k: int

    def as_dict(self) -> dict:
        return {"greedy": self.greedy, "pass1": self.pass1, "n": self.n, "k": self.k}


def _done(path: Path | None) -> dict[tuple[str, int, str], bool]:
    if path is None or not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill; regenerated below
        out[(r["problem_id"], r["sample"], r["mode"])] = r["verdict"] == CORRECT
    return out


def evaluate(teacher, problems: Sequence[Problem], *, k: int = 16, temperature: float = 0.6, greedy: bool = True,
             max_new_tokens: int = 1024, verifier: str = "math", style: str = "default", seed: int = 0,
             rows_path: str | Path | None = None, chunk: int = 256) -> EvalResult:
    """Evaluate a generator on problems; ``rows_path`` makes it resumable."""
    path = Path(rows_path) if rows_path else None
    done = _done(path)
    todo = []
    if greedy:
        todo += [(p, 0, "greedy") for p in problems if (p.id, 0, "greedy") not in done]
    if k > 0:
        todo += [(p, i, "sample") for p in problems for i in range(k) if (p.id, i, "sample") not in done]
    fh = path.open("a", encoding="utf-8") if path else None
    try:
        for mode in ("greedy", "sample"):
            part = [t for t in todo if t[2] == mode]
            params = SamplingParams(temperature=0.0 if mode == "greedy" else temperature,
                                    max_new_tokens=max_new_tokens)
            for s in range(0, len(part), chunk):
                batch = part[s:s + chunk]
                reqs = [Request(render_prompt(style, p.question), seed=seed * 1_000_003 + hash_id(p.id) + i)
                        for p, i, _ in batch]
                for (p, i, m), g in zip(batch, teacher.generate(reqs, params)):
                    verdict = check(verifier, p.answer, g.text).verdict if not g.failed else "failed"
                    done[(p.id, i, m)] = verdict == CORRECT
                    if fh:
                        fh.write(json.dumps({"problem_id": p.id, "sample": i, "mode": m, "output": g.text,
                                             "verdict": verdict}) + "\n")
                if fh:
                    fh.flush()
    finally:
        if fh:
            fh.close()
    ids = [p.id for p in problems]
    g = sum(done[(pid, 0, "greedy")] for pid in ids) / len(ids) if greedy and ids else None
    p1 = (sum(sum(done[(pid, i, "sample")] for i in range(k)) / k for pid in ids) / len(ids)) if k > 0 and ids else None
    return EvalResult(g, p1, len(ids), k)


def hash_id(pid: str) -> int:
    import hashlib

    return int(hashlib.sha1(pid.encode()).hexdigest()[:6], 16)
