"""Expectation over transformation (Athalye et al. 2018) through MIA-Former's random gates.

`EOT(model, k)` returns, for each image, the log of the mean softmax over k independent gate draws:
its softmax is the stochastic model's expected prediction, and cross-entropy on it is -log E[p_y]. The
k draws run as one batch of B*k rows, split into chunks of at most `chunk` rows (one large pass wins on a
GPU; on a 2-core CPU a few medium passes beat one huge one, so the CPU default is smaller).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def default_chunk(device: torch.device | str) -> int:
    """Rows per forward pass for EOT: measured with benchmarks/bench_attacks.py (CPU 256, CUDA 8192)."""
    return 8192 if torch.device(device).type == "cuda" else 256


class EOT(nn.Module):
    """Log of the mean softmax of `model` over `k` gate draws; x (B, C, H, W) in [0, 1] -> (B, classes)."""

    def __init__(self, model: nn.Module, k: int, chunk: int | None = None):
        super().__init__()
        self.model, self.k = model, k
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k == 1:
            return self.model(x)
        b = x.shape[0]
        rows = x.repeat(self.k, *([1] * (x.dim() - 1)))  # draw j of image i at row j * b + i
        chunk = self.chunk or default_chunk(x.device)
        outs = [self.model(part) for part in rows.split(max(chunk, 1))]
        logp = torch.cat(outs).log_softmax(-1).view(self.k, b, -1)
        return torch.logsumexp(logp, 0) - math.log(self.k)
