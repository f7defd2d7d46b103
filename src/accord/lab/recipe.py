"""The lab's recipe (DESIGN.md §4, lab v2): what each model is made of — profiles, the student and one
:class:`TeacherRecipe` per teacher, their training rows, tokenizers and architectures, and the bands a
finished model must meet.  ``lab.cache`` keeps the results, ``lab.build`` trains and measures them.

The task (``lab.tasks``): arithmetic chains mod 10 (``Start at 3. Add 4. Times 2. Minus 1. Result?``),
2–4 operations in the target family, 5–6 in the OOD family, one in ``arith-1`` (a table fact), and the
general family ``last``.  Real students already know the single steps; distillation teaches them to
chain those steps in a trace.  The lab models exactly that.

Recipe (deterministic for a profile and ``ACCORD_LAB_SEED``):

1. the lab tokenizer, trained on lab text;
2. the *student* (a 2-layer, d=64 Llama, 0.13M parameters, ``initializer_range`` 0.1): one-step
   questions answered directly + the general family, never a trace; it trains until it knows the
   table and the general family on validation problems (``student_stop``), so it has the primitive
   and not the chain;
3. each *teacher* (:data:`TEACHERS`, one :class:`TeacherRecipe` each): the student fine-tuned on its
   own style, computed with its own private wrong facts, on the teachers' problems (arith train
   4000–8000; users collect from the first 4000), with general rows mixed in; it trains until its
   validation accuracy reaches its ``stop`` targets;
4. every model measured with accord's evaluation core on the test splits (target greedy and pass@1
   at T=0.6, general, one-step, 5–6 operations) and the per-category breakdown; each is checked
   against its band (:func:`band_misses`), the zoo against its own bars (:func:`zoo_checks`).

Choices, and why:
- adaptive training everywhere: multi-step skill arrives as a jump whose step moves with the seed and
  the thread count, so every model trains until validation says it is there (a cap bounds it);
- a model outside its band is kept, recorded (``weak``) and warned about; ``accord lab build`` exits
  non-zero unless ``--allow-weak``;
- teachers are the student's size and start from it (the shared pre-training): a bigger teacher was
  not needed for the bands and would cost the 15-minute demo;
- the teachers' imperfection is systematic (wrong table facts) rather than noise, so each is best
  somewhere, the best-of-teachers oracle is high, and averaging teachers can cancel private errors.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

import torch

from accord.lab.micro import micro_config
from accord.lab.tasks import MOD, OPS, STYLE_NAMES, answer_only, apply_op, arith_trace, generate, operands
from accord.lab.tokenizer import build_tokenizer
from accord.prompts import render_prompt

RECIPE_VERSION = 6  # lab v2: arithmetic chains, a student with the primitive, imperfect teachers


@dataclass(frozen=True)
class TeacherRecipe:
    """One teacher of the zoo: its style and the private errors that make it imperfect and different."""

    style: str
    weak_op: str | None  # operation whose table facts it partly believes wrong (None: spread over all)
    wrong_share: float  # share of those facts it believes wrong (its traces use them consistently)
    slip: float = 0.0  # verify: share of steps written wrong first, then corrected ("wait, …")
    long_share: float = 0.0  # extra 5–6-operation problems (× train_n): its strength on long chains
    stop: tuple[tuple[str, float], ...] = (("arith", 0.65),)  # validation greedy targets that end its fine-tune
    version: int = 1  # bump to rebuild this teacher only


# Why each teacher is the way it is (lab v2):
# - three teachers each believe ~30% of one operation's table facts wrong (terse: Times, verbose: Add,
#   shifted: Minus), so each is the best one on problems without its weak operation, the best-of-teachers
#   oracle is high, and averaging teachers can cancel a teacher's private errors (MoT's premise);
# - ``verify`` writes a spurious result and corrects itself ("wait, …") in 15% of its steps (something for
#   COMPACT's thinking-token score to find), has a few wrong facts everywhere, and is the only teacher that
#   learned 5–6-operation chains: the best on the OOD split;
# - ``shifted`` writes another notation (``[1] 3 plus 4 makes 7``): the distribution-shifted teacher
#   (the R1 analogue of MoT).
# (each weak-operation teacher also trains until it is good where its errors are not — ≥ 85% validation
# greedy on problems without its weak operation: with overall accuracy alone, seed 2's terse stopped at
# 79.7% there, tying verify, and the zoo check failed)
TEACHERS = {
    "terse": TeacherRecipe("terse", weak_op="Times", wrong_share=0.3, stop=(("arith", 0.65), ("arith/no-*", 0.85))),
    "verbose": TeacherRecipe("verbose", weak_op="Add", wrong_share=0.3, stop=(("arith", 0.65), ("arith/no-+", 0.85))),
    # (slip 0.3 with long chains: 14% after 2,000 steps; slip 0.15 stopped at the jump (63% greedy, 49%
    # pass@1): it trains past the jump to 75%, with fewer private errors to leave room for them)
    "verify": TeacherRecipe("verify", weak_op=None, wrong_share=0.04, slip=0.15, long_share=0.3,
                            stop=(("arith", 0.75), ("arith-ood", 0.45))),
    "shifted": TeacherRecipe("shifted", weak_op="Minus", wrong_share=0.3,
                             stop=(("arith", 0.65), ("arith/no--", 0.85))),
}


STUDENT = "student"


RANDOM = "random"  # the student's architecture and initialisation, never trained: how much the prior matters


# a second student with another tokenizer (digits split, a smaller vocabulary), another architecture (Qwen2)
# and another width, trained by the student's recipe: QR-Distill's cross-tokenizer students.  Built only when
# a config names it (`lab:student-b`) or `accord lab build --with student-b` asks for it.
STUDENT_B = "student-b"


EXTRAS = (STUDENT_B,)


STUDENT_B_RECIPE = {"arch": "qwen2", "width": 0.75, "vocab": 448, "split_digits": True}  # width × the student's d


# longest fine-tune first, so parallel workers finish together (seed 0: 1400, 1200, 900, 900 steps)
BUILD_ORDER = ("verify", "shifted", "terse", "verbose")


GENERAL_SHARE = 0.3  # general answer-only rows mixed into every teacher's fine-tune (keeps its general skill)


@dataclass(frozen=True)
class Profile:
    name: str
    student_steps: int  # caps: every model trains until its validation target, at most this many steps
    teacher_steps: int
    d: int = 64
    layers: int = 2
    batch: int = 32
    lr: float = 2e-3
    teacher_lr: float = 2e-3
    init_range: float = 0.1  # transformers' default 0.02 sat on a plateau for 2,000 steps; 0.1 learns in ~450
    eval_n: int = 200
    eval_k: int = 4
    train_n: int = 4000  # traces per teacher (and student rows per family)
    check_every: int = 100  # validation checks (0: fixed schedules, the micro profile)
    check_from: int = 200
    check_n: int = 100
    student_stop: float = 0.97  # one-step and general validation greedy that end the student's pre-training
    min_lr_ratio: float = 0.1  # cosine floor (1.0: constant learning rate after warmup)
    stop_cap: float = 1.0  # teachers stop at min(their validation target, this): quick stops just past the jump
    stop_skip: tuple[str, ...] = ()  # validation families this profile does not wait for
    chunked_loss: bool = False  # the engine's chunked head (loss only at supervised positions): same loss, other
    # float sums — off where the recorded builds pin the numerics
    # bands the finished models must meet on the test splits (None: not enforced, the micro profile)
    teacher_band: tuple[float, float] | None = (0.55, 0.95)  # target pass@1
    student_band: dict | None = None
    zoo_band: bool = True  # the zoo's own bars (oracle ≥ 95%, each teacher best somewhere); off for smoke runs


STUDENT_BAND = {"one_step_greedy": (0.8, 1.0), "target_pass1": (0.0, 0.2), "general_greedy": (0.85, 1.0)}


PROFILES = {
    "full": Profile("full", student_steps=2000, teacher_steps=2000, student_band=STUDENT_BAND),
    # smoke runs: the same recipe with smaller caps and fewer evaluation problems; lower bands
    # (batch 16 reaches the multi-step jump 1.5× sooner in wall time than 32: terse 45% validation greedy at
    # ~1,000 steps, 34 s on one thread, against ~850 steps of 32, 52 s)
    # (quick ≤ 2 minutes: teacher lr 3e-3 brings verify's jump inside the cap — 45% validation greedy at 1,300
    # steps against 18% at the 1,600-step cap with 2e-3 — and it does not wait for the 5–6-operation family;
    # 50 validation problems per check; the chunked head, 7–16% faster per step here)
    "quick": Profile("quick", student_steps=1500, teacher_steps=1400, batch=16, eval_n=60, eval_k=2, train_n=2500,
                     teacher_lr=3e-3, check_n=50, check_from=800, student_stop=0.9, stop_cap=0.45,
                     stop_skip=("arith-ood",), chunked_loss=True,
                     teacher_band=(0.15, 0.95), zoo_band=False,
                     student_band={**STUDENT_BAND, "one_step_greedy": (0.6, 1.0)}),
    # tests: seconds; accuracy is irrelevant
    "micro": Profile("micro", student_steps=4, teacher_steps=2, d=32, batch=8, eval_n=6, eval_k=1, train_n=64,
                     check_every=0, teacher_band=None),
}


def lab_seed() -> int:
    """``ACCORD_LAB_SEED`` (default 0): a different seed builds a different, equally valid zoo."""
    return int(os.environ.get("ACCORD_LAB_SEED", "0"))


def _msg(question: str, answer: str, prompt_style: str = "default") -> dict:
    return {"messages": [{"role": "user", "content": render_prompt(prompt_style, question)},
                         {"role": "assistant", "content": answer}]}


def wrong_facts(recipe: TeacherRecipe, name: str, seed: int | None = None) -> dict:
    """The table facts ``(op, b, x)`` a teacher believes wrong, each mapped to its (seeded) wrong result."""
    rng = random.Random(f"facts:{name}:{lab_seed() if seed is None else seed}")
    pool = [(op, b, x) for op in OPS for b in operands(op) for x in range(MOD)
            if recipe.weak_op in (None, op)]
    return {f: (apply_op(*f) + rng.randrange(1, MOD)) % MOD for f in rng.sample(pool, round(recipe.wrong_share
                                                                                               * len(pool)))}


def _trace_rows(problems: list[dict], style: str, rng: random.Random, facts: dict | None = None,
                slip: float = 0.0, header_share: float = 0.25) -> list[dict]:
    """Traces in ``style``; a share with CoRD ``### Step`` headers under the ``steps`` prompt."""
    rows = []
    for r in problems:
        headers = rng.random() < header_share
        text = arith_trace(r["arith"], style, headers, facts=facts, rng=rng, slip=slip)
        rows.append(_msg(r["question"], text, "steps" if headers else "default"))
    return rows


