"""Slowdown (energy) attack on input-adaptive models, after DeepSloth (Hong et al. 2021) and ILFO (Haque et
al. 2020): within the threat model, push the controller to open gates so the model spends more MACs.

The objective is the executed MACs through the straight-through gates (differentiable, see
flops.mia_macs), relative to the static model; with `keep_prediction` a cross-entropy term keeps the
clean label so the attack is stealthy. Against a static model there is nothing to slow down: identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from miarobust.attacks.pgd import pgd


def build(victim, cfg, eot: int = 1):  # noqa: ANN001, ANN201  (types in attacks/__init__; eot unused: takes_eot=False)
    if victim.adaptive is None or not victim.adaptive.VARIABLE_COMPUTE:
        return lambda x, y: x
    from miarobust.models.flops import VitDims, static_macs

    full = float(static_macs(VitDims.of(victim.adaptive)))

    def objective(x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = victim.model(x_adv)
        gain = victim.adaptive.last.macs / full
        if cfg.keep_prediction:
            return gain - F.cross_entropy(logits, y, reduction="none")
        return gain

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with victim.straight_through():
            return pgd(objective, x, y, cfg.threat, cfg.steps, cfg.step_size)

    return run
