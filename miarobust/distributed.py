"""Evaluation across processes with torch.distributed (torchrun): batches are sharded round-robin by rank.

Batch b goes to rank b % world_size; each batch is seeded from (seed, b) alone (evaluate.batch_seed), so
the merged samples.csv equals a single-process run's. Rank 0 writes config.json, merges, and writes
summary.json; other ranks write only their partial batch files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def distributed_context(cfg: Any) -> Iterator[tuple[int, int]]:
    """(rank, world_size): (0, 1) outside torchrun; inside, initialise gloo (CPU) or nccl (CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    import torch
    import torch.distributed as dist

    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()
