"""How ``examples/my-traces.jsonl`` was made: 1,200 arithmetic-chain problems (the lab's task, so a
lab-sized student can learn them on a CPU) with two teachers' reasoning traces as columns, the shape of an
s1K-style table a user already has.  ``teacher_a`` writes terse steps, ``teacher_b`` verbose ones; each
column is wrong on a share of rows (a wrong final answer), which accord's verification drops.

    python examples/make_my_traces.py      # rewrites examples/my-traces.jsonl (deterministic)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from accord.lab.tasks import arith_trace, generate


def main() -> None:
    rng = random.Random(0)
    rows = []
    for r in generate("arith", "train")[6000:7200]:
        row = {"id": r["id"].replace("arith-train", "mine"), "question": r["question"], "answer": r["answer"]}
        for col, style, wrong in (("teacher_a", "terse", 0.15), ("teacher_b", "verbose", 0.25)):
            text = arith_trace(r["arith"], style)
            if rng.random() < wrong:  # a wrong final answer: verification drops this row for this teacher
                text = text.replace(f"\\boxed{{{r['answer']}}}", f"\\boxed{{{(int(r['answer']) + 3) % 10}}}")
            row[col] = text
        rows.append(row)
    out = Path(__file__).with_name("my-traces.jsonl")
    out.write_text("".join(json.dumps(x) + "\n" for x in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
