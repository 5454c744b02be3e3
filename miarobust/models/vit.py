"""Static ViT baselines, registered with timm.

`deit_t`, `deit_s`, `deit_b` are short names for timm's DeiT (Touvron et al. 2021,
arXiv 2012.12877) that accept any image size and class count; `vit_fmnist` is a small ViT for
28x28 grey images (Fashion-MNIST) whose trained weights ship with the package.
"""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from timm.models import build_model_with_cfg, register_model
from timm.models._pretrained import PretrainedCfg
from timm.models.deit import checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)

#: Architectures, as timm kwargs. The `mia_` models reuse these, so a static checkpoint loads into both.
ARCHS: dict[str, dict[str, Any]] = {
    "deit_t": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit_s": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_b": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_fmnist": dict(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0),
}


def shipped_checkpoint(filename: str) -> str:
    """Path of a checkpoint file shipped inside the package (miarobust/checkpoints/)."""
    return str(resources.files("miarobust") / "checkpoints" / filename)


def recorded_checkpoint(path: str) -> str:
    """How config.json names a weights file: a shipped one relative to the package's parent
    (`miarobust/checkpoints/NAME.safetensors`, the same wherever the package is installed), any other as given."""
    file = Path(path).expanduser().resolve()
    shipped = file == Path(shipped_checkpoint(file.name)).resolve() and file.is_file()
    return f"miarobust/checkpoints/{file.name}" if shipped else path


def shipped_names() -> list[str]:
    """Names of the checkpoints shipped in miarobust/checkpoints/ (file stem: `--checkpoint mia_vit_fmnist_b05`)."""
    folder = resources.files("miarobust") / "checkpoints"
    return sorted(f.name.removesuffix(".safetensors") for f in folder.iterdir() if f.name.endswith(".safetensors"))


def imagenet_cfg(**overrides: Any) -> PretrainedCfg:
    """timm's DeiT data config: 224x224 RGB, ImageNet mean/std, bicubic, crop 0.875."""
    base = dict(
        input_size=(3, 224, 224), num_classes=1000, interpolation="bicubic", crop_pct=0.875,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv="patch_embed.proj", classifier="head",
    )
    return PretrainedCfg(**{**base, **overrides})


def fmnist_cfg(filename: str | None, **overrides: Any) -> PretrainedCfg:
    """Data config of the Fashion-MNIST models; `file` points at the shipped weights."""
    base = dict(
        input_size=(1, 28, 28), num_classes=10, interpolation="bilinear", crop_pct=1.0,
        mean=FMNIST_MEAN, std=FMNIST_STD, first_conv="patch_embed.proj", classifier="head",
        file=shipped_checkpoint(filename) if filename else None,
    )
    return PretrainedCfg(**{**base, **overrides})


def create_vit(cls: type, variant: str, cfg: PretrainedCfg, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    """Build a `cls` (a VisionTransformer subclass) through timm, DeiT's checkpoint filter included."""
    given = kwargs.pop("pretrained_cfg", None)  # timm's create_model passes the registry's (none) or the caller's
    cfg = given if isinstance(given, PretrainedCfg) else cfg
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    if "num_classes" in kwargs:
        overlay = {"num_classes": kwargs["num_classes"], **overlay}
    if "img_size" in kwargs:
        size = kwargs["img_size"]
        h, w = (size, size) if isinstance(size, int) else size
        overlay = {"input_size": (kwargs.get("in_chans", cfg.input_size[0]), h, w), **overlay}
    # a ViT's position embedding fixes its input size unless built with dynamic_img_size (timm's DeiT cfgs say so)
    overlay = {"fixed_input_size": not kwargs.get("dynamic_img_size", False), **overlay}
    chans = kwargs.get("in_chans", cfg.input_size[0])
    if len(cfg.mean) != chans:  # e.g. a grey DeiT: the mean of the RGB statistics on every channel
        overlay = {"mean": (sum(cfg.mean) / len(cfg.mean),) * chans, "std": (sum(cfg.std) / len(cfg.std),) * chans,
                   **overlay}
    cfg = replace(cfg, **overlay)
    return build_model_with_cfg(
        cls, variant, pretrained, pretrained_cfg=cfg,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"), **kwargs,
    )


@register_model
def deit_t(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny (timm's deit_tiny_patch16_224), any image size and class count."""
    return create_vit(VisionTransformer, "deit_t", imagenet_cfg(), pretrained, **{**ARCHS["deit_t"], **kwargs})


@register_model
def deit_s(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small (timm's deit_small_patch16_224), any image size and class count."""
    return create_vit(VisionTransformer, "deit_s", imagenet_cfg(), pretrained, **{**ARCHS["deit_s"], **kwargs})


@register_model
def deit_b(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Base (timm's deit_base_patch16_224), any image size and class count."""
    return create_vit(VisionTransformer, "deit_b", imagenet_cfg(), pretrained, **{**ARCHS["deit_b"], **kwargs})


@register_model
def vit_fmnist(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A 0.2 M-parameter ViT for 28x28 grey images (patch 4, 6 blocks of width 64, 4 heads)."""
    cfg = fmnist_cfg("vit_fmnist.safetensors")
    return create_vit(VisionTransformer, "vit_fmnist", cfg, pretrained, **{**ARCHS["vit_fmnist"], **kwargs})
