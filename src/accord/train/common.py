"""What every recipe shares: corpora, the student, engine arguments, finished-model records.

A recipe writes each model it produces as a standard HF checkpoint directory and
records it in ``<run_dir>/train/<name>/result.json``::

    {"name": "std-terse", "method": "std", "final": ".../final",
     "curve": [{"steps": 50, "path": ".../checkpoint-50"}, ...],   # Table 22 / Fig. 3 points
     "branch_steps": 150}                                          # compute, as MoT Table 5

A stage whose ``result.json`` exists is finished and is skipped on re-run — when the config still asks for what
it was trained with: ``trained_with`` (:func:`method_settings`) is recorded beside it and a re-run with other values
stops with the keys that changed (an ablation such as ``compact.scores=[ppl,cons]`` in the same ``run_dir`` would
otherwise be "finished earlier" and never trained).  Knobs that give the same model (packing, the chunked loss, compile,
gradient checkpointing, accumulation), trackers and checkpoint retention are not settings; nor is the student's
path (recipes see it resolved).  The corpora it trained on count too (``corpora``: a digest of each file, compared
while the file is there): collecting more samples, verdicts checked again or another selection rebuild them, and
the old model is then not the method on these data.  A run killed before it finished resumes only on the settings
and corpora it started with (``settings.json``, ``corpora.json`` in its directory, :func:`work_dir`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
from pathlib import Path

from accord.card import write_card
from accord.config import AccordConfig, ProblemsConfig, diff_settings
from accord.errors import UsageError
from accord.evaluate import evaluate, student_config, student_generator
from accord.launch import gather
from accord.models import load_model_and_tokenizer, provenance
from accord.problems import ProblemSourceError, load_problems, read_jsonl
from accord.prompts import render_prompt
from accord.rows import CurvePoint, TrainRecord
from accord.teachers.base import Request, SamplingParams
from accord.teachers.hf import HFGenerator
from accord.train.engine import TrainArgs
from accord.ui import no_hf_bars
from accord.verify import CORRECT, check


class TrainSetupError(UsageError):
    """A training stage that cannot start (empty corpora, missing inputs); the message says which."""


class SettingsChanged(UsageError):
    """A finished result in ``run_dir`` was trained with other settings than the config now asks for."""


# train.* fields that do not change the trained model (tested equal) or only what is kept and logged
NOT_SETTINGS = {"method", "report_to", "packing", "chunked_loss", "lean_layers", "compile", "gradient_checkpointing",
                "grad_accum", "keep_checkpoints", "tag"}
MERGE_SETTINGS = {"merge", "mot_schedule"}  # only MoT and post-hoc merge read them


def method_settings(cfg: AccordConfig, method: str) -> dict:
    """What a finished result of ``method`` was trained with: the ``train`` fields it reads (post-hoc merge: only
    the merge — its STD students carry their own) and the method's own config section (``compact``, ``qr``)."""
    if method == "posthoc":
        return {"train": {"merge": cfg.train.merge.model_dump(mode="json")}}
    train = cfg.train.model_dump(mode="json", exclude=NOT_SETTINGS | (set() if method == "mot" else MERGE_SETTINGS))
    own = getattr(cfg, method, None)
    template = cfg.student.chat_template_kwargs  # only when set: results recorded before it keep their settings
    return {"train": train, **({method: own.model_dump(mode="json")} if hasattr(own, "model_dump") else {}),
            **({"student": {"chat_template_kwargs": template}} if template else {})}


def settings_change(cfg: AccordConfig, result: dict) -> list[str]:
    """``key: recorded → now`` for each setting a finished result was trained with that the config now changes
    (empty for a result recorded before settings were), and each corpus it read that holds other rows now
    (:func:`corpus_digests`; a result recorded before corpora were is not compared)."""
    if "trained_with" not in result or not result.get("method"):
        return []
    was = result.get("corpora") or {}
    now = corpus_digests(cfg, list(was))
    return diff_settings(result["trained_with"], method_settings(cfg, result["method"])) + [
        f"corpora/{n}.jsonl: {was[n]} → {now[n]} (collected, verified or selected again since)"
        for n in was if now[n] != was[n]]


def corpora_read(method: str, teachers: list[str]) -> list[str]:
    """The corpora (``corpora/<name>.jsonl``) a finished result of ``method`` trained on: MTD the union, a post-hoc
    merge none of its own (its STD students record theirs), every other method its teachers' (STD one)."""
    return [] if method == "posthoc" else ["all"] if method == "mtd" else list(teachers)


def corpus_digests(cfg: AccordConfig, names: list[str]) -> dict[str, str | None]:
    """A digest of each named corpus file as it is now (None where missing): what a result records so that a
    re-run after the corpora changed — more samples, verdicts checked again, another selection — stops instead
    of reporting the old model as trained on the new data."""
    root = Path(cfg.run_dir) / "corpora"
    return {n: _file_digest(root / f"{n}.jsonl") for n in names}


