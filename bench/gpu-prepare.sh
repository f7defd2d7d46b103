#!/usr/bin/env bash
# Lays out .gpu/ (git-ignored) for bench/gpu.sh on a CUDA machine with torch but no network (issue 13):
#   1. the shared GPU check's wheels (pydantic, math-verify, …: what accord imports beyond torch/transformers);
#   2. .gpu/whl-bench/: TRL and Liger Kernel and what they import beyond the machine's own packages, so that the
#      engine bench also measures `engine/TRL padding-free (+ Liger) throughput ratio`, the configuration TRL's
#      users run.  bench/gpu.sh installs these into a directory of their own, on the path of that bench only, so
#      they never shadow what accord's tests import there.
#
#   bash bench/gpu-prepare.sh            # here, after `make install`, from the repository root
#   OUT=$OUT bash bench/gpu.sh           # there (the device tool: carry .gpu)
set -euo pipefail
check=${GPU_CHECK:-../shared/gpu-check}
[ -x .venv/bin/python ] || { echo "run 'make install' first (needs .venv)"; exit 1; }
[ -f "$check/prepare.sh" ] || { echo "no GPU check at $check (set GPU_CHECK)"; exit 1; }
bash "$check/prepare.sh"
mkdir -p .gpu/whl-bench
fetch() {  # fetch PACKAGE [VERSION]: the venv's version when it has one, else the newest
  local v spec=$1
  v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null) && spec="$1==$v"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl-bench "$spec" || echo "could not fetch $spec (the TRL comparison may say 'not measured')"
}
for p in trl liger-kernel datasets dill multiprocess xxhash pandas tzdata python-dateutil; do fetch "$p"; done
# 3. .gpu/whl-ds/: DeepSpeed (an sdist on PyPI: built into a wheel here, its ops compiled on first use there) and
#    what it imports beyond torch, for the last step's DeepSpeed ZeRO-3 test through configs/accelerate/.
mkdir -p .gpu/whl-ds
ds=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('deepspeed'))" 2>/dev/null || echo 0.19.8)
python3 -m pip wheel -q --no-deps -w .gpu/whl-ds "deepspeed==$ds" hjson py-cpuinfo einops \
  || echo "could not build DeepSpeed's wheel (its GPU test will be skipped)"
for p in msgpack ninja; do fetch "$p"; mv .gpu/whl-bench/"${p}"-*.whl .gpu/whl-ds/ 2>/dev/null || true; done
du -sh .gpu .gpu/whl-bench .gpu/whl-ds
echo "ready: on the GPU machine run  OUT=<dir> bash bench/gpu.sh   (carry .gpu)"
