"""Training under FSDP (weights sharded across processes, :mod:`accord.train.sharded`) on two CPU processes: the
same weights as one process, checkpoints that hold the whole model, resume across FSDP and plain runs, COMPACT's
consensus score on gathered weights, and the settings FSDP does not serve refused."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import corpus_run
from test_distributed import launch, shipped_env, update_gap, weights

from accord.errors import UsageError
from accord.train.sharded import check, sharded, whole, will_shard


def _fsdp(cfg, tmp_path, *overrides: str) -> str:
    """``cfg`` trained on two processes through ``configs/accelerate/fsdp2.yaml``, in float32."""
    env = shipped_env("fsdp2.yaml", ACCELERATE_MIXED_PRECISION="no")
    return launch(cfg, 2, tmp_path, *overrides, worker="fsdp_worker.py", env=env)


def _far(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.timeout(900)
def test_fsdp_matches_one_process_and_resumes_across_fsdp_and_plain_runs(tmp_path, micro):
    one_cfg, one = corpus_run(tmp_path, micro, "one")
    launch(one_cfg, 1, tmp_path)
    fs_cfg, fs = corpus_run(tmp_path, micro, "fsdp")
    err = _fsdp(fs_cfg, tmp_path)
    assert "2 process(es) (sharded: FSDP 2)" in err, err[-2000:]
    for rel in ("checkpoint-2", "checkpoint-4", "final"):  # every checkpoint holds the whole model
        assert _far(weights(one / "train/mtd" / rel), weights(fs / "train/mtd" / rel)) < 1e-5, rel
    assert "optimizer_by_name" in torch.load(fs / "train/mtd/checkpoint-2/optimizer.pt", weights_only=True)
    # killed after step 2, resumed: under FSDP; FSDP's checkpoint by one process; one process's under FSDP.
    # The optimizer's state must come back: without it the weights end ~3e-2 away, not 1e-5
    for src, nproc in ((fs, 2), (fs, 1), (one, 2)):  # two processes: FSDP; one: a plain run
        run = tmp_path / f"resume-{src.name}-{nproc}"
        shutil.copytree(src, run)
        for gone in ("final", "checkpoint-4"):
            shutil.rmtree(run / "train/mtd" / gone)
        (run / "train/mtd/result.json").unlink()
        over = f"run_dir={run}"
        err = _fsdp(fs_cfg, tmp_path, over) if nproc == 2 else launch(fs_cfg, 1, tmp_path, over)
        assert "resuming mtd from checkpoint-2" in err, err[-2000:]
        assert _far(weights(one / "train/mtd/final"), weights(run / "train/mtd/final")) < 1e-5, run.name


def _adapters(ckpt) -> dict:
    from safetensors.torch import load_file

    return load_file(ckpt / "adapter_model.safetensors")


@pytest.mark.timeout(900)
def test_fsdp_trains_lora_on_a_sharded_base_and_resumes(tmp_path, micro):
    """LoRA under FSDP: the frozen base sharded with the adapters; checkpoints hold the adapters alone (gathered
    without the base); the merged final model equals one process's; a killed run resumes from FSDP's checkpoint
    and from one process's (index-keyed optimizer state), with the adapters' optimizer state."""
    lora = {"lora": {"r": 4, "alpha": 8}}
    one_cfg, one = corpus_run(tmp_path, micro, "one", **lora)
    launch(one_cfg, 1, tmp_path)
    fs_cfg, fs = corpus_run(tmp_path, micro, "fsdp", **lora)
    err = _fsdp(fs_cfg, tmp_path)
    assert "(sharded: FSDP" in err and "LoRA r=4" in err, err[-2000:]
    for rel in ("checkpoint-2", "checkpoint-4"):
        ckpt = fs / "train/mtd" / rel
        assert not (ckpt / "model.safetensors").exists()
        a, b = _adapters(one / "train/mtd" / rel), _adapters(ckpt)
        assert a and all("lora_" in k for k in b) and _far(a, b) < 1e-5, rel
    final = weights(fs / "train/mtd/final")
    assert not any("lora" in k for k in final)  # merged into the base, a plain model
    assert _far(weights(one / "train/mtd/final"), final) < 1e-5
    assert _far(weights(micro), final) > 1e-3  # the adapters moved the merged weights
    for src in (fs, one):
        run = tmp_path / f"resume-{src.name}"
        shutil.copytree(src, run)
        for gone in ("final", "checkpoint-4"):
            shutil.rmtree(run / "train/mtd" / gone)
        (run / "train/mtd/result.json").unlink()
        err = _fsdp(fs_cfg, tmp_path, f"run_dir={run}")
        assert "resuming mtd from checkpoint-2" in err, err[-2000:]
        assert _far(weights(one / "train/mtd/final"), weights(run / "train/mtd/final")) < 1e-5, run.name


@pytest.mark.timeout(600)
def test_fsdp_mot_trains_each_branch_sharded_over_every_process(tmp_path, micro):
    """Under FSDP MoT's branches run one after another, each over both processes (in parallel, one per process,
    a student that needs FSDP would not fit); process 0 merges; every round equals one process's."""
    one_cfg, one = corpus_run(tmp_path, micro, "one", method=["mot"], rounds=2)
    launch(one_cfg, 1, tmp_path)
    fs_cfg, fs = corpus_run(tmp_path, micro, "fsdp", method=["mot"], rounds=2)
    err = _fsdp(fs_cfg, tmp_path)
    assert "(sharded: FSDP" in err and "(data-parallel)" not in err and "1 process(es)" not in err
    base = weights(micro)
    for r in (1, 2):
        merged = f"train/mot/round-{r}/merged"
        gap = update_gap(weights(one / merged), weights(fs / merged), base)
        assert gap < 1e-3, (r, gap)
    assert not (fs / "train/mot/round-1/branch-a").exists()


