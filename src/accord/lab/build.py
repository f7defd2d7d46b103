"""Build, cache and inspect the lab's teacher zoo and student (DESIGN.md §4), lab v2.

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

Cache layout: ``$ACCORD_HOME/lab/<profile>/<model>/`` (standard HF checkpoints) and
``manifest.json``.  Each entry records the SHA-256 of its safetensors file and the
recipe hash; an entry whose files are missing, altered or built by another recipe
is rebuilt, never loaded.  Models are written to a temporary directory and renamed
into place, so a killed build leaves no partial entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from accord.errors import RunFailure
from accord.lab.tasks import MOD, OPS, STYLE_NAMES, answer_only, apply_op, arith_trace, generate, operands
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
    "quick": Profile("quick", student_steps=1500, teacher_steps=1600, batch=16, eval_n=60, eval_k=2, train_n=2500,
                     stop_cap=0.45, teacher_band=(0.15, 0.95), zoo_band=False,
                     student_band={**STUDENT_BAND, "one_step_greedy": (0.6, 1.0)}),
    # tests: seconds; accuracy is irrelevant
    "micro": Profile("micro", student_steps=4, teacher_steps=2, d=32, batch=8, eval_n=6, eval_k=1, train_n=64,
                     check_every=0, teacher_band=None),
}


def lab_seed() -> int:
    """``ACCORD_LAB_SEED`` (default 0): a different seed builds a different, equally valid zoo."""
    return int(os.environ.get("ACCORD_LAB_SEED", "0"))


def accord_home() -> Path:
    return Path(os.environ.get("ACCORD_HOME", Path.home() / ".cache" / "accord"))


def lab_dir(profile: str) -> Path:
    return accord_home() / "lab" / profile


def recipe_hash(p: Profile, model: str | None = None) -> str:
    """What a model was built from; a teacher's hash also covers its own recipe (changing one teacher
    rebuilds that teacher only); teachers start from the student, so a new student rebuilds them."""
    key = {"v": RECIPE_VERSION, "seed": lab_seed(), **asdict(p)}
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if model in TEACHERS:
        h += "-" + hashlib.sha256(repr(TEACHERS[model]).encode()).hexdigest()[:8]
    if model == STUDENT_B:
        h += "-" + hashlib.sha256(repr(STUDENT_B_RECIPE).encode()).hexdigest()[:8]
    return h


# ------------------------------------------------------------------ manifest / cache


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(profile: str) -> dict:
    path = lab_dir(profile) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"profile": profile, "models": []}


def _write_manifest(profile: str, manifest: dict) -> None:
    path = lab_dir(profile) / "manifest.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)


def valid_entry(profile: str, name: str, manifest: dict | None = None) -> dict | None:
    """The manifest entry of ``name`` if its checkpoint is complete and unaltered, else None."""
    manifest = manifest or read_manifest(profile)
    entry = next((m for m in manifest.get("models", []) if m["name"] == name), None)
    if entry is None or entry.get("recipe") != recipe_hash(PROFILES[profile], name):
        return None
    d = Path(entry["path"])
    needed = [d / "config.json", d / "model.safetensors", d / "tokenizer.json"]
    if not all(f.exists() for f in needed) or _sha256(d / "model.safetensors") != entry.get("sha256"):
        return None
    return entry


def lab_model_path(spec: str) -> Path:
    """``terse`` or ``quick/terse`` → the cached checkpoint; a clear error when not built."""
    from accord.teachers.base import TeacherConfigError

    profile, name = spec.split("/", 1) if "/" in spec else ("full", spec)
    if profile not in PROFILES:
        raise TeacherConfigError(f"lab:{spec}: unknown lab profile {profile!r} ({', '.join(PROFILES)})")
    known = [*TEACHERS, STUDENT, RANDOM, *EXTRAS]
    if name not in known:
        raise TeacherConfigError(f"lab:{spec}: unknown lab model {name!r}; choose one of {', '.join(known)}")
    entry = valid_entry(profile, name)
    if entry is None:
        flag = ("" if profile == "full" else f" --profile {profile}") + (f" --with {name}" if name in EXTRAS else "")
        raise TeacherConfigError(f"lab:{spec}: lab model not built (or its cache is stale); "
                                 f"run `accord lab build{flag}`")
    return Path(entry["path"])


# ------------------------------------------------------------------ data


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
    from accord.lab.tokenizer import build_tokenizer

    rows = generate("arith", "train")[:400]
    corpus = [r["question"] for r in rows] + [r["question"] for r in generate("last", "train")[:200]]
    rng = random.Random(0)
    corpus += [arith_trace(r["arith"], s, h, rng=rng, slip=0.3) for r in rows[:200]
               for s in STYLE_NAMES for h in (False, True)]
    return build_tokenizer(corpus, split_digits=False)


def lab_tokenizer_b():
    """Student-b's tokenizer: the same lab text, digits split one per token, a smaller vocabulary."""
    from accord.lab.tokenizer import build_tokenizer

    rows = generate("arith", "train")[:400]
    corpus = [r["question"] for r in rows] + [r["question"] for r in generate("last", "train")[:200]]
    return build_tokenizer(corpus, vocab_size=STUDENT_B_RECIPE["vocab"], split_digits=STUDENT_B_RECIPE["split_digits"])


