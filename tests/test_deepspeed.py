"""Training under DeepSpeed ZeRO (stages 2 and 3, :mod:`accord.train.sharded`) on two CPU processes against one
process: every method's weights, the checkpoints, LoRA, and a killed run resumed from DeepSpeed's own optimizer
state.  Skipped where deepspeed is not installed (``pip install -e '.[dev]'`` installs it)."""

import shutil
from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch
from conftest import corpus_run
from test_distributed import launch, shipped_env, weights
from test_fsdp import _adapters, _far, cuda_matches_plain_and_resumes

from accord.errors import UsageError
from accord.train.sharded import deepspeed_settings, shard_kind, whole_loads

needs_deepspeed = pytest.mark.skipif(find_spec("deepspeed") is None, reason="deepspeed is not installed")


def _acc(zero: int, **config) -> SimpleNamespace:
    plugin = SimpleNamespace(zero_stage=zero, deepspeed_config=config)
    return SimpleNamespace(distributed_type="DistributedType.DEEPSPEED", state=SimpleNamespace(deepspeed_plugin=plugin))


def test_deepspeed_config_gets_accords_batch_and_clip_and_its_own_optimizer_is_refused():
    acc = _acc(3, train_micro_batch_size_per_gpu="auto", gradient_clipping="auto", zero_optimization={"stage": 3})
    deepspeed_settings(acc, micro=2, world=4, clip=1.0)
    cfg = acc.state.deepspeed_plugin.deepspeed_config
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["train_batch_size"], cfg["gradient_accumulation_steps"],
            cfg["gradient_clipping"]) == (2, 8, 1, 1.0)
    assert cfg["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert shard_kind(acc) == "DeepSpeed ZeRO-3"
    for own in ({"optimizer": {"type": "AdamW"}}, {"scheduler": {"type": "WarmupLR"}}):
        with pytest.raises(UsageError, match=f"remove the '{next(iter(own))}' block"):
            deepspeed_settings(_acc(2, **own), micro=2, world=4, clip=1.0)


def test_under_zero3_models_load_whole():
    """accelerate's ZeRO-3 plugin tells transformers to build every model partitioned and generate in step across
    processes; accord drops that, so teachers and evaluated checkpoints load whole on each process."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_zero3_enabled()
    whole_loads()
    assert not is_deepspeed_zero3_enabled()
    del keep


def _ds(cfg, tmp_path, zero: int, *overrides: str) -> str:
    """``cfg`` trained on two processes through ``configs/accelerate/deepspeed-zero{zero}.yaml``, in float32."""
    env = shipped_env(f"deepspeed-zero{zero}.yaml", ACCELERATE_MIXED_PRECISION="no")
    return launch(cfg, 2, tmp_path, *overrides, worker="ds_worker.py", env=env)


@needs_deepspeed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("zero", [pytest.param(2, marks=pytest.mark.slow), 3])  # ZeRO-3 partitions more
def test_deepspeed_matches_one_process_and_resumes_only_under_deepspeed(tmp_path, micro, zero):
    """MTD and COMPACT (its consensus score gathers the last layer's weights: ZeRO-3 partitions them) under ZeRO-2
    and ZeRO-3 end within 1e-5 of one process, checkpoints included, with weight decay on the matrices alone (under
    ZeRO-3 a model's weights are empty until gathered: the decay group once came out empty, 1e-3 away); MoT's
    rounds (each branch partitioned over both processes in turn) within 1e-4, its merges adding rounding; a run
    killed after step 2 resumes under DeepSpeed from its own optimizer state, and without it is refused."""
    settings = {"method": ["mtd", "compact", "mot"], "rounds": 2, "weight_decay": 0.1, "warmup_ratio": 0.3}
    one_cfg, one = corpus_run(tmp_path, micro, "one", **settings)
    launch(one_cfg, 1, tmp_path)
    ds_cfg, ds = corpus_run(tmp_path, micro, "ds", **settings)
    err = _ds(ds_cfg, tmp_path, zero)
    assert f"2 process(es) (sharded: DeepSpeed ZeRO-{zero})" in err, err[-2000:]
    for rel in ("mtd/checkpoint-2", "mtd/final", "compact/final"):
        assert _far(weights(one / "train" / rel), weights(ds / "train" / rel)) < 1e-5, rel
    for r in (1, 2):
        rel = f"mot/round-{r}/merged"
        assert _far(weights(one / "train" / rel), weights(ds / "train" / rel)) < 1e-4, rel
    assert (ds / "train/mtd/checkpoint-2/deepspeed").is_dir()  # each process's part of the optimizer state
    assert _far(weights(micro), weights(ds / "train/mtd/final")) > 1e-2
    run = tmp_path / "resume"
    shutil.copytree(ds, run)
    shutil.rmtree(run / "train/mtd/final")
    (run / "train/mtd/result.json").unlink()
    assert [p.name for p in (run / "train/mtd").glob("checkpoint-*")] == ["checkpoint-2"]
    err = launch(ds_cfg, 1, tmp_path, f"run_dir={run}", "train.method=[mtd]", fails=True)
    assert "written under DeepSpeed" in err and "checkpoint-2" in err, err[-2000:]
    err = _ds(ds_cfg, tmp_path, zero, f"run_dir={run}", "train.method=[mtd]")
    assert "resuming mtd from checkpoint-2" in err, err[-2000:]
    # the optimizer's state must come back: without it the weights end ~1e-2 away
    assert _far(weights(one / "train/mtd/final"), weights(run / "train/mtd/final")) < 1e-5


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deepspeed_zero3_trains_lora_and_mot(tmp_path, micro):
    """ZeRO-3 with LoRA: checkpoints hold the adapters alone, MTD's merged model and MoT's rounds equal one
    process's."""
    settings = {"method": ["mtd", "mot"], "rounds": 2, "lora": {"r": 4, "alpha": 8}}
    one_cfg, one = corpus_run(tmp_path, micro, "one", **settings)
    launch(one_cfg, 1, tmp_path)
    ds_cfg, ds = corpus_run(tmp_path, micro, "ds", **settings)
    err = _ds(ds_cfg, tmp_path, 3)
    assert "(sharded: DeepSpeed ZeRO-3)" in err and "LoRA r=4" in err, err[-2000:]
    a, b = _adapters(one / "train/mtd/checkpoint-2"), _adapters(ds / "train/mtd/checkpoint-2")
    assert a and all("lora_" in k for k in b) and _far(a, b) < 1e-5
    assert not (ds / "train/mtd/checkpoint-2/model.safetensors").exists()
    for rel in ("mtd/final", "mot/round-1/merged", "mot/round-2/merged"):
        final = weights(ds / "train" / rel)
        assert not any("lora" in k for k in final) and _far(weights(one / "train" / rel), final) < 1e-5, rel


@needs_deepspeed
@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_deepspeed_through_accelerates_own_settings_on_cuda(tmp_path, micro):
    """On a GPU accelerate turns DeepSpeed on itself, from the variables `accelerate launch --config_file
    configs/accelerate/deepspeed-zero3.yaml` sets: one process under torchrun (bf16 off for a tight comparison),
    against a plain run; then a resume from its checkpoint."""
    env = shipped_env("deepspeed-zero3.yaml", ACCELERATE_MIXED_PRECISION="no")
    cuda_matches_plain_and_resumes(tmp_path, micro, env, "(sharded: DeepSpeed ZeRO-3)")


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deepspeed_bf16_trains_bf16_weights_and_writes_float32(tmp_path, micro):
    """bf16 under DeepSpeed is DeepSpeed's own (bf16 weights, float32 masters in its optimizer): the run says so,
    trains, and writes each trained weight as its float32 master, to the rounding bf16 weights leave (at this
    learning rate two bf16 runs differ by about as much as they move; one process with ``train.master_weights``
    ends 2.4e-2 away, having moved 3e-2)."""
    ds_cfg, ds = corpus_run(tmp_path, micro, "ds", bf16=True)
    err = launch(ds_cfg, 2, tmp_path, worker="ds_worker.py", env=shipped_env("deepspeed-zero3.yaml"))  # its bf16
    assert "weights bfloat16" in err and "(sharded: DeepSpeed ZeRO-3)" in err, err[-2000:]
    final = weights(ds / "train/mtd/final")
    assert all(v.dtype == torch.float32 for v in final.values())
    assert any((v != v.to(torch.bfloat16).float()).any() for v in final.values())  # the masters, not bf16 copies
    assert _far(weights(micro), final) > 1e-2


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deepspeed_zero3_with_the_optimizer_offloaded_to_the_cpu(tmp_path, micro):
    """``offload_optimizer_device: cpu``: accelerate swaps accord's AdamW for DeepSpeed's CPU Adam (compiled on
    first use), which keeps accord's parameter groups (decay on matrices only, betas) and schedule: MTD within 1e-5
    of one process (3.6e-7 measured)."""
    settings = {"weight_decay": 0.1, "warmup_ratio": 0.3}
    one_cfg, one = corpus_run(tmp_path, micro, "one", **settings)
    launch(one_cfg, 1, tmp_path)
    ds_cfg, ds = corpus_run(tmp_path, micro, "ds", **settings)
    env = shipped_env("deepspeed-zero3.yaml", ACCELERATE_MIXED_PRECISION="no",
                      ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu")
    launch(ds_cfg, 2, tmp_path, worker="ds_worker.py", env=env)
    for rel in ("checkpoint-2", "final"):
        assert _far(weights(one / "train/mtd" / rel), weights(ds / "train/mtd" / rel)) < 1e-5, rel
