"""Training across torchrun ranks: N ranks train the model that one process trains with an N-times batch.

Every rank loads the same global batch (the same shuffle: the epoch's seed) and takes its contiguous shard.
After each backward the gradients are averaged over the ranks (one all-reduce of the flattened gradients), so
the update is the one of the global batch's mean loss. What a step averages over the batch and feeds back
nonlinearly (MIA-Former's budget penalty on the mean MACs ratio, REINFORCE's baseline) goes through
`batch_mean`, a differentiable mean over the global batch. The random draws of the decisions (Gumbel and
Bernoulli gates) are drawn for the global batch on every rank and sliced (models.gates.uniform_like), so the ranks draw
exactly what one process draws. Rank 0 alone evaluates and writes the run folder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def shard(x: torch.Tensor, r: int, w: int) -> torch.Tensor:
    """Rank r's contiguous part of a global batch (near-equal parts where it does not divide)."""
    return x if w == 1 else torch.tensor_split(x, w)[r]


def batch_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of t (this rank's per-image values) over the global batch, differentiable: on every rank the
    same value, and after gradient averaging the same update as one process's mean."""
    if world() == 1:
        return t.mean()
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    count = torch.tensor(float(t.numel()), device=t.device)
    dist.all_reduce(count)
    return all_reduce(t.sum()) / count


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the parameters' gradients over the ranks in one all-reduce (a missing gradient counts as zero)."""
    w = world()
    if w == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= w
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).clone()
        offset += n


def reduce_sums(sums: dict[str, float], seen: int) -> tuple[dict[str, float], int]:
    """Per-epoch metric sums (weighted by images) and the image count, added over the ranks."""
    if world() == 1:
        return sums, seen
    import torch.distributed as dist

    keys = list(sums)  # the same order on every rank: the same step made them
    t = torch.tensor([sums[k] for k in keys] + [float(seen)], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t[:-1].tolist())), int(t[-1])
