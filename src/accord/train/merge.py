"""Weight-merge operators and checkpoint merging (MoT §4.3 Eq. 2; mergekit conventions).

Operators by name in ``accord.registry.MERGE_METHODS`` (defaults and paper per record):

- ``average`` — MoT's operator (§4.3 Eq. 2, "weight averaging"): the (weighted) mean of the
  models; mergekit's ``linear`` with ``normalize: true``.  ``linear`` is an alias.
- ``task_arithmetic`` (Ilharco et al. 2023, arXiv:2212.04089): base + Σ wᵢ τᵢ.
- ``ties`` (Yadav et al. 2023, arXiv:2306.01708): keep the top-``density`` share of
  each task vector by magnitude, elect a sign per entry from the sum of the
  weighted task vectors, average the agreeing entries.
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2024, arXiv:2311.03099): random drop
  with keep probability ``density`` and rescale by 1/density; then linear or TIES.

Conventions follow mergekit's ``GeneralizedTaskArithmeticMerge`` (what users of
merge configs expect): task vectors τᵢ = θᵢ − θ_base; weights multiply τᵢ *before*
sign election; with ``normalize`` the mixed delta is divided by the sum of the
weights (for TIES: of the weights whose sign agrees, per entry; zero sums → 1).
Defaults as in mergekit's registry: ``normalize`` on for ``average``/``ties``, off
for ``task_arithmetic``/``dare_*``; weights default to 1; density to 1.
The pruning and sign-election primitives come from ``peft.utils.merge_utils``;
only the mergekit-style weighting/normalisation around them is written here
(peft's own ``ties`` divides by the *count* of agreeing models, which differs
from mergekit as soon as weights are unequal).

Choices where the references are silent: arithmetic runs in float32 and the
result is cast back to the base dtype; DARE's random masks are seeded per
(seed, tensor name, model index), so a merge is reproducible and independent of
tensor order (MoT folds the round into the seed, so rounds draw new masks); non-floating tensors (integer
buffers) are taken from the base.

Two ways to merge:
- ``merge_checkpoints`` streams tensor by tensor from safetensors files (one
  tensor per model in memory at a time) — used by ``accord merge`` and post-hoc;
- ``RunningMerge`` keeps one float32 running sum in memory for the linear
  operators, so MoT never holds K branch copies when branches run one after
  another.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from peft.utils.merge_utils import (
    calculate_majority_sign_mask,
    magnitude_based_pruning,
    random_pruning,
)

from accord.errors import UsageError
from accord.registry import LINEAR_METHODS, MERGE_METHODS


class MergeError(UsageError):
    """Models that cannot be merged (names the first offending tensor or file)."""


@dataclass
class MergeSpec:
    method: str = "average"
    weights: list[float] | None = None  # one per model; default 1 each
    density: float = 1.0
    normalize: bool | None = None  # None → the method's default (mergekit's registry)
    rescale: bool | None = None  # DARE's 1/density rescale; None → method default
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in MERGE_METHODS:
            raise MergeError(f"unknown merge method {self.method!r}; choose one of {', '.join(MERGE_METHODS)}")
        if not 0 < self.density <= 1:
            raise MergeError(f"density must be in (0, 1], got {self.density}")

    @property
    def do_normalize(self) -> bool:
        return MERGE_METHODS[self.method].normalize if self.normalize is None else self.normalize

    @property
    def do_rescale(self) -> bool:
        return MERGE_METHODS[self.method].rescale if self.rescale is None else self.rescale

    def weights_for(self, n: int) -> list[float]:
        w = self.weights or [1.0] * n
        if len(w) != n:
            raise MergeError(f"{len(w)} weight(s) given for {n} model(s)")
        return [float(x) for x in w]


def spec_from(merge_cfg, weights: list[float] | None = None) -> MergeSpec:
    """The operator a ``train.merge`` config section names (every field the two share, so a new setting
    reaches the merge by being declared in both), with per-model ``weights`` resolved by the caller."""
    shared = {f.name for f in fields(MergeSpec)} & set(type(merge_cfg).model_fields) - {"weights"}
    return MergeSpec(**{k: getattr(merge_cfg, k) for k in shared}, weights=weights)


def _tensor_seed(seed: int, name: str, i: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 31 + i) % (2**63)


def _sparsify(delta: torch.Tensor, spec: MergeSpec, name: str, i: int) -> torch.Tensor:
    how = MERGE_METHODS[spec.method].sparsify
    if how is None or spec.density >= 1:
        return delta
    if how == "magnitude":
        if int(spec.density * delta.numel()) == 0:
            return torch.zeros_like(delta)  # mergekit refuses k=0; keeping nothing is the honest reading
        return magnitude_based_pruning(delta, spec.density)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_tensor_seed(spec.seed, name, i))
        return random_pruning(delta, spec.density, rescale=spec.do_rescale)


def merge_tensor(name: str, base: torch.Tensor, models: Sequence[torch.Tensor], spec: MergeSpec) -> torch.Tensor:
    """Merge one tensor of K models onto ``base`` (all the same shape)."""
    if not base.is_floating_point():
        return base.clone()
    b = base.float()
    w = torch.tensor(spec.weights_for(len(models)), dtype=torch.float32)
    deltas = torch.stack([_sparsify(m.float() - b, spec, name, i) for i, m in enumerate(models)])
    w = w.view(-1, *([1] * base.dim()))
    weighted = deltas * w
    if MERGE_METHODS[spec.method].sign_consensus:
        mask = calculate_majority_sign_mask(weighted, method="total")
        mixed = (weighted * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if spec.do_normalize:
        mixed = mixed / divisor
    return (b + mixed).to(base.dtype)


def merge_state_dicts(base: dict[str, torch.Tensor], models: Sequence[dict[str, torch.Tensor]],
                      spec: MergeSpec) -> dict[str, torch.Tensor]:
    """In-memory merge of whole state dicts (names and shapes must match)."""
    for i, sd in enumerate(models):
        _check_same(base, sd, f"model {i}")
    return {n: merge_tensor(n, t, [sd[n] for sd in models], spec) for n, t in base.items()}


def _check_same(base: dict, other: dict, label: str, shapes: dict | None = None) -> None:
    for n in base:
        if n not in other:
            raise MergeError(f"{label} has no tensor {n!r} (architectures differ)")
        a = shapes[n] if shapes else tuple(base[n].shape)
        b = tuple(other[n].shape) if not isinstance(other[n], tuple) else other[n]
        if tuple(a) != tuple(b):
            raise MergeError(f"tensor {n!r}: shape {tuple(b)} in {label} but {tuple(a)} in the base")
    extra = sorted(set(other) - set(base))
    if extra:
        raise MergeError(f"{label} has tensor {extra[0]!r} that the base lacks (architectures differ)")


class RunningMerge:
    """Linear merge with one float32 running sum: add branches one at a time, then ``result``.

    Memory: the running sum (one model copy) besides the base the caller holds.
    Bandwidth: the first ``add`` writes the sum, later ones read-add-write it,
    ``result`` finishes in one more pass (Σwθ/Σw for an average).
    ``buffers``: a dict the running sum lives in and that outlives this merge (MoT passes the same one every
    round), so no round allocates (and page-faults) a fresh model copy; the tensors ``result`` returns are
    those buffers — consume them (``load_state_dict`` copies) before the next merge's first ``add``.
    """

    def __init__(self, base: dict[str, torch.Tensor], spec: MergeSpec, buffers: dict | None = None):
        if spec.method not in LINEAR_METHODS:
            raise MergeError(f"RunningMerge supports {LINEAR_METHODS}, not {spec.method!r}")
        self.base, self.spec = base, spec
        self.float_names = [n for n, t in base.items() if t.is_floating_point()]
        self.acc: dict[str, torch.Tensor] = {}
        self.buffers = {} if buffers is None else buffers
        self.total_w, self.n = 0.0, 0

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != like.shape or buf.device != like.device:
            buf = self.buffers[name] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return buf

    @torch.no_grad()
    def add(self, state: dict[str, torch.Tensor], weight: float = 1.0) -> None:
        if self.n == 0:
            _check_same(self.base, state, "branch 0")
            self.acc = {}
            for n in self.float_names:  # Σ wᵢ θᵢ starts here, written into the kept buffer
                buf = self.acc[n] = self._buffer(n, state[n])
                buf.copy_(state[n])
                if weight != 1.0:
                    buf.mul_(weight)
        else:
            for name, acc in self.acc.items():
                acc.add_(state[name], alpha=weight)
        self.total_w += weight
        self.n += 1

    @torch.no_grad()
    def result(self) -> dict[str, torch.Tensor]:
        """The merged state dict, computed in place in the running sum (no third copy); call once."""
        if self.n == 0:
            raise MergeError("nothing to merge: no branch was added")
        W = self.total_w
        div = W if (self.spec.do_normalize and abs(W) >= 1e-8) else 1.0
        out = {}
        for name, t in self.base.items():
            if name not in self.acc:
                out[name] = t.clone()
                continue
            # base + (Σ wᵢ θᵢ − W·base) / div  ==  Σ wᵢ θᵢ / div + (1 − W/div)·base
            acc = self.acc[name].div_(div)
            if abs(1 - W / div) > 0:
                acc.add_(t, alpha=1 - W / div)
            out[name] = acc.to(t.dtype)
        self.acc = {}
        return out

    def all_reduce(self) -> None:
        """Sum the running sums of several processes (MoT branches trained in parallel)."""
        import torch.distributed as dist

        if not self.acc:  # this process trained no branch: contribute zeros
            self.acc = {n: self._buffer(n, self.base[n]).zero_() for n in self.float_names}
        for acc in self.acc.values():
            dist.all_reduce(acc)
        dev = next(iter(self.acc.values())).device if self.acc else "cpu"
        tot = torch.tensor([self.total_w, float(self.n)], dtype=torch.float64, device=dev)
        dist.all_reduce(tot)
        self.total_w, self.n = float(tot[0]), int(tot[1])


# --------------------------------------------------------------------------- checkpoints on disk


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """tensor name → safetensors file of an HF checkpoint dir (single file or sharded)."""
    p = Path(path)
    if not p.is_dir():
        raise MergeError(f"{p}: not a directory")
    if not (p / "config.json").exists():
        raise MergeError(f"{p}: not a Hugging Face checkpoint (no config.json)")
    index = p / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {n: p / f for n, f in weight_map.items()}
    single = p / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return dict.fromkeys(f.keys(), single)
    if (p / "pytorch_model.bin").exists() or (p / "adapter_model.safetensors").exists():
        raise MergeError(f"{p}: only safetensors full-model checkpoints can be merged (found a .bin or an adapter)")
    raise MergeError(f"{p}: no model.safetensors in this checkpoint")


class CheckpointReader:
    """Lazy tensor access across the shards of one checkpoint."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path, self.files = Path(path), checkpoint_files(path)
        self.handles = {f: safe_open(str(f), "pt") for f in set(self.files.values())}

    def shapes(self) -> dict[str, tuple]:
        return {n: tuple(self.handles[f].get_slice(n).get_shape()) for n, f in self.files.items()}

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.files[name]].get_tensor(name)


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors checkpoint (single file or sharded)."""
    rd = CheckpointReader(path)
    return {n: rd.get(n) for n in rd.files}


def _check_configs(base: Path, models: Sequence[Path]) -> None:
    def arch(p):
        c = json.loads((p / "config.json").read_text())
        return c.get("architectures"), c.get("model_type")

    ref = arch(base)
    for m in models:
        if arch(m) != ref:
            raise MergeError(f"{m}: architecture {arch(m)} differs from the base's {ref}")
    vocab = _vocab(base)
    for m in models:
        v = _vocab(m)
        if vocab is not None and v is not None and v != vocab:
            raise MergeError(f"{m}: its tokenizer differs from the base's (vocabularies are not the same)")


def _vocab(p: Path) -> dict | None:
    f = p / "tokenizer.json"
    if not f.exists():
        return None
    return json.loads(f.read_text()).get("model", {}).get("vocab")


def merge_checkpoints(base: str | Path, models: Sequence[str | Path], spec: MergeSpec, out: str | Path,
                      progress: Iterable | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Merge HF checkpoints tensor by tensor and write a standard (sharded) safetensors checkpoint to ``out``
    as it goes: at most one shard of merged tensors and one tensor per model are in memory at a time."""
    base, models, out = Path(base), [Path(m) for m in models], Path(out)
    if not models:
        raise MergeError("give at least one model to merge")
    spec.weights_for(len(models))
    rb, rms = CheckpointReader(base), [CheckpointReader(m) for m in models]
    _check_configs(base, models)
    shapes = rb.shapes()
    for r in rms:
        _check_same(shapes, r.shapes(), str(r.path), shapes=shapes)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_streaming(_merge_stream(rb.get, list(shapes), rms, spec, progress), tmp, max_shard_bytes)
    _copy_side_files(base, tmp)
    (tmp / "merge.json").write_text(json.dumps({"base": str(base), "models": [str(m) for m in models],
                                                "method": spec.method, "weights": spec.weights_for(len(models)),
                                                "density": spec.density, "normalize": spec.do_normalize,
                                                "seed": spec.seed}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def merge_onto(base: dict[str, torch.Tensor], models: Sequence[str | Path], spec: MergeSpec) -> dict[str, torch.Tensor]:
    """Merge checkpoints on disk onto an in-memory ``base`` state, keeping the base's dtype; returns the
    tensors the checkpoints hold (a tied weight saved once comes back once: load with ``strict=False``).

    MoT's TIES/DARE rounds use it with the float32 student in memory, so a small
    per-round update is never rounded away by a bf16 checkpoint between rounds.
    """
    rms = [CheckpointReader(m) for m in models]
    saved = {n: tuple(base[n].shape) for n in rms[0].files if n in base}  # tied weights are saved once
    for r in rms:
        _check_same(saved, r.shapes(), str(r.path), shapes=saved)
    return dict(_merge_stream(base.__getitem__, list(saved), rms, spec))


def _merge_stream(get_base, names: list[str], readers: Sequence[CheckpointReader], spec: MergeSpec,
                  progress: Iterable | None = None) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, merged tensor) one at a time, reading one tensor per model for each."""
    spec.weights_for(len(readers))
    for n in (progress(names) if progress else names):
        yield n, merge_tensor(n, get_base(n), [r.get(n) for r in readers], spec)


def save_streaming(items: Iterable[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int) -> list[str]:
    """Write (name, tensor) pairs as safetensors shards of at most ``max_shard_bytes`` each while they arrive
    (HF layout: ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``);
    returns the shard file names.  Written by hand because ``save_torch_state_dict`` needs the whole state."""
    from safetensors.torch import save_file

    parts: list[tuple[Path, list[str]]] = []
    cur: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal cur, size
        if cur:
            path = out / f".part-{len(parts):05d}.safetensors"
            save_file(cur, str(path), metadata={"format": "pt"})
            parts.append((path, list(cur)))
            cur, size = {}, 0

    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            flush()
        cur[name] = t.contiguous()
        size, total = size + nbytes, total + nbytes
    flush()
    names = (["model.safetensors"] if len(parts) == 1 else
             [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))])
    for (path, _), name in zip(parts, names):
        path.rename(out / name)
    if len(parts) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: name for (_, ts), name in zip(parts, names) for t in ts}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return names


SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