def style_rows(p: Profile, styles: list[str], seed: int) -> list[dict]:
    """Correct traces in the given styles on the teachers' training problems (benches and tests use these)."""
    rng = random.Random(seed)
    probs = generate("arith", "train")[4000:4000 + p.train_n]
    return [row for i, st in enumerate(styles) for row in _trace_rows(probs[i::len(styles)], st, rng)]


def general_rows(n: int) -> list[dict]:
    return [_msg(r["question"], answer_only(r["answer"])) for r in generate("last", "train")[:n]]


def one_step_rows(n: int) -> list[dict]:
    facts = generate("arith-1", "train")
    return [_msg(facts[i % len(facts)]["question"], answer_only(facts[i % len(facts)]["answer"])) for i in range(n)]


def teacher_rows(p: Profile, name: str, seed: int) -> list[dict]:
    """A teacher's fine-tune: its style with its private facts on the teachers' problems (arith train
    4000–8000, never the users' first 4000), its long chains, and general rows."""
    recipe, rng = TEACHERS[name], random.Random(seed)
    facts = wrong_facts(recipe, name)
    probs = generate("arith", "train")[4000:4000 + p.train_n]
    rows = _trace_rows(probs, recipe.style, rng, facts, recipe.slip)
    if recipe.long_share:
        long = generate("arith-ood", "train")[: round(recipe.long_share * p.train_n)]
        rows += _trace_rows(long, recipe.style, rng, facts, recipe.slip)
    return rows + general_rows(round(GENERAL_SHARE * len(rows)))


