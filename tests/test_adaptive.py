"""Adaptive attacks through gates: straight-through variants (NAME-st), the best candidate per image against a
stochastic model (attacks/candidates.py), and the `adaptive` preset.

The planted models are analytic. Images are 28x28 grey: class c lights up 7x7 block c (mean 0.7 on 0.5),
and six other blocks, W, are 0.5. A `strong` classifier reads the class blocks with a margin no 8/255
perturbation can cross. A gate reads the alignment `a` of the perturbation on W with a fixed sign pattern
(0 on clean images, 1 at the ball's corner):
- `MaskedGate` (deterministic): the gate opens at a > 0.5 and routes to a sub-model that is always wrong. Its
  hard decision has a zero gradient, so gradient attacks never move W; Square's random windows never align
  with the pattern. Only the straight-through gradient of the gate finds the weak sub-model.
- `NineOfTen` (stochastic): each forward row opens its gate with probability 0.9 * sigmoid(20 (a - 0.3)); an
  open gate gives a barely wrong answer (true class 0.45, one random wrong class 0.55), a closed one a sure
  right one. At the corner 9 of 10 draws are wrong, but the mean over draws still ranks the true class
  first (0.505 against at most ~0.1 for each wrong class), so an attack that judges success on EOT's mean
  returns the clean image.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miarobust.attacks import (
    ATTACKS,
    AttackConfig,
    Victim,
    attack_salt,
    build_attack,
    expand,
    get_attack,
    straight_through_name,
)
from miarobust.errors import UserError
from miarobust.models.gates import GateMode

EPS = 8 / 255


def blocks() -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (10, 784) of the class blocks and (784,) signs of the gate pattern on the six other blocks."""
    grid = torch.arange(16).view(4, 4).repeat_interleave(7, 0).repeat_interleave(7, 1).flatten()  # block of each pixel
    masks = torch.stack([(grid == c).float() for c in range(10)])
    signs = torch.randint(0, 2, (784,), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    return masks, signs * (grid >= 10).float()


def data(per_class: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    masks, _ = blocks()
    y = torch.arange(10).repeat_interleave(per_class)
    return (0.5 + 0.2 * masks[y]).view(-1, 1, 28, 28), y


class Planted(nn.Module):
    """What both planted models share: the strong classifier and the alignment of the perturbation on W."""

    def __init__(self, mode: GateMode):
        super().__init__()
        masks, signs = blocks()
        self.register_buffer("masks", masks)
        self.register_buffer("signs", signs)
        self.gate_mode, self.straight_through, self.num_classes = mode, False, 10

    def strong(self, x: torch.Tensor) -> torch.Tensor:
        means = (x.flatten(1) - 0.5) @ self.masks.T / self.masks.sum(1)
        return 20 * means / 0.2  # 20 for the true class, 0 for the others on clean images

    def align(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - 0.5) @ self.signs / (EPS * self.signs.abs().sum())

    def gate(self, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard + soft - soft.detach() if self.straight_through else hard


class MaskedGate(Planted):
    def __init__(self):
        super().__init__(GateMode.DETERMINISTIC)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.align(x)
        g = self.gate((a > 0.5).float(), torch.sigmoid(20 * (a - 0.5)))[:, None]
        s = self.strong(x)
        return g * s.roll(1, dims=1) + (1 - g) * s  # the weak sub-model answers class + 1


class NineOfTen(Planted):
    def __init__(self):
        super().__init__(GateMode.STOCHASTIC)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.strong(x)
        q = 0.9 * torch.sigmoid(20 * (self.align(x) - 0.3))
        g = self.gate((torch.rand_like(q) < q.detach()).float(), q)[:, None]
        label = s.detach().argmax(1)
        wrong = (label + torch.randint(1, 10, label.shape)) % 10
        bad = torch.full_like(s, -30.0)
        bad[torch.arange(len(x)), label] = torch.tensor(0.45).log()
        bad[torch.arange(len(x)), wrong] = torch.tensor(0.55).log()
        return (g * bad.softmax(1) + (1 - g) * s.softmax(1)).log()  # the gate mixes probabilities, not logits


def setup(model: Planted) -> tuple[Victim, torch.Tensor, torch.Tensor]:
    """A seeded victim of the planted model (its own gates) and the ten clean images with labels."""
    torch.manual_seed(0)
    return Victim(model, model), *data()


def correct_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 1) -> torch.Tensor:
    """Per image, the share of `draws` forwards that classify it right."""
    with torch.no_grad():
        return torch.stack([(model(x).argmax(1) == y).float() for _ in range(draws)]).mean(0)


def test_planted_models_are_right_on_clean_images() -> None:
    x, y = data()
    assert correct_rate(MaskedGate(), x, y).min() == 1
    torch.manual_seed(0)  # the gate's draws: seeded as in setup(), not left to whatever ran before on this worker
    assert correct_rate(NineOfTen(), x, y, draws=50).mean() > 0.99


@pytest.mark.slow
def test_straight_through_autoattack_finds_what_gates_hide() -> None:
    model = MaskedGate()
    victim, x, y = setup(model)
    cfg = AttackConfig(eps=EPS, queries=300)
    plain = build_attack(get_attack("autoattack", cfg), victim, cfg)(x, y)
    assert correct_rate(model, plain, y).mean() == 1.0  # masked: AutoAttack, Square included, finds nothing
    st = build_attack(get_attack("autoattack-st", cfg), victim, cfg)(x, y)
    assert correct_rate(model, st, y).mean() == 0.0  # straight-through: every image broken
    assert (st - x).abs().amax() <= EPS + 1e-6 and not model.straight_through  # in the ball; gates restored


@pytest.mark.slow
def test_eot_candidate_fooling_9_of_10_draws_scores_near_0_1() -> None:
    model = NineOfTen()
    victim, x, y = setup(model)
    cfg = AttackConfig(eps=EPS, eot=10, select_draws=20)
    info = get_attack("apgd-ce-st", cfg)
    # pyautoattack alone: the mean over 10 draws never looks fooled, so the clean image comes back
    with victim.straight_through():
        raw = info.build(victim, cfg, 10)(x, y)
    assert correct_rate(model, raw, y, draws=100).mean() > 0.95
    best = build_attack(info, victim, cfg)(x, y)
    assert (best - x).abs().amax() <= EPS + 1e-6
    rate = correct_rate(model, best, y, draws=200)
    assert rate.mean() == pytest.approx(0.1, abs=0.05)  # scored on fresh draws: about 1 in 10 is right


def test_keeping_the_best_never_returns_a_worse_image_than_the_attack() -> None:
    """A stochastic victim's attack returns its own output wherever no queried candidate did better."""
    model = NineOfTen()
    victim, x, y = setup(model)
    cfg = AttackConfig(eps=EPS, select_draws=4)
    out = build_attack(get_attack("none", cfg), victim, cfg)(x, y)  # keeps_best False: the identity
    assert torch.equal(out, x)
    fgsm = build_attack(get_attack("fgsm-st", cfg), victim, cfg)(x, y)
    assert correct_rate(model, fgsm, y, draws=100).mean() < 0.3  # one signed step along the gate's gradient


def test_straight_through_variants_and_their_errors() -> None:
    cfg = AttackConfig()
    st = get_attack("autoattack-st", cfg)
    assert st.straight_through and st.gate_grad == "straight-through" and st.name == "autoattack-st"
    assert get_attack("autoattack", cfg).gate_grad == "none" and get_attack("bpda-pgd", cfg).straight_through
    assert straight_through_name("apgd-ce") == "apgd-ce-st" and straight_through_name("square") == "square"
    assert straight_through_name("pgd") == "bpda-pgd" and straight_through_name("eot-pgd") == "eot-pgd-st"
    assert straight_through_name("bpda-pgd") == "bpda-pgd" and straight_through_name("transfer") == "transfer"
    for bad, says in [("pgd-st", "bpda-pgd"), ("square-st", "no straight-through"), ("slowdown-st", "no straight"),
                      ("nope-st", "unknown attack")]:
        with pytest.raises(UserError, match=says):
            get_attack(bad, cfg)
    # seeds: registered attacks keep their position; a variant is its base's + 1000
    assert [attack_salt(n) for n in ATTACKS] == list(range(len(ATTACKS)))
    assert attack_salt("autoattack-st") == attack_salt("autoattack") + 1000


def test_straight_through_needs_gates() -> None:
    model = Planted(GateMode.DETERMINISTIC)
    cfg = AttackConfig()
    with pytest.raises(UserError, match="has none: use autoattack on a static model"):
        build_attack(get_attack("autoattack-st", cfg), Victim(model, None), cfg)
    with pytest.raises(UserError, match="has none: use pgd on a static model"):  # bpda-pgd's plain twin
        build_attack(get_attack("bpda-pgd", cfg), Victim(model, None), cfg)


def test_adaptive_preset_expands_by_model() -> None:
    assert expand(("adaptive",), gated=False) == ("autoattack",)
    assert expand(("adaptive",), gated=True) == ("autoattack", "autoattack-st", "bpda-pgd")
    assert expand(("bpda-pgd", "adaptive", "square"), gated=True) == ("bpda-pgd", "autoattack", "autoattack-st", "square")


def test_eot_matters_for_the_tap() -> None:
    """The tap scores what the attack saw: with EOT the mean over draws (log-probabilities), its argmax kept."""
    from miarobust.attacks.candidates import CandidateTap
    from miarobust.attacks.threat import ThreatModel

    x, y = data()
    tap = CandidateTap(ThreatModel("Linf", EPS), keep=2)
    tap.start(x, y)
    far = x + 0.5  # outside every ball: never a candidate
    tap.observe(far, F.one_hot((y + 1) % 10, 10).float() * 10)
    assert torch.isinf(tap.score).all()
    near = (x + EPS).clamp(0, 1)
    tap.observe(near[:3], F.one_hot((y[:3] + 1) % 10, 10).float() * 10)
    assert torch.isfinite(tap.score[:3]).any(1).all() and torch.isinf(tap.score[3:]).all()
    assert torch.equal(tap.cands[0][tap.score[0].isfinite()][0], near[0])
    tap.observe(near[:3], F.one_hot((y[:3] + 1) % 10, 10).float() * 10)  # the same rows again: no new slot
    assert int(torch.isfinite(tap.score).sum()) == 3


def test_cli_gate_grad_runs_the_straight_through_variants(cli, tmp_path) -> None:
    import json

    args = ["run", "--model", "mia_vit_fmnist", "--n", "4", "--batch-size", "4", "--steps", "2", "--checks", "off",
            "--out", str(tmp_path)]
    r = cli(*args, "--attack", "pgd,fgsm,transfer", "--gate-grad", "straight-through")
    assert r.code == 0, r.err
    (config,) = tmp_path.glob("*/config.json")
    cfg = json.loads(config.read_text())
    assert cfg["attacks"] == ["bpda-pgd", "fgsm-st", "transfer"]
    assert cfg["gate_grad"] == {"bpda-pgd": "straight-through", "fgsm-st": "straight-through", "transfer": "none"}
    summary = json.loads((config.parent / "summary.json").read_text())
    assert summary["attacks"]["fgsm-st"]["label"] == "deterministic-model, straight-through gates"
    static = cli("run", "--model", "vit_fmnist", "--attack", "fgsm", "--gate-grad", "straight-through", "--n", "4",
                 "--out", str(tmp_path / "static"))
    assert static.code == 2 and "has none" in static.err and len(static.err.strip().splitlines()) == 1
    assert not (tmp_path / "static").exists()
    assert cli(*args, "--attack", "square-st").code == 2


def test_adaptive_preset_probes_eot_once_and_records_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On stochastic gates the preset's K comes from the probe, which config.json then answers for a resumed run."""
    import json

    from miarobust.evaluator import Evaluation, RunConfig
    from miarobust.models.normalize import Normalized
    from miarobust.results.store import read_config

    model = NineOfTen()
    x, y = data()
    ev = Evaluation.from_config(RunConfig(model="vit_fmnist", data="synthetic", attacks=("adaptive",), n=10, batch_size=10,
                              eval_samples=4, out=str(tmp_path)))
    ev.model = Normalized(model, (0.0,), (1.0,)).eval()
    ev.adaptive = model
    ev.victim = Victim(ev.model, model, ev.device)
    ev.dataset = [(x[i], int(y[i])) for i in range(len(x))]
    ev.draws = 4
    ev.macs = lambda b: torch.zeros(b)  # MACs of a ViT mean nothing here
    calls = []
    import miarobust.checks as checks

    real = checks.rerun
    monkeypatch.setattr(checks, "rerun", lambda *a, **k: calls.append(a[2].eot) or real(*a, **k))
    assert ev.preset_eot(images=10) == 4 and calls == [4, 8]  # NineOfTen's draws are independent: 8 adds nothing
    folder = tmp_path / ev.cfg.folder_name()
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"resolved_eot": 16}))
    assert read_config(folder)["resolved_eot"] == 16 and ev.preset_eot() == 16 and calls == [4, 8]


