"""DynamicViT's training (Rao et al. 2021), starting from a trained static ViT, with MIA-Former's settings.

Per step, in the Gumbel mode (hard Gumbel-softmax keep / drop per token, the masked forward carrying the
gradient to the scorers):

    CE(student) + w_kd * KL(teacher || student)                       logits distillation
    + RATIO_WEIGHT * mean over stages of (kept share - rho^s)^2       the paper's ratio loss
    + TOKEN_WEIGHT * MSE(student's final patch tokens, teacher's)     on the tokens the last stage keeps

The paper weighs the ratio loss 2, the logits and token distillation 0.5 each (30 epochs on ImageNet). Kept
here: its ratio and token losses and their weights; the logits distillation takes `extra["kd_weight"]`, the
teacher, epochs, optimiser, learning rate and augmentation from the command line, as MIA-Former's training
does, so the two families are trained on the same budget. The keep ratio rho is the one whose MACs come
closest to `--budget` of the static model's (`keep_ratio_for`). The scorers learn at 10x the backbone's rate,
as MIA-Former's controller does. The log records the test accuracy of the top-k inference and its MACs ratio.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from miarobust.models.flops import VitDims, static_macs
from miarobust.models.normalize import Normalized
from miarobust.train.loop import TrainConfig, fit
from miarobust.train.mia import KD_WEIGHT, setup, splits

log = logging.getLogger(__name__)

RATIO_WEIGHT = 2.0
TOKEN_WEIGHT = 0.5


def keep_ratio_for(model: torch.nn.Module, budget: float) -> float:
    """The keep ratio (two decimals, 0.05 to 1) whose MACs share of the static model is closest to `budget`."""
    full = static_macs(VitDims.of(model))
    before = model.keep_ratio
    best, gap = 1.0, float("inf")
    try:
        for k in range(5, 101):
            model.keep_ratio = k / 100
            share = model.macs_per_image() / full
            if abs(share - budget) < gap:
                best, gap = k / 100, abs(share - budget)
    finally:
        model.keep_ratio = before
    return best


@torch.no_grad()
def deterministic_metrics(model: Normalized, data: Any, device: torch.device, full: float,
                          batch_size: int = 500) -> dict[str, float]:
    """Test accuracy of the deterministic inference (DynamicViT's top-k, A-ViT's halting rule) and its mean MACs
    ratio over the test images."""
    net = model.model
    before, training = net.gate_mode, net.training
    net.set_gate_mode("deterministic").eval()
    correct, macs = 0, 0.0
    try:
        for x, y in DataLoader(data, batch_size=batch_size):
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            macs += float(net.last.macs.sum())
    finally:
        net.set_gate_mode(before).train(training)
    return {"test_acc": correct / len(data), "flops_ratio": macs / len(data) / full}


def train_dynamicvit(cfg: TrainConfig) -> None:
    """Train `cfg.model` (a dynamicvit_* model) for MACs budget `cfg.budget` from the static checkpoint `cfg.init`."""
    from miarobust.models import create

    teacher, init, device = setup(cfg, "dynamicvit_")
    backbone = create(cfg.model, checkpoint=init, pretrained=False, gate_mode="gumbel", num_classes=cfg.num_classes,
                      **cfg.model_args())
    from miarobust.models.registry import read_state_dict

    if "controller.keep_ratio" not in read_state_dict(init):  # a static start: rho from the budget
        backbone.keep_ratio = keep_ratio_for(backbone, cfg.budget)
    log.info("keep ratio %.2f: %.3f of the static model's MACs", backbone.keep_ratio,
             backbone.macs_per_image() / static_macs(VitDims.of(backbone)))
    model = Normalized(backbone).to(device)
    full = float(static_macs(VitDims.of(backbone)))
    train_set, test_set = splits(cfg, backbone)
    kd_weight = float(cfg.extra.get("kd_weight", KD_WEIGHT))

    def features(net: Normalized, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = net.model.forward_features((x - net.mean) / net.std)
        return net.model.forward_head(feats), feats[:, 1:]

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        backbone.set_gate_mode("gumbel")
        logits, tokens = features(model, x)
        decisions = backbone.last.decisions
        with torch.no_grad():
            t_logits, t_tokens = features(teacher, x)
        ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        kd = F.kl_div(logits.log_softmax(-1), t_logits.softmax(-1), reduction="batchmean")
        rho = backbone.keep_ratio
        ratio = torch.stack([(d.mean(1) - rho ** (s + 1)).pow(2).mean() for s, d in enumerate(decisions)]).mean()
        kept = decisions[-1].detach()[..., None]
        token = ((tokens - t_tokens).pow(2) * kept).sum() / (kept.sum() * tokens.shape[-1]).clamp_min(1)
        loss = ce + kd_weight * kd + RATIO_WEIGHT * ratio + TOKEN_WEIGHT * token
        shares = [d.detach().mean().item() for d in decisions]
        return loss, {"loss": loss.item(), "train_acc": (logits.argmax(1) == y).float().mean().item(),
                      "train_keep_last": shares[-1], "ratio_loss": ratio.item(), "token_loss": token.item()}

    def evaluate() -> dict[str, float]:
        return {**deterministic_metrics(model, test_set, device, full), "budget": cfg.budget, "keep_ratio": backbone.keep_ratio}

    scorers = [p for n, p in model.named_parameters() if ".controller." in f".{n}"]
    others = [p for n, p in model.named_parameters() if ".controller." not in f".{n}"]
    groups = [{"params": others, "lr": cfg.lr}, {"params": scorers, "lr": cfg.lr * 10, "weight_decay": 0.0}]
    fit(cfg, backbone, groups, train_set, step, evaluate)

