"""Projected gradient descent (Madry et al. 2018, arXiv 1706.06083) on any differentiable objective.

torchattacks' PGD / PGDL2 serve plain cross-entropy PGD; this loop serves what they do not: the CW margin
loss (Carlini & Wagner 2017) as `pgd-cw`, restarts that keep each image's first success, and the
slowdown objective. Images are (B, C, H, W) in [0, 1]; the gradient is taken with torch.autograd.grad.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from miarobust.attacks.threat import ThreatModel

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_adv, y) -> per-image loss to maximise (B,)


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: max wrong logit - true logit, per image (positive = misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return wrong - true


def pgd(
    objective: Objective,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    steps: int,
    alpha: float,
    random_start: bool = True,
) -> torch.Tensor:
    """Maximise `objective` within the threat model by `steps` signed (Linf) or normalised (L2) steps."""
    x = x.detach()
    if random_start:
        if threat.norm == "Linf":
            delta = torch.empty_like(x).uniform_(-threat.eps, threat.eps)
        else:
            delta = torch.randn_like(x)
            norms = delta.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
            radius = torch.rand(x.shape[0], device=x.device).view_as(norms)
            delta = delta / norms.clamp(min=1e-12) * radius * threat.eps
        x_adv = threat.project(x, x + delta)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = objective(x_adv, y).sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            if threat.norm == "Linf":
                step = alpha * grad.sign()
            else:
                g = grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *([1] * (x.dim() - 1)))
                step = alpha * grad / g
            x_adv = threat.project(x, x_adv + step)
    return x_adv.detach()


def with_restarts(
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    restarts: int,
) -> torch.Tensor:
    """Run `attack` up to `restarts` times; each image keeps its first misclassified result (else the last)."""
    best = attack(x, y)
    if restarts <= 1:
        return best
    with torch.no_grad():
        fooled = model(best).argmax(1) != y
    for _ in range(restarts - 1):
        if bool(fooled.all()):
            break
        todo = (~fooled).nonzero().squeeze(1)
        adv = attack(x[todo], y[todo])
        with torch.no_grad():
            now = model(adv).argmax(1) != y[todo]
        best[todo] = adv
        fooled[todo] = now
    return best
