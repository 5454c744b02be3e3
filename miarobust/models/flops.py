"""Multiply-accumulates (MACs) per image of the structure a ViT actually executes.

Convention of DeiT (Touvron et al. 2021): linear layers, the patch embedding and the two attention
matmuls (q k^T and attn v) count; norms, softmax, activations and additions do not. DeiT-S at 224 is
4.60 GMACs. torch's FlopCounterMode misses `scaled_dot_product_attention` on CPU and counts the dense
work of masked gates, so the figures here are computed from the executed structure and checked against
FlopCounterMode on explicitly-executed sub-models in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class VitDims:
    """The dimensions of a timm VisionTransformer that determine its MACs."""

    depth: int
    dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_patches: int
    num_prefix: int
    patch_macs: int
    head_macs: int

    @property
    def tokens(self) -> int:
        return self.num_patches + self.num_prefix

    @classmethod
    def of(cls, model: nn.Module) -> VitDims:
        """Read the dimensions off a timm VisionTransformer (or a wrapper with `.model`)."""
        while not hasattr(model, "blocks") and hasattr(model, "model"):
            model = model.model
        blk = model.blocks[0]
        conv = model.patch_embed.proj
        num_patches = model.patch_embed.num_patches
        patch_macs = num_patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        head = model.head
        head_macs = head.in_features * head.out_features if isinstance(head, nn.Linear) else 0
        return cls(
            depth=len(model.blocks), dim=model.embed_dim, num_heads=blk.attn.num_heads, head_dim=blk.attn.head_dim,
            mlp_hidden=blk.mlp.fc1.out_features, num_patches=num_patches, num_prefix=model.num_prefix_tokens,
            patch_macs=patch_macs, head_macs=head_macs,
        )


def block_macs(dims: VitDims, tokens: torch.Tensor | float, heads: torch.Tensor | float) -> torch.Tensor | float:
    """MACs of one block on `tokens` tokens with `heads` heads kept (tensors broadcast: per sample)."""
    attn_dim = heads * dims.head_dim
    qkv = tokens * dims.dim * 3 * attn_dim
    attn = 2 * attn_dim * tokens * tokens  # q k^T and attn v over the kept tokens
    proj = tokens * attn_dim * dims.dim
    mlp = 2 * tokens * dims.dim * dims.mlp_hidden
    return qkv + attn + proj + mlp


def static_macs(dims: VitDims) -> int:
    """MACs per image of the static ViT."""
    return int(dims.patch_macs + dims.depth * block_macs(dims, dims.tokens, dims.num_heads) + dims.head_macs)


def controller_macs(dims: VitDims) -> int:
    """MACs of MIA-Former's decision heads per block: block + heads from the CLS token, one logit per patch token."""
    return dims.dim * (1 + dims.num_heads) + dims.num_patches * dims.dim


def mia_macs(dims: VitDims, blocks: torch.Tensor, heads: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-image MACs of MIA-Former from its gates (differentiable in them, for the budget loss).

    blocks: (B, L) block gates; heads: (B, L, H) head gates; tokens: (B, L, N) token gates, prefix tokens
    included (always 1). Heads and tokens of a skipped block do not count. Returns (B,) float MACs.
    """
    blocks, heads, tokens = blocks.float(), heads.float(), tokens.float()  # counts up to 1e10: never in bf16
    n = tokens.sum(-1)
    h = heads.sum(-1)
    per_block = blocks * block_macs(dims, n, h)
    return dims.patch_macs + dims.head_macs + dims.depth * controller_macs(dims) + per_block.sum(-1)


def torch_counted_macs(model: nn.Module, x: torch.Tensor) -> float:
    """MACs per image as torch's FlopCounterMode counts them (it counts 2 FLOPs per MAC).

    Only meaningful where attention runs as explicit matmuls (timm's `fused_attn = False`): FlopCounterMode
    does not count `scaled_dot_product_attention` on CPU.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


def module_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """MACs per image of any static model taking (1, C, H, W) inputs: a timm ViT's from its dimensions (the
    attention matmuls included), any other module's from torch's FlopCounterMode on one forward (FLOPs / 2)."""
    try:
        return static_macs(VitDims.of(model))
    except (AttributeError, IndexError, TypeError):
        pass
    from torch.utils.flop_counter import FlopCounterMode

    _count_cpu_sdpa()
    param = next(iter(model.parameters()), None)
    x = torch.zeros(1, *input_size, device=param.device if param is not None else "cpu")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def _count_cpu_sdpa() -> None:
    """Teach FlopCounterMode the CPU kernel of scaled_dot_product_attention, which it does not count (the two
    attention matmuls: 4.24 G instead of DeiT-S's 4.60 G), with torch's own formula for the other kernels."""
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in fc.flop_registry:
        return

    @fc.register_flop_formula(op)
    def _cpu_sdpa(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)
