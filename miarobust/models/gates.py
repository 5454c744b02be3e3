"""Gate sampling for MIA-Former's decisions (skip a block, keep a head, keep a token).

A gate is a value per decision in {0, 1} in the forward pass. How it is drawn is the `GateMode`:

- ``full``: every gate open; the model is the static backbone.
- ``deterministic``: open where sigmoid(logit) > 0.5 (the efficient-inference setting).
- ``stochastic``: open with probability sigmoid(logit), drawn afresh on every forward (the setting of
  MIA-Former's robustness claim, Yu et al. 2022, arXiv 2112.11542). Never keyed on ``model.training``:
  torchattacks switches models to eval() during an attack, which must not change the model attacked.
- ``gumbel``: training only; Gumbel-sigmoid relaxation (Jang et al. 2017; Maddison et al. 2017) with
  temperature tau, hard in the forward pass and straight-through in the backward pass (as in AdaViT).

With ``straight_through`` the hard gates of the deterministic and stochastic modes carry the gradient of
their probability (Bengio et al. 2013, BPDA of Athalye et al. 2018), so an attack can steer the sub-model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cached_property

import torch

from miarobust.models.flops import VitDims, mia_macs, static_macs
from miarobust.values import GateMode  # noqa: F401  (the modes, re-exported for the models)

# (rank, world) while a distributed training step runs (train/ranks.py): random draws are the global batch's
_shard: tuple[int, int] = (0, 1)


@contextlib.contextmanager
def sharded(r: int, w: int) -> Iterator[None]:
    """Within the block, random draws of a batch dimension are those of the global batch's shard r of w."""
    global _shard
    before, _shard = _shard, (r, w)
    try:
        yield
    finally:
        _shard = before


def uniform_like(t: torch.Tensor) -> torch.Tensor:
    """torch.rand_like(t) for this rank's shard of the global batch: the global draw, sliced (dim 0 is the batch)."""
    r, w = _shard
    if w == 1:
        return torch.rand_like(t)
    full = torch.rand((t.shape[0] * w, *t.shape[1:]), dtype=t.dtype, device=t.device)
    return full[r * t.shape[0] : (r + 1) * t.shape[0]]


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """`hard` in the forward pass, the gradient of `soft` in the backward pass."""
    return hard + soft - soft.detach()


def sample_gates(logits: torch.Tensor, mode: GateMode, st: bool = False, tau: float = 1.0) -> torch.Tensor:
    """Gates of the same shape as `logits`, values in {0, 1} in the forward pass (see the module docstring)."""
    if mode is GateMode.FULL:
        return torch.ones_like(logits)
    if mode is GateMode.DETERMINISTIC:
        hard = (logits > 0).to(logits.dtype)
        return straight_through(hard, torch.sigmoid(logits)) if st else hard
    if mode is GateMode.STOCHASTIC:
        prob = torch.sigmoid(logits)
        hard = (uniform_like(prob) < prob.detach()).to(logits.dtype)
        return straight_through(hard, prob) if st else hard
    # GUMBEL: logistic noise = difference of two Gumbels; hard by threshold, ST through the relaxation
    u = uniform_like(logits).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    return straight_through((soft.detach() > 0.5).to(logits.dtype), soft)


def log_prob(logits: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability of the drawn `gates` under Bernoulli(sigmoid(logits)): REINFORCE's log pi."""
    # log sigmoid(l) if open, log sigmoid(-l) if closed; stable for large |l|
    return torch.nn.functional.logsigmoid(torch.where(gates.detach() > 0.5, logits, -logits))


class GateRecord:
    """The decisions of one forward pass, per image. Values may carry straight-through gradients.

    Holds the per-block gates and the logits they were drawn from, (B, L, 1 + H + patches) each: the
    block's, each head's and each patch token's. The fields below are derived when first read, so a
    forward whose caller reads none of them (latency-bound inference) does not pay for them.

    blocks: (B, L); heads: (B, L, H); tokens: (B, L, N) with prefix tokens always 1;
    log_prob: (B,) log-probability of the drawn decisions that mattered (REINFORCE's log pi);
    macs: (B,) MACs of the executed structure, controller included;
    probs: (blocks, heads, tokens) probabilities sigmoid(logit) of the same shapes, or None (full mode).
    """

    def __init__(self, dims: VitDims, num_prefix: int, gates: torch.Tensor, logits: torch.Tensor | None):
        """logits None: the full mode (every gate open, no controller run: the static model's MACs)."""
        self.dims, self.num_prefix, self.gates, self.logits = dims, num_prefix, gates, logits

    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.dims.num_heads
        patches = t[..., 1 + h :]
        prefix = patches.new_ones(*patches.shape[:-1], self.num_prefix)
        return t[..., 0], t[..., 1 : 1 + h], torch.cat([prefix, patches], -1)

    @cached_property
    def _gates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._split(self.gates)

    @property
    def blocks(self) -> torch.Tensor:
        return self._gates[0]

    @property
    def heads(self) -> torch.Tensor:
        return self._gates[1]

    @property
    def tokens(self) -> torch.Tensor:
        return self._gates[2]

    @cached_property
    def log_prob(self) -> torch.Tensor:
        if self.logits is None:
            return self.gates.new_zeros(self.gates.shape[0])
        # the block decision, and the head and token decisions of the blocks that ran
        lp = log_prob(self.logits, self.gates)
        return (lp[..., 0] + (self.blocks.detach() > 0.5) * lp[..., 1:].sum(-1)).sum(1)

    @cached_property
    def macs(self) -> torch.Tensor:
        if self.logits is None:
            return self.gates.new_full(self.gates.shape[:1], float(static_macs(self.dims)))
        return mia_macs(self.dims, self.blocks, self.heads, self.tokens)

    @cached_property
    def probs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        return None if self.logits is None else self._split(torch.sigmoid(self.logits))

    def threshold_gates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(blocks, heads, tokens) of the deterministic (p > 0.5) decisions along this forward's path, with
        sigmoid gradients (straight-through): lets training hold the deterministic cost to a budget too."""
        return tuple(straight_through((p.detach() > 0.5).to(p.dtype), p) for p in self.probs)

    def kept(self) -> dict[str, torch.Tensor]:
        """Per image: share of blocks run, of heads and of tokens kept inside the blocks that ran."""
        on = self.blocks.detach()
        runs = on.sum(1).clamp(min=1)
        return {
            "blocks": on.mean(1),
            "heads": (self.heads.detach().mean(-1) * on).sum(1) / runs,
            "tokens": (self.tokens.detach().mean(-1) * on).sum(1) / runs,
        }
