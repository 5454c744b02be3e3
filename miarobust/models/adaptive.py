"""What the evaluator, the attacks and the checks need of an input-adaptive ViT, and nothing more.

MIA-Former and every dynamic-ViT peer implement `AdaptiveViT`; the evaluator, the attacks, the checks and the
reports talk to this protocol only, never to one family's internals:

- `gate_mode` / `set_gate_mode`: how the model decides (gates.GateMode): `full` switches the mechanism off
  (the static backbone, exactly), `deterministic` decides by thresholds or top-k, `stochastic` draws its
  decisions anew on every forward (a random model: attacks need EOT), `gumbel` is for training. A family
  supports the modes in `GATE_MODES`.
- `straight_through`: when set, the discrete decisions stay hard in the forward pass and pass the gradient of
  their relaxation backward (BPDA), so a white-box attack can steer them.
- `last`: the record of the latest forward, whose `macs` is a (B,) tensor of each image's executed MACs
  (differentiable in the decisions under `straight_through`, for slowdown attacks).
- `VARIABLE_COMPUTE`: whether the MACs depend on the input (a fixed-compute family spends the same on every
  image, so a slowdown attack has nothing to gain).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import nn

from miarobust.models.gates import GateMode


@runtime_checkable
class AdaptiveViT(Protocol):
    """An input-adaptive ViT as the evaluator sees it; see the module docstring."""

    GATE_MODES: ClassVar[tuple[GateMode, ...]]
    VARIABLE_COMPUTE: ClassVar[bool]
    gate_mode: GateMode
    straight_through: bool
    last: Any

    def set_gate_mode(self, mode: str | GateMode) -> Any: ...


def adaptive_core(module: nn.Module) -> AdaptiveViT | None:
    """The adaptive model `module` is or wraps (through `.model`, as Normalized does), or None for a static one."""
    seen = 0
    while module is not None and seen < 8:
        if isinstance(module, AdaptiveViT):
            return module
        module, seen = getattr(module, "model", None), seen + 1
    return None


def check_gate_mode(model: AdaptiveViT, mode: str | GateMode, name: str) -> GateMode:
    """`mode` parsed, or a ValueError naming the modes `model` (called `name`) supports at evaluation (a UserError
    for a name that is no gate mode at all)."""
    parsed = GateMode.parse(mode)
    if parsed is GateMode.GUMBEL:
        raise ValueError("gate mode 'gumbel' is for training: use " + ", ".join(m.value for m in model.GATE_MODES))
    if parsed not in model.GATE_MODES:
        raise ValueError(f"{name} has no gate mode '{parsed.value}': use " + ", ".join(m.value for m in model.GATE_MODES))
    return parsed
