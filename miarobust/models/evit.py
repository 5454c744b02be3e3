"""EViT: attentive tokens kept, inattentive ones fused, by the class token's attention.

Liang et al., "Not All Patches Are What You Need: Expediting Vision Transformers via Token Reorganizations",
ICLR 2022 (arXiv 2202.07800). Written from the paper. In the blocks that reorganise (by default at a quarter, half
and three quarters of the depth: DeiT's 4th, 7th and 10th), between attention and MLP:

1. each non-class token's attentiveness is the class token's attention to it in that block, averaged over heads;
2. the ceil(keep_rate * n) most attentive of the n non-class tokens are kept, in their order;
3. the others are fused into one token, their average weighted by their attentiveness, placed last; it takes part
   in later blocks as any other token, and may be kept or fused again.

No parameter is added, so a static checkpoint is an EViT checkpoint (the paper fine-tunes; it runs without).
The compute is the same for every image: a fixed-compute peer. Gate modes (models/adaptive.py): ``full`` keeps
every token (exactly the static model); ``deterministic`` reorganises. The top-k choice is piecewise constant in
the input: without `straight_through` gradients reach the input through the kept tokens and the fusion weights
(the attention itself), never through which tokens are kept. With `straight_through` (BPDA, for attacks) the
forward pass is the same and the backward pass is that of a relaxed choice: token i is kept with weight
m_i = sigmoid((log s_i - log t) / st_tau), s_i its attentiveness and t the geometric mean of the k-th and
(k+1)-th largest (held constant); each kept token is scaled by its m_i (1 in the forward pass) and the fused token
is the attentiveness-weighted average of every token weighted by 1 - m_i (the hard fusion as st_tau -> 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.models import register_model
from torch import nn

from miarobust.models.adaptive import AdaptiveVisionTransformer
from miarobust.models.flops import VitDims, block_macs
from miarobust.models.gates import GateMode, straight_through
from miarobust.models.vit import ARCHS, create_vit, fmnist_cfg, imagenet_cfg


class FuseRecord:
    """The latest forward: `macs` (B,) per image and `tokens` per block (the tokens each block's attention saw)."""

    def __init__(self, macs: torch.Tensor, tokens: list[int]):
        self.macs, self.tokens = macs, tokens


class EViT(AdaptiveVisionTransformer):
    """timm's VisionTransformer reorganising its tokens by the class token's attention; see the module docstring.

    Args (beyond timm's): keep_rate (share of the non-class tokens kept at each reorganisation); prune_at (the
    blocks that reorganise, 0-based; default depth/4, depth/2, 3 depth/4); st_tau (the temperature of the keep
    choice's relaxation under `straight_through`); gate_mode.
    """

    NAME, CLASS_TOKEN = "EViT", "ranks tokens by the class token's attention and classifies from it"
    GATE_MODES = (GateMode.FULL, GateMode.DETERMINISTIC)
    VARIABLE_COMPUTE = False

    def __init__(self, *args: Any, keep_rate: float = 0.7, prune_at: tuple[int, ...] | None = None,
                 st_tau: float = 0.5, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1], not {keep_rate}")
        if st_tau <= 0:
            raise ValueError(f"st_tau (the temperature of the keep choice's relaxation) must be > 0, not {st_tau}")
        self.st_tau = st_tau
        depth = len(self.blocks)
        default = tuple(sorted({depth * s // 4 for s in (1, 2, 3)} - {0}))
        self.prune_at = tuple(prune_at) if prune_at is not None else default
        if sorted(set(self.prune_at)) != list(self.prune_at) or not all(0 <= b < depth for b in self.prune_at):
            raise ValueError(f"prune_at must be increasing block indices in 0..{depth - 1}, not {self.prune_at}")
        self.keep_rate = keep_rate
        self.last: FuseRecord | None = None

    def schedule(self, keep_rate: float | None = None) -> list[tuple[int, int]]:
        """(tokens into attention, tokens into the MLP) of each block, class token included."""
        rate = self.keep_rate if keep_rate is None else keep_rate
        n, out = VitDims.of(self).tokens, []
        for i in range(len(self.blocks)):
            m = n
            if i in self.prune_at and rate < 1:
                kept = math.ceil(rate * (n - 1))
                if kept < n - 2:  # the class token, the kept ones, the fused one (fusing one token alone: a no-op)
                    m = kept + 2
            out.append((n, m))
            n = m
        return out

    def macs_per_image(self, keep_rate: float | None = None) -> int:
        """MACs of one image: each block's attention on its input tokens, its MLP on the tokens left after the
        reorganisation (the ranking and fusion, O(n) per block, are left out as the paper leaves them)."""
        dims = VitDims.of(self)
        total = dims.patch_macs + dims.head_macs
        for n, m in self.schedule(keep_rate):
            total += block_macs(dims, n, dims.num_heads) - 2 * (n - m) * dims.dim * dims.mlp_hidden
        return int(total)

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        self.check_no_mask(attn_mask, is_causal)
        if self.gate_mode not in (GateMode.FULL, GateMode.DETERMINISTIC):
            raise ValueError(f"EViT has no gate mode '{self.gate_mode.value}': use full or deterministic")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        rate = 1.0 if self.gate_mode is GateMode.FULL else self.keep_rate
        schedule = self.schedule(rate)
        self.last = FuseRecord(x.new_full((x.shape[0],), float(self.macs_per_image(rate))), [n for n, _ in schedule])
        if rate >= 1:
            return self.norm(self.blocks(x))
        tau = self.st_tau if self.straight_through and torch.is_grad_enabled() else None
        for i, blk in enumerate(self.blocks):
            x = _reorganising_block(blk, x, schedule[i][1], tau) if i in self.prune_at else blk(x)
        return self.norm(x)


def _reorganising_block(blk: nn.Module, x: torch.Tensor, out_tokens: int, tau: float | None = None) -> torch.Tensor:
    """timm's pre-norm block whose MLP runs on `out_tokens` tokens: the class token, the most attended tokens and
    the fusion of the rest (EViT's token reorganisation between attention and MLP; with `tau`, the keep choice
    straight-through its relaxation at that temperature)."""
    a = blk.attn
    b, n, d = x.shape
    qkv = a.qkv(blk.norm1(x)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    attn = (q * a.scale @ k.transpose(-2, -1)).softmax(-1)
    o = (a.attn_drop(attn) @ v).transpose(1, 2).reshape(b, n, a.attn_dim)
    x = x + blk.drop_path1(blk.ls1(a.proj_drop(a.proj(o))))
    if out_tokens < n:  # the class token, `kept` attentive tokens and one fusion of the others (two or more)
        kept = out_tokens - 2
        score = attn[:, :, 0, 1:].mean(1)  # (B, n - 1): the class token's attention to each token
        order = score.argsort(1, descending=True)
        top, rest = order[:, :kept].sort(1).values, order[:, kept:]
        tokens = x[:, 1:]
        w = score.gather(1, rest)[..., None]
        fused = (tokens.gather(1, rest[..., None].expand(-1, -1, d)) * w).sum(1, keepdim=True)
        fused = fused / w.sum(1, keepdim=True).clamp_min(1e-12)
        kept_tokens = tokens.gather(1, top[..., None].expand(-1, -1, d))
        if tau is not None:
            kept_tokens, fused = relaxed_keep(tokens, score, top, kept_tokens, fused, kept, tau)
        x = torch.cat([x[:, :1], kept_tokens, fused], 1)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def relaxed_keep(tokens: torch.Tensor, score: torch.Tensor, top: torch.Tensor, kept_tokens: torch.Tensor,
                 fused: torch.Tensor, kept: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens and the fused one of a hard reorganisation, carrying the gradient of its relaxation.

    tokens (B, n, D): the non-class tokens; score (B, n): their attentiveness; top (B, kept): the kept ones'
    indices; kept_tokens, fused: the hard result. Token i is kept with weight m_i (module docstring).
    """
    log_score = score.clamp_min(1e-12).log()
    ranked = log_score.detach().sort(1, descending=True).values
    m = torch.sigmoid((log_score - (ranked[:, kept - 1:kept] + ranked[:, kept:kept + 1]) / 2) / tau)  # (B, n)
    keep_weight = m.gather(1, top)[..., None]
    w = ((1 - m) * score)[..., None]
    soft_fused = (tokens * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-12)
    return kept_tokens * straight_through(torch.ones_like(keep_weight), keep_weight), straight_through(fused, soft_fused)


def _evit(variant: str, arch: str, cfg: Any, pretrained: bool, kwargs: dict[str, Any]) -> EViT:
    return create_vit(EViT, variant, cfg, pretrained, **{**ARCHS[arch], **kwargs})


@register_model
def evit_deit_t(pretrained: bool = False, **kwargs: Any) -> EViT:
    """EViT on DeiT-Tiny (keep rate 0.7); timm's DeiT-T weights fit as they are."""
    return _evit("evit_deit_t", "deit_t", imagenet_cfg(), pretrained, kwargs)


@register_model
def evit_deit_s(pretrained: bool = False, **kwargs: Any) -> EViT:
    """EViT on DeiT-Small (keep rate 0.7: 3.0 GMACs); timm's DeiT-S weights fit as they are."""
    return _evit("evit_deit_s", "deit_s", imagenet_cfg(), pretrained, kwargs)


@register_model
def evit_deit_b(pretrained: bool = False, **kwargs: Any) -> EViT:
    """EViT on DeiT-Base (keep rate 0.7); timm's DeiT-B weights fit as they are."""
    return _evit("evit_deit_b", "deit_b", imagenet_cfg(), pretrained, kwargs)


@register_model
def evit_vit_fmnist(pretrained: bool = False, **kwargs: Any) -> EViT:
    """EViT on vit_fmnist with its shipped static weights, without fine-tuning (keep rate 0.7 by default)."""
    return _evit("evit_vit_fmnist", "vit_fmnist", fmnist_cfg("vit_fmnist.safetensors"), pretrained, kwargs)
