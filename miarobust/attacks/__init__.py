"""Attack registry: name -> factory. Every attack works in [0, 1] pixel space on a `Victim`.

Underneath: torchattacks (FGSM, PGD, PGDL2, CW) and pyautoattack, the packaged reference AutoAttack of
Croce & Hein (2020): APGD-CE, APGD-DLR, APGD-T, Square, standard AutoAttack and its `rand` version with EOT.
miarobust adds EOT through the gates (eot.py), a straight-through variant NAME-st of every gradient attack
(hard gates forward, their probabilities' gradient backward: BPDA, Athalye et al. 2018), the best candidate
per image against stochastic gates (candidates.py), the `adaptive` preset (`expand`), transfer from a
surrogate, PGD on the CW margin and the slowdown attack (slowdown.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from miarobust.attacks.candidates import CandidateTap
from miarobust.attacks.eot import EOT, default_chunk
from miarobust.attacks.pgd import cw_margin, pgd, with_restarts
from miarobust.attacks.threat import ThreatModel
from miarobust.errors import UserError, unknown_name

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttackConfig:
    """Arguments shared by the attacks; `alpha` None means 2.5 * eps / steps (Madry et al.)."""

    norm: str = "Linf"
    eps: float = 8 / 255
    steps: int = 10
    alpha: float | None = None
    restarts: int = 1
    eot: int | None = None  # gate draws per gradient; None: the attack's own default (AttackInfo.default_eot)
    eot_chunk: int | None = None
    cw_c: float = 1.0
    surrogate: str | None = None
    surrogate_checkpoint: str | None = None
    keep_prediction: bool = False
    queries: int = 5000  # Square's query budget (AutoAttack's default); the sanity checks may lower it
    select_draws: int = 10  # fresh gate draws that score each candidate against a stochastic model (candidates.py)
    seed: int = 0

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.norm, self.eps)

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / max(self.steps, 1)


@dataclass
class Victim:
    """The model under attack: `model` takes [0, 1] images; `adaptive` is its input-adaptive backbone (MIA-Former
    or a dynamic-ViT peer, models/adaptive.py), if any."""

    model: nn.Module
    adaptive: Any = None  # an AdaptiveViT
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tap: CandidateTap | None = None  # shown every query of an attack on a stochastic model (candidates.py)

    @property
    def stochastic(self) -> bool:
        return self.adaptive is not None and self.adaptive.gate_mode.value == "stochastic"

    def with_eot(self, k: int, chunk: int | None = None) -> nn.Module:
        """The model as an attack sees it: EOT over k gate draws when k > 1, its queries shown to `tap`."""
        model = EOT(self.model, k, chunk) if k > 1 else self.model
        return self.tap.wrap(model) if self.tap is not None else model

    @contextlib.contextmanager
    def straight_through(self) -> Iterator[None]:
        """Hard gates in the forward pass, sigmoid gradients in the backward pass (BPDA), for the block."""
        if self.adaptive is None:
            yield
            return
        before = self.adaptive.straight_through
        self.adaptive.straight_through = True
        try:
            yield
        finally:
            self.adaptive.straight_through = before


@dataclass(frozen=True)
class AttackInfo:
    """A registered attack: how to build it and what it is."""

    name: str
    summary: str
    build: Callable[[Victim, AttackConfig], AttackFn]
    norms: tuple[str, ...] = ("Linf", "L2")
    default_eot: int = 1  # the attack's K when --eot is not given
    own_eot: int = 0  # EOT iterations the attack runs itself (autoattack-rand), on top of --eot's
    takes_eot: bool = True  # False: its gradient never averages the victim's gate draws, whatever --eot says
    white_box: bool = True  # attacks accuracy through the victim's own gradients (the checks compare with Square)
    stepped: bool = False  # its strength follows --steps / --restarts (the checks rerun it with more)
    straight_through: bool = False  # runs with hard gates forward and their probabilities' gradient backward (BPDA)
    keeps_best: bool = True  # aims at accuracy through the victim's outputs: keeps the best candidate (candidates.py)
    includes_square: bool = False  # runs the black-box Square among its attacks (not a white-box reference in check 4)

    def eot(self, cfg: AttackConfig, stochastic: bool = True) -> int:
        """K of the EOT wrapper this attack uses under `cfg` (1 on a deterministic model: draws are all equal)."""
        if not stochastic or not self.takes_eot:
            return 1
        return self.default_eot if cfg.eot is None else cfg.eot

    def draws(self, cfg: AttackConfig, stochastic: bool = True) -> int:
        """Gate draws behind each of the attack's gradients: the EOT wrapper's K times its own EOT iterations."""
        return self.eot(cfg, stochastic) * max(1, self.own_eot)

    def adaptive(self, cfg: AttackConfig) -> bool:
        """Whether the attack averages over gate draws (required to claim a number on a stochastic model)."""
        return self.eot(cfg) > 1 or self.own_eot > 1

    @property
    def gate_grad(self) -> str:
        """The gradient the attack takes through hard gates: 'straight-through' (BPDA) or 'none' (zero)."""
        return "straight-through" if self.straight_through else "none"

    @property
    def gradient(self) -> bool:
        """Whether a straight-through variant means anything: a white-box attack not straight-through already."""
        return self.white_box and not self.straight_through


def _torchattacks_pgd(victim: Victim, cfg: AttackConfig, model: nn.Module) -> AttackFn:
    import torchattacks

    cls = torchattacks.PGD if cfg.norm == "Linf" else torchattacks.PGDL2
    atk = cls(model, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps, random_start=True)
    return lambda x, y: with_restarts(atk, model, x, y, cfg.restarts)


def build_pgd(victim: Victim, cfg: AttackConfig, eot: int = 1) -> AttackFn:
    """PGD on cross-entropy (torchattacks' PGD / PGDL2), with restarts and optional EOT."""
    return _torchattacks_pgd(victim, cfg, victim.with_eot(eot, cfg.eot_chunk))


def build_fgsm(victim: Victim, cfg: AttackConfig, eot: int = 1) -> AttackFn:
    """FGSM (Goodfellow et al. 2015): one signed gradient step of size eps (Linf only)."""
    import torchattacks

    return torchattacks.FGSM(victim.with_eot(eot, cfg.eot_chunk), eps=cfg.eps)


def build_pgd_cw(victim: Victim, cfg: AttackConfig, eot: int = 1) -> AttackFn:
    """Linf/L2 PGD maximising the Carlini-Wagner margin instead of cross-entropy."""
    model = victim.with_eot(eot, cfg.eot_chunk)
    one = lambda x, y: pgd(lambda xa, ya: cw_margin(model(xa), ya), x, y, cfg.threat, cfg.steps, cfg.step_size)  # noqa: E731
    return lambda x, y: with_restarts(one, model, x, y, cfg.restarts)


class PositiveLogits(nn.Module):
    """`model`'s outputs shifted per row so that every entry is >= 1: the same argmax and margins.

    torchattacks' CW (3.5.1) reads the true-class and runner-up logits by multiplying with a one-hot mask
    and taking a max, so a masked-out 0 wins over negative entries (upstream Harry24k/adversarial-attacks-pytorch
    #184, unmerged). EOT's outputs are log-probabilities, all negative, so unshifted CW would read a margin of 0
    with no gradient and find nothing. The shift cancels in the margin and its gradient."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out - out.detach().amin(1, keepdim=True) + 1


def build_cw(victim: Victim, cfg: AttackConfig, eot: int = 1) -> AttackFn:
    """Carlini-Wagner L2 (torchattacks' CW). It minimises the perturbation, unbounded: an example
    larger than eps counts as a failure at this eps (the clean image is kept)."""
    import torchattacks

    model = PositiveLogits(victim.with_eot(eot, cfg.eot_chunk))
    atk = torchattacks.CW(model, c=cfg.cw_c, kappa=0, steps=max(cfg.steps, 10), lr=0.01)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        adv = atk(x, y)
        ok = cfg.threat.distance(x, adv) <= cfg.eps
        return torch.where(ok.view(-1, *([1] * (x.dim() - 1))), adv, x)

    return run


def build_transfer(victim: Victim, cfg: AttackConfig, eot: int = 1) -> AttackFn:
    """PGD on a static surrogate (--surrogate, default vit_fmnist), evaluated on the target."""
    from miarobust.models import create
    from miarobust.models.normalize import Normalized

    name = cfg.surrogate or "vit_fmnist"
    backbone = create(name, checkpoint=cfg.surrogate_checkpoint)
    target_cfg = getattr(victim.model, "model", victim.model).pretrained_cfg
    if tuple(backbone.pretrained_cfg["input_size"]) != tuple(target_cfg["input_size"]):
        raise UserError(f"surrogate {name} takes {tuple(backbone.pretrained_cfg['input_size'])} images but the target "
                        f"takes {tuple(target_cfg['input_size'])}: pick a surrogate of the same input size.")
    surrogate = Normalized(backbone).to(victim.device).eval()
    for p in surrogate.parameters():
        p.requires_grad_(False)
    return build_pgd(Victim(surrogate, None, victim.device), cfg, 1)


def _autoattack(attacks: list[str] | None, version: str) -> Callable[[Victim, AttackConfig, int], AttackFn]:
    def build(victim: Victim, cfg: AttackConfig, eot: int = 1) -> AttackFn:
        from pyautoattack import AutoAttack

        model = victim.with_eot(eot, cfg.eot_chunk)

        def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            aa = AutoAttack(model, attacks=attacks, device=x.device, eps=cfg.eps, norm=cfg.norm,
                            seed=cfg.seed, version=version)
            aa.square.n_queries = cfg.queries
            # an expected warning (randomness through EOT) is recorded for check 6, not printed
            with capture_autoattack_warnings(quiet=lambda m: expected_warning(m, eot, victim.stochastic)) as warned:
                adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))  # returns (x_adv, y_adv)
            run.warnings.extend(warned)
            return adv

        run.warnings = []  # type: ignore[attr-defined]
        return run

    return build


RANDOMNESS_WARNING = "randomized defense"  # in AutoAttack's check_randomized warning


def expected_warning(message: str, k: int, stochastic: bool) -> bool:
    """Whether an AutoAttack warning is expected rather than a flag: its randomness warning, on a stochastic
    model attacked through EOT over k >= 2 gate draws (random by design; sanity check 5 judges k)."""
    return stochastic and k > 1 and RANDOMNESS_WARNING in message


@contextlib.contextmanager
def capture_autoattack_warnings(quiet: Callable[[str], bool] = lambda msg: False) -> Iterator[list[str]]:
    """Collect the warnings of AutoAttack's own checks (randomness, output range, gradient masking); those for
    which `quiet(message)` holds are collected but not printed."""
    messages: list[str] = []

    def collect(record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        msg = record.getMessage().strip()
        messages.append(msg)
        return not quiet(msg)

    logger = logging.getLogger("auto-attack")
    logger.addFilter(collect)
    try:
        yield messages
    finally:
        logger.removeFilter(collect)


def build_slowdown(victim: Victim, cfg: AttackConfig, eot: int = 1) -> AttackFn:
    from miarobust.attacks.slowdown import build

    return build(victim, cfg, eot)


ATTACKS: dict[str, AttackInfo] = {
    a.name: a
    for a in (
        AttackInfo("none", "no attack: clean accuracy only", lambda v, c, k=1: (lambda x, y: x), white_box=False,
                   keeps_best=False),
        AttackInfo("fgsm", "FGSM, one signed step (Linf)", build_fgsm, norms=("Linf",)),
        AttackInfo("pgd", "PGD on cross-entropy (torchattacks), random start, --restarts", build_pgd, stepped=True),
        AttackInfo("pgd-cw", "PGD on the Carlini-Wagner margin loss", build_pgd_cw, stepped=True),
        AttackInfo("cw", "Carlini-Wagner L2 (torchattacks); results beyond eps count as failures", build_cw,
                   norms=("L2",), stepped=True),
        AttackInfo("eot-pgd", "PGD with EOT over gate draws (--eot K, default 8)", build_pgd, default_eot=8, stepped=True),
        AttackInfo("bpda-pgd", "PGD through straight-through gates (BPDA), EOT when --eot > 1", build_pgd,
                   stepped=True, straight_through=True),
        AttackInfo("transfer", "PGD on a static surrogate (--surrogate), evaluated on the target", build_transfer,
                   white_box=False, takes_eot=False, keeps_best=False),  # the target's gates are never seen: non-adaptive
        AttackInfo("apgd-ce", "APGD on cross-entropy (pyautoattack)", _autoattack(["apgd-ce"], "custom")),
        AttackInfo("apgd-dlr", "APGD on the DLR loss (pyautoattack)", _autoattack(["apgd-dlr"], "custom")),
        AttackInfo("square", "Square Attack, black-box, 5000 queries unless --queries (pyautoattack)", _autoattack(["square"], "custom"),
                   white_box=False),
        AttackInfo("autoattack", "AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (pyautoattack)",
                   _autoattack(None, "standard"), includes_square=True),
        AttackInfo("autoattack-rand", "AutoAttack rand: APGD-CE and APGD-DLR with EOT 20 (pyautoattack)",
                   _autoattack(None, "rand"), own_eot=20),
        AttackInfo("slowdown", "energy attack: maximise the MACs an adaptive model spends", build_slowdown,
                   white_box=False, takes_eot=False, keeps_best=False),  # one gate draw; it aims at MACs, not accuracy
        # appended last: an attack's position seeds it (attack_salt), so existing runs keep their numbers
        AttackInfo("apgd-t", "targeted APGD on the DLR loss, 9 target classes (pyautoattack)",
                   _autoattack(["apgd-t"], "custom")),
    )
}


#: Presets: names that expand into several attacks, by what the model is (see `expand`).
PRESETS = {
    "adaptive": "the strongest adaptive evaluation: AutoAttack, AutoAttack and BPDA-PGD through straight-through "
                "gates on a gated model (through EOT on stochastic gates, K chosen by a convergence probe), "
                "per-image worst case, sanity checks on",
}


def expand(names: tuple[str, ...], gated: bool) -> tuple[str, ...]:
    """`names` with each preset replaced by its attacks (`adaptive`: autoattack on a static model; autoattack,
    autoattack-st and bpda-pgd on a gated one), each attack once, in order."""
    out: list[str] = []
    for name in names:
        parts = (["autoattack", "autoattack-st", "bpda-pgd"] if gated else ["autoattack"]) if name == "adaptive" else [name]
        out += [p for p in parts if p not in out]
    return tuple(out)


ST_SUFFIX = "-st"  # NAME-st: the gradient attack NAME through straight-through gates


def straight_through_name(name: str) -> str:
    """The straight-through variant's name of attack `name` (bpda-pgd for pgd; itself if it has none: not a
    gradient attack)."""
    info = ATTACKS.get(name)
    if name == "pgd":
        return "bpda-pgd"
    return f"{name}{ST_SUFFIX}" if info is not None and info.gradient else name


def plain_name(name: str) -> str:
    """The attack whose straight-through variant `name` is (pgd for bpda-pgd, apgd-ce for apgd-ce-st)."""
    return "pgd" if name == "bpda-pgd" else name.removesuffix(ST_SUFFIX)


def _lookup(name: str) -> AttackInfo:
    if name in ATTACKS:
        return ATTACKS[name]
    base = ATTACKS.get(name.removesuffix(ST_SUFFIX)) if name.endswith(ST_SUFFIX) else None
    if base is None:
        raise unknown_name("attack", name, ATTACKS)
    if base.name == "pgd":
        raise UserError("pgd-st is bpda-pgd: PGD through straight-through gates; write --attack bpda-pgd.")
    if not base.gradient:
        raise UserError(f"{base.name} takes no gradient through the model, so it has no straight-through variant "
                        f"'{name}': use {base.name}.")
    return replace(base, name=name, summary=f"{base.summary}, through straight-through gates", straight_through=True)


def attack_salt(name: str) -> int:
    """A fixed number per attack that seeds its randomness: its position in the registry (a straight-through
    variant: its base's position + 1000), so adding an attack never changes another's numbers."""
    base = name.removesuffix(ST_SUFFIX) if name not in ATTACKS else name
    return list(ATTACKS).index(base) + (0 if base == name else 1000)


def get_attack(name: str, cfg: AttackConfig) -> AttackInfo:
    """The registered attack `name` (or `NAME-st`, a gradient attack through straight-through gates), checked
    against the threat model of `cfg`."""
    info = _lookup(name)
    if cfg.norm not in info.norms:
        raise UserError(f"attack {name} supports {'/'.join(info.norms)} only, not {cfg.norm}: change --norm or --attack.")
    return info


def build_attack(info: AttackInfo, victim: Victim, cfg: AttackConfig) -> AttackFn:
    """An attack function x (B, C, H, W) in [0, 1], y (B,) -> x_adv, on `victim`.

    A straight-through attack runs with the victim's gates in straight-through mode. Against a stochastic
    victim an attack that aims at accuracy returns, per image, the best candidate it queried or returned,
    scored on `cfg.select_draws` fresh gate draws (candidates.py), never the clean image where it found better.
    AutoAttack-based functions keep a `warnings` list (their own checks' warnings, for sanity check 6).
    """
    if info.straight_through and victim.adaptive is None:
        raise UserError(f"{info.name} attacks through straight-through gates, and the model has none: use "
                        f"{plain_name(info.name)} on a static model.")
    k = info.eot(cfg, victim.stochastic)
    if not (victim.stochastic and info.keeps_best):
        return _gated(info, victim, info.build(victim, cfg, k))
    tap = CandidateTap(cfg.threat)
    inner = _gated(info, victim, info.build(replace(victim, tap=tap), cfg, k))

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tap.start(x, y)
        try:
            adv = inner(x, y)
            return tap.select(victim.model, adv, cfg.select_draws, cfg.eot_chunk or default_chunk(x.device))
        finally:
            tap.stop()

    if hasattr(inner, "warnings"):
        run.warnings = inner.warnings  # type: ignore[attr-defined]
    return run


def _gated(info: AttackInfo, victim: Victim, fn: AttackFn) -> AttackFn:
    """`fn` run with the victim's gates straight-through where `info` says so."""
    if not info.straight_through:
        return fn

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with victim.straight_through():
            return fn(x, y)

    if hasattr(fn, "warnings"):
        run.warnings = fn.warnings  # type: ignore[attr-defined]
    return run
