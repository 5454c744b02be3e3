"""A run's configuration, typed: what was asked for (RunConfig, validated once when it is made) and what it resolved
to (Resolved: the gate mode and weights a default stood for, the attacks a preset expanded to, the EOT K its probe
chose). config.json holds both side by side, and `RunRecord.read` gives them back typed.

config.json: RunConfig's fields with gate_mode and checkpoint as resolved, `requested` (gate_mode and checkpoint
as asked, which the folder name hashes), `weights_sha256`, `resolved_attacks`, `resolved_eot`, `gate_grad`
(per attack) and `environment`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from miarobust.errors import UserError
from miarobust.results.io import run_id
from miarobust.values import NORMS, PRECISIONS, Eps, GateMode, parse_norm

CHECK_MODES = ("auto", "on", "off")
DEFAULT_EPS_TEXT = "8/255"


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's numbers (plus where to write them), as asked for.

    Made at the edge (the command line, the Python API, a config.json read back), it validates its own values
    once: an unknown norm or gate mode or an eps that is not a finite number > 0 is a UserError here, and what
    holds a RunConfig never parses them again.
    """

    model: str = "mia_vit_fmnist"
    checkpoint: str | None = None
    gate_mode: str | None = None
    num_classes: int | None = None
    img_size: int | None = None
    model_kwargs: str = ""  # more timm model arguments, "in_chans=1,patch_size=4" (parse_model_kwargs)
    data: str = "embedded"
    data_root: str | None = None
    split: str = "test"
    attacks: tuple[str, ...] = ("pgd",)
    norm: str = "Linf"
    eps: float = 8 / 255
    eps_text: str = DEFAULT_EPS_TEXT
    steps: int = 10
    alpha: float | None = None
    restarts: int = 1
    queries: int = 5000  # Square's query budget, alone and inside AutoAttack (AutoAttack's own default)
    eot: int | None = None  # None: each attack's own default (8 for eot-pgd, 1 otherwise)
    eot_chunk: int | None = None
    eval_samples: int = 10
    surrogate: str | None = None
    keep_prediction: bool = False
    n: int | None = None
    batch_size: int = 100
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # or bf16 / fp16: the model's forward (and so the attacks' gradients) under autocast
    checks: str = "auto"
    out: str = "runs"  # not results/: the repository keeps its committed runs there

    def __post_init__(self) -> None:
        parse_norm(self.norm)
        if self.gate_mode is not None:
            object.__setattr__(self, "gate_mode", GateMode.parse(self.gate_mode).value)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) \
                or self.eps <= 0:
            raise UserError(f"eps {self.eps!r} must be a finite number > 0, e.g. 8/255.")
        written = Eps.parse(self.eps_text).value
        if not math.isclose(written, self.eps, rel_tol=1e-9):
            if self.eps_text != DEFAULT_EPS_TEXT:
                raise UserError(f"eps {self.eps!r} and its text '{self.eps_text}' ({written!r}) disagree: give one "
                                "(RunConfig.with_eps).")
            object.__setattr__(self, "eps_text", repr(float(self.eps)))  # eps given alone: its text is the number
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}': use {', '.join(PRECISIONS)}.")
        if self.checks not in CHECK_MODES:
            raise UserError(f"unknown checks mode '{self.checks}': use {', '.join(CHECK_MODES)}.")
        if not self.attacks:
            raise UserError("no attack named: name one (see `miarobust list attacks`).")
        for name in ("steps", "restarts", "queries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name} {v!r} must be a whole number >= 1.")

    @classmethod
    def with_eps(cls, eps: float | str | Eps, **fields: Any) -> RunConfig:
        """A RunConfig whose eps is given as a number or as text ('8/255'), parsed once."""
        e = Eps.parse(eps)
        return cls(eps=e.value, eps_text=e.text, **fields)

    @property
    def threat(self) -> Any:
        """The threat model: the `norm` ball of radius `eps` in the [0, 1] box."""
        from miarobust.attacks.threat import ThreatModel

        return ThreatModel(self.norm, self.eps)

    def attack_config(self) -> Any:
        from miarobust.attacks import AttackConfig

        return AttackConfig(norm=self.norm, eps=self.eps, steps=self.steps, alpha=self.alpha, restarts=self.restarts,
                            queries=self.queries, eot=self.eot, eot_chunk=self.eot_chunk, surrogate=self.surrogate,
                            keep_prediction=self.keep_prediction, select_draws=self.eval_samples, seed=self.seed)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the numbers: same identity, same results folder (and resume)."""
        d = asdict(self)
        for k in ("out", "checks", "eot_chunk", "device"):
            d.pop(k)
        if not d["model_kwargs"]:  # absent from the identity unless given: folders made before it keep their names
            d.pop("model_kwargs")
        if d["precision"] == "fp32":  # the same: absent unless another precision is asked for
            d.pop("precision")
        if d["queries"] == 5000:  # and AutoAttack's query budget unless another is asked for
            d.pop("queries")
        return d

    def folder_name(self) -> str:
        """model-data-attacks-norm-eps[-gate mode][-eotK][-precision]-hash: the gate mode, EOT K and a precision other
        than fp32 where asked for, and the hash of the identity, which tells apart the runs that differ in anything
        else."""
        attacks = "+".join(self.attacks)
        eps = self.eps_text.replace("/", "_")
        asked = [v for v in (self.gate_mode, None if self.eot is None else f"eot{self.eot}",
                             None if self.precision == "fp32" else self.precision) if v]
        return "-".join([self.model, self.data, attacks, self.norm, eps, *asked, run_id(self.identity())])


@dataclass(frozen=True)
class Resolved:
    """What a run's requested defaults and presets resolved to."""

    gate_mode: str | None  # None: a static model
    checkpoint: str | None  # the weights file read (None: none; a shipped one relative to the package's parent)
    weights_sha256: str | None
    attacks: tuple[str, ...]  # the preset expanded
    eot: int | None  # EOT K the attacks ran with (the adaptive preset's probe decides it on stochastic gates)
    gate_grad: dict[str, str]  # per attack: none or straight-through


