"""miarobust/attacks: agreement with the reference implementations, and every attack in the threat model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

import miarobust.models  # noqa: F401  (registers the models with timm)
from miarobust.attacks import ATTACKS, AttackConfig, Victim, build_attack, get_attack
from miarobust.attacks.eot import EOT
from miarobust.errors import UserError
from miarobust.models.normalize import Normalized


def frozen(model: torch.nn.Module) -> Normalized:
    net = Normalized(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.fixture(scope="module")
def tiny_vit() -> Normalized:
    torch.manual_seed(0)
    return frozen(timm.create_model("vit_fmnist", depth=1))


def fit_head(net: Normalized, x: torch.Tensor, y: torch.Tensor, margin: float = 4.0) -> None:
    """Least-squares head on the model's features, so it is right on (x, y) and sensitive to its input
    (a random ViT predicts nearly the same class for every image, which no untargeted attack can change)."""
    model = net.model
    with torch.no_grad():
        feats = model.forward_head(model.forward_features((x - net.mean) / net.std), pre_logits=True)
        target = torch.nn.functional.one_hot(y, model.num_classes).float() * margin - margin / model.num_classes
        sol = torch.linalg.lstsq(torch.cat([feats, torch.ones(len(x), 1)], 1), target).solution
        model.head.weight.copy_(sol[:-1].T)
        model.head.bias.copy_(sol[-1])


@pytest.fixture(scope="module")
def tiny_mia() -> Normalized:
    """A random 2-block MIA-Former with a fitted head; in stochastic mode each gate opens with p = 0.88."""
    torch.manual_seed(0)
    net = frozen(timm.create_model("mia_vit_fmnist", depth=2, embed_dim=32, num_heads=2, controller_bias=2.0))
    fit_head(net, images(4), torch.arange(4))
    return net


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_registry_errors() -> None:
    with pytest.raises(UserError, match="unknown attack"):
        get_attack("pgdd", AttackConfig())
    with pytest.raises(UserError, match="L2 only"):
        get_attack("cw", AttackConfig(norm="Linf"))


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_pgd_matches_torchattacks(tiny_vit: Normalized, norm: str, eps: float) -> None:
    """`pgd` is torchattacks' PGD / PGDL2: same seed, same adversarial images, pixel for pixel."""
    import torchattacks

    cfg = AttackConfig(norm=norm, eps=eps, steps=5)
    x = images(6)
    y = tiny_vit(x).argmax(1)
    torch.manual_seed(1)
    ours = build_attack(get_attack("pgd", cfg), Victim(tiny_vit), cfg)(x, y)
    cls = torchattacks.PGD if norm == "Linf" else torchattacks.PGDL2
    torch.manual_seed(1)
    theirs = cls(tiny_vit, eps=eps, alpha=2.5 * eps / 5, steps=5, random_start=True)(x, y)
    assert torch.equal(ours, theirs)


def test_restarts_keep_every_success(tiny_vit: Normalized) -> None:
    """With the same seed the first restart is the single run, so restarts can only add successes."""
    x = images(8)
    y = tiny_vit(x).argmax(1)
    fooled = {}
    for restarts in (1, 3):
        cfg = AttackConfig(eps=2 / 255, steps=2, restarts=restarts)
        torch.manual_seed(0)
        adv = build_attack(get_attack("pgd", cfg), Victim(tiny_vit), cfg)(x, y)
        fooled[restarts] = tiny_vit(adv).argmax(1) != y
    assert (fooled[3] >= fooled[1]).all()


def config_for(name: str, eot: int) -> AttackConfig:
    """A large ball, so every attack succeeds within a few iterations (and AutoAttack stops after APGD-CE)."""
    norm = "Linf" if "Linf" in ATTACKS[name].norms else "L2"
    return AttackConfig(norm=norm, eps=0.3 if norm == "Linf" else 3.0, steps=2, eot=eot, queries=50)


