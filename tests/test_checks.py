"""miarobust.checks: each sanity check passes on a sound setup and flags a planted failure.

The planted models are tiny and analytic (no training): `Regions` classifies 28x28 grey images by the
nearest class template over 16 region means (7x7 pixels each). It is right on its data, its margin is
0.25 in region-mean units, so Linf eps 0.2 leaves it robust and eps 0.3 breaks it, and PGD solves it in a
few steps. Its failure modes are planted: `quantise` rounds the input with a zero gradient (masked
gradients: PGD stalls, Square succeeds); `grad_noise` adds, per forward row, a gradient-only term of random
sign (a randomized model whose single draw misleads PGD but whose mean over two draws does not).
`boundary_data` moves a few images 0.3 of the way to another class's template: robust at eps 0.2 to an attack
too weak to move them, broken by a proper one, so a paired test sees the few images a stronger rerun adds.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from types import SimpleNamespace

import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from miarobust import checks
from miarobust.attacks import ATTACKS, AttackConfig, Victim, build_attack, get_attack
from miarobust.checks import reruns
from miarobust.evaluator import Evaluation, RunConfig
from miarobust.models.gates import GateMode
from miarobust.models.normalize import Normalized
from miarobust.results import CSV_FLOAT
from miarobust.results.summary import summarize
from miarobust.stats import mcnemar_power, wilson

SQUARE = dict(checks.SQUARE)  # the shipped budgets (the fixture `small_square` lowers them for the other tests)


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


def boundary_data(templates: torch.Tensor, n: int = 100, wrong: int = 50, near: int = 8
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """n Regions images (n, 1, 28, 28) with labels (n,), in a fixed shuffled order: `wrong` of them carry a wrong
    label (clean errors), `near` lie 0.3 of the way from their template to the next class's (robust at Linf eps
    0.2 to one PGD step of size 0.003, broken by a proper PGD), the others at their template (robust at 0.2)."""
    g = torch.Generator().manual_seed(2)
    classes = len(templates)
    y = torch.arange(n) % classes
    frac = torch.zeros(n)
    frac[wrong:wrong + near] = 0.3
    means = templates[y] + frac[:, None] * (templates[(y + 1) % classes] - templates[y])
    x = means.view(-1, 1, 4, 4).repeat_interleave(7, 2).repeat_interleave(7, 3)
    x = (x + (torch.rand(x.shape, generator=g) - 0.5) * 0.1).clamp(0, 1)
    label = torch.where(torch.arange(n) < wrong, (y + 1) % classes, y)
    order = torch.randperm(n, generator=g)
    return x[order], label[order]


def planted(model: nn.Module, attacks: str, stochastic: bool = False, checks_mode: str = "on",
            data: tuple[torch.Tensor, torch.Tensor] | None = None, mia: nn.Module | None = None,
            **cfg: object) -> Evaluation:
    """A real Evaluation whose model and data are swapped for `model` on the Regions data (or `data`). With
    `mia` (the MIA-Former inside `model`) the victim is gated and its MACs are measured; else MACs are 0."""
    x, y = data if data is not None else regions_data()[1:]
    run = RunConfig(**{"model": "vit_fmnist", "data": "synthetic", "attacks": tuple(attacks.split(",")), "n": len(x),
                       "batch_size": 8, "eval_samples": 2, "checks": checks_mode, **cfg})
    ev = Evaluation.from_config(run)
    ev.model = Normalized(model, (0.0,), (1.0,)).eval()
    if mia is not None:
        ev.adaptive = mia
    else:
        ev.adaptive = SimpleNamespace(gate_mode=GateMode.STOCHASTIC, straight_through=False) if stochastic else None
        ev.macs = lambda b: torch.zeros(b)  # MACs of a ViT mean nothing here
    ev.victim = Victim(ev.model, ev.adaptive, ev.device)
    ev.dataset = [(x[i], int(y[i])) for i in range(len(x))]
    ev.draws = run.eval_samples if ev.victim.stochastic else 1
    ev.attack_fns = [build_attack(info, ev.victim, ev.acfg) for info in ev.attacks]
    return ev


def records(ev: Evaluation) -> pd.DataFrame:
    """samples.csv of `ev`, as the evaluator writes it (rounded to its six significant digits)."""
    import io

    frame = pd.concat([ev.run_batch(b) for b in range(ev.num_batches)], ignore_index=True)
    return pd.read_csv(io.StringIO(frame.to_csv(index=False, float_format=CSV_FLOAT)))


def evaluate(ev: Evaluation) -> tuple[pd.DataFrame, dict]:
    """samples, summary and checks of `ev`, as evaluator.finish computes them (without the files)."""
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


def test_square_check_of_checks_on_can_detect_a_5_point_gap() -> None:
    """At the shipped budget of --checks on, check 4's McNemar test flags Square breaking an extra 5% of its
    images with probability >= 0.8 (200 images: 0.97); --checks auto is a cheap probe with little power."""
    on, auto = SQUARE["on"], SQUARE["auto"]
    assert on == (200, 5000)
    assert mcnemar_power(on[0], checks.SQUARE_GAP, checks.LEVEL) == pytest.approx(0.9736, abs=1e-4)
    assert mcnemar_power(auto[0], checks.SQUARE_GAP, checks.LEVEL) < 0.01


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
                   "square_vs_white_box": "pass", "eot_convergence": "skip", "autoattack_flags": "pass",
                   "randomness": "pass", "slowdown_steps": "skip"}
    assert list(summary["checks"]) == list(checks.CHECKS)
    assert "square (sanity check)" in summary["checks"]["autoattack_flags"]["message"]  # check 4's Square is judged
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
    assert r["status"] == "pass" and r["value"]["acc_rerun"] == 1.0 and r["value"]["test"] == "mcnemar"

    weak = planted(Regions(templates), "pgd", eps=0.3, steps=1, alpha=0.003)  # one tiny step cannot cross the ball
    samples = pd.concat([weak.run_batch(b) for b in range(weak.num_batches)], ignore_index=True)
    r = checks.more_steps(weak, samples, len(samples))
    assert r["status"] == "flag" and r["value"]["acc_main"] == 1.0 and r["value"]["acc_rerun"] < 0.5


def test_more_steps_is_paired_and_flags_a_drop_within_the_interval(templates: torch.Tensor) -> None:
    """8 of 100 images that a proper PGD breaks and one tiny step does not: robust accuracy 0.50 -> 0.42, inside
    the 95% Wilson half-width at 0.5 (about 0.1), yet 8 discordant images all one way (McNemar p = 1/256)."""
    data = boundary_data(templates)
    weak = planted(Regions(templates), "pgd", eps=0.2, steps=1, alpha=0.003, data=data, batch_size=50)
    r = checks.more_steps(weak, records(weak), 100)
    lo, hi = wilson(50, 100)
    drop = r["value"]["acc_main"] - r["value"]["acc_rerun"]
    assert drop == pytest.approx(0.08) and drop < (hi - lo) / 2  # the unpaired interval would let it pass
    assert r["status"] == "flag", r
    assert (r["value"]["only_main"], r["value"]["only_rerun"]) == (8, 0) and r["value"]["p"] == 0.5**8

    sound = planted(Regions(templates), "pgd", eps=0.2, steps=10, data=data, batch_size=50)
    r = checks.more_steps(sound, records(sound), 100)
    assert r["status"] == "pass" and r["value"]["acc_main"] == r["value"]["acc_rerun"] == 0.42


def test_paired_test_counts_discordance_both_ways() -> None:
    """A rerun that breaks 8 images the run left robust and misses 8 the run broke is not stronger: judged
    alone, not merged with the run's result (min(run, rerun) would make it look 8 images stronger)."""
    main = torch.tensor([1.0] * 8 + [0.0] * 8 + [1.0] * 4, dtype=torch.float64)
    rerun = torch.tensor([0.0] * 8 + [1.0] * 8 + [1.0] * 4, dtype=torch.float64)
    assert checks.paired(main, rerun, binary=True)["p"] > 0.5
    assert checks.paired(main, torch.minimum(main, rerun), binary=True)["p"] < checks.LEVEL
    stochastic = checks.paired(main * 0.5, rerun * 0.5, binary=False)
    assert stochastic["test"] == "paired_mean" and stochastic["diff"] == 0 and stochastic["p"] == 0.5
    assert checks.paired(main, main - 0.25, binary=False)["p"] == 0.0


