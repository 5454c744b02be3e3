"""miarobust/checks.py: each sanity check passes on a sound setup and flags a planted failure.

The planted models are tiny and analytic (no training): `Regions` classifies 28x28 grey images by the
nearest class template over 16 region means (7x7 pixels each). It is right on its data, its margin is
0.25 in region-mean units, so Linf eps 0.2 leaves it robust and eps 0.3 breaks it, and PGD solves it in a
few steps. Its failure modes are planted: `quantise` rounds the input with a zero gradient (masked
gradients: PGD stalls, Square succeeds); `grad_noise` adds, per forward row, a gradient-only term of random
sign (a randomized model whose single draw misleads PGD but whose mean over two draws does not).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miarobust import checks
from miarobust.attacks import Victim, build_attack
from miarobust.evaluate import Evaluation, RunConfig, summarize
from miarobust.models.gates import GateMode
from miarobust.models.normalize import Normalized


class Regions(nn.Module):
    """Nearest-template classifier on 4x4 region means of (B, 1, 28, 28) images in [0, 1] -> (B, classes)."""

    def __init__(self, templates: torch.Tensor, quantise: bool = False, grad_noise: float = 0.0):
        super().__init__()
        self.templates = nn.Parameter(templates, requires_grad=False)  # (classes, 16), values 0.25 / 0.75
        self.num_classes = templates.shape[0]
        self.quantise, self.grad_noise = quantise, grad_noise
        g = torch.Generator().manual_seed(1)
        self.register_buffer("noise_dir", torch.randn(28 * 28, self.num_classes, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantise:
            x = (x * 8).round() / 8  # round has a zero gradient: every gradient attack sees none
        means = F.avg_pool2d(x, 7).flatten(1)
        logits = -20 * ((means[:, None] - self.templates) ** 2).sum(-1)
        if self.grad_noise:
            proj = x.flatten(1) @ self.noise_dir
            sign = torch.randint(0, 2, (len(x), 1), device=x.device) * 2 - 1
            logits = logits + self.grad_noise * sign * (proj - proj.detach())  # zero in value, random in gradient
        return logits


def regions_data(per_class: int = 2, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Templates (classes, 16) with distinct codes, and images (N, 1, 28, 28) with labels (N,)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2, (classes, 16), generator=g).float()
    codes[:, 0] = torch.arange(classes) % 2  # keep the codes distinct
    codes[:, 1:5] = ((torch.arange(classes)[:, None] >> torch.arange(4)) & 1).float()
    templates = 0.25 + 0.5 * codes
    y = torch.arange(classes).repeat_interleave(per_class)
    x = templates[y].view(-1, 1, 4, 4).repeat_interleave(7, 2).repeat_interleave(7, 3)
    x = (x + (torch.rand(x.shape, generator=g) - 0.5) * 0.1).clamp(0, 1)
    return templates, x, y


def planted(model: nn.Module, attacks: str, stochastic: bool = False, checks_mode: str = "on",
            **cfg: object) -> Evaluation:
    """A real Evaluation whose model and data are swapped for `model` on the Regions data."""
    _, x, y = regions_data()
    run = RunConfig(**{"model": "vit_fmnist", "data": "synthetic", "attacks": tuple(attacks.split(",")), "n": len(x),
                       "batch_size": 8, "eval_samples": 2, "checks": checks_mode, **cfg})
    ev = Evaluation(run)
    ev.model = Normalized(model, (0.0,), (1.0,)).eval()
    ev.mia = SimpleNamespace(gate_mode=GateMode.STOCHASTIC, straight_through=False) if stochastic else None
    ev.victim = Victim(ev.model, ev.mia, ev.device)
    ev.dataset = [(x[i], int(y[i])) for i in range(len(x))]
    ev.draws = run.eval_samples if stochastic else 1
    ev.attack_fns = [build_attack(info, ev.victim, ev.acfg) for info in ev.attacks]
    ev.macs = lambda b: torch.zeros(b)  # MACs of a ViT mean nothing here
    return ev


def evaluate(ev: Evaluation) -> tuple[pd.DataFrame, dict]:
    """samples, summary and checks of `ev`, as evaluate.finish computes them (without the files)."""
    samples = pd.concat([ev.run_batch(b) for b in range(ev.num_batches)], ignore_index=True)
    summary = summarize(ev.cfg, samples, ev.attacks, ev.draws, {})
    summary["checks"] = checks.run_checks(ev.cfg, ev, samples, summary)
    return samples, summary


@pytest.fixture(scope="module")
def templates() -> torch.Tensor:
    return regions_data()[0]


@pytest.fixture(autouse=True)
def small_square(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "SQUARE", {"on": (20, 300), "auto": (8, 100)})


def test_regions_is_right_on_clean_data(templates: torch.Tensor) -> None:
    _, x, y = regions_data()
    for model in (Regions(templates), Regions(templates, quantise=True), Regions(templates, grad_noise=100.0)):
        assert (model(x).argmax(1) == y).all()


def test_plan() -> None:
    assert checks.plan("off", 50).checks == ("robust_le_clean",)
    small, large, on = checks.plan("auto", 200), checks.plan("auto", 5000), checks.plan("on", 5000)
    assert small.checks == large.checks == on.checks == checks.CHECKS
    assert (small.images, large.images, on.images) == (200, 100, 5000)
    assert large.square_queries < on.square_queries and large.square_images <= on.square_images


def test_checks_off_runs_check_1_only(templates: torch.Tensor) -> None:
    _, summary = evaluate(planted(Regions(templates), "pgd", eps=0.3, checks_mode="off"))
    assert list(summary["checks"]) == ["robust_le_clean"]


def test_robust_le_clean() -> None:
    samples = pd.DataFrame({"clean_correct": [1.0, 0, 0, 0] * 10, "pgd_adv_correct": [0.0, 0, 0, 1] * 10})
    assert checks.robust_le_clean(samples, {"attacks": {"pgd": {}}})["status"] == "pass"
    samples["pgd_adv_correct"] = 1.0
    assert checks.robust_le_clean(samples, {"attacks": {"pgd": {}}})["status"] == "flag"


def test_sound_setup_passes_every_check(templates: torch.Tensor) -> None:
    _, summary = evaluate(planted(Regions(templates), "pgd", eps=0.3))
    assert summary["robust"]["acc"] == 0.0
    got = {k: v["status"] for k, v in summary["checks"].items()}
    assert got == {"robust_le_clean": "pass", "large_eps": "pass", "more_steps": "pass",
                   "square_vs_white_box": "pass", "eot_convergence": "skip", "autoattack_flags": "skip"}
    json.dumps(summary["checks"], allow_nan=False)  # what summary.json will hold


def test_large_eps_flags_masked_gradients(templates: torch.Tensor, caplog: pytest.LogCaptureFixture) -> None:
    ev = planted(Regions(templates, quantise=True), "pgd", eps=0.3)
    samples = pd.concat([ev.run_batch(b) for b in range(ev.num_batches)], ignore_index=True)
    with caplog.at_level(logging.WARNING, logger="miarobust.checks"):
        r = checks.large_eps(ev, samples, len(samples))
    assert r["status"] == "flag" and r["value"]["acc"] == 1.0
    assert "does not work on this model" in caplog.text


def test_more_steps_passes_on_robust_images_and_flags_a_weak_attack(templates: torch.Tensor) -> None:
    sound = planted(Regions(templates), "pgd", eps=0.2)  # robust at 0.2: the stronger attack must find nothing
    samples = pd.concat([sound.run_batch(b) for b in range(sound.num_batches)], ignore_index=True)
    assert samples["robust"].mean() == 1.0
    r = checks.more_steps(sound, samples, len(samples))
    assert r["status"] == "pass" and r["value"]["stronger"] == 1.0

    weak = planted(Regions(templates), "pgd", eps=0.3, steps=1, alpha=0.003)  # one tiny step cannot cross the ball
    samples = pd.concat([weak.run_batch(b) for b in range(weak.num_batches)], ignore_index=True)
    r = checks.more_steps(weak, samples, len(samples))
    assert r["status"] == "flag" and r["value"]["robust"] == 1.0 and r["value"]["stronger"] < 0.5


def test_more_steps_skips_fixed_budget_attacks(templates: torch.Tensor) -> None:
    ev = planted(Regions(templates), "fgsm", eps=0.3)
    assert checks.more_steps(ev, pd.DataFrame(), 4)["status"] == "skip"


def test_square_flags_masked_gradients(templates: torch.Tensor) -> None:
    sound = planted(Regions(templates), "pgd", eps=0.2)  # nothing breaks it: Square runs and finds nothing
    samples = pd.concat([sound.run_batch(b) for b in range(sound.num_batches)], ignore_index=True)
    r = checks.square_vs_white_box(sound, samples, 8, 100)
    assert r["status"] == "pass" and r["value"]["with_square"] == 1.0

    masked = planted(Regions(templates, quantise=True), "pgd", eps=0.3)
    samples = pd.concat([masked.run_batch(b) for b in range(masked.num_batches)], ignore_index=True)
    assert samples["robust"].mean() == 1.0  # PGD sees a zero gradient
    r = checks.square_vs_white_box(masked, samples, 8, 300)
    assert r["status"] == "flag" and r["value"]["with_square"] < 0.5


def test_eot_convergence_flags_k_1_on_a_stochastic_model(templates: torch.Tensor) -> None:
    k1 = planted(Regions(templates, grad_noise=100.0), "pgd", stochastic=True, eps=0.3, steps=20)
    samples = pd.concat([k1.run_batch(b) for b in range(k1.num_batches)], ignore_index=True)
    r = checks.eot_convergence(k1, samples, len(samples))
    assert r["status"] == "flag", r
    assert r["value"]["eot"] == 1 and r["value"]["acc_k"] - r["value"]["acc_2k"] > 0.25

    calm = planted(Regions(templates), "pgd", stochastic=True, eps=0.3, steps=20)
    samples = pd.concat([calm.run_batch(b) for b in range(calm.num_batches)], ignore_index=True)
    assert checks.eot_convergence(calm, samples, len(samples))["status"] == "pass"
    assert checks.eot_convergence(planted(Regions(templates), "pgd"), samples, 4)["status"] == "skip"


def test_autoattack_flags_zero_gradients(templates: torch.Tensor) -> None:
    for model, status in ((Regions(templates), "pass"), (Regions(templates, quantise=True), "flag")):
        ev = planted(model, "apgd-dlr", eps=0.3, n=4, batch_size=4)  # DLR: AutoAttack checks its gradient
        ev.run_batch(0)
        assert checks.autoattack_flags(ev)["status"] == status


class NoisyOutputs(Regions):
    """Regions whose logits carry fresh noise on every forward: AutoAttack's randomness check sees it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits + 0.01 * torch.randn_like(logits)