@pytest.mark.timeout(600)
def test_fsdp_compact_gathers_the_last_layer_and_drops_the_chunked_head(tmp_path, micro):
    """COMPACT's consensus score recomputes the last layer's q/k outside the forward (gathered under FSDP); the
    chunked head is off there, so one process's chunked run and FSDP's full-logit run agree to float rounding."""
    settings = {"method": ["compact"], "rounds": 1, "chunked_loss": True, "lean_layers": True,
                "gradient_checkpointing": True}
    one_cfg, one = corpus_run(tmp_path, micro, "one", **settings)
    launch(one_cfg, 1, tmp_path)
    fs_cfg, fs = corpus_run(tmp_path, micro, "fsdp", **settings)
    err = _fsdp(fs_cfg, tmp_path)
    assert "compact: the head over full-vocabulary logits" in err
    assert "lean RMSNorm/SwiGLU" in err
    # the bound is on the whole update (a largest difference of 1e-4 held on an Intel CPU; on an AMD one three of
    # 2,048 weights of a matrix ended 1.4e-3 apart, 5.4e-4 of the update): dropping the consensus score moves the
    # result 0.19 of the update, so a consensus computed on the wrong weights cannot pass
    gap = update_gap(weights(one / "train/compact/final"), weights(fs / "train/compact/final"), weights(micro))
    assert gap < 1e-2, gap
    assert json.loads((fs / "train/compact/result.json").read_text())["method"] == "compact"


def test_what_fsdp_does_not_serve_is_refused_and_plain_modules_pass():
    fsdp = SimpleNamespace(distributed_type="DistributedType.FSDP")
    with pytest.raises(UsageError, match="QR-Distill's students"):
        check(fsdp, several=True)
    with pytest.raises(UsageError, match="run QLoRA data-parallel"):
        check(fsdp, several=False, quantized=True, lora=True)
    check(fsdp, several=False, lora=True)  # LoRA on a sharded base: FSDP 2
    check(fsdp, several=False)
    fsdp1 = SimpleNamespace(distributed_type="DistributedType.FSDP", state=SimpleNamespace(
        fsdp_plugin=SimpleNamespace(fsdp_version=1, use_orig_params=False)))
    with pytest.raises(UsageError, match="use_orig_params: true"):
        check(fsdp1, several=False, lora=True)
    check(fsdp1, several=False)
    fsdp1.state.fsdp_plugin.use_orig_params = True
    check(fsdp1, several=False, lora=True)
    deepspeed = SimpleNamespace(distributed_type="DistributedType.DEEPSPEED")
    assert will_shard(deepspeed, True) and will_shard(fsdp, True) and not will_shard(fsdp, False)
    assert not will_shard(SimpleNamespace(distributed_type="DistributedType.MULTI_GPU"), True)
    check(deepspeed, several=False, lora=True)  # DeepSpeed ZeRO: tests/test_deepspeed.py
    with pytest.raises(UsageError, match="QR-Distill's students"):
        check(deepspeed, several=True)
    with pytest.raises(UsageError, match="run QLoRA data-parallel"):
        check(deepspeed, several=False, quantized=True, lora=True)
    m = torch.nn.Linear(2, 2)
    assert not sharded(m)
    with whole(m):  # a no-op for weights that are whole
        assert m.weight.shape == (2, 2)


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_through_accelerates_own_settings_on_cuda(tmp_path, micro, version):
    """On a GPU accelerate turns FSDP on itself, from the variables `accelerate launch` sets for an FSDP config
    (FSDP 1 is its default): one process under torchrun, the engine's defaults there (bf16 off for a tight
    comparison; the chunked head falls back), against a plain run; then a resume from its checkpoint."""
    fsdp = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(version), "FSDP_AUTO_WRAP_POLICY":
            "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_USE_ORIG_PARAMS": "true"}
    cuda_matches_plain_and_resumes(tmp_path, micro, fsdp, "(sharded: FSDP")


def cuda_matches_plain_and_resumes(tmp_path, micro, env: dict, says: str) -> None:
    """One process under torchrun with accelerate's variables ``env`` on CUDA (bf16 off) ends within 1e-3 of a
    plain run, its first line saying ``says``; killed after step 2, it resumes there."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    one_cfg, one = corpus_run(tmp_path, micro, "one", bf16=False)
    launch(one_cfg, 1, tmp_path)
    cfg, run = corpus_run(tmp_path, micro, "sharded", bf16=False)
    err = launch(cfg, 1, tmp_path, env=env, torchrun=True)
    assert says in err, err[-2000:]
    assert _far(weights(one / "train/mtd/final"), weights(run / "train/mtd/final")) < 1e-3
    for gone in ("final", "checkpoint-4"):
        shutil.rmtree(run / "train/mtd" / gone)
    (run / "train/mtd/result.json").unlink()
    err = launch(cfg, 1, tmp_path, env=env, torchrun=True)
    assert "resuming mtd from checkpoint-2" in err
    assert _far(weights(one / "train/mtd/final"), weights(run / "train/mtd/final")) < 1e-3