def student_rows(p: Profile) -> list[dict]:
    """One-step questions answered directly + the general family: the primitive, never a trace."""
    return one_step_rows(p.train_n) + general_rows(p.train_n)


def lab_tokenizer():
    rows = generate("arith", "train")[:400]
    corpus = [r["question"] for r in rows] + [r["question"] for r in generate("last", "train")[:200]]
    rng = random.Random(0)
    corpus += [arith_trace(r["arith"], s, h, rng=rng, slip=0.3) for r in rows[:200]
               for s in STYLE_NAMES for h in (False, True)]
    return build_tokenizer(corpus, split_digits=False)


def lab_tokenizer_b():
    """Student-b's tokenizer: the same lab text, digits split one per token, a smaller vocabulary."""
    rows = generate("arith", "train")[:400]
    corpus = [r["question"] for r in rows] + [r["question"] for r in generate("last", "train")[:200]]
    return build_tokenizer(corpus, vocab_size=STUDENT_B_RECIPE["vocab"], split_digits=STUDENT_B_RECIPE["split_digits"])


def _new_model(tok, d: int, layers: int, seed: int, init_range: float = 0.1):
    from transformers import LlamaForCausalLM


    torch.manual_seed(seed)
    cfg = micro_config(len(tok), hidden=d, layers=layers, heads=4, max_pos=512)
    cfg.intermediate_size, cfg.initializer_range = 3 * d, init_range
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def _new_qwen2(tok, d: int, layers: int, seed: int, init_range: float = 0.1):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=d, intermediate_size=3 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, initializer_range=init_range, rms_norm_eps=1e-5,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def _validation(family: str) -> list[dict]:
    """Validation problems of a family; ``arith/no-<op>`` keeps those without that operation (the category
    where a teacher whose private errors are in <op> must be the best one)."""
    if "/no-" not in family:
        return generate(family, "validation")
    fam, sym = family.split("/no-")
    return [r for r in generate(fam, "validation") if not any(k.startswith(sym) for k in r["arith"].kinds())]


