"""Build, cache and inspect the lab's teacher zoo and student (DESIGN.md §4).

Recipe (deterministic for a profile):

1. the lab tokenizer, trained on lab text;
2. a shared *base* model trained from scratch on terse traces (with and without
   CoRD ``### Step`` headers) — the analogue of the teachers' shared pre-training —
   until it follows links on held-out validation problems (≥ 95% greedy, checked
   every 100 steps; the step count is a cap), see :func:`_train_base`;
   A base trained on a mixture of all styles learned markedly slower (teachers at
   47–52% vs 64% for one style at equal steps): mixing styles hurts, as papers/004 says;
3. each teacher: the base fine-tuned on its own style only (``terse``, ``verbose``,
   ``verify``, and the distribution-shifted ``shifted``), answering the default
   prompt in its style and the ``steps`` prompt with ``### Step N`` headers;
   ``verify`` also sees 5–6-link chains, so the teachers differ in strength by
   difficulty and the best teacher depends on the split.  Each fine-tune stops
   once the teacher is good on validation problems (``STOP_WHEN``);
4. the student: a smaller model trained from scratch on the general family and on
   *answer-only* target problems, so it knows the domain but cannot reason;
5. every model evaluated with :func:`accord.evaluate.evaluate` on the target test
   split (greedy and pass@1 at T=0.6) and the general test split (greedy).

Cache layout: ``$ACCORD_HOME/lab/<profile>/<model>/`` (standard HF checkpoints) and
``manifest.json``.  Each entry records the SHA-256 of its safetensors file and the
recipe hash; an entry whose files are missing, altered or built by another recipe
is rebuilt, never loaded.  Models are written to a temporary directory and renamed
into place, so a killed build leaves no partial entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from accord.lab.tasks import answer_only, chain_trace, generate, random_chain
from accord.prompts import render_prompt

RECIPE_VERSION = 5
TEACHERS = {"terse": "terse", "verbose": "verbose", "verify": "verify", "shifted": "shifted"}
# (steps, lr) multipliers per teacher: the base already reasons in the terse notation,
# so it needs few steps (verbose at 0.6x stayed at 16%; shifted at 2x steps and lr reached only 24%).
TEACHER_SCHEDULE = {"terse": (0.6, 1.0), "verbose": (1.2, 1.0), "verify": (2.0, 1.0), "shifted": (1.0, 1.0)}
# With Profile.teacher_stop, a teacher's fine-tune stops once its greedy accuracy on validation problems
# of each family reaches the target (its schedule is the cap).  `verify` must also handle 5–6-link chains:
# its OOD strength arrives late and not monotonically (one run, chain-ood validation at steps 200/250/
# 300/350/400 of 500: 8%/46%/42%/90%/99%; the fixed 250 steps of another build gave 5%), so a fixed
# schedule risked a verify no better than the rest (~0% on OOD).  40% keeps it clearly the best there
# at about the cost of the old fixed schedule; 80% cost 75 s more of a build that must stay < 12 min.
STOP_WHEN = {"terse": {"chain": 0.98}, "verbose": {"chain": 0.98}, "shifted": {"chain": 0.98},
             "verify": {"chain": 0.98, "chain-ood": 0.4}}
# A style's version enters only its own teacher's recipe hash (shifted v2: source-first `[1] 8 => 7`).
STYLE_VERSION = {"shifted": 2, "verify": 2}
# Teachers with different strengths by difficulty: `verify` (v2) also learns 5–6-link chains from the
# chain-ood *train* split (disjoint from its test split), so on the OOD split it is the one strong teacher.
LONG_CHAIN_SHARE = {"verify": 0.25}
# The tokenizer's corpus is frozen: the base's learning is a phase transition that moved (and once
# failed) whenever a style change altered the BPE merges, so style changes must not touch it.
TOKENIZER_STYLES = ("terse", "verbose", "verify", "shifted-v5")
STUDENT = "student"
# Tried (v2): 1-link warm-up problems with a short-form trace `(1) 8>7`; the student's general-family
# accuracy fell from 89% to 10% (it started writing traces everywhere), so v1 (answer-only) stays.
STUDENT_VERSION = 1
BASE_STYLE = "terse"  # the base learns link-following in the simplest style; teachers then specialise


@dataclass(frozen=True)
class Profile:
    name: str
    base_steps: int
    teacher_steps: int
    student_steps: int
    d_teacher: int = 96
    layers_teacher: int = 4
    d_student: int = 64
    layers_student: int = 3
    batch: int = 32
    lr: float = 2e-3
    teacher_lr: float = 1e-3
    eval_n: int = 300
    eval_k: int = 4
    train_n: int = 4000
    # Adaptive base (None: a fixed ``base_steps`` schedule): train until greedy accuracy on
    # ``base_check_n`` validation problems reaches ``base_target`` (checked every ``base_check_every``
    # steps), with ``base_steps`` as the cap and the length of the cosine schedule.
    base_target: float | None = None
    base_check_every: int = 100
    base_check_from: int = 300  # no check before (the transition never came earlier; checks cost ~3 s)
    base_check_n: int = 100
    # Teachers stop their fine-tune at the validation accuracies of STOP_WHEN (checked every
    # ``teacher_check_every`` steps; their schedule is the cap).
    teacher_stop: bool = False
    teacher_check_every: int = 50


PROFILES = {
    "full": Profile("full", base_steps=2400, teacher_steps=250, student_steps=500, d_teacher=128, lr=1e-3,
                    teacher_lr=5e-4, eval_n=200, base_target=0.95, teacher_stop=True),
    "quick": Profile("quick", base_steps=250, teacher_steps=40, student_steps=150, d_teacher=64, layers_teacher=3,
                     d_student=48, layers_student=2, eval_n=60, eval_k=2, train_n=1500),
    # tests: seconds; accuracy is irrelevant
    "micro": Profile("micro", base_steps=8, teacher_steps=2, student_steps=4, d_teacher=32, layers_teacher=2,
                     d_student=32, layers_student=1, batch=8, eval_n=6, eval_k=1, train_n=64),
}


def accord_home() -> Path:
    return Path(os.environ.get("ACCORD_HOME", Path.home() / ".cache" / "accord"))


def lab_dir(profile: str) -> Path:
    return accord_home() / "lab" / profile


def recipe_hash(p: Profile, model: str | None = None) -> str:
    """What a model was built from; a teacher's hash also covers its own schedule, so changing
    one teacher's schedule rebuilds that teacher only."""
    h = hashlib.sha256(json.dumps({"v": RECIPE_VERSION, **asdict(p)}, sort_keys=True).encode()).hexdigest()[:16]
    if model in TEACHER_SCHEDULE:
        v = STYLE_VERSION.get(model, 1)
        key = repr(TEACHER_SCHEDULE[model]) + (f"/style-v{v}" if v != 1 else "")
        h += "-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    if model == STUDENT and STUDENT_VERSION != 1:
        h += f"-student-v{STUDENT_VERSION}"
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
    known = [*TEACHERS, STUDENT, "base"]
    if name not in known:
        raise TeacherConfigError(f"lab:{spec}: unknown lab model {name!r}; choose one of {', '.join(known)}")
    entry = valid_entry(profile, name)
    if entry is None:
        flag = "" if profile == "full" else f" --profile {profile}"
        raise TeacherConfigError(f"lab:{spec}: lab model not built (or its cache is stale); "
                                 f"run `accord lab build{flag}`")
    return Path(entry["path"])


