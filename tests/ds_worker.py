"""Run under `torchrun --nproc_per_node 2` by tests/test_deepspeed.py: training under accelerate's DeepSpeed on the
CPU, with the variables `accelerate launch --config_file configs/accelerate/deepspeed-zeroN.yaml` sets (the test
passes them).

accelerate turns DeepSpeed on for GPUs only, while DeepSpeed runs ZeRO over gloo on its CPU accelerator; so this sets
accelerate's state to DeepSpeed by hand, with the plugin built from those variables, and hands that accelerator to
the engine."""

import os
import sys

os.environ.setdefault("ACCELERATE_USE_CPU", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from rich.console import Console

from accord.config import load_config
from accord.train import engine, train_methods
from accord.train.common import end_distributed
from accord.train.sharded import whole_loads

if __name__ == "__main__":
    assert os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true", "run with a DeepSpeed config's variables"
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    acc = Accelerator(cpu=True, mixed_precision=precision)
    # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op at init (74 s on 2 cores, once per machine):
    # ZeRO's training collectives go through torch.distributed (gloo here) either way, so the tests skip it
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    acc.state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED  # as accelerate keeps both in step
    acc.state.deepspeed_plugins = {"default": DeepSpeedPlugin()}  # from the variables, as accelerate's state does
    acc.state.deepspeed_plugins["default"].select(_from_accelerator_state=True)
    acc.state.deepspeed_plugin.set_mixed_precision(precision)
    whole_loads()  # as engine.get_accelerator does under DeepSpeed
    engine._ACCELERATOR = acc
    train_methods(load_config(sys.argv[1], sys.argv[2:]), Console(stderr=True))
    end_distributed()
