"""Run under `torchrun --nproc_per_node 2` by tests/test_fsdp.py: training under accelerate's FSDP 2 on the CPU.

accelerate lets FSDP run on GPUs only (its state turns FSDP on for multi-GPU kinds), while torch's `fully_shard`
runs over gloo on the CPU; so this sets accelerate's state to FSDP by hand, with the plugin an `accelerate launch`
FSDP config gives (version 2, each decoder layer its own unit), and hands that accelerator to the engine."""

import os
import sys

os.environ.setdefault("ACCELERATE_USE_CPU", "1")
os.environ["ACCELERATE_USE_FSDP"] = "true"  # what `accelerate launch` sets with an FSDP config

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
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        state_dict_type="FULL_STATE_DICT", reshard_after_forward=True)
    engine._ACCELERATOR = acc
    train_methods(load_config(sys.argv[1], sys.argv[2:]), Console(stderr=True))
    end_distributed()