# ------------------------------------------------------------------ building


def _new_model(tok, d: int, layers: int, seed: int, init_range: float = 0.1):
    from transformers import LlamaForCausalLM

    from accord.lab.micro import micro_config

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


def _train(model, tok, rows, steps: int, p: Profile, lr: float, seed: int, label: str, console,
           stop=None) -> int:
    """Train in place; ``stop(step)`` → True ends training early.  Returns the steps taken."""
    from accord.train.engine import TrainArgs, train_sft
    from accord.ui import progress

    args = TrainArgs(steps=steps, batch_size=p.batch, lr=lr, warmup_ratio=0.05, min_lr_ratio=p.min_lr_ratio, max_len=256,
                     seed=seed)

    def on_step(s: int, loss: float) -> bool:
        bar.update(task, advance=1, description=f"train {label} loss {loss:.3f}")
        return bool(stop and stop(s + 1))

    with progress(console) as bar:
        task = bar.add_task(f"train {label}", total=steps)
        return len(train_sft(model, tok, rows, args, on_step=on_step))


def _train_until(model, tok, rows, p: Profile, targets: dict[str, float], cap: int, lr: float, seed: int,
                 label: str, console) -> dict:
    """Train until greedy accuracy on validation problems reaches ``targets`` (checked every
    ``p.check_every`` steps from ``p.check_from``), at most ``cap`` steps.

    Why adaptive: multi-step skill arrives as a jump whose step moves with the seed and the machine's
    numerics (thread count), so a fixed step count is either wasted time or a half-trained model.
    """
    if not p.check_every:
        return {"steps": _train(model, tok, rows, cap, p, lr, seed, label, console)}
    stop, seen = _until(model, tok, targets, p.check_every, p.check_n, p.check_from)
    steps = _train(model, tok, rows, cap, p, lr, seed, label, console, stop=stop)
    reached = all(seen.get(str(steps), {}).get(f, 0.0) >= t for f, t in targets.items())
    if not reached:
        stop(steps, force=True)  # the final state's validation accuracy, for the record
    return {"steps": steps, "reached": reached, "checks": seen}


def _until(model, tok, targets: dict[str, float], every: int, n: int, start: int = 0):
    """A ``stop(step)`` for :func:`_train`: every ``every`` steps (from ``start``), greedy accuracy on
    ``n`` validation problems of each family (disjoint from the test splits the manifest reports)
    reaches ``targets[family]``.  ``seen`` collects ``{"<step>": {family: accuracy}}`` (JSON-ready)."""
    from accord.problems import Problem

    val = {fam: [Problem(r["id"], r["question"], r["answer"]) for r in _validation(fam)[:n]] for fam in targets}
    seen: dict[str, dict[str, float]] = {}

    def stop(step: int, force: bool = False) -> bool:
        if not force and (step % every or step < start):
            return False
        model.eval()
        accs = seen[str(step)] = {}
        for fam, problems in val.items():  # stop checking at the first family below its target
            accs[fam] = _greedy(model, tok, problems)
            if accs[fam] < targets[fam] and not force:
                break
        model.train()
        return all(accs.get(fam, 0.0) >= t for fam, t in targets.items())

    return stop, seen


