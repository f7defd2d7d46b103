"""Build and inspect the lab (``accord lab build`` / ``accord lab status``): every model of the recipe
(``lab.recipe``) trains until its validation targets (a cap bounds it), is measured with accord's evaluation
core on the test splits, checked against its band, and recorded in the cache (``lab.cache``).  Teachers
train side by side in a spawn pool on several cores.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from accord.config import GeneratorConfig
from accord.errors import RunFailure
from accord.evaluate import evaluate
from accord.lab.cache import _load, _save, _save_tmp, lab_dir, lab_lock, read_manifest, recipe_hash, status, valid_entry
from accord.lab.recipe import (
    BREAKDOWN,
    BUILD_ORDER,
    EXTRAS,
    PROFILES,
    RANDOM,
    STUDENT,
    STUDENT_B,
    STUDENT_B_RECIPE,
    TEACHERS,
    Profile,
    _new_model,
    _new_qwen2,
    _validation,
    band_misses,
    hash_name,
    lab_seed,
    lab_tokenizer,
    lab_tokenizer_b,
    student_rows,
    teacher_rows,
    zoo_checks,
)
from accord.lab.tasks import generate
from accord.problems import Problem
from accord.prompts import render_prompt
from accord.teachers.base import Request, SamplingParams
from accord.teachers.hf import HFGenerator
from accord.train.engine import TrainArgs, train_sft
from accord.ui import make_console, progress, quiet_libraries, say_once
from accord.verify import CORRECT, check


def _train(model, tok, rows, steps: int, p: Profile, lr: float, seed: int, label: str, console,
           stop=None) -> int:
    """Train in place; ``stop(step)`` → True ends training early.  Returns the steps taken."""
    # packing off: the lab's models are pinned by their recipe hash, and its checks were recorded with padded
    # batches (packing changes float sums in the last digits, and the base's skill arrives as a sudden transition)
    args = TrainArgs(steps=steps, batch_size=p.batch, lr=lr, warmup_ratio=0.05, min_lr_ratio=p.min_lr_ratio,
                     max_len=256, seed=seed, packing=False, chunked_loss=p.chunked_loss)

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


def _generator(model, tok, name: str = "m"):
    return HFGenerator(GeneratorConfig(name=name, model="in-memory", batch_size=256), model=model, tokenizer=tok)


def _greedy(model, tok, problems) -> float:
    return evaluate(_generator(model, tok), problems, k=0, max_new_tokens=200).greedy


def _per_problem(gen, problems, max_new_tokens: int) -> list[bool]:
    """Greedy correctness per problem (for the oracle and the breakdown)."""
    outs = gen.generate([Request(render_prompt("default", p.question)) for p in problems],
                        SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    return [not g.failed and check("math", p.answer, g.text).verdict == CORRECT for p, g in zip(problems, outs)]


def measure(model, tok, p: Profile, name: str = "m") -> dict:
    """Accuracies on the test splits with accord's evaluation core, and the per-category breakdown."""
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


class LabTooWeak(RunFailure):
    """A lab model missed its accuracy band (``accord lab build --allow-weak`` keeps it anyway)."""


def _build_one(tok, p: Profile, profile: str, name: str, console) -> tuple[object, dict]:
    seed = lab_seed()
    if name == RANDOM:
        return _new_model(tok, p.d, p.layers, seed=99 + seed, init_range=p.init_range), {"steps": 0}
    if name in (STUDENT, STUDENT_B):
        model = (_new_model(tok, p.d, p.layers, seed=99 + seed, init_range=p.init_range) if name == STUDENT else
                 _new_qwen2(tok, round(p.d * STUDENT_B_RECIPE["width"]), p.layers, seed=77 + seed,
                            init_range=p.init_range))
        targets = {"arith-1": p.student_stop, "last": p.student_stop}
        info = _train_until(model, tok, student_rows(p), p, targets, p.student_steps, p.lr, seed, name, console)
    else:
        # teachers share the student's pre-training (the table, the general family) and learn to reason in
        # their own style on top of it
        model, _ = _load(profile, STUDENT)
        targets = {f: min(t, p.stop_cap) for f, t in TEACHERS[name].stop if f not in p.stop_skip}
        rows = teacher_rows(p, name, seed=hash_name(name) + seed)
        info = _train_until(model, tok, rows, p, targets, p.teacher_steps, p.teacher_lr, seed, name, console)
    return model, info


def build_lab(quick: bool = False, force: bool = False, profile: str | None = None, console=None,
              allow_weak: bool = False, extra: tuple[str, ...] = ()) -> dict:
    """Build (or reuse) every lab model of a profile; return the manifest.

    A model that misses its band is kept and recorded (``weak`` in the manifest) with a warning naming
    it, its accuracy and the band; unless ``allow_weak``, :class:`LabTooWeak` is raised at the end.
    """
    console = console or make_console()
    name = profile or ("quick" if quick else "full")
    p = PROFILES[name]
    torch.set_num_threads(_cpus())
    lab_dir(name).mkdir(parents=True, exist_ok=True)
    with lab_lock(name, console):
        return _build_locked(name, p, force, console, allow_weak, tuple(e for e in extra if e in EXTRAS))


