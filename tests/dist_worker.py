"""Run under `torchrun --nproc_per_node N` by tests/test_distributed.py: MTD (DDP) and MoT (branch-parallel)."""

import sys

from rich.console import Console

from accord.config import load_config
from accord.train import train_methods
from accord.train.common import end_distributed

if __name__ == "__main__":
    cfg = load_config(sys.argv[1], sys.argv[2:])
    train_methods(cfg, Console(stderr=True, quiet=True))
    end_distributed()
