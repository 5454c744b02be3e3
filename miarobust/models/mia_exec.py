"""MIA-Former's fast execution paths: what the hard gates of `MIABlock.forward_masked` (the reference, dense
forward: gates as multipliers) mean, computed without the work they skip. tests/test_mia_former.py holds every
path to the reference forward.

- sliced execution (`SlicedExecution.forward_sliced`, inference with hard gates): skipped blocks, heads and
  tokens are not computed. Samples with the block on are gathered, kept tokens are gathered (padded to the
  batch's longest, masked as keys), head weights are sliced when the batch shares one head pattern (always at
  batch 1; else dropped heads are zeroed), and results are scattered back.
- one image without autograd (`forward_one_image`, latency-bound: time is per operation): each block's
  decisions are read out once as Python values and only the kept work is dispatched, on the functional ops of
  a plain block's tensors (`SlicedExecution._plain`).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from functools import cached_property
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import Mlp
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from miarobust.models.flops import VitDims
from miarobust.models.gates import GateMode, GateRecord, sample_gates

# The module tree's version: torch's global registration hooks bump it whenever any module anywhere gets a
# submodule, parameter or buffer assigned, so facts derived from a block's layers (`MIABlock._plain`) can be
# cached on the hot path and still follow a swapped layer.
tree_version = [0]


def _tree_changed(*_: Any) -> None:
    tree_version[0] += 1


for _register in (register_module_module_registration_hook, register_module_parameter_registration_hook,
                  register_module_buffer_registration_hook):
    _register(_tree_changed)


def norm_args(norm: nn.LayerNorm) -> tuple:
    """norm's arguments to torch.layer_norm: norm(x) is torch.layer_norm(x, *norm_args(norm)), without the module call."""
    return norm.normalized_shape, norm.weight, norm.bias, norm.eps


def _long_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """torch.tensor(values) as int64 on `device`, read from a buffer: torch.tensor converts a list element by
    element (20 us for 150 indices on this project's CPU, against 3 us)."""
    idx = torch.frombuffer(array("q", values), dtype=torch.int64)
    return idx if device.type == "cpu" else idx.to(device)


class _Plain(NamedTuple):
    """A plain block's tensors and settings as its functional ops take them (see `MIABlock._plain`)."""

    norm1: tuple
    qkv: tuple[torch.Tensor, torch.Tensor | None]
    proj: tuple[torch.Tensor, torch.Tensor | None]
    norm2: tuple
    fc1: tuple[torch.Tensor, torch.Tensor | None]
    fc2: tuple[torch.Tensor, torch.Tensor | None]
    approximate: str
    num_heads: int
    head_dim: int


def _plain_norm(norm: nn.Module) -> bool:
    """Whether norm(x) is F.layer_norm with its own parameters (torch's LayerNorm, or timm's without fast-norm)."""
    return type(norm) is nn.LayerNorm or (type(norm) is TimmLayerNorm and not norm._fast_norm)


