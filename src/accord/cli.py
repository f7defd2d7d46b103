"""The ``accord`` command.

Every stage reads the previous stage's files in the run directory and skips work
already done (``--force`` starts that stage afresh, keeping a backup).  Config
values can be overridden as ``key.sub=value`` after the config path; list items
by index (``teachers.0.model=...``) or by name (``teachers.alpha.model=...``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from rich.console import Console

EXIT_USAGE, EXIT_FAIL = 2, 1

EPILOG = """examples:
  accord run                                   # the lab quickstart, end to end
  accord run --profile quick                   # the same on the quick lab (≈3 min)
  accord run --profile quick run_dir=/tmp/q    # …with overrides (no config needed)
  accord run my.yaml train.method=[std,mtd,mot]
  accord run my.yaml --plan                    # what would be built, generated, trained, evaluated; does none
  accord run my.yaml --seeds 0,1,2             # every method trained per seed; the report pools over seeds
  accord train my.yaml train.method=mot train.rounds=5
  accord train my.yaml train.epochs=3 train.lora.r=32 train.lora.quantize=nf4   # QLoRA, steps from the data
  accord eval my.yaml
  accord report runs/lab-quickstart            # a run directory stands for the config.yaml a stage wrote there
  accord cord my.yaml cord.beam=4 cord.segmentation=prompt
  accord merge --method ties --base B --models M1 M2 --out DIR --density 0.5
  accord interpolate my.yaml --models mtd mot --points 11   # MoT Fig. 6
  accord diagnose my.yaml --problems 200       # before training: which teacher's traces fit the student
  accord drift my.yaml --models mtd compact    # after: how far each model's states moved (COMPACT Fig. 4)
  accord collect configs/lab-quickstart.yaml collect.samples=4
  accord collect my.yaml teachers.beta.base_url=http://127.0.0.1:8000/v1 --force
  accord export my.yaml --out traces.jsonl
  accord config my.yaml            # validate and print the resolved config
  accord config --schema           # every field with its description
  accord train my.yaml student.attention=flash_attention_2   # FlashAttention-2 (flash-attn, CUDA): one packed row
  accord train my.yaml student.device=cuda:1   # train (and evaluate) on the second GPU; cpu also works beside a GPU
  accord train my.yaml train.master_weights=true   # GPU: a bf16 model, float32 master weights in the optimizer
  accord env                       # versions, devices, optional packages: paste it into a bug report
  # several GPUs: configs/accelerate/ has ddp.yaml, fsdp2.yaml, deepspeed-zero2.yaml, deepspeed-zero3.yaml
  accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 4 -m accord.cli run my.yaml
