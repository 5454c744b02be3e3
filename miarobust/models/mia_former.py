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
- masked execution (`MIABlock.forward_masked`; training, straight-through attacks): the reference forward.
  Dense compute, gates multiply head outputs and token updates and mask attention keys, so gradients reach
  the gates. This is what a decision means.
- sliced execution (inference with hard gates, mia_exec.py): the same function without the work the gates
  skip. Per-image MACs are those of the image's own sub-model, i.e. what batch-1 inference executes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from miarobust.models.adaptive import AdaptiveVisionTransformer
from miarobust.models.flops import VitDims
from miarobust.models.gates import GateMode, GateRecord, sample_gates
from miarobust.models.mia_exec import SlicedExecution, Uncopied, forward_one_image, norm_args, tree_version
from miarobust.models.vit import ARCHS, create_vit, fmnist_cfg, imagenet_cfg

__all__ = ["DecisionHead", "GateRecord", "MIABlock", "MIAFormer", "mia_deit_b", "mia_deit_s", "mia_deit_t", "mia_vit_fmnist"]


class DecisionHead(Uncopied, nn.Module):
    """The controller of one block: logits for running the block, each head, and each patch token.

    Cost per image: dim * (1 + num_heads) for the block and head decisions (one linear on the CLS token)
    plus num_patches * dim for the token decisions. Biases start at `init_bias` so every gate starts open.
    Checkpoints with the block and head decisions as two linears (`block`, `heads`, an earlier layout) load
    too: their rows are stacked into `cls` on load.
    """

    _caches = ("_args",)

    def __init__(self, dim: int, num_heads: int, init_bias: float = 3.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.cls = nn.Linear(dim, 1 + num_heads)  # row 0: the block; rows 1..H: the heads
        self.tokens = nn.Linear(dim, 1)
        for lin in (self.cls, self.tokens):
            nn.init.trunc_normal_(lin.weight, std=0.01)
            nn.init.constant_(lin.bias, init_bias)
        self._register_load_state_dict_pre_hook(_stack_cls_decisions)

    def forward(self, x: torch.Tensor, num_prefix: int) -> torch.Tensor:
        """x (B, N, D) -> logits (B, 1 + H + N - num_prefix): the block's, each head's, each patch token's."""
        return self.join(*self.parts(x, num_prefix))

    @staticmethod
    def join(cls: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """`parts`' two pieces as one logits row per image, (B, 1 + H + N - num_prefix)."""
        return torch.cat([cls, tokens.squeeze(-1)], 1)

    def parts(self, x: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same logits in two pieces, as computed: (B, 1 + H) from the CLS token, (B, N - num_prefix, 1)
        from the patch tokens (batch-1 inference reads the second only for a block that runs)."""
        norm, cls, tokens = self._memo("_args", tree_version[0], lambda: (  # read once per layer change
            norm_args(self.norm), (self.cls.weight, self.cls.bias), (self.tokens.weight, self.tokens.bias)))
        z = torch.layer_norm(x, *norm)
        return F.linear(z[:, 0], *cls), F.linear(z[:, num_prefix:], *tokens)


def _stack_cls_decisions(state_dict: dict[str, torch.Tensor], prefix: str, *_: Any) -> None:
    """Load hook of DecisionHead: the earlier layout's `block` and `heads` linears become `cls` (rows stacked)."""
    for kind in ("weight", "bias"):
        old = [prefix + "block." + kind, prefix + "heads." + kind]
        if all(k in state_dict for k in old):
            state_dict[prefix + "cls." + kind] = torch.cat([state_dict.pop(k) for k in old])


class MIABlock(SlicedExecution, Uncopied, Block):
    """timm's Block with two gated forwards; its own `forward` stays timm's (used by the full mode)."""

    _caches = ("_plain_cache", "_slices")

    def _check(self) -> None:
        if not isinstance(self.attn.norm, nn.Identity) or getattr(self.attn, "gate", None) is not None:
            raise NotImplementedError("MIA-Former gates do not support attention scale-norm or gated attention")

    def forward_masked(self, x: torch.Tensor, blk: torch.Tensor, heads: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Dense forward with gates as multipliers. x (B, N, D); blk (B,); heads (B, H); tokens (B, N)."""
        self._check()
        return masked_block(self, x, tokens, heads, blk[:, None] * tokens)


def masked_block(blk: Block, x: torch.Tensor, keys: torch.Tensor, heads: torch.Tensor | None = None,
                 update: torch.Tensor | None = None) -> torch.Tensor:
    """A timm pre-norm block with its decisions as multipliers, dense: attention over the kept `keys` (B, N) only,
    the kept `heads` (B, H), and each token's residual updates scaled by `update` (B, N). The softmax over the kept
    keys is the full softmax masked and renormalised (DynamicViT's form), so the key gates receive a gradient."""
    a = blk.attn
    b, n, d = x.shape
    qkv = a.qkv(blk.norm1(x)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    w = (q * a.scale @ k.transpose(-2, -1)).softmax(-1) * keys[:, None, None, :]
    w = a.attn_drop(w / w.sum(-1, keepdim=True))
    o = w @ v
    if heads is not None:
        o = o * heads[:, :, None, None]
    o = a.proj_drop(a.proj(o.transpose(1, 2).reshape(b, n, a.attn_dim)))
    if update is None:
        x = x + blk.drop_path1(blk.ls1(o))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    x = x + update[..., None] * blk.drop_path1(blk.ls1(o))
    return x + update[..., None] * blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


class _GatedSteps(list):
    """One callable per block, in order: the block's decision head draws its gates from the block's input, then
    the block runs on the kept heads and tokens (masked or sliced). A list, so timm's loops over `self.blocks`
    (forward_intermediates: enumerate, slices, checkpoint) run it in the blocks' place. The decisions collect in
    `logits` and `gates`; `record` is the GateRecord once every block ran."""

    def __init__(self, model: MIAFormer, masked: bool):
        super().__init__(partial(self._step, blk, head) for blk, head in zip(model.blocks, model.controller))
        self.model, self.masked = model, masked
        self.logits: list[torch.Tensor] = []  # per block (B, 1 + H + patches): block, head and patch-token logits
        self.gates: list[torch.Tensor] = []  # the gates drawn from them, same layout

    def _step(self, blk: MIABlock, head: DecisionHead, x: torch.Tensor) -> torch.Tensor:
        h, npre = blk.attn.num_heads, self.model.num_prefix_tokens
        lg = head(x, npre)
        g = self.model._draw(lg, h)
        gb, gh, gt = g[:, 0], g[:, 1 : 1 + h], torch.cat([x.new_ones(x.shape[0], npre), g[:, 1 + h :]], 1)
        self.logits.append(lg)
        self.gates.append(g)
        return blk.forward_masked(x, gb, gh, gt) if self.masked else blk.forward_sliced(x, gb, gh, gt)

    @property
    def record(self) -> GateRecord:
        return GateRecord(self.model.dims, self.model.num_prefix_tokens, torch.stack(self.gates, 1),
                          torch.stack(self.logits, 1))


class MIAFormer(Uncopied, AdaptiveVisionTransformer):
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

    NAME, TOKEN_POOL = "MIA-Former", False  # models/adaptive.py
    CLASS_TOKEN = "needs a class token (its decision heads read it, and it is the token that always runs)"
    GATE_MODES = (GateMode.FULL, GateMode.DETERMINISTIC, GateMode.STOCHASTIC)
    VARIABLE_COMPUTE = True

    def __init__(self, *args: Any, tau: float = 1.0, controller_bias: float = 3.0, **kwargs: Any):
        super().__init__(*args, block_fn=MIABlock, **kwargs)
        self.controller = nn.ModuleList(
            DecisionHead(self.embed_dim, blk.attn.num_heads, controller_bias) for blk in self.blocks
        )
        self.tau = tau
        self.execution = "auto"
        self.last: GateRecord | None = None

    _caches = ("_dims_cache",)

    @property
    def dims(self) -> VitDims:
        """The model's dimensions, cached until a layer, parameter or buffer is assigned anywhere
        (`tree_version`: timm's set_input_size and reset_classifier assign some)."""
        return self._memo("_dims_cache", tree_version[0], lambda: VitDims.of(self))

    def clear_caches(self) -> MIAFormer:
        """Drop every cached derivative of the weights (sliced head weights, functional-op arguments). Needed
        only after weights were written through `.data`, which torch's version counters do not see."""
        for module in self.modules():
            if isinstance(module, Uncopied):
                for name in module._caches:
                    module.__dict__.pop(name, None)
        return self

    def _masked(self) -> bool:
        if self.execution != "auto":
            return self.execution == "masked"
        # straight-through gates matter only where a gradient is taken: a forward without autograd (an attack's
        # success check, Square's queries) runs the same hard gates on the faster sliced path
        return self.training or (self.straight_through and torch.is_grad_enabled()) or self.gate_mode is GateMode.GUMBEL

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Patch embedding, gated blocks, final norm; records the decisions in `self.last`."""
        self.check_no_mask(attn_mask, is_causal)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        b = x.shape[0]
        dims = self.dims
        if self.gate_mode is GateMode.FULL:
            x = self.blocks(x)
            self.last = GateRecord(dims, self.num_prefix_tokens, x.new_ones(b, dims.depth, 1 + dims.num_heads
                                                                            + dims.num_patches), None)
            return self.norm(x)
        masked = self._masked()
        if b == 1 and not masked and not torch.is_grad_enabled():
            return self.norm(forward_one_image(self, x, dims))
        steps = self._gated_steps(masked)
        for step in steps:
            x = step(x)
        self.last = steps.record
        return self.norm(x)

    def _gated_steps(self, masked: bool) -> _GatedSteps:
        """The blocks with their decision heads, as one callable per block (see `_GatedSteps`)."""
        return _GatedSteps(self, masked)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """timm's `forward_intermediates` (and so `features_only`) through the gated blocks: each block's output
        is that of the sub-model the gates chose; `self.last` records the decisions when every block ran."""
        timm_loop = VisionTransformer.forward_intermediates  # the base class refuses: MIA-Former's tokens keep their places
        if self.gate_mode is GateMode.FULL:
            return timm_loop(self, x, *args, **kwargs)
        self.check_no_mask(kwargs.get("attn_mask"), kwargs.get("is_causal", False), "forward_intermediates")
        steps = self._gated_steps(self._masked())
        blocks = self._modules["blocks"]
        self._modules["blocks"] = steps  # timm's loop calls each step; no module is registered or replaced
        try:
            out = timm_loop(self, x, *args, **kwargs)
        finally:
            self._modules["blocks"] = blocks
        self.last = steps.record if len(steps.logits) == len(blocks) else None
        return out

    def _draw(self, lg: torch.Tensor, num_heads: int) -> torch.Tensor:
        """Gates from one block's logits (B, 1 + H + patches), by the gate mode."""
        mode, st, tau = self.gate_mode, self.straight_through, self.tau
        if mode in (GateMode.STOCHASTIC, GateMode.GUMBEL):  # draws per kind: block, heads, tokens (fixed stream)
            parts = ((0, 1), (1, 1 + num_heads), (1 + num_heads, None))
            return torch.cat([sample_gates(lg[:, a:z], mode, st, tau) for a, z in parts], 1)
        return sample_gates(lg, mode, st, tau)


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
    """MIA-Former on vit_fmnist. Default weights: trained for 0.76 of the static model's batch-1 time (0.64 of its
    MACs, 0.69 of its time); also shipped: `mia_vit_fmnist_b07` and `_b05`, trained for 0.7 and 0.5 of its MACs."""
    return _mia("mia_vit_fmnist", "vit_fmnist", fmnist_cfg("mia_vit_fmnist_lat076.safetensors"), pretrained, kwargs)
