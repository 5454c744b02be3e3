"""Normalisation inside the model, so attacks work on [0, 1] pixels (RobustBench's ImageNormalizer pattern)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def resolve(model: nn.Module, mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std `Normalized` applies: those given, else the model's timm pretrained_cfg's, else 0 and 1."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = mean if mean is not None else cfg.get("mean", (0.0,))
    std = std if std is not None else cfg.get("std", (1.0,))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


class Normalized(nn.Module):
    """`model((x - mean) / std)` for x in [0, 1] of shape (B, C, H, W); mean/std from the model's timm cfg.

    The wrapped model stays reachable as `.model`, so gate modes and FLOPs are read through the wrapper. With
    `autocast` (torch.bfloat16 or torch.float16) the model runs under torch.autocast and its logits come back in fp32.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 autocast: torch.dtype | None = None):
        super().__init__()
        mean, std = resolve(model, mean, std)
        self.model = model
        self.autocast = autocast
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.autocast is None:
            return self.model((x - self.mean) / self.std)
        with torch.autocast(x.device.type, dtype=self.autocast):
            out = self.model((x - self.mean) / self.std)
        return out.float()