"""


def _add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("config", nargs="?" if optional else None,
                   help="YAML config file, or a run directory (the config.yaml a stage wrote there)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")


def _add_plan_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", action="store_true", help="say what would be built, generated (stored / to go per "
                   "teacher), trained (finished / resumes / to train) and evaluated, and do none of it")


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds are integers separated by commas, e.g. 0,1,2") from None
    if not seeds:
        raise argparse.ArgumentTypeError("no seed given: e.g. --seeds 0,1,2")
    return seeds


def _add_seeds_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=_seed_list, metavar="S,S,...",
                   help="train every method once per training seed (e.g. 0,1,2): train.seed's own run keeps its "
                   "names, the others are tagged seed<S> (train/<name>-seed<S>/); each is evaluated like any model "
                   "and the report pools them: mean over seeds, ± over problems and seeds, the spread between seeds")


SEVERAL = ("collect", "cord", "train", "run", "eval", "interpolate")  # commands that use every process of a launch


def _show_plan(cfg, stages: tuple[str, ...], seeds: list[int] | None = None) -> int:
    from accord.launch import rank
    from accord.plan import plan

    if rank() == 0:  # several processes: said once
        print("\n".join(plan(cfg, stages, seeds)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from accord.registry import MERGE_METHODS, method_choices

    ap = argparse.ArgumentParser(prog="accord", description="Distil the reasoning of several teacher LLMs into one "
                                 "small student.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"accord {_version()}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    p = sub.add_parser("run", help="collect → train → eval → report (the lab quickstart without a config)",
                       description="Run every stage, skipping work already in run_dir. With no config: the lab "
                       "quickstart (configs/lab-quickstart.yaml; --profile quick: configs/lab-quick.yaml), "
                       "building the lab models on first use.")
    _add_config_args(p, optional=True)
    p.add_argument("--profile", choices=["full", "quick"], help="with no config: which lab config to run")
    _add_seeds_arg(p)
    _add_plan_arg(p)

    p = sub.add_parser("train", help="train the student with every method in train.method",
                       description=f"Train with train.method ({method_choices()}; a list runs "
                       "several). Reads <run_dir>/corpora; writes <run_dir>/train/<name>/ (HF checkpoints, "
                       "metrics.jsonl, result.json). A killed run resumes from its last checkpoint.")
    _add_config_args(p)
    _add_seeds_arg(p)
    _add_plan_arg(p)

    p = sub.add_parser("eval", help="evaluate the base student and every trained checkpoint",
                       description="pass@1 over eval.k samples and greedy accuracy on every eval split, for the "
                       "base student and each model in <run_dir>/train (every round/checkpoint unless "
                       "eval.every_checkpoint=false). Resumable; writes <run_dir>/eval/results.json.")
    _add_config_args(p)
    p.add_argument("--models", nargs="+", metavar="[NAME=]PATH", help="also evaluate these checkpoints")
    _add_plan_arg(p)

    p = sub.add_parser("report", help="write <run_dir>/report/index.html from finished stages",
                       description="At a glance (what the paired differences show, in words), the method table "
                       "(pass@1 ± SE, paired differences against MTD and the base), accuracy over training, each "
                       "method's own plots (MoT's rounds, COMPACT's weights, QR's routing, CoRD's steps) and the "
                       "traces behind them (where the best model and MTD differ), from whatever stages have "
                       "finished: <run_dir>/report/index.html with PNG figures beside it. A trained checkpoint not "
                       "yet evaluated is evaluated first, as `accord eval` would (`accord eval CONFIG --plan` "
                       "says how many).")
    _add_config_args(p)

    p = sub.add_parser("cord", help="CoRD: teachers write one trajectory together, step by step",
                       description="Collaborative step-wise decoding (CoRD): for every problem the teachers propose "
                       "steps, a meta-prover scores them by the predictive perplexity of the gold answer, beam "
                       "search keeps the best cord.beam prefixes. Stored as teacher 'cord' (corpora/cord.jsonl), "
                       "with the curation baseline at the same budget; summary in <run_dir>/cord/summary.json.")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="decode again the problems stored with other cord settings "
                   "(their old rows are kept in <run_dir>/cord/replaced-<time>.jsonl)")
    _add_plan_arg(p)

    p = sub.add_parser("interpolate", help="pass@1 along the line from the base to each trained model (MoT Fig. 6)",
                       description="Base-to-checkpoint linear interpolation (MoT App. D): for λ on an even grid, "
                       "θ = λ·base + (1 − λ)·checkpoint is evaluated on one split with the run's eval settings "
                       "(hf backend, weights replaced in memory). Writes <run_dir>/analysis/interpolation.json and "
                       ".png; the report draws it. Resumable.")
    _add_config_args(p)
    p.add_argument("--models", nargs="+", metavar="NAME", help="trained models to interpolate (default: mtd and "
                   "mot, where trained)")
    p.add_argument("--points", type=int, default=11, help="λ grid points from 0 to 1 (default 11: 0, 0.1, …, 1)")
    p.add_argument("--split", help="evaluation split (default: the first in eval.splits)")

    p = sub.add_parser("diagnose", help="before training: how the student sees each teacher's traces",
                       description="Teacher diagnostics (specs/diagnostics.md §6): the student before training "
                       "scores every teacher's verified traces on the problems they share — NLL (median, IQR, "
                       "mean ± SE, paired differences on the same problems), surprise rate (tokens above 5 nats), "
                       "mean rank (clipped at 100) and the Rank-Surprisal Ratio — and the teachers' style (length, "
                       "length over the median teacher's, lines, thinking words, hedges, checks per 100 words; "
                       "length against difficulty where rows carry a level), how far apart the teachers write "
                       "(Jensen–Shannon over word bigrams) and how well a classifier tells them apart, the share "
                       "of trigrams no other teacher writes, COMPACT's weights at θ0; from the trace store, every "
                       "sample right or wrong: how well the student's and the teacher's confidence tell them apart "
                       "(AUROC; global, window, step, tail), what keeping only the most confident share would buy, "
                       "and length against difficulty (per split where there are several). Ranks the teachers by "
                       "compatibility and flags one more than 2 SD less compatible than the rest. Reads "
                       "<run_dir>/corpora (run `accord collect` first) and traces.sqlite; writes "
                       "<run_dir>/analysis/teachers.json; the report shows it.")
    _add_config_args(p)
    p.add_argument("--problems", type=int, default=200, help="how many shared problems to score (default 200; "
                   "the first by id)")
    p.add_argument("--student-samples", type=int, default=0, help="the student also answers this many of those "
                   "problems (greedy, eval settings) and its own outputs join the style distances as a row "
                   "(default 0: off; generation costs what evaluation does)")

    p = sub.add_parser("drift", help="after training: how far each model's hidden states moved from the base "
                       "(COMPACT Fig. 4)", description="Post-training drift (specs/diagnostics.md §6 item 7; "
                       "COMPACT §4.3): on the first --problems prompts of every eval split, the last prompt token's "
                       "hidden state at every layer; a PCA of the base student's states per layer and split; each "
                       "trained model's shift of the mean along PC1 … PC<rank> (QR students against their own "
                       "base). Writes <run_dir>/analysis/drift.json and drift.png; the report shows them.")
    _add_config_args(p)
    p.add_argument("--models", nargs="+", metavar="NAME", help="trained models (default: every finished one)")
    p.add_argument("--problems", type=int, default=100, help="prompts per eval split (default 100)")
    p.add_argument("--rank", type=int, default=2, help="principal components (default 2: PC1 and PC2)")

    p = sub.add_parser("merge", help="merge HF checkpoints (mergekit conventions)",
                       description=f"Merge models onto a base: {', '.join(MERGE_METHODS)}. Task vectors are "
                       "model − base; weights and normalisation follow mergekit. Safetensors in, safetensors out.")
    p.add_argument("--method", default="average", choices=list(MERGE_METHODS), help="merge method (default average)")
    p.add_argument("--base", required=True, help="base checkpoint dir")
    p.add_argument("--models", nargs="+", required=True, help="checkpoint dirs to merge")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per model (default 1 each)")
    p.add_argument("--density", type=float, default=1.0, help="ties/dare: share of each task vector kept")
    p.add_argument("--normalize", choices=["true", "false"], help="override the method's default")
    p.add_argument("--seed", type=int, default=0, help="DARE's random seed")

    p = sub.add_parser("collect", help="sample, verify and store every teacher's traces; build corpora",
                       description="Sample `collect.samples` traces per teacher per problem, verify each final "
                       "answer, store them in <run_dir>/traces.sqlite (resumable), and write "
                       "<run_dir>/corpora/<teacher>.jsonl and all.jsonl with the selection policy.")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="start afresh (the old store is kept as a backup)")
    _add_plan_arg(p)

    p = sub.add_parser("export", help="export the trace store to JSONL",
                       description="Every stored generation (problem, teacher, style, sample, text, parsed answer, "
                       "verdict, judge verdict, tokens, confidence, timing) as one JSON line each.")
    _add_config_args(p)
    p.add_argument("--out", help="output file (default <run_dir>/traces.jsonl)")

    p = sub.add_parser("config", help="validate a config and print it resolved, or print the schema",
                       description="With a config: check it (every problem at once, with its field path) and print "
                       "it with defaults and overrides applied. --schema: every field with its meaning.")
    _add_config_args(p, optional=True)
    p.add_argument("--schema", action="store_true", help="print every config field with its description")

    p = sub.add_parser("env", help="what this machine runs accord with (for bug reports)",
                       description="Versions, devices, the optional packages and what each turns on, what the "
                       "default settings resolve to here, and the environment variables that steer a run (never "
                       "a key or token). Paste it into a bug report.")
    p.add_argument("--json", action="store_true", help="print it as JSON")

    p = sub.add_parser("lab", help="the offline lab: build and inspect the teacher zoo and student",
                       description="Tiny HF-format teachers and a student the project trains itself, on tasks it "
                       "generates, so every stage runs offline on a CPU through the same code path as real "
                       "models (referenced in configs as lab:<model> and lab:<task>).")
    lab = p.add_subparsers(dest="lab_cmd", metavar="ACTION")
    b = lab.add_parser("build", help="train the lab models (cached under $ACCORD_HOME)")
    b.add_argument("--quick", action="store_true", help="small models for smoke runs")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--profile", choices=["full", "quick", "micro"], help="build profile (micro: for tests)")
    b.add_argument("--seed", type=int, help="lab seed (default: $ACCORD_LAB_SEED or 0); another seed, another zoo")
    b.add_argument("--with", dest="extra", action="append", choices=["student-b"],
                   help="also build an optional model: student-b (QR-Distill's second student, another tokenizer)")
    b.add_argument("--allow-weak", action="store_true",
                   help="keep models that miss their accuracy bands and exit 0 (they are still reported)")
    s = lab.add_parser("status", help="show what is built, with measured accuracies")
    s.add_argument("--json", action="store_true", help="print the manifest as JSON")
    s.add_argument("--quick", action="store_true", help="the quick profile's models")
    s.add_argument("--profile", choices=["full", "quick", "micro"], help="which profile to show")

    sub.add_parser("demo", help="the main job on the embedded lab (what `make demo` runs)",
                   description="Build the lab on first use, then collect, train every method, evaluate and "
                   "report on it (configs/lab-quickstart.yaml; ACCORD_DEMO_PROFILE=quick: the smoke version), "
                   "printing the method table. Finished stages are skipped on a re-run.")
    return ap


def _version() -> str:
    from accord import __version__

    return __version__


def _load(args):
    from accord.config import ConfigError, load_config

    if _is_override(args.config):
        raise ConfigError(args.config, [("", f"this looks like a key=value override, not a config file: give the "
                                         f"YAML config first (accord {args.cmd} CONFIG {args.config} …); only "
                                         "`accord run` takes overrides without one (the lab quickstart)")])
    return load_config(args.config, args.overrides)


def cmd_collect(args, console: Console) -> int:
    from accord.collect import collect

    cfg = _load(args)
    if args.plan:
        return _show_plan(cfg, ("collect",))
    from accord.launch import rank
    from accord.run import launch_share

    share = launch_share(cfg)  # `accelerate launch`: hf teachers' batches dealt out among the processes
    store = Path(cfg.run_dir) / "traces.sqlite"
    if args.force and store.exists() and rank() == 0:
        backup = store.with_name(f"traces.{time.strftime('%Y%m%d-%H%M%S')}.sqlite")
        store.rename(backup)
        for ext in ("-wal", "-shm"):
            side = Path(str(store) + ext)
            if side.exists():
                side.rename(Path(str(backup) + ext))
        console.print(f"previous store kept as {backup}")
    res = collect(cfg, console, share)
    if rank() > 0:
        return 0
    console.print(f"generated {res.generated} new trace(s); corpora in {Path(cfg.run_dir) / 'corpora'}")
    return 0


def cmd_export(args, console: Console) -> int:
    from accord.store import TraceStore

    cfg = _load(args)
    path = Path(cfg.run_dir) / "traces.sqlite"
    if not path.exists():
        console.print(f"[red]error[/]: no trace store at {path}; run `accord collect` first")
        return EXIT_FAIL
    out = args.out or str(Path(cfg.run_dir) / "traces.jsonl")
    store = TraceStore(path)
    n = store.export_jsonl(out)
    store.close()
    console.print(f"wrote {n} trace(s) to {out}")
    return 0


def cmd_config(args, console: Console) -> int:
    import yaml

    if args.schema:
        from accord.config import AccordConfig

        _print_schema(AccordConfig, "", console)
        return 0
    if not args.config:
        console.print("[red]error[/]: give a config file or --schema")
        return EXIT_USAGE
    cfg = _load(args)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _print_schema(model, prefix: str, console: Console) -> None:
    from pydantic import BaseModel

    for name, f in model.model_fields.items():
        ann = f.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner:
            _print_schema(inner[0], f"{prefix}{name}.", console)
            continue
        from rich.markup import escape

        default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
        # descriptions and defaults hold brackets ([ppl,cons], lab:<task>[:<split>]): text, not markup
        console.print(f"[bold]{escape(prefix + name)}[/] ({escape(default)}): {escape(f.description or '')}",
                      highlight=False)


def cmd_env(args, console: Console) -> int:
    import json

    from rich.markup import escape
    from rich.table import Table

    from accord.models import environment

    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    tab = Table(title="accord env", show_header=False)
    tab.add_column("what", style="bold")
    tab.add_column("value")
    for section, rows in env.items():
        tab.add_section()
        tab.add_row(f"[dim]{section}[/]", "" if rows else "[dim](none set)[/]")
        for k, v in rows.items():
            tab.add_row(escape(k), escape(v))
    console.print(tab)
    return 0


def cmd_lab(args, console: Console) -> int:
    from accord.lab import build as labbuild

    if args.lab_cmd == "build":
        if args.seed is not None:
            os.environ["ACCORD_LAB_SEED"] = str(args.seed)
        try:
            labbuild.build_lab(quick=args.quick, force=args.force, profile=args.profile, console=console,
                               allow_weak=args.allow_weak, extra=tuple(args.extra or ()))
        except labbuild.LabTooWeak as e:
            console.print(f"[red]error:[/] {e}")
            return 1
        return 0
    if args.lab_cmd == "status":
        return labbuild.print_status(quick=args.quick, as_json=args.json, console=console, profile=args.profile)
    console.print("usage: accord lab {build,status}")
    return EXIT_USAGE


def _run_config(args):
    from accord.config import load_config
    from accord.demo import config_path

    config, overrides = args.config, list(args.overrides)
    if config and _is_override(config):  # `accord run run_dir=X`: overrides of the lab quickstart
        config, overrides = None, [config, *overrides]
    if config:
        return load_config(config, overrides)
    name = "lab-quick.yaml" if getattr(args, "profile", None) == "quick" else "lab-quickstart.yaml"
    return load_config(config_path(name), overrides)


def _is_override(arg: str) -> bool:
    """``key.sub=value`` given where a config file goes, and no file of that name exists."""
    return "=" in arg and not Path(arg).exists() and bool(re.match(r"^[A-Za-z_][\w.\-\[\]]*=", arg))


def cmd_run(args, console: Console) -> int:
    from accord.run import run

    if args.plan:
        return _show_plan(_run_config(args), ("collect", "train", "eval", "report"), args.seeds)
    run(_run_config(args), console, seeds=args.seeds)
    return 0


def cmd_train(args, console: Console) -> int:
    from accord.run import run

    if args.plan:
        return _show_plan(_load(args), ("train",), args.seeds)
    from accord.launch import rank

    res = run(_load(args), console, stages=("train",), seeds=args.seeds)
    for r in res["results"] if rank() == 0 else []:  # several processes: said once
        console.print(f"{r['name']}: {r['final']}")
    return 0


def cmd_eval(args, console: Console) -> int:
    from accord.analysis.report import summary_text
    from accord.run import run

    cfg = _load(args)
    if args.plan:
        return _show_plan(cfg, ("eval",))
    extra = []
    for m in args.models or []:
        name, _, path = m.rpartition("=")
        if not Path(path).is_dir():
            console.print(f"[red]error[/]: --models {m}: no such checkpoint directory")
            return EXIT_USAGE
        extra.append({"name": name or Path(path).name, "final": path, "curve": []})
    from accord.launch import rank

    res = run(cfg, console, stages=("eval",), extra_results=extra)
    if rank() > 0:  # several processes: each evaluated its share, process 0 the table
        return 0
    print(summary_text(Path(cfg.run_dir), res["eval"], res.get("results", []), list(cfg.eval.splits)))
    return 0


def cmd_report(args, console: Console) -> int:
    from accord.run import run

    run(_load(args), console, stages=("eval", "report"))
    return 0


def cmd_merge(args, console: Console) -> int:
    from accord.train.merge import MergeSpec, merge_checkpoints
    from accord.ui import progress

    norm = None if args.normalize is None else args.normalize == "true"
    spec = MergeSpec(method=args.method, weights=args.weights, density=args.density, normalize=norm, seed=args.seed)
    with progress(console) as bar:
        task = bar.add_task(f"merge ({args.method})", total=None)

        def tick(names):
            bar.update(task, total=len(names))
            for n in names:
                yield n
                bar.update(task, advance=1)

        out = merge_checkpoints(args.base, args.models, spec, args.out, progress=tick)
    console.print(f"merged {len(args.models)} model(s) with {args.method} → {out}")
    return 0


def cmd_interpolate(args, console: Console) -> int:
    from accord.analysis import interpolate
    from accord.launch import rank
    from accord.run import launch_share, prepare_models

    cfg = _load(args)
    share = launch_share(cfg)  # `accelerate launch`: the points dealt out among the processes
    if rank() == 0:
        prepare_models(cfg, console)  # a lab student's base is built if missing (the others wait in the stage)
    interpolate.run(cfg, console, args.models, args.points, args.split, share)
    if rank() > 0:
        return 0
    console.print(f"interpolation: {Path(cfg.run_dir) / 'analysis' / 'interpolation.png'} "
                  "(and in the report: accord report CONFIG)")
    return 0


def cmd_diagnose(args, console: Console) -> int:
    from accord.analysis import diagnose
    from accord.run import prepare_models

    cfg = _load(args)
    prepare_models(cfg, console)  # a lab student is built if missing
    diagnose.run(cfg, console, args.problems, student_samples=args.student_samples)
    return 0


def cmd_drift(args, console: Console) -> int:
    from accord.analysis import drift
    from accord.run import finished_results, prepare_models

    cfg = _load(args)
    prepare_models(cfg, console)  # a lab student's base is built if missing
    drift.run(cfg, console, finished_results(cfg), args.models, args.problems, args.rank)
    return 0


def cmd_cord(args, console: Console) -> int:
    from accord.cord import stage
    from accord.launch import rank
    from accord.run import launch_share, prepare_models

    cfg = _load(args)
    if args.plan:
        from accord.plan import cord_plan

        if rank() == 0:  # several processes: said once
            print("\n".join(cord_plan(cfg)))
        return 0
    share = launch_share(cfg)  # `accelerate launch`: the problems dealt out among the processes
    if rank() == 0:
        prepare_models(cfg, console, student=False)  # the others wait for it inside the stage
    stage.run(cfg, console, share, force=args.force)
    if rank() > 0:
        return 0
    console.print(f"CoRD traces: {Path(cfg.run_dir) / 'corpora' / 'cord.jsonl'}; "
                  f"summary: {Path(cfg.run_dir) / 'cord' / 'summary.json'}")
    return 0


def cmd_demo(args, console: Console) -> int:
    from accord.demo import demo

    return demo(console)


COMMANDS = {"cord": cmd_cord, "run": cmd_run, "train": cmd_train, "eval": cmd_eval, "report": cmd_report,
            "merge": cmd_merge,
            "interpolate": cmd_interpolate,
            "diagnose": cmd_diagnose,
            "drift": cmd_drift,
            "collect": cmd_collect, "export": cmd_export, "config": cmd_config, "env": cmd_env, "lab": cmd_lab,
            "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    from accord.errors import AccordError
    from accord.ui import quiet_libraries

    quiet_libraries()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (`accord train my.yaml --plan train.rounds=2`)
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    if not args.cmd:
        parser.print_help()
        return EXIT_USAGE
    from accord.launch import rank, world
    from accord.ui import make_console

    console = make_console(quiet=rank() > 0)  # several processes: one says what happens (errors still print)

    if world() > 1 and args.cmd not in SEVERAL:  # `accelerate launch` of a one-process command
        if rank() > 0:
            return 0  # process 0 does it; the others of the launch leave at once
        console.print(f"[yellow]note[/]: accord {args.cmd} runs on one process; this launch's {world() - 1} other "
                      f"process(es) left at once (only {', '.join(SEVERAL)} use several)")
    try:
        code = COMMANDS[args.cmd](args, console)
        if "torch.distributed" in sys.modules:  # under torchrun / accelerate launch: leave the group cleanly
            from accord.train.common import end_distributed

            end_distributed()
        return code
    except AccordError as e:  # every error a user can act on: exit 2 for bad input, 1 for a failed run
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished batches are stored; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