def _file_digest(path: Path) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return _digest(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """sha1 of a file (its size and mtime key the cache: each version is read once per process — a corpus of
    millions of traces takes seconds)."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:12]


def work_dir(cfg: AccordConfig, name: str, method: str, teachers: list[str]) -> Path:
    """A recipe's output directory, claimed for this config's settings and corpora: ``settings.json`` and
    ``corpora.json`` (:func:`corpus_digests` of what ``method`` reads from ``teachers``) are written on the first
    start, and a later start with other settings or on corpora changed since — which would resume checkpoints
    trained on the old ones — stops naming what changed (a run started before ``corpora.json`` was written
    records its corpora now)."""
    out = train_dir(cfg, name)
    path, corpora = out / "settings.json", out / "corpora.json"
    if changed := started_change(cfg, out, method):
        raise SettingsChanged(f"{tagged(cfg, name)}: {out} holds a run started with other settings or corpora "
                              "than this config asks for: " + "; ".join(changed) + ". To train these settings "
                              f"beside it, name them: train.tag=<word>; to start over, delete {out}.")
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _write_json(path, method_settings(cfg, method))
        if not corpora.exists():
            _write_json(corpora, corpus_digests(cfg, corpora_read(method, teachers)))
    return out


def started_change(cfg: AccordConfig, out: Path, method: str) -> list[str]:
    """:func:`settings_change` of the run started in ``out`` (its ``settings.json`` and ``corpora.json``; empty
    when none was)."""
    if not (path := out / "settings.json").exists():
        return []
    record = {"method": method, "trained_with": json.loads(path.read_text())}
    if (corpora := out / "corpora.json").exists():
        record["corpora"] = json.loads(corpora.read_text())
    return settings_change(cfg, record)


def tagged(cfg: AccordConfig, name: str) -> str:
    """A result's name in this run: ``<name>-<train.tag>`` when a tag is set (an ablation beside the default)."""
    return f"{name}-{cfg.train.tag}" if cfg.train.tag else name


def replicas(cfg: AccordConfig, seeds: list[int] | None = None) -> list[AccordConfig]:
    """One config per training seed (``accord run/train --seeds``): ``cfg`` itself for its own ``train.seed``
    (its models keep their names), and for every other seed s a copy with ``train.seed = s`` whose models are
    tagged ``seed<s>`` (after ``train.tag`` when one is set) — replicas the report pools over seeds."""
    out = []
    for s in dict.fromkeys(seeds or [cfg.train.seed]):
        if s == cfg.train.seed:
            out.append(cfg)
            continue
        tag = f"{cfg.train.tag}-seed{s}" if cfg.train.tag else f"seed{s}"
        out.append(cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": s, "tag": tag})}))
    return out


def train_dir(cfg: AccordConfig, name: str) -> Path:
    return Path(cfg.run_dir) / "train" / tagged(cfg, name)


def load_corpus(cfg: AccordConfig, teacher: str, replay: bool = True) -> list[dict]:
    """Chat rows of ``corpora/<teacher>.jsonl`` (``all`` = the union); errors name the file and line.

    With ``train.replay`` (and ``replay``), replay rows are appended: ``share × len(corpus)`` of them."""
    path = Path(cfg.run_dir) / "corpora" / f"{teacher}.jsonl"
    if not path.exists():
        raise TrainSetupError(f"{path}: no corpus; run `accord collect` first")

    rows = []
    for where, row in read_jsonl(path, TrainSetupError):
        msgs = row.get("messages")
        if not msgs or not isinstance(msgs, list) or msgs[-1].get("role") != "assistant":
            raise TrainSetupError(f"{where}: field 'messages' must be a list ending with an assistant turn")
        rows.append(row)
    if replay and cfg.train.replay and rows:
        pool = replay_rows(cfg)
        n = round(cfg.train.replay.share * len(rows))
        rows += [pool[i % len(pool)] for i in range(n)] if pool else []
    return rows


def steps_per_round(epochs: float, n: int, batch: int, rounds: int) -> int:
    """S such that ``rounds`` × S steps of ``batch`` rows cover ``epochs`` passes over ``n`` rows (rounded up)."""
    return max(1, math.ceil(epochs * n / (batch * rounds)))


def resolve_budget(cfg: AccordConfig, console=None) -> AccordConfig:
    """``train.epochs`` → ``train.steps_per_round``: S = ⌈epochs × rows of the union corpus (with its replay share)
    / (batch_size × rounds)⌉, one S for every method so budgets stay matched.  Unchanged without ``epochs``;
    a missing corpus raises :class:`TrainSetupError` (as training would)."""
    t = cfg.train
    if t.epochs is None:
        return cfg
    n = len(load_corpus(cfg, "all", replay=False))
    n += round(t.replay.share * n) if t.replay else 0
    S = steps_per_round(t.epochs, n, t.batch_size, t.rounds)
    if console is not None:
        console.print(f"train.epochs {t.epochs:g} over the union corpus ({n} rows, {t.batch_size} per step): "
                      f"{t.rounds} round(s) × {S} steps for every method")
    return cfg.model_copy(update={"train": t.model_copy(update={"steps_per_round": S})})


def check_corpora(cfg: AccordConfig) -> None:
    """Every corpus ``train.method`` will read exists and parses (errors name the file and line)."""
    for m in cfg.train.methods:
        name, _, arg = m.partition(":")
        if name == "qr" and cfg.qr.filter == "off":
            continue  # reads the trace store
        for t in [arg] if arg else [t.name for t in cfg.teachers]:
            load_corpus(cfg, t, replay=False)


def replay_rows(cfg: AccordConfig, console=None) -> list[dict]:
    """The base student's own verified answers on ``train.replay.path`` (``run_dir/replay.jsonl``, made once).

    Self-generated replay: rows in the student's own words, so mixing them in restrains forgetting
    without teaching any new style; only answers the verifier accepts are kept.
    """
    path = Path(cfg.run_dir) / "replay.jsonl"
    if not path.exists() and is_main():
        _make_replay(cfg, path)
    barrier()

    return [row for _, row in read_jsonl(path, TrainSetupError)]


def _make_replay(cfg: AccordConfig, path: Path) -> None:
    r = cfg.train.replay
    problems = load_problems(ProblemsConfig(path=r.path, limit=r.limit))
    gen = HFGenerator(student_config(cfg, cfg.student.model, "student", backend="hf", dtype=cfg.student.dtype))
    outs = gen.generate([Request(render_prompt("default", p.question)) for p in problems],
                        SamplingParams(temperature=0.0, max_new_tokens=r.max_new_tokens))
    gen.close()
    rows = [{"messages": [{"role": "user", "content": render_prompt("default", p.question)},
                          {"role": "assistant", "content": g.text}]}
            for p, g in zip(problems, outs) if not g.failed and check(r.verifier, p.answer, g.text).verdict == CORRECT]
    if not rows:
        raise TrainSetupError(f"train.replay: the student answered none of the {len(problems)} problems of "
                              f"{r.path} correctly; nothing to replay")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in rows))
    tmp.replace(path)