class LogProbs(torch.nn.Module):
    """A model whose outputs are log-probabilities, all negative: what EOT hands an attack."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).log_softmax(1)


def test_cw_finds_examples_on_log_probabilities() -> None:
    """torchattacks' CW reads the margin through a one-hot product, which is 0 when every output is negative
    (its issue 184): on EOT's log-probabilities it found no example at all. miarobust's cw shifts the outputs
    positive first (PositiveLogits), which leaves the argmax and every margin as they were."""
    import torchattacks

    from miarobust.attacks import PositiveLogits

    torch.manual_seed(0)
    net = frozen(timm.create_model("vit_fmnist", depth=1))
    x, y = images(8), torch.arange(8)
    fit_head(net, x, y)
    logp = LogProbs(net)
    with torch.no_grad():
        out, shifted = logp(x), PositiveLogits(logp)(x)
    assert (out < 0).all() and (shifted >= 1 - 1e-6).all()
    assert torch.equal(out.argmax(1), shifted.argmax(1))
    torch.testing.assert_close(out - out[:, :1], shifted - shifted[:, :1])

    cfg = AttackConfig(norm="L2", eps=3.0, steps=10)
    adv_ours = build_attack(get_attack("cw", cfg), Victim(logp), cfg)(x, y)
    adv_theirs = torchattacks.CW(logp, c=cfg.cw_c, kappa=0, steps=10, lr=0.01)(x, y)
    with torch.no_grad():
        ours, theirs = net(adv_ours).argmax(1), net(adv_theirs).argmax(1)
    assert (ours != y).sum() >= 6, "cw found too few examples on log-probabilities"
    assert (theirs == y).all(), "torchattacks' CW margin works on negative outputs now: PositiveLogits may go"


@pytest.fixture
def short_autoattack(monkeypatch: pytest.MonkeyPatch) -> None:
    """AutoAttack's APGD and FAB with 3 iterations instead of 100: these tests are about miarobust's wrapper
    (threat model, return value, EOT), not AutoAttack's budget, which test_cli_autoattack_matches_pyautoattack
    runs in full."""
    import pyautoattack.autoattack as aa

    for cls_name in ("APGDAttack", "APGDAttack_targeted", "FABAttack_PT"):
        cls = getattr(aa, cls_name)
        short = type(cls_name, (cls,), {"__init__": lambda self, *a, _cls=cls, **k: _cls.__init__(self, *a, **{**k, "n_iter": 3})})
        monkeypatch.setattr(aa, cls_name, short)


@pytest.mark.parametrize("mode", ["deterministic", "stochastic"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_stays_in_the_threat_model(tiny_mia: Normalized, short_autoattack: None, name: str,
                                                mode: str) -> None:
    tiny_mia.model.set_gate_mode(mode)
    victim = Victim(tiny_mia, tiny_mia.model)
    cfg = config_for(name, eot=2 if mode == "stochastic" else 1)
    x = images(4)
    with torch.no_grad():
        y = EOT(tiny_mia, 32)(x).argmax(1)  # labels the model gets right (mostly, when stochastic): all are attacked
    torch.manual_seed(0)
    adv = build_attack(get_attack(name, cfg), victim, cfg)(x, y)
    assert isinstance(adv, torch.Tensor) and adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= 0 and adv.max() <= 1
    cfg.threat.check(x, adv, name)  # raises ThreatModelViolation outside the ball
    if name not in ("none", "slowdown", "cw"):  # cw keeps the clean image beyond eps; slowdown may find no gain
        assert not torch.equal(adv, x), f"{name} did not perturb anything"


@pytest.mark.slow
def test_cli_autoattack_matches_pyautoattack(cli, tmp_path: Path) -> None:
    """`miarobust run --attack autoattack` makes the same per-sample decisions as pyautoattack called directly.

    The model is vit_fmnist with random blocks and a head fitted (least squares) to be right on the first 6
    images, so clean errors (images 7-8) and successful attacks are both compared; AutoAttack standard on
    8 images of it takes a few seconds because APGD-CE breaks every image (none goes on to FAB-T / Square).
    """
    from pyautoattack import AutoAttack
    from safetensors.torch import save_file

    from miarobust.data import Geometry, load_dataset
    from miarobust.models import create

    torch.manual_seed(0)
    model = timm.create_model("vit_fmnist").eval()
    data = load_dataset("embedded", Geometry.of(model))
    x = torch.stack([data[i][0] for i in range(8)])
    y = torch.tensor([data[i][1] for i in range(8)])
    fit_head(Normalized(model), x[:6], y[:6])
    ckpt = tmp_path / "vit_fmnist_fitted.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))

    r = cli("run", "--model", "vit_fmnist", "--checkpoint", str(ckpt), "--attack", "autoattack", "--eps", "8/255",
            "--n", "8", "--batch-size", "8", "--checks", "off", "--out", str(tmp_path / "out"))
    assert r.code == 0, r.err
    (folder,) = (tmp_path / "out").iterdir()
    samples = pd.read_csv(folder / "samples.csv")

    reference = frozen(create("vit_fmnist", checkpoint=str(ckpt)))
    aa = AutoAttack(reference, eps=8 / 255, norm="Linf", seed=0, version="standard")
    x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=8)
    clean = reference(x).argmax(1) == y
    assert clean[:6].all() and samples["clean_correct"].tolist() == clean.float().tolist()
    assert samples["autoattack_pred"].tolist() == y_adv.tolist()
    assert samples["robust"].tolist() == (y_adv == y).float().tolist()
    linf = (x_adv - x).flatten(1).abs().amax(1)
    assert samples["autoattack_linf"].to_numpy() == pytest.approx(linf.numpy(), abs=1e-6)
