"""A-ViT: adaptive tokens by per-token halting (adaptive computation time).

Yin et al., "A-ViT: Adaptive Tokens for Efficient Vision Transformer", CVPR 2022 (arXiv 2112.07658; its first
arXiv title was "AdaViT", which is another paper: Meng et al., CVPR 2022). Written from the paper (its code is
under a non-commercial licence). After every block each patch token reads a halting score from one channel of
its own embedding, h = sigmoid(gamma * t[e] + beta), and accumulates it; a token halts once its cumulative
score reaches 1 - eps: it leaves the computation (later blocks neither update it nor attend to it) and keeps
its last value. The class token runs every block and classifies. No parameter is added: a static checkpoint is
an A-ViT checkpoint, and training (ponder loss, a prior on the halting depth) teaches the network to use the
halting channel. Compute varies per image.

Execution reuses MIA-Former's blocks (`MIABlock`) with every block and head kept and the running tokens as
token gates: ``full`` (no halting) is timm's own forward, exactly the static model; ``deterministic`` halts by
the rule above. Without a gradient to the halting decisions halted tokens are not computed (sliced). With
`straight_through` (or in training) the masked reference forward runs and the hard "still running" gate carries
the gradient of its relaxation, the remaining halting mass clamp(1 - cumulative h, 0, 1) (BPDA), so an attack
can delay or hasten halting.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import nn

from miarobust.models.adaptive import AdaptiveVisionTransformer
from miarobust.models.flops import VitDims, block_macs
from miarobust.models.gates import GateMode, straight_through
from miarobust.models.mia_former import MIABlock
from miarobust.models.vit import ARCHS, create_vit, fmnist_cfg, imagenet_cfg


class HaltRecord:
    """The latest forward: `macs` (B,) per image; `running` (B, L, N) the patch tokens each block computed;
    `halting` (B, L, N) the halting scores h; `ponder` (B,) the mean ponder cost (halting depth + remainder)."""

    def __init__(self, macs: torch.Tensor, running: torch.Tensor, halting: torch.Tensor, ponder: torch.Tensor):
        self.macs, self.running, self.halting, self.ponder = macs, running, halting, ponder


class AViT(AdaptiveVisionTransformer):
    """timm's VisionTransformer with A-ViT's token halting; see the module docstring.

    Args (beyond timm's): gamma, beta (the halting score's scale and offset; beta -10 starts with almost no
    halting, the static model), eps (a token halts at cumulative h >= 1 - eps), channel (the embedding channel
    read), gate_mode. gamma, beta and eps are kept as buffers under `controller`, so a trained checkpoint carries
    them.
    """

    NAME, CLASS_TOKEN = "A-ViT", "classifies from the class token, which never halts"  # models/adaptive.py
    GATE_MODES = (GateMode.FULL, GateMode.DETERMINISTIC)
    VARIABLE_COMPUTE = True

    def __init__(self, *args: Any, gamma: float = 10.0, beta: float = -10.0, eps: float = 0.01, channel: int = 0,
                 **kwargs: Any):
        super().__init__(*args, block_fn=MIABlock, **kwargs)
        if not 0 < eps < 1 or not 0 <= channel < self.embed_dim:
            raise ValueError(f"eps must be in (0, 1) and channel in 0..{self.embed_dim - 1}")
        self.controller = nn.Module()
        for name, value in (("gamma", gamma), ("beta", beta), ("eps", eps)):
            self.controller.register_buffer(name, torch.tensor(float(value)))
        self.channel = channel
        self.last: HaltRecord | None = None

    def halting_score(self, x: torch.Tensor) -> torch.Tensor:
        """h of every patch token of x (B, N, D): (B, N - 1)."""
        c = self.controller
        return torch.sigmoid(c.gamma * x[:, 1:, self.channel] + c.beta)

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        self.check_no_mask(attn_mask, is_causal)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        dims = VitDims.of(self)
        b, n = x.shape[0], x.shape[1] - 1
        if self.gate_mode is GateMode.FULL:
            ones = x.new_ones(b, dims.depth, n)
            self.last = HaltRecord(self._macs(dims, ones), ones, x.new_zeros(b, dims.depth, n), x.new_full((b,), float(dims.depth)))
            return self.norm(self.blocks(x))
        if self.gate_mode is not GateMode.DETERMINISTIC:
            raise ValueError(f"A-ViT has no gate mode '{self.gate_mode.value}': use full or deterministic")
        masked = self.training or (self.straight_through and torch.is_grad_enabled())
        eps = float(self.controller.eps)
        cumulative = x.new_zeros(b, n)  # sum of h over the blocks each token ran
        ponder = x.new_zeros(b, n)
        one, heads = x.new_ones(b), x.new_ones(b, dims.num_heads)
        running_all, halting_all = [], []
        running = x.new_ones(b, n)
        for i, blk in enumerate(self.blocks):
            gates = torch.cat([x.new_ones(b, 1), running], 1)
            x = blk.forward_masked(x, one, heads, gates) if masked else blk.forward_sliced(x, one, heads, gates)
            h = self.halting_score(x) if i + 1 < len(self.blocks) else x.new_ones(b, n)  # the last block halts all
            alive = running.detach() > 0.5
            h = h * alive
            running_all.append(running)
            halting_all.append(h)
            total = cumulative + h
            halts = alive & (total >= 1 - eps)
            # ponder cost: blocks run, plus the remainder 1 - cumulative at the halting block (A-ViT's rho)
            ponder = ponder + alive.to(x.dtype) + torch.where(halts, 1 - cumulative, torch.zeros_like(h))
            cumulative = torch.where(alive, total, cumulative)
            hard = (alive & ~halts).to(x.dtype)
            running = straight_through(hard, (1 - cumulative).clamp(0, 1)) if masked else hard
        run = torch.stack(running_all, 1)
        self.last = HaltRecord(self._macs(dims, run), run, torch.stack(halting_all, 1), ponder.mean(1))
        return self.norm(x)

    def _macs(self, dims: VitDims, running: torch.Tensor) -> torch.Tensor:
        """(B,) MACs from the running patch tokens per block (B, L, N) (differentiable in them)."""
        per_block = block_macs(dims, running.sum(-1) + dims.num_prefix, dims.num_heads)
        return dims.patch_macs + dims.head_macs + per_block.sum(-1)


def _avit(variant: str, arch: str, cfg: Any, pretrained: bool, kwargs: dict[str, Any]) -> AViT:
    return create_vit(AViT, variant, cfg, pretrained, **{**ARCHS[arch], **kwargs})


@register_model
def avit_deit_t(pretrained: bool = False, **kwargs: Any) -> AViT:
    """A-ViT on DeiT-Tiny (the paper's main model)."""
    return _avit("avit_deit_t", "deit_t", imagenet_cfg(), pretrained, kwargs)


@register_model
def avit_deit_s(pretrained: bool = False, **kwargs: Any) -> AViT:
    """A-ViT on DeiT-Small."""
    return _avit("avit_deit_s", "deit_s", imagenet_cfg(), pretrained, kwargs)


@register_model
def avit_deit_b(pretrained: bool = False, **kwargs: Any) -> AViT:
    """A-ViT on DeiT-Base."""
    return _avit("avit_deit_b", "deit_b", imagenet_cfg(), pretrained, kwargs)


@register_model
def avit_vit_fmnist(pretrained: bool = False, **kwargs: Any) -> AViT:
    """A-ViT on vit_fmnist; default weights `avit_vit_fmnist_b05`, trained for half the static model's MACs (it runs at
    0.56 of them)."""
    return _avit("avit_vit_fmnist", "vit_fmnist", fmnist_cfg("avit_vit_fmnist_b05.safetensors"), pretrained, kwargs)