# ------------------------------------------------------------------ data


def _msg(question: str, answer: str, prompt_style: str = "default") -> dict:
    return {"messages": [{"role": "user", "content": render_prompt(prompt_style, question)},
                         {"role": "assistant", "content": answer}]}


def style_rows(p: Profile, styles: list[str], seed: int) -> list[dict]:
    """Chain traces, half of them with ``### Step`` headers under CoRD's ``steps`` prompt.

    (A 1-hop curriculum and general-family rows in this mix slowed learning in our
    measurements, so the teachers see target traces only.)
    """
    rng = random.Random(seed)
    rows = []
    for r in generate("chain", "train")[: p.train_n]:
        headers = rng.random() < 0.5
        rows.append(_msg(r["question"], chain_trace(r["chain"], rng.choice(styles), headers),
                         "steps" if headers else "default"))
    return rows


def long_rows(p: Profile, style: str, share: float, seed: int) -> list[dict]:
    """``share`` × train_n extra 5–6-link problems (chain-ood train split) in ``style``, half with headers."""
    rng = random.Random(seed)
    rows = []
    for r in generate("chain-ood", "train")[: int(share * p.train_n)]:
        headers = rng.random() < 0.5
        rows.append(_msg(r["question"], chain_trace(r["chain"], style, headers), "steps" if headers else "default"))
    return rows


