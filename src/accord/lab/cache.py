"""The lab's cache: ``$ACCORD_HOME/lab/<profile>/<model>/`` (standard HF checkpoints) and
``manifest.json``.  Each entry records the SHA-256 of its safetensors file and the recipe hash; an entry
whose files are missing, altered or built by another recipe is rebuilt, never loaded.  Models are written
to a temporary directory and renamed into place, so a killed build leaves no partial entry; one builder
per profile at a time (``lab_lock``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from accord.lab.recipe import (
    EXTRAS,
    PROFILES,
    RANDOM,
    RECIPE_VERSION,
    STUDENT,
    STUDENT_B,
    STUDENT_B_RECIPE,
    TEACHERS,
    Profile,
    lab_seed,
    zoo_checks,
)
from accord.teachers.base import TeacherConfigError
from accord.ui import no_hf_bars


def accord_home() -> Path:
    return Path(os.environ.get("ACCORD_HOME", Path.home() / ".cache" / "accord"))


def lab_dir(profile: str) -> Path:
    return accord_home() / "lab" / profile


LATER_FIELDS = ("stop_skip", "chunked_loss")  # Profile fields that joined after the recipe's version


def recipe_hash(p: Profile, model: str | None = None) -> str:
    """What a model was built from; a teacher's hash also covers its own recipe (changing one teacher
    rebuilds that teacher only); teachers start from the student, so a new student rebuilds them."""
    key = {"v": RECIPE_VERSION, "seed": lab_seed(), **asdict(p)}
    for f in LATER_FIELDS:  # added after labs were built: at their defaults they leave those builds valid
        if key[f] == getattr(Profile, f):
            del key[f]
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if model in TEACHERS:
        h += "-" + hashlib.sha256(repr(TEACHERS[model]).encode()).hexdigest()[:8]
    if model == STUDENT_B:
        h += "-" + hashlib.sha256(repr(STUDENT_B_RECIPE).encode()).hexdigest()[:8]
    return h


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


def _save_tmp(model, tok, profile: str, name: str) -> Path:
    tmp = lab_dir(profile) / f".{name}.tmp"

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

    from accord.models import no_hub_kernels

    path = lab_dir(profile) / name
    with no_hf_bars():
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, **no_hub_kernels())
    return model, AutoTokenizer.from_pretrained(str(path))


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
