"""Run under `torchrun --nproc_per_node 2` by tests/test_deepspeed.py: training under accelerate's DeepSpeed (ZeRO
stage from ACCORD_TEST_ZERO) on the CPU.

accelerate turns DeepSpeed on for GPUs only, while DeepSpeed runs ZeRO over gloo on its CPU accelerator; so this sets
accelerate's state to DeepSpeed by hand, with the plugin `accelerate launch --use_deepspeed --zero_stage N` gives,
and hands that accelerator to the engine."""

import os
import sys

os.environ.setdefault("ACCELERATE_USE_CPU", "1")
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch --use_deepspeed` sets
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
    acc = Accelerator(cpu=True, mixed_precision="bf16" if os.environ.get("ACCORD_TEST_BF16") else "no")
    deepspeed.init_distributed(dist_backend="gloo")
    acc.state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED  # as accelerate keeps both in step
    acc.state.deepspeed_plugins = {"default": DeepSpeedPlugin(zero_stage=int(os.environ.get("ACCORD_TEST_ZERO", "2")))}
    acc.state.deepspeed_plugins["default"].set_mixed_precision(acc.mixed_precision)
    acc.state.deepspeed_plugins["default"].select(_from_accelerator_state=True)
    whole_loads()  # as engine.get_accelerator does under DeepSpeed
    engine._ACCELERATOR = acc
    train_methods(load_config(sys.argv[1], sys.argv[2:]), Console(stderr=True))
    end_distributed()
