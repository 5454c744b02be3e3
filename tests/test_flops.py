"""MACs per image: the DeiT figures, and agreement with torch's FlopCounterMode on executed sub-models."""

from __future__ import annotations

import pytest
import timm
import torch

import miarobust.models  # noqa: F401
from miarobust.models.flops import VitDims, mia_macs, static_macs, torch_counted_macs


def explicit_attention(model: torch.nn.Module) -> torch.nn.Module:
    """FlopCounterMode misses SDPA on CPU: run attention as explicit matmuls so it counts them."""
    for blk in model.blocks:
        blk.attn.fused_attn = False
    return model


@pytest.mark.parametrize("name,gmacs", [("deit_t", 1.25), ("deit_s", 4.60), ("deit_b", 17.56)])
def test_deit_figures(name: str, gmacs: float) -> None:
    dims = VitDims.of(timm.create_model(name))
    assert static_macs(dims) / 1e9 == pytest.approx(gmacs, rel=0.01)


@pytest.mark.parametrize("name", ["deit_t", "vit_fmnist"])
def test_static_formula_matches_flop_counter(name: str) -> None:
    model = explicit_attention(timm.create_model(name).eval())
    c, h, w = model.pretrained_cfg["input_size"]
    counted = torch_counted_macs(model, torch.randn(1, c, h, w))
    assert static_macs(VitDims.of(model)) == pytest.approx(counted, rel=1e-3)


@pytest.mark.parametrize("name,kwargs", [("mia_vit_fmnist", {}), ("mia_deit_t", {"img_size": 64})])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_executed_submodel_matches_flop_counter(name: str, kwargs: dict, seed: int) -> None:
    torch.manual_seed(seed)
    model = explicit_attention(timm.create_model(name, **kwargs).eval())
    for head in model.controller:  # random decisions: some blocks skipped, heads and tokens dropped
        for lin in (head.cls, head.tokens):
            torch.nn.init.normal_(lin.weight, std=1.0)
            torch.nn.init.constant_(lin.bias, 0.5)
    c, h, w = model.pretrained_cfg["input_size"]
    x = torch.randn(1, c, h, w)
    counted = torch_counted_macs(model, x)  # batch 1: sliced execution runs exactly the kept structure
    recorded = float(model.last.macs[0])
    assert recorded < static_macs(VitDims.of(model))  # something was dropped
    assert recorded == pytest.approx(counted, rel=0.01)


def test_mia_macs_all_open_is_static_plus_controller() -> None:
    dims = VitDims.of(timm.create_model("mia_vit_fmnist"))
    ones = torch.ones
    macs = mia_macs(dims, ones(1, dims.depth), ones(1, dims.depth, dims.num_heads), ones(1, dims.depth, dims.tokens))
    from miarobust.models.flops import controller_macs

    assert float(macs) == pytest.approx(static_macs(dims) + dims.depth * controller_macs(dims))
