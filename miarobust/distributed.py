"""Evaluation across processes with torch.distributed (torchrun): batches are sharded round-robin by rank.

Batch b goes to rank b % world_size; each batch is seeded from (seed, b) alone (results.store.batch_seed), so
the merged samples.csv equals a single-process run's. Rank 0 writes config.json, merges, and writes
summary.json; other ranks write only their partial batch files. Rank 0 holds the run folder's lock and
writes config.json before it tells the other ranks to start; a rank whose batches fail tells every rank.

    torchrun --standalone --nproc_per_node=2 -m miarobust run --model vit_fmnist -n 1000 --batch-size 100

(`-n`, not `--n`: torchrun takes any `--n...` on its command line for one of its own options.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from miarobust.errors import UserError


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
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device != "cuda":
            raise UserError(f"--device {cfg.device} under torchrun: use --device cuda, each rank takes the GPU of its "
                            "LOCAL_RANK.")
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise UserError(f"rank with LOCAL_RANK {local} needs GPU {local}, but {torch.cuda.device_count()} are "
                            "visible: lower --nproc_per_node or use --device cpu.")
        torch.cuda.set_device(local)  # so --device cuda means this rank's GPU, and nccl uses it
    dist.init_process_group("nccl" if cuda else "gloo")
    finished = False
    try:
        yield dist.get_rank(), dist.get_world_size()
        finished = True
    finally:
        if finished:
            # No rank tears its end of the group down while another still talks to it (gloo aborts the
            # process otherwise). A rank that failed skips this: torchrun then stops the others.
            dist.barrier()
        dist.destroy_process_group()


class RankStopped(KeyboardInterrupt):
    """SIGTERM: torchrun's, which stops every rank when one fails or is killed, or a user's `kill`."""


class Stopping:
    """Whether the process is already stopping: set it first thing where a run handles its failure, so that a SIGTERM
    arriving then (torchrun stops every rank when one fails, at about the moment the survivors see the lost
    connection) cannot cut the handling and its one-line message short. An attribute of a slotted object: setting it
    runs no Python code, so no signal handler can run before it takes effect."""

    __slots__ = ("stopping",)

    def __init__(self) -> None:
        self.stopping = False


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[Stopping]:
    """Within: the first SIGTERM raises RankStopped, so a process that torchrun or `kill` stops cleans up and says why
    in one line instead of vanishing; later ones, and any once the yielded Stopping is set, are ignored (the handler
    before is restored after)."""
    import signal

    state = Stopping()

    def stop(signum: int, frame: Any) -> None:
        if not state.stopping:
            state.stopping = True
            raise RankStopped

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, before)


def lost_a_rank(e: BaseException) -> bool:
    """Whether `e` is a collective's failure because another rank went away (gloo: the connection closed; nccl)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or (isinstance(e, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL")))