@dataclass(frozen=True)
class RunRecord:
    """config.json, typed: the request and its resolution side by side."""

    requested: RunConfig
    resolved: Resolved

    def to_json(self, environment: dict[str, Any]) -> dict[str, Any]:
        r = self.resolved
        return {**asdict(self.requested), "environment": environment,
                "requested": {"gate_mode": self.requested.gate_mode, "checkpoint": self.requested.checkpoint},
                "gate_mode": r.gate_mode, "checkpoint": r.checkpoint, "weights_sha256": r.weights_sha256,
                "resolved_attacks": list(r.attacks), "resolved_eot": r.eot, "gate_grad": dict(r.gate_grad)}

    @classmethod
    def read(cls, config: dict[str, Any], folder_name: str | None = None) -> RunRecord:
        """The record of a config.json's contents (`folder_name` finds the request of a file without `requested`)."""
        asked = requested_config(config, folder_name)
        eot = config.get("resolved_eot", config.get("eot"))
        return cls(asked, Resolved(gate_mode=config.get("gate_mode"), checkpoint=config.get("checkpoint"),
                                   weights_sha256=config.get("weights_sha256"),
                                   attacks=tuple(config.get("resolved_attacks") or asked.attacks),
                                   eot=eot if isinstance(eot, int) and not isinstance(eot, bool) else None,
                                   gate_grad=dict(config.get("gate_grad") or {})))


def _is_a(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON has the type `hint` of a RunConfig field (an int passes for a float)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_is_a(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(_is_a(v, typing.get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return value is None if hint is type(None) else isinstance(value, hint)


def requested_config(config: dict[str, Any], folder_name: str | None = None) -> RunConfig:
    """The RunConfig recorded in config.json, as it was asked for.

    config.json holds the resolved gate mode and checkpoint (what ran: the weights' file, a shipped one as
    miarobust/checkpoints/NAME.safetensors) and, under `requested`, what was asked for (None: the model's default,
    or a shipped checkpoint's name), which the folder name hashes:
    a re-run takes the same defaults (the checkout's shipped weights, not a path recorded on another machine). A
    config.json without `requested` is matched by folder name: the candidate whose name is `folder_name`.
    """
    names = {f.name for f in dataclasses.fields(RunConfig)}
    kw = {k: v for k, v in config.items() if k in names}
    if isinstance(kw.get("attacks"), list):
        kw["attacks"] = tuple(kw["attacks"])
    hints = typing.get_type_hints(RunConfig)
    wrong = [f"{k} = {v!r}" for k, v in kw.items() if not _is_a(v, hints[k])]
    if wrong:
        raise UserError(f"config.json of {folder_name} has values of the wrong type ({'; '.join(wrong)[:200]}): "
                        "regenerate that run.")
    try:
        recorded = RunConfig(**kw)
    except TypeError as e:
        raise UserError(f"config.json of {folder_name} is not a run config ({e}): is it a `miarobust run` folder?") from e
    asked = config.get("requested")
    if (isinstance(asked, dict) and set(asked) == {"gate_mode", "checkpoint"}
            and all(v is None or isinstance(v, str) for v in asked.values())):
        return dataclasses.replace(recorded, **asked)
    if folder_name is None:
        return recorded
    shipped = Path(recorded.checkpoint).name.removesuffix(".safetensors") if recorded.checkpoint else None
    for gate in dict.fromkeys([recorded.gate_mode, None]):
        for ckpt in dict.fromkeys([recorded.checkpoint, None, shipped]):
            cfg = dataclasses.replace(recorded, gate_mode=gate, checkpoint=ckpt)
            if cfg.folder_name() == folder_name:
                return cfg
    import logging

    logging.getLogger(__name__).warning("%s: no config identity reproduces this folder name (renamed?); re-running "
                                        "the recorded config", folder_name)
    return recorded


def resolve_device(name: str) -> Any:
    """The torch device `--device name` asks for; a UserError if it is no device or not on this machine."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device: use cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: miarobust runs on cpu, cuda or cuda:N.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but CUDA is not available here: use --device cpu.")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices, "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    return device


__all__ = ["NORMS", "Eps", "GateMode", "Resolved", "RunConfig", "RunRecord", "requested_config", "resolve_device"]
