"""The threat model: an Lp ball around the clean image, intersected with the [0, 1] box."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: slack for float rounding in the projection (fp32 images in [0, 1]): relative to eps, and absolute (per pixel
#: for Linf, where rounding x + delta costs at most half an ulp of 1.0, 6e-8; for the L2 norm, summed over pixels)
TOLERANCE = 1e-5
LINF_SLACK = 1e-6


class ThreatModelViolation(RuntimeError):
    """An attack returned an image outside the threat model: a bug, never a number."""


@dataclass(frozen=True)
class ThreatModel:
    """norm: 'Linf' or 'L2'; eps: radius in [0, 1] pixel units."""

    norm: str
    eps: float

    def distance(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Per-image perturbation size in this norm, (B,)."""
        d = (x_adv - x).flatten(1)
        return d.abs().amax(1) if self.norm == "Linf" else d.norm(p=2, dim=1)

    def project(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """The closest image to x_adv inside the ball around x and the [0, 1] box."""
        d = x_adv - x
        if self.norm == "Linf":
            d = d.clamp(-self.eps, self.eps)
        else:
            norms = d.flatten(1).norm(p=2, dim=1).clamp(min=1e-12)
            d = d * (self.eps / norms).clamp(max=1.0).view(-1, *([1] * (d.dim() - 1)))
        return (x + d).clamp(0, 1)

    def check(self, x: torch.Tensor, x_adv: torch.Tensor, attack: str) -> torch.Tensor:
        """Raise ThreatModelViolation unless every x_adv is in the ball and the box; return the distances."""
        if not torch.isfinite(x_adv).all():
            raise ThreatModelViolation(f"attack {attack} returned non-finite pixels")
        lo, hi = float(x_adv.min()), float(x_adv.max())
        if lo < -TOLERANCE or hi > 1 + TOLERANCE:
            raise ThreatModelViolation(f"attack {attack} left the [0, 1] box (pixels in [{lo:.6f}, {hi:.6f}])")
        dist = self.distance(x, x_adv)
        worst = float(dist.max()) if dist.numel() else 0.0
        if worst > self.eps * (1 + TOLERANCE) + (LINF_SLACK if self.norm == "Linf" else TOLERANCE):
            raise ThreatModelViolation(f"attack {attack} exceeded the {self.norm} ball: {worst:.6f} > eps {self.eps:.6f}")
        return dist