def student_rows(p: Profile, seed: int) -> list[dict]:
    """General family + answer-only target problems (1–4 hops): knows the domain, never saw reasoning."""
    rng = random.Random(seed)
    rows = [_msg(r["question"], answer_only(r["answer"])) for r in generate("last", "train")[: p.train_n]]
    rows += [_msg(r["question"], answer_only(r["answer"])) for r in generate("chain", "train")[: p.train_n // 2]]
    for _ in range(p.train_n // 4):
        c = random_chain(rng, 1, rng.randint(1, 3))
        rows.append(_msg(c.question(), answer_only(c.answer)))
    return rows


def lab_tokenizer():
    from accord.lab.tokenizer import build_tokenizer

    rows = generate("chain", "train")[:400]
    corpus = [r["question"] for r in rows] + [r["question"] for r in generate("last", "train")[:200]]
    corpus += [chain_trace(r["chain"], s, h) for r in rows[:200] for s in TOKENIZER_STYLES for h in (False, True)]
    return build_tokenizer(corpus, split_digits=False)


# ------------------------------------------------------------------ building


def _new_model(tok, d: int, layers: int, seed: int):
    from transformers import LlamaForCausalLM

    from accord.lab.micro import micro_config

    torch.manual_seed(seed)
    cfg = micro_config(len(tok), hidden=d, layers=layers, heads=4, max_pos=512)
    cfg.intermediate_size = 3 * d
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def _train(model, tok, rows, steps: int, p: Profile, lr: float, seed: int, label: str, console,
           stop=None) -> int:
    """Train in place; ``stop(step)`` → True ends training early.  Returns the steps taken."""
    from accord.train.engine import TrainArgs, train_sft
    from accord.ui import progress

    args = TrainArgs(steps=steps, batch_size=p.batch, lr=lr, warmup_ratio=0.05, min_lr_ratio=0.1, max_len=256,
                     seed=seed)

    def on_step(s: int, loss: float) -> bool:
        bar.update(task, advance=1, description=f"train {label} loss {loss:.3f}")
        return bool(stop and stop(s + 1))

    with progress(console) as bar:
        task = bar.add_task(f"train {label}", total=steps)
        return len(train_sft(model, tok, rows, args, on_step=on_step))


def _train_base(model, tok, p: Profile, console) -> dict:
    """The shared base; with ``p.base_target``, stop once it follows links on held-out problems.

    Why adaptive: the base learns link-following in a sudden transition whose step moves with
    tiny numeric differences (on one machine: step ~700 with 2 threads, ~1400 with 1 thread, same
    seed), so a fixed step count is either wasted time or a half-trained zoo.  Validation
    problems are disjoint from the test split the manifest reports.
    """
    rows = style_rows(p, [BASE_STYLE], seed=0)
    if p.base_target is None:
        return {"steps": _train(model, tok, rows, p.base_steps, p, p.lr, 0, "base", console)}
    stop, seen = _until(model, tok, {"chain": p.base_target}, p.base_check_every, p.base_check_n, p.base_check_from)
    steps = _train(model, tok, rows, p.base_steps, p, p.lr, 0, "base", console, stop=stop)
    acc = seen.get(str(steps), {}).get("chain", 0.0)
    if acc < p.base_target:
        console.print(f"[yellow]warning:[/] the lab base reached {acc:.0%} validation accuracy after its "
                      f"{steps}-step cap (target {p.base_target:.0%}); teachers may fall short")
    return {"steps": steps, "validation_greedy": acc, "checks": seen}


def _train_teacher(model, tok, p: Profile, name: str, seed: int, console) -> dict:
    steps_x, lr_x = TEACHER_SCHEDULE[name]
    rows = style_rows(p, [TEACHERS[name]], seed=seed)
    rows += long_rows(p, TEACHERS[name], LONG_CHAIN_SHARE.get(name, 0.0), seed=seed)
    stop, seen = (_until(model, tok, STOP_WHEN[name], p.teacher_check_every, p.base_check_n)
                  if p.teacher_stop and name in STOP_WHEN else (None, {}))
    steps = _train(model, tok, rows, max(1, round(p.teacher_steps * steps_x)), p, p.teacher_lr * lr_x, seed, name,
                   console, stop=stop)
    return {"steps": steps, **({"checks": seen} if seen else {})}


def _until(model, tok, targets: dict[str, float], every: int, n: int, start: int = 0):
    """A ``stop(step)`` for :func:`_train`: every ``every`` steps (from ``start``), greedy accuracy on
    ``n`` validation problems of each family (disjoint from the test splits the manifest reports)
    reaches ``targets[family]``.  ``seen`` collects ``{"<step>": {family: accuracy}}`` (JSON-ready)."""
    from accord.lab.tasks import generate as gen_problems
    from accord.problems import Problem

    val = {fam: [Problem(r["id"], r["question"], r["answer"]) for r in gen_problems(fam, "validation")[:n]]
           for fam in targets}
    seen: dict[str, dict[str, float]] = {}

    def stop(step: int) -> bool:
        if step % every or step < start:
            return False
        model.eval()
        accs = seen[str(step)] = {}
        for fam, problems in val.items():  # stop checking at the first family below its target
            accs[fam] = _greedy(model, tok, problems)
            if accs[fam] < targets[fam]:
                break
        model.train()
        return all(accs.get(fam, 0.0) >= t for fam, t in targets.items())

    return stop, seen


def _generator(model, tok, name: str = "m"):
    from accord.config import TeacherConfig
    from accord.teachers.hf import HFTeacher

    return HFTeacher(TeacherConfig(name=name, model="in-memory", batch_size=128), model=model, tokenizer=tok)


def _greedy(model, tok, problems) -> float:
    from accord.evaluate import evaluate

    return evaluate(_generator(model, tok), problems, k=0, max_new_tokens=200).greedy


def measure(model, tok, p: Profile, name: str = "m") -> dict:
    """Target greedy / pass@1 (T=0.6, k samples) and general greedy, with accord's evaluation core."""
    from accord.evaluate import evaluate
    from accord.problems import Problem

    gen = _generator(model, tok, name)

    def probs(family):
        return [Problem(r["id"], r["question"], r["answer"]) for r in generate(family, "test")[: p.eval_n]]

    target = evaluate(gen, probs("chain"), k=p.eval_k, temperature=0.6, max_new_tokens=160)
    general = evaluate(gen, probs("last"), k=0, max_new_tokens=40)
    return {"target_greedy": target.greedy, "target_pass1": target.pass1, "general_greedy": general.greedy}


def _save(model, tok, profile: str, name: str, role: str, p: Profile, accuracy: dict, manifest: dict,
          info: dict | None = None) -> dict:
    final = lab_dir(profile) / name
    tmp = lab_dir(profile) / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    entry = {"name": name, "role": role, "path": str(final), "accuracy": accuracy,
             "sha256": _sha256(final / "model.safetensors"), "recipe": recipe_hash(p, name),
             "params": sum(x.numel() for x in model.parameters()), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "training": info or {}}
    manifest["models"] = [m for m in manifest.get("models", []) if m["name"] != name] + [entry]
    _write_manifest(profile, manifest)
    return entry


def _load(profile: str, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = lab_dir(profile) / name
    return AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True), AutoTokenizer.from_pretrained(
        str(path))


def build_lab(quick: bool = False, force: bool = False, profile: str | None = None, console=None) -> dict:
    """Build (or reuse) every lab model of a profile; return the manifest."""
    from rich.console import Console

    console = console or Console(stderr=True)
    name = profile or ("quick" if quick else "full")
    p = PROFILES[name]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lab_dir(name).mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(name)
    manifest.update(profile=name, recipe=recipe_hash(p))
    t0 = time.perf_counter()
    tok = lab_tokenizer()
    plan = [("base", "base"), *[(t, "teacher") for t in TEACHERS], (STUDENT, "student")]
    for i, (model_name, role) in enumerate(plan):
        if not force and valid_entry(name, model_name, manifest):
            continue
        info, t_model = {}, time.perf_counter()
        if role == "base":
            model = _new_model(tok, p.d_teacher, p.layers_teacher, seed=0)
            info = _train_base(model, tok, p, console)
        elif role == "teacher":
            model, _ = _load(name, "base")
            info = _train_teacher(model, tok, p, model_name, i, console)
        else:
            model = _new_model(tok, p.d_student, p.layers_student, seed=99)
            info = {"steps": _train(model, tok, student_rows(p, seed=99), p.student_steps, p, p.lr, 99, "student",
                                    console)}
        model.eval()
        acc = measure(model, tok, p, model_name) if role != "base" else {}
        info["build_s"] = round(time.perf_counter() - t_model, 1)
        entry = _save(model, tok, name, model_name, role, p, acc, manifest, info)
        extra = f"{_fmt(acc)} after {info['steps']} steps ({info['build_s']:.0f}s)"
        console.print(f"built lab model [bold]{model_name}[/] ({entry['params'] / 1e6:.2f}M params) {extra}")
    console.print(f"lab profile {name!r} ready in {time.perf_counter() - t0:.0f}s at {lab_dir(name)}")
    return read_manifest(name)


def _fmt(acc: dict) -> str:
    return " ".join(f"{k}={v:.1%}" for k, v in acc.items() if v is not None)


def status(profile: str) -> dict:
    """The manifest restricted to valid entries, in the shape ``accord lab status --json`` prints."""
    manifest = read_manifest(profile)
    models = []
    for m in manifest.get("models", []):
        if m["role"] == "base" or not valid_entry(profile, m["name"], manifest):
            continue
        models.append({k: m[k] for k in ("name", "role", "path", "accuracy")})
    return {"profile": profile, "home": str(lab_dir(profile)), "models": models}


def print_status(quick: bool = False, as_json: bool = False, console=None, profile: str | None = None) -> int:
    from rich.table import Table

    st = status(profile or ("quick" if quick else "full"))
    if as_json:
        print(json.dumps(st, indent=2))
        return 0
    if not st["models"]:
        console.print(f"no lab models built for profile {st['profile']!r}; run `accord lab build`")
        return 1
    tab = Table(title=f"lab ({st['profile']}) at {st['home']}")
    for col in ("model", "role", "target greedy", "target pass@1", "general greedy"):
        tab.add_column(col, justify="left" if col in ("model", "role") else "right")
    for m in st["models"]:
        a = m["accuracy"]
        tab.add_row(m["name"], m["role"], *(f"{a.get(k, 0) or 0:.1%}" for k in
                                             ("target_greedy", "target_pass1", "general_greedy")))
    console.print(tab)
    return 0


__all__ = ["PROFILES", "Profile", "build_lab", "lab_model_path", "print_status", "status"]