def teacher_corpora(cfg: AccordConfig, console=None) -> dict[str, list[dict]]:
    """Every teacher's corpus; empty ones are skipped with a warning, all empty is an error."""
    out = {}
    for t in cfg.teachers:
        rows = load_corpus(cfg, t.name)
        if rows:
            out[t.name] = rows
        elif console:
            console.print(f"[yellow]warning[/]: teacher {t.name!r} has an empty corpus; its branch is skipped")
    if not out:
        raise TrainSetupError("every teacher corpus is empty: nothing to train on (check `accord collect`'s table)")
    return out


def load_student(cfg: AccordConfig):
    s = cfg.student
    dtype = "float32" if s.dtype == "auto" else s.dtype  # fp32 master weights; bf16 comes from autocast
    model, tok = load_model_and_tokenizer(s.model, device="cpu", dtype=dtype, trust_remote_code=s.trust_remote_code,
                                          who="student", attention=s.attention)
    tok.padding_side = "right"
    return model, tok


def engine_args(cfg: AccordConfig, steps: int, *, checkpoint_every: int | None = None,
                schedule_steps: int | None = None, schedule_offset: int = 0, seed_offset: int = 0) -> TrainArgs:
    """The engine's arguments from ``train:`` — every field the two share by name is carried over (so a new
    option reaches the engine by being declared in both), ``lora.*`` as ``lora_*``, ``student.device``, plus this
    run's schedule."""
    t = cfg.train
    shared = {f.name: getattr(t, f.name) for f in dataclasses.fields(TrainArgs) if f.name in type(t).model_fields}
    lora = {f"lora_{k}": getattr(t.lora, k) for k in ("r", "alpha", "dropout", "quantize")}
    return TrainArgs(**{**shared, **lora, "betas": tuple(t.betas), "report_to": list(t.report_to),
                        "device": cfg.student.device, "chat_template_kwargs": dict(cfg.student.chat_template_kwargs),
                        "lora_targets": t.lora.target_modules, "steps": steps, "seed": t.seed + seed_offset,
                        "schedule_steps": schedule_steps, "schedule_offset": schedule_offset,
                        "checkpoint_every": checkpoint_every})


def epochs_note(n_rows: int, steps: int, batch: int) -> str:
    ep = steps * batch / max(1, n_rows)
    return f"{steps} steps × {batch} = {ep:.1f} epoch(s) of {n_rows} examples"