def test_more_steps_skips_fixed_budget_attacks(templates: torch.Tensor) -> None:
    ev = planted(Regions(templates), "fgsm", eps=0.3)
    assert checks.more_steps(ev, pd.DataFrame(), 4)["status"] == "skip"


def test_square_flags_masked_gradients(templates: torch.Tensor) -> None:
    sound = planted(Regions(templates), "pgd", eps=0.2)  # nothing breaks it: Square runs and finds nothing
    samples = pd.concat([sound.run_batch(b) for b in range(sound.num_batches)], ignore_index=True)
    r = checks.square_vs_white_box(sound, samples, 8, 100)
    assert r["status"] == "pass" and r["value"]["square"] == 1.0
    assert r["value"]["power"] == mcnemar_power(8) and "power" in r["message"]

    masked = planted(Regions(templates, quantise=True), "pgd", eps=0.3)
    samples = pd.concat([masked.run_batch(b) for b in range(masked.num_batches)], ignore_index=True)
    assert samples["robust"].mean() == 1.0  # PGD sees a zero gradient
    r = checks.square_vs_white_box(masked, samples, 8, 300)
    assert r["status"] == "flag" and r["value"]["square"] < 0.5 and r["value"]["rerun"] == []


@pytest.fixture
def short_apgd(monkeypatch: pytest.MonkeyPatch) -> None:
    """AutoAttack's APGD with 3 iterations instead of 100 (as in test_attacks): these tests are about which attacks
    the checks run and how they judge them, not AutoAttack's budget."""
    import pyautoattack.autoattack as aa

    for cls_name in ("APGDAttack", "APGDAttack_targeted"):
        cls = getattr(aa, cls_name)
        init = lambda self, *a, _cls=cls, **k: _cls.__init__(self, *a, **{**k, "n_iter": 3})  # noqa: E731
        monkeypatch.setattr(aa, cls_name, type(cls_name, (cls,), {"__init__": init}))