def to_build(profile: str, extra: tuple[str, ...] = (), manifest: dict | None = None, force: bool = False) -> list[str]:
    """The models a build of ``profile`` (with the optional ``extra`` ones) makes: every one not validly cached."""
    manifest = manifest if manifest is not None else read_manifest(profile)
    return [m for m in (STUDENT, RANDOM, *extra, *TEACHERS) if force or not valid_entry(profile, m, manifest)]


def _build_locked(name: str, p: Profile, force: bool, console, allow_weak: bool, extra: tuple[str, ...] = ()) -> dict:
    manifest = read_manifest(name)
    manifest.update(profile=name, recipe=recipe_hash(p), seed=lab_seed())
    t0 = time.perf_counter()
    todo = to_build(name, extra, manifest, force)
    if todo:
        workers = _workers(name, len([m for m in todo if m in TEACHERS]))
        console.print(f"building the lab ({name!r} profile, seed {lab_seed()}, "
                      + (f"teachers on {workers} processes × {max(1, _cpus() // workers)} thread(s)"
                         if workers > 1 else f"{torch.get_num_threads()} threads")
                      + f") at {lab_dir(name)}: about {_ETA[name]} on 2 CPU cores")
        if STUDENT in todo:  # the teachers start from the student: it comes first, with every thread
            _record(name, p, manifest, console, *_build_job((name, STUDENT, torch.get_num_threads(), console)))
        for m in extra:
            if m in todo:
                _record(name, p, manifest, console, *_build_job((name, m, torch.get_num_threads(), console)))
        # longest first; the untrained random-init model (seconds: only measured) last, on whichever worker
        # frees first, so it never waits on the critical path
        jobs = sorted((m for m in todo if m in TEACHERS), key=BUILD_ORDER.index) + \
            [m for m in (RANDOM,) if m in todo]
        if workers > 1:
            import multiprocessing as mp

            threads = max(1, _cpus() // workers)
            with mp.get_context("spawn").Pool(workers, initializer=quiet_libraries) as pool:
                for res in pool.imap_unordered(_build_job, [(name, m, threads, None) for m in jobs]):
                    _record(name, p, manifest, console, *res)
        else:
            for m in jobs:
                _record(name, p, manifest, console, *_build_job((name, m, torch.get_num_threads(), console)))
    manifest = read_manifest(name)
    if todo:
        console.print(f"lab profile {name!r} ready in {time.perf_counter() - t0:.0f}s at {lab_dir(name)}")
    weak = [m for m in manifest.get("models", []) if m.get("weak") and valid_entry(name, m["name"], manifest)]
    zoo = zoo_checks(status(name)) if p.teacher_band and p.zoo_band else {"misses": []}
    for w in zoo["misses"]:  # once per process: every stage of a run checks the lab again
        say_once(f"[yellow]warning:[/] lab zoo: {w}", console)
    if (weak or zoo["misses"]) and not allow_weak and p.teacher_band:
        names = ", ".join(m["name"] for m in weak) or "the zoo"
        raise LabTooWeak(f"lab profile {name!r}: {names} missed the lab's bands (see the warnings above and "
                         "`accord lab status`); rebuild with another ACCORD_LAB_SEED, or pass --allow-weak")
    return manifest


_ETA = {"full": "4 minutes", "quick": "2 minutes", "micro": "seconds"}


def _cpus() -> int:
    return int(os.environ.get("ACCORD_LAB_THREADS", "0")) or max(1, os.cpu_count() or 1)


def _workers(profile: str, n_teachers: int) -> int:
    """Processes that train teachers side by side: tiny models use one core poorly (a step of the lab's
    0.13M-parameter model is 1.4× faster on 2 threads than on 1, while 2 processes do 2 steps), so on
    2 cores two teachers train at once, 1 thread each.  ``ACCORD_LAB_WORKERS=1``: one at a time with
    every thread; the micro profile (tests, seconds) always builds in this process."""
    env = int(os.environ.get("ACCORD_LAB_WORKERS", "0"))
    if profile == "micro":
        return 1
    return max(1, min(n_teachers, env or min(4, _cpus())))


def _build_job(job: tuple) -> tuple:
    """Train, measure and save one model (in this process or a pool worker); returns what the parent records."""
    profile, model_name, threads, console = job
    if console is None:  # a pool worker: plain throttled progress lines, never two live bars at once
        console = make_console(force_terminal=False)
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