def save_model(model, tok, path: Path, local: bool = False) -> Path:
    """Atomic: written to ``<path>.partial`` then renamed, so a kill never leaves half a checkpoint.

    ``local``: written by this process whatever its rank (MoT branches trained in parallel);
    ``transformers``' ``save_pretrained`` writes on rank 0 only once torch.distributed is up.
    """
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if local and _distributed():
        from safetensors.torch import save_model as save_safetensors

        tmp.mkdir(parents=True)
        save_safetensors(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.to_json_file(tmp / "config.json")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.to_json_file(tmp / "generation_config.json")
    else:
        with no_hf_bars():
            model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    import torch.distributed as dist

    return not _distributed() or dist.get_rank() == 0


def end_distributed() -> None:
    """Leave the process group cleanly at the end of a multi-process run: without it, gloo's threads can still
    be running at interpreter exit and abort the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if _distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if _distributed():
        dist.barrier()


def write_result(cfg: AccordConfig, name: str, **fields) -> TrainRecord:
    d = train_dir(cfg, name)
    res = {"name": tagged(cfg, name), **fields, "seed": cfg.train.seed, "provenance": provenance()}
    if cfg.train.tag:
        res["tag"] = cfg.train.tag
    if fields.get("method"):  # beside a recipe's own ``settings`` (its section alone, written before this existed)
        res["trained_with"] = method_settings(cfg, fields["method"])
        res["corpora"] = corpus_digests(cfg, corpora_read(fields["method"], fields.get("teachers", [])))
    if not is_main():
        return res  # rank 0 writes the record
    d.mkdir(parents=True, exist_ok=True)
    _write_json(d / "result.json", res)
    write_card(cfg, res)  # the model's README.md; ``accord report`` adds its evaluation
    return res


def _write_json(path: Path, obj) -> None:
    """Written whole or not at all (other processes of a launch, and a re-run after a kill, read it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def read_result(cfg: AccordConfig, name: str, console=None) -> TrainRecord | None:
    """A finished result, or None; a :class:`SettingsChanged` error when the config now asks for other settings
    than it was trained with.  ``console``: say that it is skipped, under its (tagged) name."""
    p = train_dir(cfg, name) / "result.json"
    if not p.exists():
        return None
    res = json.loads(p.read_text())
    if changed := settings_change(cfg, res):
        raise SettingsChanged(f"{tagged(cfg, name)} in {p.parent} was trained with other settings than this config "
                              "asks for: " + "; ".join(changed) + ". To train these settings beside it (same "
                              "corpora, one table), name them: train.tag=<word>; to replace it, delete "
                              f"{p.parent}.")
    if console is not None:
        console.print(f"{res['name']}: finished earlier, skipped")
    return res


def step_checkpoints(out: Path) -> list[CurvePoint]:
    done = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return [{"steps": int(p.name.split("-")[1]), "path": str(p)} for p in sorted(done, key=lambda p: int(
        p.name.split("-")[1]))]


def select_checkpoint(cfg: AccordConfig, points: list[dict], name: str, console) -> int:
    """Index of the point (``{"path", "steps"}``) with the best greedy accuracy on the held-out validation
    split of ``problems`` (MoT Table 10 for rounds; §6.1's "best checkpoint" for STD/MTD); ties → the earlier.

    The hold-out is the id-hash ``validation`` split of the *training* source, whatever splits the source
    names itself; with none, the last point is kept (and a warning says so)."""
    if cfg.problems.split == "all":
        console.print(f"[yellow]warning[/]: {name}: train.select=validation with problems.split=all: the held-out "
                      "problems were also collected for training; set problems.split=train")
    try:
        probs = load_problems(cfg.problems.model_copy(update={"split": "validation", "limit": cfg.eval.limit}))
    except ProblemSourceError:
        probs = []
    if not probs:
        console.print(f"[yellow]warning[/]: {name}: no validation problems; keeping the last checkpoint")
        return len(points) - 1
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    mine = {}
    for i in range(rank, len(points), world):  # several processes: every n-th point each, as `accord eval` shares
        gen = student_generator(cfg, points[i]["path"], f"{name}-select-{i}")
        res = evaluate(gen, probs, k=0, greedy=True, max_new_tokens=cfg.eval.max_new_tokens,
                       verifier=cfg.eval.verifier)
        gen.close()
        mine[i] = res.greedy
        if world == 1:
            console.print(f"{name}: step {points[i]['steps']} validation greedy {res.greedy:.3f}")
    scores = gather(mine)
    if world > 1:
        for i, pt in enumerate(points):
            console.print(f"{name}: step {pt['steps']} validation greedy {scores[i]:.3f}")
    best = max(range(len(points)), key=lambda i: (scores[i], -i))
    console.print(f"{name}: selected step {points[best]['steps']} on {len(probs)} held-out problems")
    return best