def test_square_is_compared_with_white_box_attacks_only(templates: torch.Tensor, short_apgd: None) -> None:
    """Standard AutoAttack runs Square itself, so it is no reference for Square (Square could never beat it).
    A run of autoattack alone that Square broke everywhere on a masked model: the check reruns APGD-CE and
    APGD-T as the white-box reference, which find nothing, and flags. Beside another white-box attack, the
    AutoAttack's white-box parts are rerun too (through straight-through gates for autoattack-st)."""
    assert ATTACKS["autoattack"].includes_square and not ATTACKS["autoattack-rand"].includes_square
    assert not ATTACKS["square"].white_box
    broken = pd.DataFrame({"index": range(8), "clean_correct": 1.0, "autoattack_correct": 0.0})  # by its Square
    reference = ["apgd-ce", "apgd-t"]
    assert reruns.reference_attacks(planted(Regions(templates), "autoattack", eps=0.3, n=8)) == reference
    assert reruns.reference_attacks(planted(Regions(templates), "square", eps=0.3, n=8)) == reference
    assert reruns.reference_attacks(planted(Regions(templates), "pgd,square", eps=0.3, n=8)) == []
    gated = SimpleNamespace(attacks=[get_attack(a, AttackConfig()) for a in ("autoattack", "autoattack-st", "bpda-pgd")])
    assert reruns.reference_attacks(gated) == ["apgd-ce", "apgd-t", "apgd-ce-st", "apgd-t-st"]
    for model, status, white_box in ((Regions(templates, quantise=True), "flag", 1.0),
                                     (Regions(templates), "pass", 0.0)):
        ev = planted(model, "autoattack", eps=0.3, n=8)
        runs: list = []
        r = checks.square_vs_white_box(ev, broken, 8, 300, runs)
        assert r["status"] == status, r
        assert r["value"]["rerun"] == reference and r["value"]["attacks"] == reference
        assert r["value"]["white_box"] == white_box and r["value"]["square"] < 0.5
        assert [a.attack for a in runs] == [*reference, "square"]  # judged by autoattack_flags
    ev = planted(Regions(templates), "pgd,autoattack", eps=0.3, n=8)
    r = checks.square_vs_white_box(ev, records(ev), 8, 100)
    assert r["value"]["rerun"] == reference and r["value"]["attacks"] == ["pgd", *reference]