def _validation(family: str) -> list[dict]:
    """Validation problems of a family; ``arith/no-<op>`` keeps those without that operation (the category
    where a teacher whose private errors are in <op> must be the best one)."""
    if "/no-" not in family:
        return generate(family, "validation")
    fam, sym = family.split("/no-")
    return [r for r in generate(fam, "validation") if not any(k.startswith(sym) for k in r["arith"].kinds())]


def _generator(model, tok, name: str = "m"):
    from accord.config import TeacherConfig
    from accord.teachers.hf import HFTeacher

    return HFTeacher(TeacherConfig(name=name, model="in-memory", batch_size=256), model=model, tokenizer=tok)


def _greedy(model, tok, problems) -> float:
    from accord.evaluate import evaluate

    return evaluate(_generator(model, tok), problems, k=0, max_new_tokens=200).greedy


def _per_problem(gen, problems, max_new_tokens: int) -> list[bool]:
    """Greedy correctness per problem (for the oracle and the breakdown)."""
    from accord.teachers.base import Request, SamplingParams
    from accord.verify import CORRECT, check

    outs = gen.generate([Request(render_prompt("default", p.question)) for p in problems],
                        SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    return [not g.failed and check("math", p.answer, g.text).verdict == CORRECT for p, g in zip(problems, outs)]


BREAKDOWN = {"no +": "+", "no -": "-", "no *": "*"}  # problems without one operation: where a teacher is best


def measure(model, tok, p: Profile, name: str = "m") -> dict:
    """Accuracies on the test splits with accord's evaluation core, and the per-category breakdown."""
    from accord.evaluate import evaluate
    from accord.problems import Problem

    gen = _generator(model, tok, name)

    def probs(family, n=p.eval_n):
        return [Problem(r["id"], r["question"], r["answer"], meta={"kinds": r.get("arith") and r["arith"].kinds()})
                for r in generate(family, "test")[:n]]

    target = probs("arith")
    bits = _per_problem(gen, target, 200)
    sampled = evaluate(gen, target, k=p.eval_k, greedy=False, temperature=0.6, max_new_tokens=200)
    acc = {"target_greedy": sum(bits) / len(bits), "target_pass1": sampled.pass1,
           "general_greedy": evaluate(gen, probs("last"), k=0, max_new_tokens=40).greedy,
           "one_step_greedy": evaluate(gen, probs("arith-1", 250), k=0, max_new_tokens=60).greedy,
           "ood_greedy": evaluate(gen, probs("arith-ood", max(1, p.eval_n // 2)), k=0, max_new_tokens=300).greedy}
    breakdown = {}
    for cat, sym in BREAKDOWN.items():
        hit = [b for b, q in zip(bits, target) if not any(k.startswith(sym) for k in q.meta["kinds"])]
        breakdown[cat] = sum(hit) / len(hit) if hit else None
    breakdown["5-6 ops"] = acc["ood_greedy"]
    return {"accuracy": acc, "breakdown": breakdown, "target_bits": "".join("1" if b else "0" for b in bits)}


def band_misses(role: str, acc: dict, p: Profile) -> list[str]:
    """What a finished model misses of its profile's bands (empty: all met)."""
    bands = (p.student_band or {}) if role == "student" else (
        {"target_pass1": p.teacher_band} if p.teacher_band and role == "teacher" else {})
    return [f"{k} {acc[k]:.1%} outside [{lo:.0%}, {hi:.0%}]" for k, (lo, hi) in bands.items()
            if acc.get(k) is None or not lo <= acc[k] <= hi]


def _save_tmp(model, tok, profile: str, name: str) -> Path:
    tmp = lab_dir(profile) / f".{name}.tmp"
    from accord.ui import no_hf_bars

    shutil.rmtree(tmp, ignore_errors=True)
    with no_hf_bars():
        model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    return tmp


def _save(tmp: Path, profile: str, name: str, role: str, p: Profile, measured: dict, manifest: dict,
          info: dict) -> dict:
    """Move a finished model from its temporary directory into place and record it (the parent process
    alone writes the manifest, whichever process trained the model)."""
    final = lab_dir(profile) / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    entry = {"name": name, "role": role, "path": str(final), **measured,
             "sha256": _sha256(final / "model.safetensors"), "recipe": recipe_hash(p, name),
             "params": info.pop("params"), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "seed": lab_seed(), "training": info}
    manifest["models"] = [m for m in manifest.get("models", []) if m["name"] != name] + [entry]
    _write_manifest(profile, manifest)
    return entry


def _load(profile: str, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accord.ui import no_hf_bars

    path = lab_dir(profile) / name
    with no_hf_bars():
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(str(path))


class LabTooWeak(RunFailure):
    """A lab model missed its accuracy band (``accord lab build --allow-weak`` keeps it anyway)."""


def _build_one(tok, p: Profile, profile: str, name: str, console) -> tuple[object, dict]:
    seed = lab_seed()
    if name == RANDOM:
        return _new_model(tok, p.d, p.layers, seed=99 + seed, init_range=p.init_range), {"steps": 0}
    if name in (STUDENT, STUDENT_B):
        model = (_new_model(tok, p.d, p.layers, seed=99 + seed, init_range=p.init_range) if name == STUDENT else
                 _new_qwen2(tok, round(p.d * STUDENT_B_RECIPE["width"]), p.layers, seed=77 + seed, init_range=p.init_range))
        targets = {"arith-1": p.student_stop, "last": p.student_stop}
        info = _train_until(model, tok, student_rows(p), p, targets, p.student_steps, p.lr, seed, name, console)
    else:
        model, _ = _load(profile, STUDENT)  # teachers share the student's pre-training (the table, the general
        targets = {f: min(t, p.stop_cap) for f, t in TEACHERS[name].stop}  # family) and learn to reason in
        # their own style on top of it
        rows = teacher_rows(p, name, seed=hash_name(name) + seed)
        info = _train_until(model, tok, rows, p, targets, p.teacher_steps, p.teacher_lr, seed, name, console)
    return model, info


def hash_name(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)


def build_lab(quick: bool = False, force: bool = False, profile: str | None = None, console=None,
              allow_weak: bool = False, extra: tuple[str, ...] = ()) -> dict:
    """Build (or reuse) every lab model of a profile; return the manifest.

    A model that misses its band is kept and recorded (``weak`` in the manifest) with a warning naming
    it, its accuracy and the band; unless ``allow_weak``, :class:`LabTooWeak` is raised at the end.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    name = profile or ("quick" if quick else "full")
    p = PROFILES[name]
    torch.set_num_threads(_cpus())
    lab_dir(name).mkdir(parents=True, exist_ok=True)
    with lab_lock(name, console):
        return _build_locked(name, p, force, console, allow_weak, tuple(e for e in extra if e in EXTRAS))


@contextlib.contextmanager
def lab_lock(profile: str, console):
    """One builder per lab profile: a second process (two `accord run`s at once) waits, says so, and then
    reuses what the first one built instead of overwriting its models (POSIX ``flock``; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; builds there are not guarded
        yield
        return
    with (lab_dir(profile) / ".lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"another process is building the lab at {lab_dir(profile)}; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_locked(name: str, p: Profile, force: bool, console, allow_weak: bool, extra: tuple[str, ...] = ()) -> dict:
    manifest = read_manifest(name)
    manifest.update(profile=name, recipe=recipe_hash(p), seed=lab_seed())
    t0 = time.perf_counter()
    todo = [m for m in (STUDENT, RANDOM, *extra, *TEACHERS) if force or not valid_entry(name, m, manifest)]
    if todo:
        workers = _workers(name, len([m for m in todo if m in TEACHERS]))
        console.print(f"building the lab ({name!r} profile, seed {lab_seed()}, "
                      + (f"teachers on {workers} processes × {max(1, _cpus() // workers)} thread(s)"
                         if workers > 1 else f"{torch.get_num_threads()} threads")
                      + f") at {lab_dir(name)}: about {_ETA[name]} on 2 CPU cores")
        if STUDENT in todo:  # the teachers start from the student: it comes first, with every thread
            _record(name, p, manifest, console, *_build_job((name, STUDENT, torch.get_num_threads(), console)))
        for m in (RANDOM, *extra):
            if m in todo:
                _record(name, p, manifest, console, *_build_job((name, m, torch.get_num_threads(), console)))
        teachers = sorted((m for m in todo if m in TEACHERS), key=lambda m: BUILD_ORDER.index(m))
        if workers > 1:
            import multiprocessing as mp

            threads = max(1, _cpus() // workers)
            with mp.get_context("spawn").Pool(workers) as pool:
                for res in pool.imap_unordered(_build_job, [(name, m, threads, None) for m in teachers]):
                    _record(name, p, manifest, console, *res)
        else:
            for m in teachers:
                _record(name, p, manifest, console, *_build_job((name, m, torch.get_num_threads(), console)))
    manifest = read_manifest(name)
    if todo:
        console.print(f"lab profile {name!r} ready in {time.perf_counter() - t0:.0f}s at {lab_dir(name)}")
    weak = [m for m in manifest.get("models", []) if m.get("weak") and valid_entry(name, m["name"], manifest)]
    zoo = zoo_checks(status(name)) if p.teacher_band and p.zoo_band else {"misses": []}
    for w in zoo["misses"]:
        console.print(f"[yellow]warning:[/] lab zoo: {w}")
    if (weak or zoo["misses"]) and not allow_weak and p.teacher_band:
        names = ", ".join(m["name"] for m in weak) or "the zoo"
        raise LabTooWeak(f"lab profile {name!r}: {names} missed the lab's bands (see the warnings above and "
                         "`accord lab status`); rebuild with another ACCORD_LAB_SEED, or pass --allow-weak")
    return manifest


_ETA = {"full": "4 minutes", "quick": "2 minutes", "micro": "seconds"}


def _cpus() -> int:
    return int(os.environ.get("ACCORD_LAB_THREADS", 0)) or max(1, os.cpu_count() or 1)


def _workers(profile: str, n_teachers: int) -> int:
    """Processes that train teachers side by side: tiny models use one core poorly (a step of the lab's
    0.13M-parameter model is 1.4× faster on 2 threads than on 1, while 2 processes do 2 steps), so on
    2 cores two teachers train at once, 1 thread each.  ``ACCORD_LAB_WORKERS=1``: one at a time with
    every thread; the micro profile (tests, seconds) always builds in this process."""
    env = int(os.environ.get("ACCORD_LAB_WORKERS", 0))
    if profile == "micro":
        return 1
    return max(1, min(n_teachers, env or min(4, _cpus())))


def _build_job(job: tuple) -> tuple:
    """Train, measure and save one model (in this process or a pool worker); returns what the parent records."""
    profile, model_name, threads, console = job
    if console is None:  # a pool worker: plain throttled progress lines, never two live bars at once
        from rich.console import Console

        console = Console(stderr=True, force_terminal=False)
    torch.set_num_threads(threads)
    p, t0 = PROFILES[profile], time.perf_counter()
    tok = lab_tokenizer_b() if model_name == STUDENT_B else lab_tokenizer()
    model, info = _build_one(tok, p, profile, model_name, console)
    model.eval()
    measured = measure(model, tok, p, model_name)
    info.update(build_s=round(time.perf_counter() - t0, 1), threads=threads,
                params=sum(x.numel() for x in model.parameters()))
    return model_name, str(_save_tmp(model, tok, profile, model_name)), measured, info


def _record(profile: str, p: Profile, manifest: dict, console, model_name: str, tmp: str, measured: dict,
            info: dict) -> None:
    role = {STUDENT: "student", STUDENT_B: "student", RANDOM: "random-init"}.get(model_name, "teacher")
    misses = band_misses(role, measured["accuracy"], p)
    entry = _save(Path(tmp), profile, model_name, role, p, {**measured, "weak": misses}, manifest, info)
    console.print(f"built lab model [bold]{model_name}[/] ({entry['params'] / 1e6:.2f}M params) "
                  f"{_fmt(measured['accuracy'])} after {info['steps']} steps ({info['build_s']:.0f}s)")
    for miss in misses:
        console.print(f"[yellow]warning:[/] lab model {model_name!r} missed its band: {miss}")


def _fmt(acc: dict) -> str:
    return " ".join(f"{k}={v:.1%}" for k, v in acc.items() if v is not None)


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


def status(profile: str) -> dict:
    """The manifest restricted to valid entries, in the shape ``accord lab status --json`` prints."""
    manifest = read_manifest(profile)
    models = []
    for m in manifest.get("models", []):
        if m["role"] == "base" or not valid_entry(profile, m["name"], manifest):
            continue
        models.append({k: m.get(k) for k in ("name", "role", "path", "accuracy", "breakdown", "target_bits", "weak",
                                             "training")})
    out = {"profile": profile, "home": str(lab_dir(profile)), "seed": manifest.get("seed"), "models": models}
    if any(m["role"] == "teacher" for m in models):
        z = zoo_checks(out)
        out["zoo"] = {"oracle": z["oracle"], "best_in": z["best_in"], "misses": z["misses"]}
    return out


COLUMNS = {"target greedy": "target_greedy", "target pass@1": "target_pass1", "general greedy": "general_greedy",
           "one-step greedy": "one_step_greedy", "5-6 ops greedy": "ood_greedy"}


def print_status(quick: bool = False, as_json: bool = False, console=None, profile: str | None = None) -> int:
    from rich.table import Table

    st = status(profile or ("quick" if quick else "full"))
    if as_json:
        print(json.dumps(st, indent=2))
        return 0
    if not st["models"]:
        console.print(f"no lab models built for profile {st['profile']!r}; run `accord lab build`")
        return 1
    tab = Table(title=f"lab ({st['profile']}, seed {st.get('seed')}) at {st['home']}")
    for col in ("model", "role", *COLUMNS, "steps", "band"):
        tab.add_column(col, justify="left" if col in ("model", "role", "band") else "right")
    for m in st["models"]:
        a = m["accuracy"] or {}
        tab.add_row(m["name"], m["role"], *(f"{a[k]:.1%}" if a.get(k) is not None else "-" for k in COLUMNS.values()),
                    str((m.get("training") or {}).get("steps", "-")), "missed" if m.get("weak") else "ok")
    console.print(tab)
    teachers = [m for m in st["models"] if m["role"] == "teacher" and m.get("breakdown")]
    if teachers:
        cats = list(teachers[0]["breakdown"])
        br = Table(title="target greedy by category (where each teacher is best)")
        for col in ("teacher", *cats):
            br.add_column(col, justify="left" if col == "teacher" else "right")
        best = st["zoo"]["best_in"]
        for m in teachers:
            br.add_row(m["name"], *(("[bold]" if c in best.get(m["name"], []) else "") + f"{m['breakdown'][c]:.1%}"
                                    if m["breakdown"].get(c) is not None else "-" for c in cats))
        console.print(br)
        z = st["zoo"]
        console.print(f"best-of-teachers oracle (some teacher greedy-right): {z['oracle']:.1%}")
        for w in z["misses"]:
            console.print(f"[yellow]warning:[/] {w}")
    return 0


__all__ = ["PROFILES", "Profile", "TEACHERS", "LabTooWeak", "build_lab", "lab_model_path", "print_status", "status"]