BREAKDOWN = {"no +": "+", "no -": "-", "no *": "*"}  # problems without one operation: where a teacher is best


def band_misses(role: str, acc: dict, p: Profile) -> list[str]:
    """What a finished model misses of its profile's bands (empty: all met)."""
    bands = (p.student_band or {}) if role == "student" else (
        {"target_pass1": p.teacher_band} if p.teacher_band and role == "teacher" else {})
    return [f"{k} {acc[k]:.1%} outside [{lo:.0%}, {hi:.0%}]" for k, (lo, hi) in bands.items()
            if acc.get(k) is None or not lo <= acc[k] <= hi]


def hash_name(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)


def zoo_checks(st: dict) -> dict:
    """The zoo's own bars: the best-of-teachers oracle (some teacher greedy-right) ≥ 95% on the target
    test problems, and every teacher the strictly best one in some breakdown category."""
    teachers = [m for m in st["models"] if m["role"] == "teacher" and m.get("target_bits")]
    if not teachers:
        return {"oracle": None, "best_in": {}, "misses": []}
    bits = [m["target_bits"] for m in teachers]
    oracle = sum(any(b[i] == "1" for b in bits) for i in range(len(bits[0]))) / len(bits[0])
    best_in: dict[str, list[str]] = {m["name"]: [] for m in teachers}
    for cat in teachers[0].get("breakdown", {}):
        vals = [(m["breakdown"].get(cat) or 0.0, m["name"]) for m in teachers]
        top = max(vals)
        if sum(v == top[0] for v, _ in vals) == 1:
            best_in[top[1]].append(cat)
    misses = [f"best-of-teachers oracle {oracle:.1%} < 95%"] if oracle < 0.95 else []
    misses += [f"teacher {n!r} is the best one nowhere" for n, cats in best_in.items() if not cats]
    return {"oracle": oracle, "best_in": best_in, "misses": misses}
