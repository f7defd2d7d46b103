"""What a launcher (``torchrun``, ``accelerate launch``) tells this process, read from the environment it sets,
so a command can ask before torch.distributed is up and without importing torch: how many processes this
launch has and which one this is (``WORLD_SIZE``, ``RANK``; one process, rank 0, without a launcher)."""

from __future__ import annotations

import os


def world() -> int:
    """Processes of this launch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0: the one that collects, reports and writes)."""
    return int(os.environ.get("RANK", "0"))
