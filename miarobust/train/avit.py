"""A-ViT's halting training (Yin et al. 2022), written from the paper, starting from a trained static ViT with
MIA-Former's settings.

Per step, the masked forward with hard halting decisions that carry the gradient of the remaining halting mass
(models/avit.py), and

    CE(student) + w_kd * KL(teacher || student)                       logits distillation
    + PONDER_WEIGHT * mean ponder cost                                 the paper's ponder loss: per token the
                                                                       blocks it ran plus its remainder at halting
    + PRIOR_WEIGHT * KL(halting distribution || prior)                 the paper's distributional prior

The halting distribution is the batch's mean halting score per block, normalised over the blocks; the prior is a
Gaussian over block indices (standard deviation PRIOR_STD blocks) centred at the halting depth whose MACs come
closest to `--budget` of the static model's (`target_depth`), so the budget is met through the prior, as the paper
sets its target depth. The paper's weights (5e-4 ponder, 0.1 prior) are kept; the logits distillation takes
`extra["kd_weight"]`, and the teacher, epochs, optimiser, learning rate and augmentation come from the command line
as for MIA-Former and DynamicViT, so every family trains on the same budget. The halting scale gamma and offset
beta are the model's (buffers under `controller`, saved with the weights). The log records the test accuracy of the
deterministic inference and its mean MACs ratio.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from miarobust.models.flops import VitDims, block_macs, static_macs
from miarobust.models.normalize import Normalized
from miarobust.train.dynamicvit import deterministic_metrics
from miarobust.train.loop import TrainConfig, fit
from miarobust.train.mia import KD_WEIGHT, setup, splits

log = logging.getLogger(__name__)

PONDER_WEIGHT = 5e-4
PRIOR_WEIGHT = 0.1
PRIOR_STD = 1.0


def target_depth(dims: VitDims, budget: float) -> float:
    """The mean number of blocks a patch token runs (fractional, 1 to depth) whose MACs share of the static model is
    closest to `budget`: every patch token running that many blocks, the class token all of them."""
    full = static_macs(dims)
    best, gap = float(dims.depth), float("inf")
    for k in range(10, 10 * dims.depth + 1):
        d = k / 10
        running = torch.tensor([[dims.num_patches * min(1.0, max(0.0, d - i)) for i in range(dims.depth)]])
        per_block = block_macs(dims, running + dims.num_prefix, dims.num_heads)
        share = float(dims.patch_macs + dims.head_macs + per_block.sum()) / full
        if abs(share - budget) < gap:
            best, gap = d, abs(share - budget)
    return best


def depth_prior(depth: int, target: float, std: float = PRIOR_STD) -> torch.Tensor:
    """A Gaussian over the blocks 1..depth centred at `target`, normalised: the halting depth the prior asks for."""
    return log_depth_prior(depth, target, std).exp()


def log_depth_prior(depth: int, target: float, std: float = PRIOR_STD) -> torch.Tensor:
    """log of `depth_prior`, computed in log space: finite on deep models where far blocks' prior underflows."""
    blocks = torch.arange(1, depth + 1, dtype=torch.float64)
    logp = -0.5 * ((blocks - target) / std) ** 2
    return (logp - torch.logsumexp(logp, 0)).float()


def train_avit(cfg: TrainConfig) -> None:
    """Train `cfg.model` (an avit_* model) for MACs budget `cfg.budget` from the static checkpoint `cfg.init`."""
    from miarobust.models import create

    teacher, init, device = setup(cfg, "avit_")
    backbone = create(cfg.model, checkpoint=init, pretrained=False, gate_mode="deterministic",
                      num_classes=cfg.num_classes, **cfg.model_args())
    dims = VitDims.of(backbone)
    target = target_depth(dims, cfg.budget)
    log_prior = log_depth_prior(dims.depth, target).to(device)
    log.info("A-ViT: target halting depth %.1f of %d blocks for budget %.2f", target, dims.depth, cfg.budget)
    model = Normalized(backbone).to(device)
    full = float(static_macs(dims))
    train_set, test_set = splits(cfg, backbone)
    kd_weight = float(cfg.extra.get("kd_weight", KD_WEIGHT))

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(x)  # training mode: the masked forward, halting straight-through (models/avit.py)
        rec = backbone.last
        with torch.no_grad():
            soft = teacher(x).softmax(-1)
        ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        kd = F.kl_div(logits.log_softmax(-1), soft, reduction="batchmean")
        ponder = rec.ponder.mean()
        per_block = rec.halting.float().mean((0, 2))  # (L,) the batch's mean halting score per block
        halting = per_block / per_block.sum().clamp_min(1e-12)
        prior_kl = (halting * (halting.clamp_min(1e-12).log() - log_prior)).sum()
        loss = ce + kd_weight * kd + PONDER_WEIGHT * ponder + PRIOR_WEIGHT * prior_kl
        depth = rec.running.detach().sum(1).mean()  # blocks a patch token ran, on average
        return loss, {"loss": loss.item(), "train_acc": (logits.argmax(1) == y).float().mean().item(),
                      "ponder": ponder.item(), "prior_kl": prior_kl.item(), "train_depth": depth.item(),
                      "train_ratio": (rec.macs.detach().mean() / full).item()}

    def evaluate() -> dict[str, float]:
        return {**deterministic_metrics(model, test_set, device, full), "budget": cfg.budget, "target_depth": target}

    fit(cfg, backbone, list(model.parameters()), train_set, step, evaluate)