def test_eot_convergence_flags_k_1_on_a_stochastic_model(templates: torch.Tensor) -> None:
    k1 = planted(Regions(templates, grad_noise=100.0), "pgd", stochastic=True, eps=0.3, steps=20)
    samples = pd.concat([k1.run_batch(b) for b in range(k1.num_batches)], ignore_index=True)
    r = checks.eot_convergence(k1, samples, len(samples))
    assert r["status"] == "flag", r
    assert r["value"]["eot"] == 1 and r["value"]["acc_k"] - r["value"]["acc_2k"] > 0.25

    data = boundary_data(templates)  # 8 of 100 images broken with EOT 2 only: 0.50 -> 0.42, inside the interval
    k1 = planted(Regions(templates, grad_noise=100.0), "pgd", stochastic=True, eps=0.2, steps=10, data=data,
                 batch_size=50)
    r = checks.eot_convergence(k1, records(k1), 100)
    lo, hi = wilson(50, 100)
    assert r["value"]["acc_k"] - r["value"]["acc_2k"] < (hi - lo) / 2
    assert r["status"] == "flag" and r["value"]["test"] == "paired_mean" and r["value"]["p"] < checks.LEVEL, r

    calm = planted(Regions(templates), "pgd", stochastic=True, eps=0.3, steps=20)
    samples = pd.concat([calm.run_batch(b) for b in range(calm.num_batches)], ignore_index=True)
    assert checks.eot_convergence(calm, samples, len(samples))["status"] == "pass"
    assert checks.eot_convergence(planted(Regions(templates), "pgd"), samples, 4)["status"] == "skip"


def test_autoattack_flags_zero_gradients(templates: torch.Tensor) -> None:
    for model, status in ((Regions(templates), "pass"), (Regions(templates, quantise=True), "flag")):
        ev = planted(model, "apgd-dlr", eps=0.3, n=4, batch_size=4)  # DLR: AutoAttack checks its gradient
        ev.run_batch(0)
        assert checks.autoattack_flags(ev)["status"] == status


def test_autoattack_flags_counts_every_warning_batch_by_batch(templates: torch.Tensor) -> None:
    """Warnings are kept batch by batch, not merged by their text: the same Square warning in two batches
    counts twice, and the message adds up the images Square broke from each batch's share."""
    ev = planted(Regions(templates), "apgd-ce", eps=0.3, n=12, batch_size=8)  # batches of 8 and 4 images
    square = "Square Attack has decreased the robust accuracy of {:.2f}%. This might indicate ..."
    ev.warnings = {0: {"apgd-ce": [square.format(25)]}, 1: {"apgd-ce": [square.format(25), "output range odd"]}}
    r = checks.autoattack_flags(ev)
    assert r["status"] == "flag", r
    assert r["value"] == [f"apgd-ce, batch 0: {square.format(25)}", f"apgd-ce, batch 1: {square.format(25)}",
                          "apgd-ce, batch 1: output range odd"], r
    assert "apgd-ce: Square broke 3 images the attacks before it had left robust, in 2 of 2 batches" in r["message"]
    assert "apgd-ce: output range odd" in r["message"] and "unreliable" in r["message"], r


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