def test_autoattack_randomness_warning_is_expected_only_under_eot(templates: torch.Tensor) -> None:
    """A stochastic model attacked by APGD without EOT: AutoAttack's randomness warning flags (its advice holds).
    Through EOT over 4 draws the warning is expected and the check passes, saying so."""
    for eot, status in ((1, "flag"), (4, "pass")):
        ev = planted(NoisyOutputs(templates), "apgd-ce", stochastic=True, eps=0.3, n=4, batch_size=4, eot=eot)
        ev.run_batch(0)
        r = checks.autoattack_flags(ev)
        assert r["status"] == status, r
        assert any(checks.RANDOMNESS_WARNING in w for w in r["value"]), r
        assert ("expected" in r["message"]) == (eot > 1)


def test_reruns_are_checked_against_the_threat_model(templates: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    from miarobust import attacks
    from miarobust.attacks.threat import ThreatModelViolation

    ev = planted(Regions(templates), "pgd", eps=0.2)
    samples = pd.concat([ev.run_batch(b) for b in range(ev.num_batches)], ignore_index=True)
    info = attacks.ATTACKS["pgd"]
    monkeypatch.setitem(attacks.ATTACKS, "pgd", replace(info, build=lambda v, c, k=1: (lambda x, y: x + 2 * c.eps)))
    with pytest.raises(ThreatModelViolation):
        checks.more_steps(ev, samples, 8)


def test_run_writes_checks_to_summary(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real evaluator and a random MIA-Former in stochastic mode: every check has a result."""
    from miarobust.evaluate import run

    cfg = RunConfig(model="mia_vit_fmnist", gate_mode="stochastic", data="synthetic", attacks=("pgd",), eot=2,
                    steps=2, n=4, batch_size=4, eval_samples=2, checks="on", out=str(tmp_path))
    res = run(cfg, progress=False)
    on_disk = json.loads((res.folder / "summary.json").read_text())["checks"]
    assert sorted(on_disk) == sorted(checks.CHECKS)
    assert all(v["status"] in ("pass", "flag", "skip") and v["message"] for v in on_disk.values())
    assert on_disk["eot_convergence"]["status"] != "skip" and on_disk["eot_convergence"]["value"]["eot"] == 2


def test_expected_autoattack_warnings_are_recorded_but_not_printed(caplog: pytest.LogCaptureFixture) -> None:
    """Through EOT on the stochastic gates AutoAttack's randomness warning is expected: check 6 still sees it,
    the terminal does not (it printed once per batch, and from check 4's Square in runs without AutoAttack)."""
    import logging

    from miarobust.attacks import capture_autoattack_warnings

    logger = logging.getLogger("auto-attack")
    with caplog.at_level(logging.WARNING):
        with capture_autoattack_warnings(quiet=lambda m: checks.RANDOMNESS_WARNING in m) as got:
            logger.warning("it seems to be a randomized defense! Please use version='rand'.")
            logger.warning("there are clean points with zero gradient!")
    assert len(got) == 2
    assert "randomized defense" not in caplog.text and "zero gradient" in caplog.text
    assert not logger.filters  # removed on exit
