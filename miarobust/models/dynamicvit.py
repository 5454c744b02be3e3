"""DynamicViT: hierarchical token sparsification with learned token scorers.

Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification", NeurIPS 2021
(arXiv 2106.02034). Before three stages of the ViT (for DeiT's 12 blocks: blocks 3, 6 and 9) a light scorer
reads every remaining patch token, its local features beside the mean of the kept tokens' global features,
and predicts keep / drop; the stage keeps the top rho, rho^2, rho^3 of the original patch tokens (the CLS token
always), so the compute is the same for every image.

Written from the paper, as a subclass of timm's VisionTransformer: a static checkpoint loads with only the
scorers' keys (`controller.*`) missing.

Execution by gate mode (models/adaptive.py):
- ``full``: the scorers do not run, timm's own blocks: exactly the static model.
- ``deterministic``: hard top-k per stage. Without a gradient to the decisions the dropped tokens are not
  computed (gathered: the paper's inference). With `straight_through`, or in training, the reference masked
  forward runs instead: every token is computed, attention keys of dropped tokens are masked out (softmax over
  the kept keys only, which leaves the CLS token's path exactly that of the gathered forward), and the hard
  keep mask passes the gradient of the scorer's keep probability backward (BPDA), so attacks can steer the
  selection.
- ``gumbel`` (training): keep / drop drawn by hard Gumbel-softmax on the scorer's log-probabilities, as the
  paper trains; the masked forward carries the gradient to the scorers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from miarobust.models.adaptive import AdaptiveVisionTransformer
from miarobust.models.flops import VitDims, block_macs
from miarobust.models.gates import GateMode, straight_through, uniform_like
from miarobust.models.mia_former import masked_block
from miarobust.models.vit import ARCHS, create_vit, fmnist_cfg, imagenet_cfg


class TokenScorer(nn.Module):
    """DynamicViT's prediction module: per patch token, log-probabilities of (keep, drop).

    Local features: the first half of a projected token; global: the mean of the second half over the tokens
    still kept; both feed an MLP (dim -> dim/2 -> dim/4 -> 2).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2))

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) patch tokens; policy (B, N, 1): 1 where still kept (None: all) -> (B, N, 2) log-probs."""
        z = self.in_conv(x)
        half = z.shape[-1] // 2
        local, glob = z[..., :half], z[..., half:]
        if policy is None:
            pooled = glob.mean(1, keepdim=True)
        else:
            pooled = (glob * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True).clamp_min(1e-6)
        return F.log_softmax(self.out_conv(torch.cat([local, pooled.expand_as(local)], -1)), -1)

    @staticmethod
    def macs(dim: int, tokens: int) -> int:
        """MACs of scoring `tokens` patch tokens (the linear layers)."""
        return tokens * (dim * dim + dim * (dim // 2) + (dim // 2) * (dim // 4) + (dim // 4) * 2)


class DynamicRecord:
    """The decisions of one forward: `macs` (B,); `keep` (B, stages, N) the patch tokens kept after each stage
    (cumulative, bool); `decisions`: per stage (B, N) the 0/1 keep decisions as computed, with their gradient in
    the masked forward (Gumbel or straight-through), for the ratio loss; empty in the gathered forward."""

    def __init__(self, macs: torch.Tensor, keep: torch.Tensor | None, decisions: list[torch.Tensor]):
        self.macs, self.keep, self.decisions = macs, keep, decisions


class DynamicViT(AdaptiveVisionTransformer):
    """timm's VisionTransformer with DynamicViT's token scorers; see the module docstring.

    Args (beyond timm's): keep_ratio rho (per stage of the original patch tokens: rho, rho^2, ...); prune_at:
    the blocks before which a stage prunes (default: depth/4, depth/2, 3 depth/4 as in the paper); gate_mode.
    """

    NAME, FIXED_SIZE = "DynamicViT", "keeps a fixed number of tokens per stage"  # models/adaptive.py
    GATE_MODES = (GateMode.FULL, GateMode.DETERMINISTIC)
    VARIABLE_COMPUTE = False

    def __init__(self, *args: Any, keep_ratio: float = 0.7, prune_at: tuple[int, ...] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], not {keep_ratio}")
        depth = len(self.blocks)
        # the paper's three stages at a quarter, half and three quarters of the depth (fewer in a shallower ViT)
        default = tuple(sorted({depth * s // 4 for s in (1, 2, 3)} - {0}))
        self.prune_at = tuple(prune_at) if prune_at is not None else default
        if sorted(set(self.prune_at)) != list(self.prune_at) or not all(0 < b < depth for b in self.prune_at):
            raise ValueError(f"prune_at must be increasing block indices in 1..{depth - 1}, not {self.prune_at}")
        self.controller = nn.ModuleList(TokenScorer(self.embed_dim) for _ in self.prune_at)
        # the keep ratio is the scorers' setting: saved with them, so a checkpoint evaluates at the ratio it was
        # trained for (a static checkpoint lacks it: the constructor's stays)
        self.controller.register_buffer("keep_ratio", torch.tensor(float(keep_ratio)))
        self.last: DynamicRecord | None = None

    @property
    def keep_ratio(self) -> float:
        return round(float(self.controller.keep_ratio), 4)  # the buffer's float32 (or bf16) rounding undone

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        if not 0 < value <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], not {value}")
        self.controller.keep_ratio.fill_(float(value))

    def kept_counts(self) -> list[int]:
        """Patch tokens kept after each stage: int(N rho^s), at least 1."""
        n = self.patch_embed.num_patches
        rho = self.keep_ratio
        return [max(1, int(n * rho ** (s + 1) + 1e-9)) for s in range(len(self.prune_at))]

    def macs_per_image(self, full: bool = False, scorers: bool = True) -> int:
        """MACs of one image: patch embedding, every block on its stage's tokens, the scorers (unless `scorers` is
        False: the paper's GMACs leave them out), the head; `full`: the static model's."""
        dims = VitDims.of(self)
        if full:
            tokens = [dims.tokens] * dims.depth
        else:
            counts, tokens, n = self.kept_counts(), [], dims.num_patches
            for b in range(dims.depth):
                if b in self.prune_at:
                    n = counts[self.prune_at.index(b)]
                tokens.append(n + 1)
        # the scorer before block b reads the patch tokens entering it: those block b - 1 ran on
        scoring = 0 if full or not scorers else sum(TokenScorer.macs(dims.dim, tokens[b - 1] - 1) for b in self.prune_at)
        return int(dims.patch_macs + sum(block_macs(dims, t, dims.num_heads) for t in tokens) + scoring + dims.head_macs)

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        self.check_no_mask(attn_mask, is_causal)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        b = x.shape[0]
        if self.gate_mode is GateMode.FULL:
            self.last = DynamicRecord(x.new_full((b,), float(self.macs_per_image(full=True))), None, [])
            return self.norm(self.blocks(x))
        if self.gate_mode not in (GateMode.DETERMINISTIC, GateMode.GUMBEL):
            raise ValueError(f"DynamicViT has no gate mode '{self.gate_mode.value}': use full or deterministic")
        masked = self.training or self.gate_mode is GateMode.GUMBEL or (self.straight_through and torch.is_grad_enabled())
        x = self._masked(x) if masked else self._gathered(x)
        return self.norm(x)

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        """Every token computed; dropped tokens masked as attention keys; decisions carry gradients."""
        b, n = x.shape[0], x.shape[1] - 1
        policy = x.new_ones(b, n)
        keeps, decisions, counts = [], [], self.kept_counts()
        for i, blk in enumerate(self.blocks):
            if i in self.prune_at:
                s = self.prune_at.index(i)
                logp = self.controller[s](x[:, 1:], policy[..., None])
                p_keep = logp[..., 0].exp()
                if self.gate_mode is GateMode.GUMBEL:
                    hard = _gumbel_keep(logp) * policy
                else:
                    score = logp[..., 0].masked_fill(policy.detach() == 0, float("-inf"))
                    top = score.topk(counts[s], dim=1).indices
                    hard = torch.zeros_like(policy).scatter_(1, top, 1.0)
                    if self.straight_through or self.training:
                        hard = straight_through(hard, p_keep * policy)
                policy = hard
                keeps.append(policy.detach() > 0.5)
                decisions.append(policy)
            x = masked_block(blk, x, torch.cat([policy.new_ones(b, 1), policy], 1))
        self.last = DynamicRecord(x.new_full((b,), float(self.macs_per_image())), torch.stack(keeps, 1), decisions)
        return x

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's inference: each stage gathers its top-k tokens; the dropped ones are not computed."""
        b = x.shape[0]
        counts, keeps = self.kept_counts(), []
        index = torch.arange(x.shape[1] - 1, device=x.device).expand(b, -1)  # original positions of the kept tokens
        for i, blk in enumerate(self.blocks):
            if i in self.prune_at:
                s = self.prune_at.index(i)
                logp = self.controller[s](x[:, 1:])
                top = logp[..., 0].topk(counts[s], dim=1).indices.sort(1).values  # original order
                x = torch.cat([x[:, :1], x[:, 1:].gather(1, top[..., None].expand(-1, -1, x.shape[-1]))], 1)
                index = index.gather(1, top)
                keeps.append(torch.zeros(b, self.patch_embed.num_patches, dtype=torch.bool, device=x.device)
                             .scatter_(1, index, True))
            x = blk(x)
        self.last = DynamicRecord(x.new_full((b,), float(self.macs_per_image())), torch.stack(keeps, 1), [])
        return x


def _gumbel_keep(logp: torch.Tensor) -> torch.Tensor:
    """Hard Gumbel-softmax keep decisions from (B, N, 2) log-probabilities, straight-through: the draws of
    gates.uniform_like, so ranks of a distributed training draw what one process draws."""
    u = uniform_like(logp).clamp(1e-10, 1 - 1e-10)
    soft = (logp - (-u.log()).log()).softmax(-1)[..., 0]
    return straight_through((soft.detach() > 0.5).to(soft.dtype), soft)


def _dynamicvit(variant: str, arch: str, cfg: Any, pretrained: bool, kwargs: dict[str, Any]) -> DynamicViT:
    return create_vit(DynamicViT, variant, cfg, pretrained, **{**ARCHS[arch], **kwargs})


@register_model
def dynamicvit_deit_t(pretrained: bool = False, **kwargs: Any) -> DynamicViT:
    """DynamicViT on DeiT-Tiny (keep_ratio 0.7 by default)."""
    return _dynamicvit("dynamicvit_deit_t", "deit_t", imagenet_cfg(), pretrained, kwargs)


@register_model
def dynamicvit_deit_s(pretrained: bool = False, **kwargs: Any) -> DynamicViT:
    """DynamicViT on DeiT-Small (the paper's main model; keep_ratio 0.7: 2.9 GMACs without the scorers)."""
    return _dynamicvit("dynamicvit_deit_s", "deit_s", imagenet_cfg(), pretrained, kwargs)


@register_model
def dynamicvit_deit_b(pretrained: bool = False, **kwargs: Any) -> DynamicViT:
    """DynamicViT on DeiT-Base."""
    return _dynamicvit("dynamicvit_deit_b", "deit_b", imagenet_cfg(), pretrained, kwargs)


@register_model
def dynamicvit_vit_fmnist(pretrained: bool = False, **kwargs: Any) -> DynamicViT:
    """DynamicViT on vit_fmnist (6 blocks: stages before blocks 1, 3 and 4). Default weights
    `dynamicvit_vit_fmnist_b05`: trained for half the static model's MACs (keep ratio 0.57)."""
    return _dynamicvit("dynamicvit_vit_fmnist", "vit_fmnist", fmnist_cfg("dynamicvit_vit_fmnist_b05.safetensors"),
                       pretrained, kwargs)
