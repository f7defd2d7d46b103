"""Run under `torchrun --nproc_per_node 2` by tests/test_fsdp.py: training under accelerate's FSDP 2 on the CPU.

accelerate lets FSDP run on GPUs only (its state turns FSDP on for multi-GPU kinds), while torch's `fully_shard`
runs over gloo on the CPU; so this sets accelerate's state to FSDP by hand, with the plugin built from the variables
`accelerate launch --config_file configs/accelerate/fsdp2.yaml` sets (the test passes them), and hands that
accelerator to the engine."""

import os
import sys

os.environ.setdefault("ACCELERATE_USE_CPU", "1")

from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from rich.console import Console

from accord.config import load_config
from accord.train import engine, train_methods
from accord.train.common import end_distributed

if __name__ == "__main__":
    acc = Accelerator(cpu=True)
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate keeps both in step
    assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "run with an FSDP config's variables (shipped_env)"
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the variables, as accelerate's state builds it
    engine._ACCELERATOR = acc
    train_methods(load_config(sys.argv[1], sys.argv[2:]), Console(stderr=True))
    end_distributed()
