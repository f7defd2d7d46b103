"""What a launcher (``torchrun``, ``accelerate launch``) tells this process, read from the environment it sets,
so a command can ask before torch.distributed is up and without importing torch: how many processes this
launch has and which one this is (``WORLD_SIZE``, ``RANK``; one process, rank 0, without a launcher).  And what
stages that deal work out among the processes share (:class:`Share`, :func:`gather`), torch imported only there."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass


def world() -> int:
    """Processes of this launch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0: the one that collects, reports and writes)."""
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class Share:
    """This process's place in a launch of ``world`` processes and a barrier over all of them (``wait``), for a
    stage that deals its work out (collection's ``hf`` batches, CoRD's problems)."""
    rank: int
    world: int
    wait: Callable[[], None]


def dealt(items: list, share: Share | None) -> list:
    """This process's part of ``items`` — every ``world``-th from its rank — or all of them on one process."""
    return items if share is None else items[share.rank::share.world]


def gather(mine: dict) -> dict:
    """Every process's ``mine`` merged, on every process (a collective over the process group); ``mine`` itself
    where there is none."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return mine
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for p in parts for k, v in p.items()}
