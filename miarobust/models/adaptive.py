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

from timm.models.vision_transformer import VisionTransformer
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


class AdaptiveVisionTransformer(VisionTransformer):
    """timm's VisionTransformer with what every adaptive family of this package shares: the gate mode, the
    straight-through switch and the record of the latest forward (the protocol above); the refusal of what a family
    cannot honour (dynamic image sizes, attention masks, per-block features under a mechanism that changes the
    token count); and the class token every family needs. A family sets NAME, FIXED_SIZE (why its image size is
    fixed), CLASS_TOKEN (why it needs a class token) and TOKEN_POOL (whether it classifies from the class token
    only), and calls `check_no_mask` at the top of `forward_features`.
    """

    NAME: ClassVar[str] = "this model"
    FIXED_SIZE: ClassVar[str] = "counts MACs for the image size it is built for"
    CLASS_TOKEN: ClassVar[str] = "classifies from the class token"
    TOKEN_POOL: ClassVar[bool] = True
    GATE_MODES: ClassVar[tuple[GateMode, ...]] = (GateMode.FULL, GateMode.DETERMINISTIC)
    VARIABLE_COMPUTE: ClassVar[bool] = False

    def __init__(self, *args: Any, gate_mode: str | GateMode = "deterministic", **kwargs: Any):
        if kwargs.get("dynamic_img_size") or kwargs.get("dynamic_img_pad"):
            raise ValueError(f"{self.NAME} {self.FIXED_SIZE}: build it with img_size=(H, W) of your images instead of "
                             "dynamic_img_size / dynamic_img_pad")
        super().__init__(*args, **kwargs)
        if self.cls_token is None or (self.TOKEN_POOL and (self.global_pool != "token" or self.num_prefix_tokens != 1)):
            asked = "class_token=True, global_pool='token' and no register tokens" if self.TOKEN_POOL else "class_token=True"
            raise ValueError(f"{self.NAME} {self.CLASS_TOKEN}: build it with {asked}")
        for blk in self.blocks:  # the families run attention themselves: timm's optional extras would be dropped
            attn = getattr(blk, "attn", None)
            if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) or getattr(attn, "gate", None) is not None:
                raise ValueError(f"{self.NAME} computes attention itself, without timm's scale_attn_norm and attention "
                                 "gate: build it without them")
        self.gate_mode = GateMode.parse(gate_mode)
        self.straight_through = False
        self.last: Any = None

    def set_gate_mode(self, mode: str | GateMode) -> Any:
        """Switch how the model decides (gates.GateMode); returns self."""
        self.gate_mode = GateMode.parse(mode)
        return self

    def check_no_mask(self, attn_mask: Any, is_causal: bool, call: str = "forward_features") -> None:
        """Refuse an attention mask: the mechanism decides which tokens attend."""
        if attn_mask is not None or is_causal:
            raise ValueError(f"{self.NAME}'s blocks take no attention mask: call {call} without attn_mask and is_causal")

    def forward_intermediates(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """timm's per-block features (and so `features_only`) of the static model only: with the mechanism on, the
        blocks' outputs have no fixed token count, and timm's loop would run them without it."""
        if self.gate_mode is not GateMode.FULL:
            raise ValueError(f"{self.NAME} changes the tokens from block to block, so it has no per-block feature maps: "
                             "use forward_features, or set_gate_mode('full') for the static model's")
        return super().forward_intermediates(x, *args, **kwargs)
