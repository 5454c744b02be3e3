"""miarobust/attacks/threat.py: projection, and the check that makes an out-of-ball example an error."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from miarobust import attacks
from miarobust.attacks.threat import ThreatModel, ThreatModelViolation


def pair(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 6, 6, generator=g), torch.rand(n, 1, 6, 6, generator=g) * 3 - 1


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_project_lands_in_the_ball_and_the_box(norm: str, eps: float) -> None:
    threat = ThreatModel(norm, eps)
    x, far = pair()
    p = threat.project(x, far)
    assert p.min() >= 0 and p.max() <= 1
    assert (threat.distance(x, p) <= eps * (1 + 1e-6)).all()
    threat.check(x, p, "projected")
    inside = threat.project(x, p)
    assert torch.allclose(inside, p, atol=1e-6)  # projecting twice changes nothing


def test_distance() -> None:
    x = torch.zeros(1, 1, 2, 2)
    d = torch.tensor([[[[0.3, 0.0], [0.4, 0.0]]]])
    assert ThreatModel("Linf", 1).distance(x, d).item() == pytest.approx(0.4)
    assert ThreatModel("L2", 1).distance(x, d).item() == pytest.approx(0.5)


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_check_raises_outside(norm: str, eps: float) -> None:
    threat = ThreatModel(norm, eps)
    x = torch.full((2, 1, 6, 6), 0.5)
    step = 2 * eps if norm == "Linf" else 2 * eps / 6  # twice the radius, inside the box
    with pytest.raises(ThreatModelViolation, match="exceeded"):
        threat.check(x, x + step, "planted")
    with pytest.raises(ThreatModelViolation, match="box"):
        threat.check(torch.zeros_like(x), torch.zeros_like(x) - 1e-3, "planted")
    with pytest.raises(ThreatModelViolation, match="non-finite"):
        threat.check(x, x * float("nan"), "planted")
    assert (threat.check(x, x, "identity") == 0).all()


def test_float_rounding_at_the_edge_is_tolerated() -> None:
    threat = ThreatModel("Linf", 8 / 255)
    x = torch.full((1, 1, 4, 4), 0.25)
    threat.check(x, x + 8 / 255 + 1e-7, "rounding")


def test_a_tiny_eps_is_not_swamped_by_the_rounding_slack() -> None:
    """At Linf eps 1e-6 a perturbation of 3e-6 is refused (an absolute slack of 1e-5 let 11 x eps through),
    while every pixel moved by exactly eps in float32 passes."""
    threat = ThreatModel("Linf", 1e-6)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    with pytest.raises(ThreatModelViolation, match="exceeded"):
        threat.check(x, x + 3e-6, "planted")
    threat.check(x, threat.project(x, x + 1.0), "projected")


def outside(victim, cfg, eot=1):  # noqa: ANN001, ANN201
    """A planted attack that steps out of the ball (inside the box)."""
    return lambda x, y: (x + 2 * cfg.eps * torch.where(x < 0.5, 1.0, -1.0)).clamp(0, 1)


def test_evaluator_refuses_an_attack_outside_the_ball(monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluator checks every adversarial example before it counts: a violation is an error."""
    from miarobust.evaluator import Evaluation, RunConfig

    planted = replace(attacks.ATTACKS["pgd"], name="planted", build=outside)
    monkeypatch.setitem(attacks.ATTACKS, "planted", planted)
    ev = Evaluation.from_config(RunConfig(model="vit_fmnist", data="synthetic", attacks=("planted",), n=2, batch_size=2))
    with pytest.raises(ThreatModelViolation, match="planted exceeded the Linf ball"):
        ev.run_batch(0)
