"""AdaViT: adaptive blocks, heads and patches from per-block decision networks, trained end to end.

Meng et al., "AdaViT: Adaptive Vision Transformers for Efficient Image Recognition", CVPR 2022 (arXiv
2111.15668; not A-ViT, whose first arXiv version carried the same name). Before every block a light decision
network decides, per image, whether the block runs, which heads and which patch tokens it keeps; the decisions
are trained with straight-through Gumbel-softmax and a usage loss, and are deterministic at inference.

That is MIA-Former's mechanism without its reinforcement-learning half, so here AdaViT is MIA-Former's model
(the same decision heads, gated blocks, execution paths and MACs counter) trained by `miarobust train` with the
supervised part only (`--rl-weight 0` enforced): the pair isolates what the hybrid controller adds. What is
kept of the paper: the decision granularity, Gumbel straight-through training, deterministic inference. What
differs: the usage loss holds the MACs share to `--budget` (as MIA-Former's supervised loss does) instead of
three separate usage targets for blocks, heads and patches, so the two families are trained to the same budget
by the same objective apart from the RL term.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model

from miarobust.models.gates import GateMode
from miarobust.models.mia_former import MIAFormer
from miarobust.models.vit import ARCHS, create_vit, fmnist_cfg, imagenet_cfg


class AdaViT(MIAFormer):
    """MIA-Former's gated ViT with AdaViT's inference (deterministic decisions only); see the module docstring."""

    NAME = "AdaViT"  # models/adaptive.py
    GATE_MODES = (GateMode.FULL, GateMode.DETERMINISTIC)


def _adavit(variant: str, arch: str, cfg: Any, pretrained: bool, kwargs: dict[str, Any]) -> AdaViT:
    return create_vit(AdaViT, variant, cfg, pretrained, **{**ARCHS[arch], **kwargs})


@register_model
def adavit_deit_t(pretrained: bool = False, **kwargs: Any) -> AdaViT:
    """AdaViT on DeiT-Tiny."""
    return _adavit("adavit_deit_t", "deit_t", imagenet_cfg(), pretrained, kwargs)


@register_model
def adavit_deit_s(pretrained: bool = False, **kwargs: Any) -> AdaViT:
    """AdaViT on DeiT-Small."""
    return _adavit("adavit_deit_s", "deit_s", imagenet_cfg(), pretrained, kwargs)


@register_model
def adavit_deit_b(pretrained: bool = False, **kwargs: Any) -> AdaViT:
    """AdaViT on DeiT-Base."""
    return _adavit("adavit_deit_b", "deit_b", imagenet_cfg(), pretrained, kwargs)


@register_model
def adavit_vit_fmnist(pretrained: bool = False, **kwargs: Any) -> AdaViT:
    """AdaViT on vit_fmnist; default weights `adavit_vit_fmnist_b05`, trained for half the static model's MACs by
    `miarobust train --model adavit_vit_fmnist --budget 0.5` (MIA-Former's recipe without its RL half)."""
    return _adavit("adavit_vit_fmnist", "vit_fmnist", fmnist_cfg("adavit_vit_fmnist_b05.safetensors"), pretrained, kwargs)