def _cache_key(params: list[torch.Tensor]) -> tuple | None:
    """A key for tensors derived from `params` (storage, version counter, dtype, device: an in-place
    update, a reload or a move changes it), or None where autograd may flow into them (no caching)."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return None
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)


class Uncopied:
    """Pickles and deep copies leave out the caches named in `_caches`: keyed on this process's module
    registrations (`tree_version`) or storage addresses, meaningless in a copy or another process."""

    _caches: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in super().__getstate__().items() if k not in self._caches}

    def _memo(self, name: str, key: Any, derive: Callable[[], Any]) -> Any:
        """The value cached as `name` (one of `_caches`) under `key`, derived anew when the key changed."""
        hit = self.__dict__.get(name)
        if hit is None or hit[0] != key:
            hit = self.__dict__[name] = (key, derive())
        return hit[1]


class SlicedExecution:
    """The sliced forwards of `MIABlock` (a timm Block): the kept heads and tokens only."""

    def _sliced_weights(self, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """q/k/v weight and bias and proj weight of the heads `keep` (indices), copied out of the full ones.

        Without autograd through the weights the slices are cached per head pattern (a few per block, at
        most twice the block's attention weights in memory), keyed on the weights' storage and version
        counter, so an in-place update, a reload or a move invalidates them. A write through `.data`
        bypasses the version counter: after one, call `MIAFormer.clear_caches()`.
        """
        a = self.attn
        d = a.qkv.in_features
        params = [p for p in (a.qkv.weight, a.qkv.bias, a.proj.weight) if p is not None]
        weights = _cache_key(params)
        if weights is not None:
            key = (tuple(keep), weights)
            cache = self.__dict__.setdefault("_slices", {})
            hit = cache.pop(key, None)
            if hit is not None:
                cache[key] = hit  # most recently used last
                return hit
        w_qkv = a.qkv.weight.view(3, a.num_heads, a.head_dim, d)[:, keep].reshape(-1, d)
        b_qkv = a.qkv.bias
        if b_qkv is not None:
            b_qkv = b_qkv.view(3, a.num_heads, a.head_dim)[:, keep].reshape(-1)
        w_proj = a.proj.weight.view(d, a.num_heads, a.head_dim)[:, keep].reshape(d, -1)
        out = (w_qkv, b_qkv, w_proj)
        if weights is not None:
            budget = 2 * sum(p.numel() for p in params)
            cache[key] = out
            while sum(t.numel() for v in cache.values() for t in v if t is not None) > budget:
                cache.pop(next(iter(cache)))
        return out

    def _attention(self, h: torch.Tensor, keep: list[int], key_mask: torch.Tensor | None,
                   head_mask: torch.Tensor | None = None, plain: _Plain | None = None) -> torch.Tensor:
        """Attention of the heads `keep` (indices) only, with q/k/v and proj weights sliced. h (B, M, D).

        head_mask (B, len(keep)), if given, zeroes heads per sample (mixed head patterns in one batch).
        plain: this block's tensors if it is plain (see `_plain`): q_norm and k_norm are identities, not called.
        """
        a = self.attn
        if plain is None:
            nh, hd, (w_qkv, b_qkv), (w_proj, b_proj) = a.num_heads, a.head_dim, (a.qkv.weight, a.qkv.bias), (a.proj.weight, a.proj.bias)
        else:
            nh, hd, (w_qkv, b_qkv), (w_proj, b_proj) = plain.num_heads, plain.head_dim, plain.qkv, plain.proj
        b, m, d = h.shape
        hk = len(keep)
        if hk == 0:
            bias = h.new_zeros(d) if b_proj is None else b_proj if torch.is_grad_enabled() else b_proj.detach()
            return bias.expand(b, m, d)  # detached without autograd: a view of a parameter would require grad
        if hk < nh:
            w_qkv, b_qkv, w_proj = self._sliced_weights(keep)
        q, k, v = F.linear(h, w_qkv, b_qkv).reshape(b, m, 3, hk, hd).permute(2, 0, 3, 1, 4).unbind(0)
        if plain is None:
            q, k = a.q_norm(q), a.k_norm(k)
        if plain is not None or a.fused_attn:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        else:
            s = q * a.scale @ k.transpose(-2, -1)
            if key_mask is not None:
                s = s.masked_fill(~key_mask, float("-inf"))
            o = s.softmax(-1) @ v
        if head_mask is not None:
            o = o * head_mask[:, :, None, None].to(o.dtype)
        return F.linear(o.transpose(1, 2).reshape(b, m, hk * hd), w_proj, b_proj)

    def _run(self, xt: torch.Tensor, keep_head: list[int] | torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """The block on the gathered tokens xt (B, M, D); keep_head: kept head indices shared by the
        batch, or per-image head gates (B, H) as bool."""
        plain = self._plain()
        h = self.norm1(xt) if plain is None else torch.layer_norm(xt, *plain.norm1)
        if isinstance(keep_head, list):  # one pattern: slice the weights
            o = self._attention(h, keep_head, key_mask, plain=plain)
        elif bool((keep_head == keep_head[:1]).all()):  # one pattern in the batch after all
            o = self._attention(h, keep_head[0].nonzero().squeeze(1).tolist(), key_mask, plain=plain)
        else:  # mixed patterns: all heads in one pass, dropped heads zeroed (per-pattern loops cost more on CPU)
            o = self._attention(h, list(range(self.attn.num_heads)), key_mask, keep_head, plain)
        if plain is None:
            y = xt + self.ls1(o)
            return y + self.ls2(self.mlp(self.norm2(y)))
        y = xt + o
        u = F.gelu(F.linear(torch.layer_norm(y, *plain.norm2), *plain.fc1), approximate=plain.approximate)
        return F.linear(u, *plain.fc2).add_(y)  # the linear's output is this call's own tensor

    def _plain(self) -> _Plain | None:
        """This block's tensors if it is timm's plain pre-norm block as run in eval (LayerNorms, GELU MLP, no
        layer scale, no active dropout or drop path), else None. `_run` then calls the functional ops
        directly on them: the same kernels on the same tensors, without a module call per identity or an
        attribute lookup per tensor (at batch 1 on a small model each costs as much as a kernel). Cached
        until a layer, parameter or buffer is assigned anywhere (see `tree_version`), the train/eval mode
        or the attention's `fused_attn` changes; a dropout's rate changed in place while training is not seen.
        Parameters updated in place (an optimiser step, a load) are the same tensors: nothing to refresh."""
        return self._memo("_plain_cache", (tree_version[0], self.training, self.attn.fused_attn), self._derive_plain)

    def _derive_plain(self) -> _Plain | None:
        a, mlp = self.attn, self.mlp
        inactive = [a.attn_drop, a.proj_drop, self.ls1, self.ls2, self.drop_path1, self.drop_path2,
                    a.q_norm, a.k_norm, getattr(mlp, "drop1", None), getattr(mlp, "drop2", None), getattr(mlp, "norm", None)]
        plain = (_plain_norm(self.norm1) and _plain_norm(self.norm2) and type(mlp) is Mlp
                 and type(mlp.act) is nn.GELU and a.fused_attn
                 and all(type(m) is nn.Identity or (type(m) is nn.Dropout and (m.p == 0 or not self.training))
                         for m in inactive))
        if not plain:
            return None
        return _Plain(norm_args(self.norm1), (a.qkv.weight, a.qkv.bias), (a.proj.weight, a.proj.bias),
                      norm_args(self.norm2), (mlp.fc1.weight, mlp.fc1.bias), (mlp.fc2.weight, mlp.fc2.bias),
                      mlp.act.approximate, a.num_heads, a.head_dim)

    def forward_one(self, x: torch.Tensor, heads: list[int], tokens: list[int], inplace: bool = False) -> torch.Tensor:
        """One image x (1, N, D) through the kept heads and tokens only (indices, prefix tokens included):
        the fewest operations, for latency-bound inference. Differentiable in x unless `inplace`, which
        writes the kept tokens' results into x itself (no autograd)."""
        self._check()
        if len(tokens) == x.shape[1]:
            return self._run(x, heads, None)
        rows = x[0]  # (N, D): gathering rows of a matrix is the fast path of index_select / index_copy
        idx = _long_tensor(tokens, x.device)
        y = self._run(rows.index_select(0, idx)[None], heads, None)[0]
        return (rows.index_copy_(0, idx, y) if inplace else rows.index_copy(0, idx, y))[None]

    def forward_sliced(self, x: torch.Tensor, blk: torch.Tensor, heads: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Forward that computes only what the hard 0/1 gates keep; differentiable in x."""
        self._check()
        if x.shape[0] == 1:  # one image (latency-bound): exactly its kept tokens and heads
            if not bool(blk[0] > 0.5):
                return x
            kept = [(g[0] > 0.5).nonzero().squeeze(1).tolist() for g in (heads, tokens)]
            return self.forward_one(x, *kept)
        on = blk > 0.5
        running = int(on.sum())
        if running == 0:
            return x
        every = running == len(on)
        active = None if every else on.nonzero().squeeze(1)
        xa = x if every else x[active]
        keep_tok = (tokens if every else tokens[active]) > 0.5
        keep_head = (heads if every else heads[active]) > 0.5
        b, n, d = xa.shape
        counts = keep_tok.sum(1)
        m = int(counts.max())
        if m == n:  # some image keeps every token: no gather (the others' dropped tokens are masked as keys)
            valid, index, xt = keep_tok, None, xa
        else:  # kept tokens first, in their original order; the batch's longest set decides the length m
            order = torch.argsort((~keep_tok).to(torch.int8), dim=1, stable=True)[:, :m]
            valid = keep_tok.gather(1, order)
            index = order[..., None].expand(-1, -1, d)
            xt = xa.gather(1, index)
        key_mask = None if bool((counts == m).all()) else valid[:, None, None, :]
        y = self._run(xt, keep_head, key_mask)
        if key_mask is not None:  # padding slots hold dropped tokens: leave them unchanged
            y = torch.where(valid[..., None], y, xt)
        ya = y if index is None else xa.scatter(1, index, y)
        return ya if every else x.index_copy(0, active, ya)


class _DeterministicOneRecord(GateRecord):
    """The record of a batch-1 forward with deterministic gates (`MIAFormer._forward_one`): its logits are
    assembled from the decision heads' outputs, and its gates drawn from them, when first read."""

    def __init__(self, dims: VitDims, num_prefix: int, cls: list[torch.Tensor], tokens: list[torch.Tensor]):
        """cls: per block (1, 1 + H) block and head logits; tokens: per block (1, patches, 1)."""
        self.dims, self.num_prefix, self._parts = dims, num_prefix, (cls, tokens)

    @cached_property
    def logits(self) -> torch.Tensor:
        cls, tokens = self._parts
        return torch.cat([torch.stack(cls, 1), torch.stack(tokens, 1).squeeze(-1)], 2)

    @cached_property
    def gates(self) -> torch.Tensor:
        return sample_gates(self.logits, GateMode.DETERMINISTIC)


def forward_one_image(model: Any, x: torch.Tensor, dims: VitDims) -> torch.Tensor:
    """The sliced blocks for one image with no autograd: each block's decisions are read out once as
    Python values, so a block costs its kept work and its decision head, not a batch's tensor
    bookkeeping (at batch 1 time is per operation; the token logits are read only for a block that
    runs). Same logits, gates and RNG stream as the batched path. x is this forward's own tensor: the
    kept tokens' results are written into it in place. Sets `model.last`."""
    h, npre = dims.num_heads, model.num_prefix_tokens
    deterministic = model.gate_mode is GateMode.DETERMINISTIC
    cls: list[torch.Tensor] = []  # deterministic, per block (1, 1 + H): block and head logits
    tok: list[torch.Tensor] = []  # deterministic, per block (1, patches, 1): patch-token logits
    logits: list[torch.Tensor] = []  # stochastic, per block (1, 1 + H + patches), and the gates drawn from them
    gates: list[torch.Tensor] = []
    prefix = list(range(npre))
    for blk, head in zip(model.blocks, model.controller):
        c, t = head.parts(x, npre)
        if deterministic:  # open where the logit is > 0 (the gates are drawn when the record is read)
            cls.append(c)
            tok.append(t)
            values, cut = c.tolist()[0], 0.0
        else:
            logits.append(head.join(c, t))
            gates.append(model._draw(logits[-1], h))
            values, cut = gates[-1].tolist()[0], 0.5
        if values[0] > cut:
            heads = [i for i in range(h) if values[1 + i] > cut]
            patches = t.view(-1).tolist() if deterministic else values[1 + h :]
            tokens = prefix + [npre + i for i, v in enumerate(patches) if v > cut]
            x = blk.forward_one(x, heads, tokens, inplace=True)
    if deterministic:
        model.last = _DeterministicOneRecord(dims, npre, cls, tok)
    else:
        model.last = GateRecord(dims, npre, torch.stack(gates, 1), torch.stack(logits, 1))
    return x
