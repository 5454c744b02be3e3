"""Normalisation inside the model, so attacks work on [0, 1] pixels (RobustBench's ImageNormalizer pattern)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalized(nn.Module):
    """`model((x - mean) / std)` for x in [0, 1] of shape (B, C, H, W); mean/std from the model's timm cfg.

    The wrapped model stays reachable as `.model`, so gate modes and FLOPs are read through the wrapper.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = mean if mean is not None else cfg.get("mean", (0.0,))
        std = std if std is not None else cfg.get("std", (1.0,))
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)
