"""miarobust/attacks/eot.py: EOT is the log of the mean softmax over gate draws, batched and chunked."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import miarobust.models  # noqa: F401  (registers the models with timm)
from miarobust.attacks import AttackConfig, Victim, build_attack, get_attack
from miarobust.attacks.eot import EOT, default_chunk
from miarobust.models.normalize import Normalized


@pytest.fixture(scope="module")
def mia() -> Normalized:
    torch.manual_seed(0)
    net = Normalized(timm.create_model("mia_vit_fmnist", depth=2, embed_dim=32, num_heads=2, controller_bias=0.0))
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


class Draws(nn.Module):
    """A stochastic model with known draws: row j * b + i (draw j of image i, EOT's layout) gets offset j."""

    def __init__(self, b: int, offsets: torch.Tensor):
        super().__init__()
        self.b, self.offsets = b, offsets  # (k, classes)
        self.lin = nn.Linear(4, offsets.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        draw = torch.arange(len(x)) // self.b
        return self.lin(x) + self.offsets[draw]


def x4(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_k1_is_the_model(mia: Normalized) -> None:
    mia.model.set_gate_mode("deterministic")
    x = x4()
    assert torch.equal(EOT(mia, 1)(x), mia(x))
    assert Victim(mia, mia.model).with_eot(1) is mia and isinstance(Victim(mia).with_eot(3), EOT)


def test_log_mean_softmax_of_the_draws() -> None:
    torch.manual_seed(0)
    b, k = 3, 5
    model = Draws(b, torch.randn(k, 7) * 3)
    x = torch.randn(b, 4)
    probs = torch.stack([F.softmax(model.lin(x) + model.offsets[j], -1) for j in range(k)])
    expected = probs.mean(0).log()
    got = EOT(model, k, chunk=b * k)(x)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.exp().sum(-1), torch.ones(b), atol=1e-6)  # a distribution: CE on it is -log E[p_y]


def test_stochastic_mia_draws_in_one_batch(mia: Normalized) -> None:
    mia.model.set_gate_mode("stochastic")
    x, k = x4(), 6
    torch.manual_seed(3)
    got = EOT(mia, k, chunk=len(x) * k)(x)
    torch.manual_seed(3)
    logits = mia(x.repeat(k, 1, 1, 1)).view(k, len(x), -1)  # the same draws, in EOT's row layout
    expected = logits.softmax(-1).mean(0).log()
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(logits[0], logits[1])  # the draws differ: the gates are random


@pytest.mark.parametrize("chunk", [1, 2, 5, 7, 1000])
def test_chunking_does_not_change_a_deterministic_model(mia: Normalized, chunk: int) -> None:
    mia.model.set_gate_mode("deterministic")
    x = x4()
    reference = F.log_softmax(mia(x), -1)  # every draw the same: EOT is the model's log-softmax
    assert torch.allclose(EOT(mia, 4, chunk=chunk)(x), reference, atol=1e-5)


def test_gradient_flows_through_every_chunk(mia: Normalized) -> None:
    mia.model.set_gate_mode("stochastic")
    x = x4().requires_grad_(True)
    y = torch.tensor([0, 1, 2])
    torch.manual_seed(0)
    (grad,) = torch.autograd.grad(F.nll_loss(EOT(mia, 4, chunk=5)(x), y), x)
    assert torch.isfinite(grad).all() and (grad.flatten(1).abs().sum(1) > 0).all()


def test_eot_pgd_on_a_deterministic_model_is_pgd(mia: Normalized) -> None:
    """With no randomness EOT only adds a log-softmax, which cross-entropy ignores: the same attack."""
    mia.model.set_gate_mode("deterministic")
    x = x4()
    y = mia(x).argmax(1)
    cfg = AttackConfig(eps=8 / 255, steps=3, eot=4)
    victim = Victim(mia, mia.model)
    torch.manual_seed(0)
    eot = build_attack(get_attack("eot-pgd", cfg), victim, cfg)(x, y)
    torch.manual_seed(0)
    one = AttackConfig(eps=8 / 255, steps=3)
    plain = build_attack(get_attack("pgd", one), victim, one)(x, y)
    assert (eot == plain).float().mean() > 0.99  # a sign may flip where a gradient entry is ~0 in float


def test_default_chunk() -> None:
    """The rows per pass measured by bench_attacks: 256 on a CPU, 8192 on CUDA; a torch.device or its name."""
    assert (default_chunk("cpu"), default_chunk("cuda")) == (256, 8192)
    assert default_chunk(torch.device("cuda", 1)) == 8192 and default_chunk(torch.device("cpu")) == 256


def test_an_explicit_eot_is_kept_and_only_a_missing_one_takes_the_attacks_default():
    """`--eot 4` on eot-pgd runs K=4 (the K=1/4/16 grid depends on it); no --eot runs its default of 8."""
    cfg = AttackConfig(eps=0.1)
    eot_pgd, pgd = get_attack("eot-pgd", cfg), get_attack("pgd", cfg)
    assert [eot_pgd.eot(AttackConfig(eps=0.1, eot=k)) for k in (None, 1, 4, 16)] == [8, 1, 4, 16]
    assert [pgd.eot(AttackConfig(eps=0.1, eot=k)) for k in (None, 4)] == [1, 4]
    assert eot_pgd.eot(AttackConfig(eps=0.1, eot=4), stochastic=False) == 1
    assert not eot_pgd.adaptive(AttackConfig(eps=0.1, eot=1)) and eot_pgd.adaptive(AttackConfig(eps=0.1))


def test_labels_say_what_each_attack_averaged(cli, tmp_path):
    """With --eot 2 on the stochastic gates: transfer (a static surrogate) and slowdown (one draw) do not
    average the target's gate draws and are non-adaptive; autoattack-rand runs its own 20 EOT iterations
    on top of the wrapper's 2, so 40 draws per gradient."""
    k2 = AttackConfig(eps=0.1, eot=2)
    for name in ("transfer", "slowdown"):
        info = get_attack(name, k2)
        assert info.eot(k2) == 1 and info.draws(k2) == 1 and not info.adaptive(k2)
    rand = get_attack("autoattack-rand", k2)
    assert rand.draws(k2) == 40 and rand.draws(AttackConfig(eps=0.1)) == 20 and rand.adaptive(AttackConfig(eps=0.1))
    r = cli("run", "--model", "mia_vit_fmnist", "--gate-mode", "stochastic", "--eval-samples", "2", "--eot", "2",
            "--attack", "pgd,transfer", "--eps", "2/255", "--steps", "2", "-n", "4", "--checks", "off", "--out", str(tmp_path))
    assert r.code == 0, r.err
    (folder,) = tmp_path.glob("mia_vit_fmnist-*")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["attacks"]["pgd"]["label"] == "adaptive" and summary["attacks"]["pgd"]["eot"] == 2
    assert summary["attacks"]["transfer"]["label"] == "non-adaptive" and summary["attacks"]["transfer"]["eot"] == 1
    assert summary["non_adaptive"]
