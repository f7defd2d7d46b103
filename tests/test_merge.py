"""Merge operators against slow element-by-element references (mergekit conventions), and checkpoint merging."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from accord.registry import MERGE_METHODS
from accord.train.merge import (
    MergeError,
    MergeSpec,
    RunningMerge,
    _sparsify,
    merge_checkpoints,
    merge_state_dicts,
    merge_tensor,
)


def slow_reference(base, models, weights, method, density=1.0, normalize=None, masks=None):
    """Element by element, in Python floats: prune → weight → elect sign → mix → normalise."""
    m = MERGE_METHODS[method]
    sparsify, consensus, norm_default = m.sparsify, m.sign_consensus, m.normalize
    normalize = norm_default if normalize is None else normalize
    b = base.flatten().tolist()
    deltas = [[x - y for x, y in zip(m.flatten().tolist(), b)] for m in models]
    if sparsify == "magnitude" and density < 1:
        k = int(density * len(b))
        for d in deltas:
            keep = set(sorted(range(len(d)), key=lambda i: -abs(d[i]))[:k])
            for i in range(len(d)):
                d[i] = d[i] if i in keep else 0.0
    if masks is not None:  # DARE: the kept entries (and their 1/density rescale) are given
        deltas = [[x * m for x, m in zip(d, mk)] for d, mk in zip(deltas, masks)]
    out = []
    for i in range(len(b)):
        wd = [w * d[i] for w, d in zip(weights, deltas)]
        if consensus:
            major = 1.0 if sum(wd) >= 0 else -1.0
            agree = [(x > 0) - (x < 0) == major for x in wd]
            mixed = sum(x for x, a in zip(wd, agree) if a)
            div = sum(w for w, a in zip(weights, agree) if a) or 1.0
        else:
            mixed = sum(wd)
            div = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        out.append(b[i] + (mixed / div if normalize else mixed))
    return torch.tensor(out).view_as(base)


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 7, generator=g)
    models = [base + 0.5 * torch.randn(6, 7, generator=g) for _ in range(3)]
    return base, models


@pytest.mark.parametrize("method", ["average", "linear", "task_arithmetic", "ties"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.7, 0.2, 1.3]])
@pytest.mark.parametrize("density", [1.0, 0.5])
def test_deterministic_methods_match_reference(tensors, method, weights, density):
    base, models = tensors
    spec = MergeSpec(method=method, weights=weights, density=density)
    got = merge_tensor("w", base, models, spec)
    want = slow_reference(base, models, weights, method, density)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_normalize_override(tensors, normalize):
    base, models = tensors
    spec = MergeSpec(method="ties", weights=[0.5, 1.0, 2.0], density=0.6, normalize=normalize)
    want = slow_reference(base, models, [0.5, 1.0, 2.0], "ties", 0.6, normalize=normalize)
    assert torch.allclose(merge_tensor("w", base, models, spec), want, atol=1e-5)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_reference_given_its_masks(tensors, method):
    base, models = tensors
    spec = MergeSpec(method=method, weights=[1.0, 0.5, 2.0], density=0.4, seed=7)
    got = merge_tensor("layer.w", base, models, spec)
    masks = []
    for i, m in enumerate(models):
        d = m - base
        kept = _sparsify(d, spec, "layer.w", i)
        nz = kept != 0
        assert torch.allclose(kept[nz], d[nz] / 0.4)  # kept entries are rescaled by 1/density
        masks.append((nz.float() / 0.4).flatten().tolist())
    frac = sum(sum(1 for x in mk if x) for mk in masks) / (3 * base.numel())
    assert 0.2 < frac < 0.6  # about `density` of the entries survive
    want = slow_reference(base, models, [1.0, 0.5, 2.0], method, masks=masks)
    assert torch.allclose(got, want, atol=1e-5)


def test_dare_is_seeded_and_reproducible(tensors):
    base, models = tensors
    a = merge_tensor("w", base, models, MergeSpec(method="dare_ties", density=0.5, seed=1))
    b = merge_tensor("w", base, models, MergeSpec(method="dare_ties", density=0.5, seed=1))
    c = merge_tensor("w", base, models, MergeSpec(method="dare_ties", density=0.5, seed=2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_merging_identical_models_is_identity_for_averages(tensors, method):
    base, models = tensors
    same = [models[0].clone() for _ in range(3)]
    got = merge_tensor("w", base, same, MergeSpec(method=method))
    if MERGE_METHODS[method].normalize:  # normalised methods: the mean of identical models is that model
        assert torch.allclose(got, models[0], atol=1e-6)
    else:  # task arithmetic adds the same task vector three times
        assert torch.allclose(got, base + 3 * (models[0] - base), atol=1e-5)


def test_running_merge_equals_batch_merge(tensors):
    base, models = tensors
    sd_base = {"a": base, "b": base.T.contiguous(), "n": torch.tensor([3])}
    sds = [{"a": m, "b": m.T.contiguous(), "n": torch.tensor([3])} for m in models]
    for method, w in [("average", [1.0, 2.0, 0.5]), ("task_arithmetic", [0.3, 0.3, 0.3])]:
        spec = MergeSpec(method=method, weights=w)
        run = RunningMerge(sd_base, spec)
        for sd, wi in zip(sds, w):
            run.add(sd, wi)
        got, want = run.result(), merge_state_dicts(sd_base, sds, spec)
        for k in want:
            assert torch.allclose(got[k].float(), want[k].float(), atol=1e-5), (method, k)
        assert torch.equal(got["n"], sd_base["n"])


def test_bad_specs():
    with pytest.raises(MergeError, match="unknown merge method"):
        MergeSpec(method="slerpy")
    with pytest.raises(MergeError, match="density"):
        MergeSpec(method="ties", density=0)
    with pytest.raises(MergeError, match="2 weight"):
        MergeSpec(weights=[1, 2]).weights_for(3)


# ----------------------------------------------------------------------------------- checkpoints


def _perturbed(micro, tmp_path, name, seed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(micro)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    out = tmp_path / name
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(micro).save_pretrained(out)
    return out


def _state(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_accord_merge_cli_writes_what_the_operator_computes(micro, tmp_path):
    from transformers import AutoModelForCausalLM

    m1, m2 = _perturbed(micro, tmp_path, "m1", 1), _perturbed(micro, tmp_path, "m2", 2)
    out = tmp_path / "merged"
    code, text = run_cli("merge", "--method", "ties", "--base", str(micro), "--models", str(m1), str(m2),
                         "--out", str(out), "--density", "0.5")
    assert code == 0, text
    merged, base, s1, s2 = _state(out), _state(micro), _state(m1), _state(m2)
    spec = MergeSpec(method="ties", density=0.5)
    for k in base:
        assert torch.allclose(merged[k], merge_tensor(k, base[k], [s1[k], s2[k]], spec), atol=1e-6), k
    assert json.loads((out / "merge.json").read_text())["method"] == "ties"
    AutoModelForCausalLM.from_pretrained(out)  # a standard checkpoint


def test_merge_writes_shards_as_it_goes_and_they_load(micro, tmp_path):
    """A small shard budget forces several shards (HF index layout); the model loads and equals the
    one-shard merge; shards are cut at the budget (two 4 kB tensors per 8 kB shard)."""
    from transformers import AutoModelForCausalLM

    from accord.train import merge as M

    m1, m2 = _perturbed(micro, tmp_path, "m1", 1), _perturbed(micro, tmp_path, "m2", 2)
    one = M.merge_checkpoints(micro, [m1, m2], MergeSpec(), tmp_path / "one")
    many = M.merge_checkpoints(micro, [m1, m2], MergeSpec(), tmp_path / "many", max_shard_bytes=20_000)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (many / "model.safetensors").exists()
    a, b = M.load_state(one), M.load_state(many)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    AutoModelForCausalLM.from_pretrained(many)

    def items():
        for i in range(6):
            yield f"t{i}", torch.zeros(1000)  # 4,000 bytes each

    names = M.save_streaming(items(), tmp_path, max_shard_bytes=8000)
    assert len(names) == 3  # two tensors per shard


def test_merge_errors_name_the_problem(micro, tmp_path):
    from accord.lab.micro import build_micro

    other = tmp_path / "wide"
    build_micro(other, hidden=48)
    m1 = _perturbed(micro, tmp_path, "m1", 1)
    with pytest.raises(MergeError, match=r"tensor '.*': shape"):
        merge_checkpoints(micro, [m1, other], MergeSpec(), tmp_path / "x")
    (tmp_path / "empty").mkdir()
    code, text = run_cli("merge", "--base", str(micro), "--models", str(tmp_path / "empty"), "--out",
                         str(tmp_path / "y"))
    assert code == 2 and "not a Hugging Face checkpoint" in text
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("method,params,args", [
    ("ties", "normalize: true", ["--density", "0.5", "--weights", "0.3", "0.7", "1.6"]),
    ("task_arithmetic", "", ["--density", "0.5", "--weights", "0.3", "0.7", "1.6"]),
])
def test_same_tensors_as_mergekit(micro, tmp_path, method, params, args):
    """Runs real mergekit when ACCORD_MERGEKIT_PATH points at an install of it (pip install --target)."""
    import os
    import subprocess
    import sys

    mk = os.environ.get("ACCORD_MERGEKIT_PATH")
    if not mk:
        pytest.skip("set ACCORD_MERGEKIT_PATH to a mergekit install to compare with it")
    ms = [_perturbed(micro, tmp_path, f"m{i}", i) for i in (1, 2, 3)]
    w = args[args.index("--weights") + 1:]
    lines = [f"merge_method: {method}", f"base_model: {micro}", "dtype: float32", "models:"]
    lines += [f"  - model: {m}\n    parameters: {{weight: {x}, density: 0.5}}" for m, x in zip(ms, w)]
    lines += ["parameters:", f"  {params}"] if params else []
    (tmp_path / "mk.yaml").write_text("\n".join(lines) + "\n")
    subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(tmp_path / "mk.yaml"),
                    str(tmp_path / "mk-out")], check=True, env={**os.environ, "PYTHONPATH": mk}, capture_output=True)
    code, text = run_cli("merge", "--method", method, "--base", str(micro), "--models", *map(str, ms),
                         "--out", str(tmp_path / "acc-out"), *args)
    assert code == 0, text
    a, b = _state(tmp_path / "acc-out"), _state(tmp_path / "mk-out")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_running_merge_reuses_its_buffers_across_merges(tensors):
    """MoT passes one buffer dict to every round: the second merge writes into the first one's memory and
    gives the same result as a fresh merge."""
    base, models = tensors
    state = lambda m: {"w": m}
    buffers: dict = {}
    first = RunningMerge({"w": base}, MergeSpec("average"), buffers)
    for m in models:
        first.add(state(m))
    ptr = buffers["w"].data_ptr()
    got1 = first.result()["w"].clone()
    second = RunningMerge({"w": base}, MergeSpec("average"), buffers)
    for m in models:
        second.add(state(m))
    got2 = second.result()["w"]
    assert buffers["w"].data_ptr() == ptr and got2.data_ptr() == ptr  # no new model copy
    fresh = RunningMerge({"w": base}, MergeSpec("average"))
    for m in models:
        fresh.add(state(m))
    assert torch.allclose(got1, fresh.result()["w"]) and torch.allclose(got2, got1)
