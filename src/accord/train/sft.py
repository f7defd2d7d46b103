"""STD and MTD: supervised fine-tuning on one teacher's corpus, or on all of them mixed (MoT §5 baselines).

- ``std:<teacher>`` (single-teacher distillation) trains the student on that
  teacher's corpus; plain ``std`` runs every teacher one by one.
- ``mtd`` (multi-teacher distillation) trains on the union of the corpora.

Budgets match MoT's comparison (§5, Table 22): T×S optimizer steps, a
checkpoint every S steps (each one evaluated for the curves), the same engine
settings as MoT's branches.  The cosine schedule spans the T×S steps.  With
``train.select=validation`` the recorded model (``final``) is the checkpoint
best on the held-out validation split, as the paper reports STD/MTD (§6.1);
``last`` keeps the last one.
"""

from __future__ import annotations

from accord.config import AccordConfig
from accord.train.common import (
    barrier,
    engine_args,
    epochs_note,
    is_main,
    load_corpus,
    load_student,
    read_result,
    save_model,
    select_checkpoint,
    step_checkpoints,
    steps_per_round,
    work_dir,
    write_result,
)
from accord.train.engine import train
from accord.ui import progress


def fit(cfg: AccordConfig, name: str, method: str, rows: list[dict], console, teachers: list[str]) -> dict:
    if (done := read_result(cfg, name, console)) is not None:
        return done
    T, S = cfg.train.rounds, cfg.train.steps_per_round
    steps, out = T * S, work_dir(cfg, name, method, teachers)
    _warn_epochs(console, name, len(rows), steps, cfg.train.batch_size, cfg.train.epochs, T)
    model, tok = load_student(cfg)
    args = engine_args(cfg, steps, checkpoint_every=S)
    with progress(console) as bar:
        task = bar.add_task(name, total=steps)
        res = train(model, tok, rows, args, out_dir=out, on_step=lambda s, loss: bar.update(
            task, completed=s + 1, description=f"{name} loss {loss:.3f}"))
    final = out / "final"
    if is_main():
        save_model(res.model, tok, final)
    barrier()
    curve = [c for c in step_checkpoints(out) if c["steps"] < steps] + [{"steps": steps, "path": str(final)}]
    picked = str(final)
    if cfg.train.select == "validation":  # the paper reports each method's best checkpoint (§6.1)
        picked = curve[select_checkpoint(cfg, curve, name, console)]["path"]
    return write_result(cfg, name, method=method, final=picked, last=str(final), curve=curve, branch_steps=steps,
                        teachers=teachers, examples=len(rows), resumed_from=res.resumed_from)


def _warn_epochs(console, name: str, n: int, steps: int, batch: int, epochs: float | None = None,
                 rounds: int = 1) -> None:
    """Say when the data repeats beyond what was asked: past one epoch, or — with ``train.epochs`` — past the steps
    those epochs give this corpus (:func:`resolve_budget`'s rounding: the union corpus itself never warns)."""
    asked = steps_per_round(epochs, n, batch, rounds) * rounds * batch if epochs else n
    if steps * batch > max(n, asked):
        console.print(f"[yellow]note[/]: {name} asks for {epochs_note(n, steps, batch)}; the data repeats")


def plan_std(cfg: AccordConfig, teacher: str = "") -> list[tuple[str, str, str]]:
    T, S = cfg.train.rounds, cfg.train.steps_per_round
    return [(f"std-{t}", f"std-{t}", f"{T * S} steps") for t in ([teacher] if teacher else
                                                               [t.name for t in cfg.teachers])]


def plan_mtd(cfg: AccordConfig, _arg: str = "") -> list[tuple[str, str, str]]:
    return [("mtd", "mtd", f"{cfg.train.rounds * cfg.train.steps_per_round} steps")]


def std(cfg: AccordConfig, console, teacher: str | None = None) -> list[dict]:
    names = [teacher] if teacher else [t.name for t in cfg.teachers]
    out = []
    for t in names:
        rows = load_corpus(cfg, t)
        if not rows:
            console.print(f"[yellow]warning[/]: teacher {t!r} has an empty corpus; std-{t} skipped")
            continue
        out.append(fit(cfg, f"std-{t}", "std", rows, console, [t]))
    return out


def mtd(cfg: AccordConfig, console) -> list[dict]:
    rows = load_corpus(cfg, "all")
    if not rows:
        from accord.train.common import TrainSetupError

        raise TrainSetupError("mtd: the union corpus (corpora/all.jsonl) is empty")
    return [fit(cfg, "mtd", "mtd", rows, console, [t.name for t in cfg.teachers])]
