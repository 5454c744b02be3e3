"""MIA-Former: a timm VisionTransformer with a multi-grained input-adaptive controller.

Yu et al., "MIA-Former: Efficient and Robust Vision Transformers via Multi-grained Input-Adaptation",
AAAI 2022 (arXiv 2112.11542). Before every block a low-cost decision head looks at the block's input and
decides, per image, (a) whether the block runs, (b) which attention heads run, (c) which tokens the block
processes. The CLS token always runs; a token left out passes through the block unchanged.

No code was published; this implementation follows ToMe's way of changing a timm ViT (subclass the
model and block, add no parameters to the backbone), so a timm DeiT state dict loads with
``load_state_dict(sd, strict=False)`` and only the ``controller.*`` keys are missing.

Execution, chosen per forward:
- ``full`` gate mode runs timm's own blocks: bit-for-bit the static model.
- masked execution (training, straight-through attacks): dense compute, gates multiply head outputs and
  token updates and mask attention keys, so gradients reach the gates.
- sliced execution (inference with hard gates): skipped blocks, heads and tokens are not computed. Samples
  with the block on are gathered, kept tokens are gathered (padded to the batch's longest, masked as keys),
  head weights are sliced when the batch shares one head pattern (always at batch 1; else dropped heads
  are zeroed), and results are scattered back. Per-image MACs are those of the image's own sub-model,
  i.e. what batch-1 inference executes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from miarobust.models.flops import VitDims, mia_macs, static_macs
from miarobust.models.gates import GateMode, sample_gates, straight_through
from miarobust.models.vit import ARCHS, create_vit, fmnist_cfg, imagenet_cfg


@dataclass
class GateRecord:
    """The decisions of one forward pass, per image. Values may carry straight-through gradients.

    blocks: (B, L); heads: (B, L, H); tokens: (B, L, N) with prefix tokens always 1;
    log_prob: (B,) log-probability of the drawn decisions that mattered (REINFORCE's log pi);
    macs: (B,) MACs of the executed structure, controller included;
    probs: (blocks, heads, tokens) probabilities sigmoid(logit) of the same shapes, or None (full mode).
    """

    blocks: torch.Tensor
    heads: torch.Tensor
    tokens: torch.Tensor
    log_prob: torch.Tensor
    macs: torch.Tensor
    probs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def threshold_macs(self, dims: VitDims) -> torch.Tensor:
        """(B,) MACs of the deterministic (p > 0.5) decisions along this forward's path, with sigmoid
        gradients (straight-through): lets training hold the deterministic cost to a budget too."""
        hard = [straight_through((p.detach() > 0.5).to(p.dtype), p) for p in self.probs]
        return mia_macs(dims, *hard)

    def kept(self) -> dict[str, torch.Tensor]:
        """Per image: share of blocks run, of heads and of tokens kept inside the blocks that ran."""
        on = self.blocks.detach()
        runs = on.sum(1).clamp(min=1)
        return {
            "blocks": on.mean(1),
            "heads": (self.heads.detach().mean(-1) * on).sum(1) / runs,
            "tokens": (self.tokens.detach().mean(-1) * on).sum(1) / runs,
        }


class DecisionHead(nn.Module):
    """The controller of one block: logits for running the block, each head, and each patch token.

    Cost per image: dim * (1 + num_heads) for the block and head decisions (from the CLS token) plus
    num_patches * dim for the token decisions. Biases start at `init_bias` so every gate starts open.
    """

    def __init__(self, dim: int, num_heads: int, init_bias: float = 3.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.block = nn.Linear(dim, 1)
        self.heads = nn.Linear(dim, num_heads)
        self.tokens = nn.Linear(dim, 1)
        for lin in (self.block, self.heads, self.tokens):
            nn.init.trunc_normal_(lin.weight, std=0.01)
            nn.init.constant_(lin.bias, init_bias)

    def forward(self, x: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, D) -> block logits (B,), head logits (B, H), patch-token logits (B, N - num_prefix)."""
        z = self.norm(x)
        cls = z[:, 0]
        return self.block(cls).squeeze(-1), self.heads(cls), self.tokens(z[:, num_prefix:]).squeeze(-1)


class MIABlock(Block):
    """timm's Block with two gated forwards; its own `forward` stays timm's (used by the full mode)."""

    def _check(self) -> None:
        if not isinstance(self.attn.norm, nn.Identity) or getattr(self.attn, "gate", None) is not None:
            raise NotImplementedError("MIA-Former gates do not support attention scale-norm or gated attention")

    def forward_masked(self, x: torch.Tensor, blk: torch.Tensor, heads: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Dense forward with gates as multipliers. x (B, N, D); blk (B,); heads (B, H); tokens (B, N)."""
        self._check()
        a = self.attn
        b, n, d = x.shape
        qkv = a.qkv(self.norm1(x)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        # softmax over the kept keys only, written so the key gates receive a gradient (DynamicViT's form)
        w = (q * a.scale @ k.transpose(-2, -1)).softmax(-1) * tokens[:, None, None, :]
        w = a.attn_drop(w / w.sum(-1, keepdim=True))
        o = (w @ v) * heads[:, :, None, None]
        o = a.proj_drop(a.proj(o.transpose(1, 2).reshape(b, n, a.attn_dim)))
        update = (blk[:, None] * tokens)[..., None]
        x = x + update * self.drop_path1(self.ls1(o))
        return x + update * self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _attention(self, h: torch.Tensor, keep: torch.Tensor, key_mask: torch.Tensor | None,
                   head_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the heads `keep` (indices) only, with q/k/v and proj weights sliced. h (B, M, D).

        head_mask (B, len(keep)), if given, zeroes heads per sample (mixed head patterns in one batch).
        """
        a = self.attn
        b, m, d = h.shape
        hk = keep.numel()
        if hk == 0:
            bias = a.proj.bias if a.proj.bias is not None else h.new_zeros(d)
            return bias.expand(b, m, d)
        full = hk == a.num_heads
        w_qkv = a.qkv.weight if full else a.qkv.weight.view(3, a.num_heads, a.head_dim, d)[:, keep].reshape(-1, d)
        b_qkv = a.qkv.bias
        if b_qkv is not None and not full:
            b_qkv = b_qkv.view(3, a.num_heads, a.head_dim)[:, keep].reshape(-1)
        q, k, v = F.linear(h, w_qkv, b_qkv).reshape(b, m, 3, hk, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        if a.fused_attn:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        else:
            s = q * a.scale @ k.transpose(-2, -1)
            if key_mask is not None:
                s = s.masked_fill(~key_mask, float("-inf"))
            o = s.softmax(-1) @ v
        if head_mask is not None:
            o = o * head_mask[:, :, None, None].to(o.dtype)
        w_proj = a.proj.weight if full else a.proj.weight.view(d, a.num_heads, a.head_dim)[:, keep].reshape(d, -1)
        return F.linear(o.transpose(1, 2).reshape(b, m, hk * a.head_dim), w_proj, a.proj.bias)

    def forward_sliced(self, x: torch.Tensor, blk: torch.Tensor, heads: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Forward that computes only what the hard 0/1 gates keep; differentiable in x."""
        self._check()
        on = blk > 0.5
        every = bool(on.all())
        if not every and not bool(on.any()):
            return x
        active = None if every else on.nonzero().squeeze(1)
        xa = x if every else x[active]
        keep_tok = (tokens if every else tokens[active]) > 0.5
        keep_head = (heads if every else heads[active]) > 0.5
        b, n, d = xa.shape
        counts = keep_tok.sum(1)
        m = int(counts.max())
        if m == n:  # some image keeps every token: no gather (the others' dropped tokens are masked as keys)
            order, valid, index, xt = None, keep_tok, None, xa
        else:  # kept tokens first, in their original order; the batch's longest set decides the length m
            order = torch.argsort((~keep_tok).to(torch.int8), dim=1, stable=True)[:, :m]
            valid = keep_tok.gather(1, order)
            index = order[..., None].expand(-1, -1, d)
            xt = xa.gather(1, index)
        key_mask = None if bool((counts == m).all()) else valid[:, None, None, :]
        h = self.norm1(xt)
        if bool((keep_head == keep_head[:1]).all()):  # one head pattern (always at batch 1): slice the weights
            o = self._attention(h, keep_head[0].nonzero().squeeze(1), key_mask)
        else:  # mixed patterns: all heads in one pass, dropped heads zeroed (per-pattern loops cost more on CPU)
            o = self._attention(h, torch.arange(self.attn.num_heads, device=h.device), key_mask, keep_head)
        y = xt + self.ls1(o)
        y = y + self.ls2(self.mlp(self.norm2(y)))
        if key_mask is not None:  # padding slots hold dropped tokens: leave them unchanged
            y = torch.where(valid[..., None], y, xt)
        ya = y if index is None else xa.scatter(1, index, y)
        return ya if every else x.index_copy(0, active, ya)


class MIAFormer(VisionTransformer):
    """A VisionTransformer with MIA-Former's controller. See the module docstring.

    Args (beyond timm's VisionTransformer):
        gate_mode: 'full' | 'deterministic' | 'stochastic' | 'gumbel' (training); settable later.
        tau: temperature of the Gumbel-sigmoid relaxation.
        controller_bias: initial bias of every decision logit (3.0: gates start open with p = 0.95).
    Attributes:
        straight_through: hard gates carry the gradient of their probability (for BPDA attacks).
        execution: 'auto' (sliced for hard gates without gradient to the gates, else masked), 'masked', 'sliced'.
        last: the GateRecord of the latest forward.
    """

    def __init__(self, *args: Any, gate_mode: str = "deterministic", tau: float = 1.0,
                 controller_bias: float = 3.0, **kwargs: Any):
        super().__init__(*args, block_fn=MIABlock, **kwargs)
        self.controller = nn.ModuleList(
            DecisionHead(self.embed_dim, blk.attn.num_heads, controller_bias) for blk in self.blocks
        )
        self.gate_mode = GateMode.parse(gate_mode)
        self.tau = tau
        self.straight_through = False
        self.execution = "auto"
        self.last: GateRecord | None = None

    def set_gate_mode(self, mode: str | GateMode) -> MIAFormer:
        """Switch how gates are drawn (see gates.GateMode); returns self."""
        self.gate_mode = GateMode.parse(mode)
        return self

    @property
    def dims(self) -> VitDims:
        return VitDims.of(self)

    def _masked(self) -> bool:
        if self.execution != "auto":
            return self.execution == "masked"
        return self.training or self.straight_through or self.gate_mode is GateMode.GUMBEL

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Patch embedding, gated blocks, final norm; records the decisions in `self.last`."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        b = x.shape[0]
        dims = self.dims
        if self.gate_mode is GateMode.FULL:
            x = self.blocks(x)
            ones = x.new_ones
            self.last = GateRecord(ones(b, dims.depth), ones(b, dims.depth, dims.num_heads),
                                   ones(b, dims.depth, dims.tokens), x.new_zeros(b),
                                   x.new_full((b,), float(static_macs(dims))))
            return self.norm(x)
        masked = self._masked()
        prefix = x.new_ones(b, self.num_prefix_tokens)
        blocks, heads, tokens, log_prob = [], [], [], x.new_zeros(b)
        probs: tuple[list[torch.Tensor], ...] = ([], [], [])
        for blk, head in zip(self.blocks, self.controller):
            lb, lh, lt = head(x, self.num_prefix_tokens)
            gb, pb = sample_gates(lb, self.gate_mode, self.straight_through, self.tau)
            gh, ph = sample_gates(lh, self.gate_mode, self.straight_through, self.tau)
            gt, pt = sample_gates(lt, self.gate_mode, self.straight_through, self.tau)
            gt = torch.cat([prefix, gt], 1)
            log_prob = log_prob + pb + (gb.detach() > 0.5) * (ph.sum(1) + pt.sum(1))
            x = (blk.forward_masked if masked else blk.forward_sliced)(x, gb, gh, gt)
            blocks.append(gb), heads.append(gh), tokens.append(gt)
            for acc, p in zip(probs, (torch.sigmoid(lb), torch.sigmoid(lh), torch.cat([prefix, torch.sigmoid(lt)], 1))):
                acc.append(p)
        g_b, g_h, g_t = torch.stack(blocks, 1), torch.stack(heads, 1), torch.stack(tokens, 1)
        self.last = GateRecord(g_b, g_h, g_t, log_prob, mia_macs(dims, g_b, g_h, g_t),
                               tuple(torch.stack(p, 1) for p in probs))
        return self.norm(x)


def _mia(variant: str, arch: str, cfg: Any, pretrained: bool, kwargs: dict[str, Any]) -> MIAFormer:
    return create_vit(MIAFormer, variant, cfg, pretrained, **{**ARCHS[arch], **kwargs})


@register_model
def mia_deit_t(pretrained: bool = False, **kwargs: Any) -> MIAFormer:
    """MIA-Former on DeiT-Tiny."""
    return _mia("mia_deit_t", "deit_t", imagenet_cfg(), pretrained, kwargs)


@register_model
def mia_deit_s(pretrained: bool = False, **kwargs: Any) -> MIAFormer:
    """MIA-Former on DeiT-Small (the paper's main model)."""
    return _mia("mia_deit_s", "deit_s", imagenet_cfg(), pretrained, kwargs)


@register_model
def mia_deit_b(pretrained: bool = False, **kwargs: Any) -> MIAFormer:
    """MIA-Former on DeiT-Base."""
    return _mia("mia_deit_b", "deit_b", imagenet_cfg(), pretrained, kwargs)


@register_model
def mia_vit_fmnist(pretrained: bool = False, **kwargs: Any) -> MIAFormer:
    """MIA-Former on vit_fmnist; shipped weights: trained for a MACs budget of about 0.7 of the static model."""
    return _mia("mia_vit_fmnist", "vit_fmnist", fmnist_cfg("mia_vit_fmnist_b07.safetensors"), pretrained, kwargs)