def test_adaptive_preset_builds_every_attack_with_the_probed_eot(monkeypatch: pytest.MonkeyPatch) -> None:
    """On stochastic gates every attack of the preset runs through EOT with the K the probe chose, and the
    summary labels them adaptive with that K (not the attacks' own default of 1)."""
    import pandas as pd

    from miarobust import evaluator
    from miarobust.evaluator import Evaluation, RunConfig, summarize

    built = []
    real = evaluator.build_attack
    monkeypatch.setattr(evaluator, "build_attack", lambda info, victim, cfg: built.append((info.name, cfg.eot)) or real(info, victim, cfg))
    monkeypatch.setattr(Evaluation, "preset_eot", lambda self, **kw: 8)
    ev = Evaluation.from_config(RunConfig(model="mia_vit_fmnist", gate_mode="stochastic", attacks=("adaptive",), n=2, batch_size=2))
    assert built == [("autoattack", 8), ("autoattack-st", 8), ("bpda-pgd", 8)] and ev.acfg.eot == 8
    samples = pd.DataFrame({"index": [0, 1], "clean_correct": [1.0, 1.0], "robust": [0.5, 0.0], "clean_gmacs": [1.0, 1.0],
                            **{f"{a}_{k}": [0.5, 0.0] for a in ("autoattack", "autoattack-st", "bpda-pgd")
                               for k in ("correct", "gmacs", "dist")}})
    summary = summarize(ev.cfg, samples, ev.attacks, 10, {}, ev.acfg)
    assert {a: (v["eot"], v["label"]) for a, v in summary["attacks"].items()} == {
        "autoattack": (8, "adaptive"), "autoattack-st": (8, "adaptive, straight-through gates"),
        "bpda-pgd": (8, "adaptive, straight-through gates")}