class GaussianInput(Regions):
    """Regions behind Gaussian input noise (sigma 0.05), fresh on every forward: a randomised defence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x + 0.05 * torch.randn_like(x)).clamp(0, 1))


def test_randomness_probe_flags_a_random_model_attacked_without_eot(templates: torch.Tensor) -> None:
    """Whatever the model claims to be: a deterministic model passes; Gaussian input noise flags when the run
    treats the model as deterministic or attacks it without EOT, and passes as a stochastic model under EOT 2."""
    r = checks.randomness(planted(Regions(templates), "pgd", eps=0.3))
    assert r["status"] == "pass" and not r["value"]["varies"]
    for stochastic, attack, eot, status in ((False, "eot-pgd", 2, "flag"), (True, "pgd", None, "flag"),
                                            (True, "eot-pgd", 2, "pass")):
        r = checks.randomness(planted(GaussianInput(templates), attack, stochastic=stochastic, eps=0.3, eot=eot))
        assert r["status"] == status and r["value"]["varies"], (stochastic, attack, r)
        assert ("--eot" in r["message"]) == (status == "flag")
        assert ("deterministic model" in r["message"]) == (not stochastic)


def test_autoattack_flags_judges_the_checks_own_autoattack_runs(templates: torch.Tensor) -> None:
    """A run of PGD alone on a randomised model: AutoAttack's randomness warning comes from check 4's Square,
    so autoattack_flags flags it instead of skipping for want of an AutoAttack attack in the run."""
    ev = planted(GaussianInput(templates), "pgd", eps=0.3, n=8)
    _, summary = evaluate(ev)
    r = summary["checks"]["autoattack_flags"]
    assert r["status"] == "flag", r
    assert any(w.startswith("square (sanity check)") and checks.RANDOMNESS_WARNING in w for w in r["value"]), r
    assert checks.autoattack_flags(ev)["status"] == "skip"  # the run's own attacks: none from AutoAttack
    assert summary["checks"]["randomness"]["status"] == "flag"


@pytest.fixture(scope="module")
def gated_mia() -> nn.Module:
    """A random 2-block MIA-Former with deterministic gates whose controller follows the input (zero bias,
    random weights), so that a perturbation changes the MACs."""
    import miarobust.models  # noqa: F401  (registers the models with timm)

    torch.manual_seed(0)
    mia = timm.create_model("mia_vit_fmnist", depth=2, embed_dim=32, num_heads=2).eval()
    for head in mia.controller:
        for lin in (head.cls, head.tokens):
            nn.init.normal_(lin.weight, std=0.5)
            nn.init.constant_(lin.bias, 0.0)
    for p in mia.parameters():
        p.requires_grad_(False)
    return mia.set_gate_mode("deterministic")


def test_slowdown_steps_flags_a_weak_slowdown_attack(gated_mia: nn.Module) -> None:
    """One slowdown step of size 1e-4 raises no MACs; 2 steps of the default size do: flagged. 10 default steps
    reach what 20 reach: passes. A static model, or a run without slowdown, skips."""
    x = regions_data()[1][:8]
    data = (x, torch.zeros(8, dtype=torch.long))
    weak = planted(gated_mia, "slowdown", data=data, mia=gated_mia, steps=1, alpha=1e-4)
    r = checks.slowdown_steps(weak, records(weak), 8)
    assert r["status"] == "flag" and r["value"]["p"] < checks.LEVEL, r
    assert r["value"]["share_of_static_rerun"] > r["value"]["share_of_static"] and r["value"]["steps"] == 2
    sound = planted(gated_mia, "slowdown", data=data, mia=gated_mia, steps=10)
    r = checks.slowdown_steps(sound, records(sound), 8)
    assert r["status"] == "pass", r
    assert 0 < r["value"]["share_of_static"] <= 1 and "MACs share" in r["message"]
    no_slowdown = planted(gated_mia, "pgd", data=data, mia=gated_mia)
    assert checks.slowdown_steps(no_slowdown, pd.DataFrame(), 8)["status"] == "skip"
    static = checks.slowdown_steps(planted(gated_mia, "slowdown", data=data), pd.DataFrame(), 8)
    assert static["status"] == "skip" and "static model" in static["message"]


def test_a_slowdown_only_run_skips_the_accuracy_checks(gated_mia: nn.Module) -> None:
    """Checks 2-5 rerun attacks on accuracy: a run whose only attack is slowdown skips them (no Square, no APGD
    reruns for a MACs figure) and still runs check 8; a run with slowdown beside an accuracy attack runs them."""
    x = regions_data()[1][:8]
    data = (x, torch.zeros(8, dtype=torch.long))
    _, summary = evaluate(planted(gated_mia, "slowdown", data=data, mia=gated_mia, steps=10))
    got = {k: v["status"] for k, v in summary["checks"].items()}
    assert {got[c] for c in checks.ACCURACY_RERUNS} == {"skip"} and got["slowdown_steps"] == "pass", got
    assert "slowdown-only" in summary["checks"]["square_vs_white_box"]["message"]
    _, summary = evaluate(planted(gated_mia, "pgd,slowdown", data=data, mia=gated_mia, steps=10))
    got = {k: v["status"] for k, v in summary["checks"].items()}
    assert got["large_eps"] != "skip" and got["square_vs_white_box"] != "skip" and got["slowdown_steps"] != "skip", got


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
    from miarobust.evaluator import run

    cfg = RunConfig(model="mia_vit_fmnist", gate_mode="stochastic", data="synthetic", attacks=("pgd",), eot=2,
                    steps=2, n=4, batch_size=4, eval_samples=2, checks="on", out=str(tmp_path))
    res = run(cfg, progress=False)
    on_disk = json.loads((res.folder / "summary.json").read_text())["checks"]
    assert sorted(on_disk) == sorted(checks.CHECKS)
    assert all(v["status"] in ("pass", "flag", "skip") and v["message"] for v in on_disk.values())
    assert on_disk["eot_convergence"]["status"] != "skip" and on_disk["eot_convergence"]["value"]["eot"] == 2
    assert on_disk["randomness"]["status"] == "pass"  # random gates, attacked through EOT 2


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
