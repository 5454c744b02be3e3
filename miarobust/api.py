"""The Python API: evaluate any model under any registered attack, or use an attack as a function.

`evaluate` is `miarobust run` for a model a user holds: a registered name (as on the command line) or any
`nn.Module`. It writes the same results folder (config.json, samples.csv, summary.json), checks every
adversarial image against the threat model, runs the sanity checks and counts MACs per image (MIA-Former's
executed structure, a timm ViT's dimensions, any other module's FlopCounterMode count). `Attack` wraps one
registered attack as a callable on (images, labels), as torchattacks' attacks are.

    import miarobust
    result = miarobust.evaluate(my_model, data="embedded", attack="autoattack", eps="8/255",
                                mean=(0.286,), std=(0.353,), input_size=(1, 28, 28), n=100)
    print(result.summary["robust"]["acc"], result.folder)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from miarobust.attacks import AttackConfig, Victim, build_attack, get_attack
from miarobust.attacks.threat import ThreatModel
from miarobust.errors import UserError
from miarobust.evaluator import Evaluation, RunConfig, RunResult, run


def _eps(eps: float | str) -> tuple[float, str]:
    """(value, text) of an eps given as a number or as text like "8/255"; a UserError unless finite and > 0."""
    from miarobust.cli import parse_eps

    text = eps.strip() if isinstance(eps, str) else repr(float(eps))
    return parse_eps(text), text


def state_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state_dict (names, shapes, dtypes and bytes): which weights a result is of."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def evaluate(model: str | nn.Module, *, attack: str | Sequence[str] = "pgd", eps: float | str = 8 / 255,
             data: str = "embedded", n: int | None = None, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None, input_size: Sequence[int] | None = None, out: str = "runs",
             progress: bool = False, **options: Any) -> RunResult:
    """Evaluate `model` under `attack` at `eps` on `data`; the results folder is `result.folder`.

    model: a registered name (`miarobust list`), or any nn.Module taking (B, C, H, W) images: normalised by
      `mean`/`std` if given, else by its timm `pretrained_cfg`, else fed [0, 1] pixels; `input_size` (C, H, W)
      where it has no pretrained_cfg. Its folder is named after its class and the SHA-256 of its state_dict.
    attack: a name, several (each image robust only if it survives all), or the preset "adaptive".
    eps: a float or text such as "8/255". options: any other `miarobust run` setting as a RunConfig field
      (norm, steps, restarts, eot, gate_mode, eval_samples, checkpoint, batch_size, seed, device, checks, ...).
    """
    known = {f.name for f in fields(RunConfig)} - {"model", "attacks", "eps", "eps_text", "data", "n", "out"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"evaluate() got unknown options {', '.join(unknown)}: use RunConfig's fields ({', '.join(sorted(known))}).")
    value, text = _eps(eps)
    attacks = tuple(a.strip() for a in attack.split(",")) if isinstance(attack, str) else tuple(attack)
    common = dict(attacks=attacks, eps=value, eps_text=text, data=data, n=n, out=str(Path(out)), **options)
    if isinstance(model, str):
        return run(RunConfig(model=model, **common), progress=progress)
    if not isinstance(model, nn.Module):
        raise UserError(f"evaluate() takes a model name or an nn.Module, not {type(model).__name__}.")
    sha = state_sha256(model)
    cfg = RunConfig(model=f"{type(model).__name__}-{sha[:10]}", **common)
    size = tuple(int(v) for v in input_size) if input_size is not None else None
    ev = Evaluation(cfg, model, tuple(mean) if mean is not None else None, tuple(std) if std is not None else None, size)
    ev.weights_sha256 = sha
    return run(cfg, progress=progress, ev=ev)


class Attack:
    """A registered attack as a function of (images (B, C, H, W) in [0, 1], labels (B,)) -> adversarial images.

    model: any nn.Module (normalised by `mean`/`std`, else its timm pretrained_cfg); an adaptive ViT (directly or
    as `.model` of a wrapper) is attacked through its gates as its `gate_mode` says. Every output is checked
    against the threat model (a violation raises, never returns). Options: AttackConfig's fields (steps,
    restarts, eot, queries, ...).

        atk = miarobust.Attack("apgd-ce", model, eps="8/255")
        x_adv = atk(images, labels)
    """

    def __init__(self, name: str, model: nn.Module, eps: float | str = 8 / 255, norm: str = "Linf",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **options: Any):
        from miarobust.models.adaptive import adaptive_core
        from miarobust.models.normalize import Normalized

        self.cfg = AttackConfig(norm=norm, eps=_eps(eps)[0], **options)
        self.info = get_attack(name, self.cfg)
        wrapped = Normalized(model, tuple(mean) if mean is not None else None, tuple(std) if std is not None else None)
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        self.victim = Victim(wrapped.to(device).eval(), adaptive_core(model), device)
        self.fn = build_attack(self.info, self.victim, self.cfg)
        self.threat = ThreatModel(norm, self.cfg.eps)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x_adv = self.fn(images, labels).detach()
        self.threat.check(images, x_adv, self.info.name)
        return x_adv

    def __repr__(self) -> str:
        return f"Attack({self.info.name!r}, {self.cfg.norm}, eps={self.cfg.eps:.6g})"
