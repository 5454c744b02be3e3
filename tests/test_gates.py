"""Gate sampling: modes, straight-through gradients, log-probabilities."""

from __future__ import annotations

import pytest
import torch

from miarobust.errors import UserError
from miarobust.models.gates import GateMode, log_prob, sample_gates


def test_deterministic_thresholds_at_half() -> None:
    g = sample_gates(torch.tensor([-1.0, -1e-4, 1e-4, 2.0]), GateMode.DETERMINISTIC)
    assert g.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_full_opens_everything() -> None:
    g = sample_gates(torch.full((5,), -9.0), GateMode.FULL)
    assert g.tolist() == [1.0] * 5


def test_stochastic_frequency_matches_probability() -> None:
    torch.manual_seed(0)
    logits = torch.full((20000,), 0.8473)  # sigmoid = 0.7
    g = sample_gates(logits, GateMode.STOCHASTIC)
    assert set(g.unique().tolist()) <= {0.0, 1.0}
    assert g.mean().item() == pytest.approx(0.7, abs=0.01)


def test_stochastic_does_not_depend_on_training_flag() -> None:
    """torchattacks calls eval(): the gates must stay random (mode is explicit, never model.training)."""
    import timm

    import miarobust.models  # noqa: F401

    model = timm.create_model("mia_vit_fmnist", gate_mode="stochastic", controller_bias=0.0).eval()
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(0)
    a = model(x)
    b = model(x)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("mode", [GateMode.DETERMINISTIC, GateMode.STOCHASTIC])
def test_straight_through_gradient_is_sigmoid_derivative(mode: GateMode) -> None:
    logits = torch.tensor([0.3, -0.2], requires_grad=True)
    g = sample_gates(logits, mode, st=True)
    g.sum().backward()
    p = torch.sigmoid(logits.detach())
    assert torch.allclose(logits.grad, p * (1 - p))
    hard_logits = torch.tensor([0.3, -0.2], requires_grad=True)
    g2 = sample_gates(hard_logits, mode, st=False)
    assert not g2.requires_grad


def test_gumbel_is_hard_forward_with_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.zeros(1000, requires_grad=True)
    g = sample_gates(logits, GateMode.GUMBEL, tau=1.0)
    hard = g.detach()
    assert torch.allclose(hard, hard.round(), atol=1e-6)  # straight-through: hard up to float rounding
    assert hard.mean().item() == pytest.approx(0.5, abs=0.05)
    g.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_log_prob_is_bernoulli_log_likelihood() -> None:
    logits = torch.tensor([2.0, -1.0])
    g = sample_gates(logits, GateMode.DETERMINISTIC)
    logp = log_prob(logits, g)
    p = torch.sigmoid(logits)
    expected = torch.where(g > 0.5, p.log(), (1 - p).log())
    assert torch.allclose(logp, expected)


def test_unknown_mode_is_a_user_error() -> None:
    with pytest.raises(UserError, match="deterministic"):
        GateMode.parse("sometimes")
