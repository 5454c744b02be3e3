"""Gate sampling for MIA-Former's decisions (skip a block, keep a head, keep a token).

A gate is a value per decision in {0, 1} in the forward pass. How it is drawn is the `GateMode`:

- ``full``: every gate open; the model is the static backbone.
- ``deterministic``: open where sigmoid(logit) > 0.5 (the efficient-inference setting).
- ``stochastic``: open with probability sigmoid(logit), drawn afresh on every forward (the setting of
  MIA-Former's robustness claim, Yu et al. 2022, arXiv 2112.11542). Never keyed on ``model.training``:
  torchattacks switches models to eval() during an attack, which must not change the model attacked.
- ``gumbel``: training only; Gumbel-sigmoid relaxation (Jang et al. 2017; Maddison et al. 2017) with
  temperature tau, hard in the forward pass and straight-through in the backward pass (as in AdaViT).

With ``straight_through`` the hard gates of the deterministic and stochastic modes carry the gradient of
their probability (Bengio et al. 2013, BPDA of Athalye et al. 2018), so an attack can steer the sub-model.
"""

from __future__ import annotations

from enum import Enum

import torch


class GateMode(str, Enum):
    """How gates are drawn; see the module docstring."""

    FULL = "full"
    DETERMINISTIC = "deterministic"
    STOCHASTIC = "stochastic"
    GUMBEL = "gumbel"

    @classmethod
    def parse(cls, value: str | GateMode) -> GateMode:
        """The mode named `value`, or a UserError listing the modes."""
        from miarobust.errors import UserError

        try:
            return cls(value)
        except ValueError:
            modes = ", ".join(m.value for m in cls if m is not cls.GUMBEL)
            raise UserError(f"unknown gate mode '{value}': use one of {modes} ('gumbel' in training).") from None


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """`hard` in the forward pass, the gradient of `soft` in the backward pass."""
    return hard + soft - soft.detach()


def sample_gates(logits: torch.Tensor, mode: GateMode, st: bool = False, tau: float = 1.0) -> torch.Tensor:
    """Gates of the same shape as `logits`, values in {0, 1} in the forward pass (see the module docstring)."""
    if mode is GateMode.FULL:
        return torch.ones_like(logits)
    if mode is GateMode.DETERMINISTIC:
        hard = (logits > 0).to(logits.dtype)
        return straight_through(hard, torch.sigmoid(logits)) if st else hard
    if mode is GateMode.STOCHASTIC:
        prob = torch.sigmoid(logits)
        hard = (torch.rand_like(prob) < prob.detach()).to(logits.dtype)
        return straight_through(hard, prob) if st else hard
    # GUMBEL: logistic noise = difference of two Gumbels; hard by threshold, ST through the relaxation
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    return straight_through((soft.detach() > 0.5).to(logits.dtype), soft)


def log_prob(logits: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability of the drawn `gates` under Bernoulli(sigmoid(logits)): REINFORCE's log pi."""
    # log sigmoid(l) if open, log sigmoid(-l) if closed; stable for large |l|
    return torch.nn.functional.logsigmoid(torch.where(gates.detach() > 0.5, logits, -logits))
