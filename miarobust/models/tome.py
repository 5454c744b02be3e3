"""ToMe: token merging by bipartite soft matching, training-free.

Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023 (arXiv 2210.09461). Written from the paper (its
code is under a non-commercial licence). In every block, between attention and MLP, r tokens are merged away:

1. the tokens' keys, averaged over heads, are the similarity metric (cosine);
2. the tokens are split alternately into sets A and B; each token of A is joined by an edge to its most similar
   token of B;
3. the r most similar edges are kept, and each A token on one is merged into its B token: features averaged,
   weighted by the number of patches each token stands for (its size), sizes added;
4. the class token is never merged; the remaining tokens keep their order, A's before B's.

Attention is proportional: log(size) is added to every key's score, so a merged token weighs as the patches
it stands for. The compute is the same for every image (r per block), so it is a fixed-compute peer.

Gate modes (models/adaptive.py): ``full`` merges nothing (r = 0: exactly the static model); ``deterministic``
merges r per block. The matching is a discrete choice, piecewise constant in the input: without
`straight_through` gradients reach the input only through the merged features and the proportional attention,
never through which tokens merge. With `straight_through` (BPDA, for attacks) the forward pass is the same hard
merge and the backward pass is that of its relaxation (`soft_merge`): each A token joins every B token with the
softmax of their similarities over `st_tau`, in proportion to its soft "is merged" weight, the sigmoid of its best
similarity's distance to the threshold between the r-th and (r+1)-th best edges over `st_tau`. As `st_tau` -> 0
the relaxation is the hard merge.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from miarobust.models.adaptive import AdaptiveVisionTransformer
from miarobust.models.flops import VitDims, block_macs
from miarobust.models.gates import GateMode, straight_through
from miarobust.models.vit import ARCHS, create_vit, fmnist_cfg, imagenet_cfg


class MergeRecord:
    """The latest forward: `macs` (B,) per image and `tokens` per block (the tokens each block's attention saw)."""

    def __init__(self, macs: torch.Tensor, tokens: list[int]):
        self.macs, self.tokens = macs, tokens


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int,
                    tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge r tokens of x (B, N, D) with sizes (B, N, 1) by bipartite soft matching on metric (B, N, C).

    Token 0 (the class token) is in A and never merged. Returns the merged features (B, N - r, D) and sizes; with
    `tau`, the B tokens' features and sizes carry the gradient of `soft_merge` at that temperature (the values
    are the hard merge's).
    """
    if r <= 0:
        return x, size
    metric = F.normalize(metric, dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    sim = a @ b.transpose(-1, -2)  # (B, Na, Nb)
    sim[:, 0] = float("-inf")  # the class token keeps its place
    best, match = sim.max(-1)  # each A token's most similar B token
    order = best.argsort(-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:].sort(-1).values  # kept A tokens in their order (class token first)
    d = x.shape[-1]
    xa, xb = (x * size)[:, ::2], (x * size)[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    target = match.gather(1, merged_a)[..., None]  # the B token each merged A token joins
    keep = kept_a[..., None]
    hard_sb = sb.scatter_add(1, target, sa.gather(1, merged_a[..., None]))
    hard_xb = xb.scatter_add(1, target.expand(-1, -1, d), xa.gather(1, merged_a[..., None].expand(-1, -1, d))) / hard_sb
    if tau is not None:
        soft_xb, soft_sb = soft_merge(xa, xb, sa, sb, sim, best.gather(1, order), r, tau)
        hard_xb, hard_sb = straight_through(hard_xb, soft_xb), straight_through(hard_sb, soft_sb)
    kept_sa = sa.gather(1, keep)
    new_x = torch.cat([xa.gather(1, keep.expand(-1, -1, d)) / kept_sa, hard_xb], 1)
    return new_x, torch.cat([kept_sa, hard_sb], 1)


def soft_merge(xa: torch.Tensor, xb: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, sim: torch.Tensor,
               ranked: torch.Tensor, r: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The relaxation of merging r A tokens into B: the B tokens' features and sizes (B, Nb, D), (B, Nb, 1).

    xa, xb: size-weighted features of A and B; sa, sb: their sizes; sim (B, Na, Nb): similarities (the class
    token's row -inf); ranked (B, Na): each A token's best similarity, sorted descending. A token i is merged
    with weight m_i = sigmoid((best_i - t) / tau), t halfway between the r-th and (r+1)-th best (held constant),
    and joins B token j in proportion softmax_j(sim_ij / tau).
    """
    finite = sim[:, 1:]  # the class token (row 0) never merges
    threshold = (ranked[:, r - 1] + ranked[:, r].clamp_min(-1.0)).detach()[:, None] / 2  # cosines are >= -1
    m = torch.sigmoid((finite.max(-1).values - threshold) / tau)  # (B, Na - 1)
    w = m[..., None] * (finite / tau).softmax(-1)  # (B, Na - 1, Nb): how much of A token i joins B token j
    wt = w.transpose(1, 2)
    soft_sb = sb + wt @ sa[:, 1:]
    return (xb + wt @ xa[:, 1:]) / soft_sb, soft_sb


class ToMe(AdaptiveVisionTransformer):
    """timm's VisionTransformer merging `r` tokens per block; see the module docstring."""

    NAME, CLASS_TOKEN = "ToMe", "here protects the class token and classifies from it"  # models/adaptive.py
    GATE_MODES = (GateMode.FULL, GateMode.DETERMINISTIC)
    VARIABLE_COMPUTE = False

    def __init__(self, *args: Any, r: int = 8, st_tau: float = 0.1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if r < 0:
            raise ValueError(f"r (tokens merged per block) must be >= 0, not {r}")
        if st_tau <= 0:
            raise ValueError(f"st_tau (the temperature of the merge's relaxation) must be > 0, not {st_tau}")
        self.r, self.st_tau = r, st_tau
        self.last: MergeRecord | None = None

    def schedule(self, r: int | None = None) -> list[int]:
        """Tokens entering each block: each merges min(r, (n - 1) // 2) of them (A has the class token)."""
        r = self.r if r is None else r
        n, out = VitDims.of(self).tokens, []
        for _ in self.blocks:
            out.append(n)
            n -= min(r, (n - 1) // 2)
        return out

    def macs_per_image(self, r: int | None = None) -> int:
        """MACs of one image: attention on the block's tokens, the matching's similarity matmul, the MLP on the
        tokens left after merging, plus patch embedding and head."""
        dims = VitDims.of(self)
        tokens = self.schedule(r)
        total = dims.patch_macs + dims.head_macs
        for i, n in enumerate(tokens):
            m = tokens[i + 1] if i + 1 < len(tokens) else n - min(self.r if r is None else r, (n - 1) // 2)
            attention = block_macs(dims, n, dims.num_heads) - 2 * n * dims.dim * dims.mlp_hidden
            similarity = ((n + 1) // 2) * (n // 2) * dims.head_dim if m < n else 0  # keys averaged over heads
            total += attention + similarity + 2 * m * dims.dim * dims.mlp_hidden
        return int(total)

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        self.check_no_mask(attn_mask, is_causal)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        b = x.shape[0]
        r = 0 if self.gate_mode is GateMode.FULL else self.r
        if self.gate_mode not in (GateMode.FULL, GateMode.DETERMINISTIC):
            raise ValueError(f"ToMe has no gate mode '{self.gate_mode.value}': use full or deterministic")
        self.last = MergeRecord(x.new_full((b,), float(self.macs_per_image(r))), self.schedule(r))
        if r == 0:
            return self.norm(self.blocks(x))
        size = x.new_ones(b, x.shape[1], 1)
        tau = self.st_tau if self.straight_through and torch.is_grad_enabled() else None
        for blk in self.blocks:
            x, size = _merging_block(blk, x, size, r, tau)
        return self.norm(x)


def _merging_block(blk: nn.Module, x: torch.Tensor, size: torch.Tensor, r: int,
                   tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's pre-norm block with proportional attention, r tokens merged between attention and MLP (with `tau`,
    the merge straight-through its relaxation at that temperature)."""
    a = blk.attn
    b, n, d = x.shape
    qkv = a.qkv(blk.norm1(x)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    bias = size.log().transpose(1, 2)[:, None]  # (B, 1, 1, N): log of each key's size
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=a.attn_drop.p if blk.training else 0.0)
    x = x + blk.drop_path1(blk.ls1(a.proj_drop(a.proj(o.transpose(1, 2).reshape(b, n, a.attn_dim)))))
    x, size = bipartite_merge(x, size, k.mean(1), min(r, (n - 1) // 2), tau)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), size


def _tome(variant: str, arch: str, cfg: Any, pretrained: bool, kwargs: dict[str, Any]) -> ToMe:
    return create_vit(ToMe, variant, cfg, pretrained, **{**ARCHS[arch], **kwargs})


@register_model
def tome_deit_t(pretrained: bool = False, **kwargs: Any) -> ToMe:
    """ToMe on DeiT-Tiny (r = 13 by default, the paper's DeiT setting); timm's DeiT-T weights fit as they are."""
    return _tome("tome_deit_t", "deit_t", imagenet_cfg(), pretrained, {"r": 13, **kwargs})


@register_model
def tome_deit_s(pretrained: bool = False, **kwargs: Any) -> ToMe:
    """ToMe on DeiT-Small (r = 13: 2.7 GMACs); timm's DeiT-S weights fit as they are."""
    return _tome("tome_deit_s", "deit_s", imagenet_cfg(), pretrained, {"r": 13, **kwargs})


@register_model
def tome_deit_b(pretrained: bool = False, **kwargs: Any) -> ToMe:
    """ToMe on DeiT-Base (r = 13 by default); timm's DeiT-B weights fit as they are."""
    return _tome("tome_deit_b", "deit_b", imagenet_cfg(), pretrained, {"r": 13, **kwargs})


@register_model
def tome_vit_fmnist(pretrained: bool = False, **kwargs: Any) -> ToMe:
    """ToMe on vit_fmnist with its shipped static weights (training-free); r = 6 per block by default (0.63 of the
    static model's MACs), `--model-kwargs r=8` for 0.52."""
    return _tome("tome_vit_fmnist", "vit_fmnist", fmnist_cfg("vit_fmnist.safetensors"), pretrained, {"r": 6, **kwargs})
