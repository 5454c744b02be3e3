"""Fine-tuning of the fixed-compute token-reduction peers, ToMe (r tokens merged per block) and EViT (a keep rate of
inattentive tokens fused), from a trained static ViT, with MIA-Former's settings.

Neither peer learns a decision: ToMe's matching and EViT's ranking are computed from the tokens, so fine-tuning
is the backbone's adaptation to running with its mechanism on. Per step:

    CE(student) + w_kd * KL(teacher || student)                       logits distillation

with the teacher, epochs, optimiser, learning rate, augmentation and distillation weight as MIA-Former's and the
other peers' training takes them (ToMe's paper fine-tunes with DeiT's recipe and no distillation, EViT's with
DeiT's distillation: the same recipe for every family is what makes the comparison fair here). The mechanism's
strength is `--budget`, the share of the static model's MACs (the r, or the keep rate in steps of 0.01, whose
MACs come closest), or given outright with `--model-kwargs r=8` / `keep_rate=0.7`; either way it is saved in the
weights' metadata, so the checkpoint runs at it with no other option.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from miarobust.errors import UserError
from miarobust.models.flops import VitDims, static_macs
from miarobust.models.normalize import Normalized
from miarobust.train.loop import TrainConfig, fit

log = logging.getLogger(__name__)

#: The argument that sets each family's strength, and the values `--budget` chooses among.
STRENGTH = {"tome_": ("r", lambda model: range(0, VitDims.of(model).tokens)),
            "evit_": ("keep_rate", lambda model: [k / 100 for k in range(5, 101)])}


def strength_for(model: torch.nn.Module, prefix: str, budget: float) -> int | float:
    """ToMe's r or EViT's keep rate whose MACs share of the static model is closest to `budget` (ties: the
    weaker reduction, which keeps more tokens)."""
    _, values = STRENGTH[prefix]
    full = static_macs(VitDims.of(model))
    macs = {v: model.macs_per_image(v) for v in values(model)}
    return min(macs, key=lambda v: (abs(macs[v] / full - budget), -macs[v]))


def train_fixed(cfg: TrainConfig) -> None:
    """Fine-tune `cfg.model` (a tome_* or evit_* model) from the static checkpoint `cfg.init` (default: the shipped
    static weights of its backbone); writes the run folder cfg.out."""
    from miarobust.models import create
    from miarobust.models.registry import format_model_kwargs
    from miarobust.train.dynamicvit import deterministic_metrics
    from miarobust.train.mia import KD_WEIGHT, setup, splits

    prefix = next(p for p in STRENGTH if cfg.model.startswith(p))
    name, _ = STRENGTH[prefix]
    given = cfg.model_args()
    if cfg.budget is not None and name in given:
        raise UserError(f"--budget chooses {cfg.model}'s {name}; --model-kwargs sets it too: pass one of them.")
    teacher, init, device = setup(cfg, prefix)
    backbone = create(cfg.model, checkpoint=init, pretrained=False, gate_mode="deterministic",
                      num_classes=cfg.num_classes, **given)
    if cfg.budget is not None:
        setattr(backbone, name, strength_for(backbone, prefix, cfg.budget))
    cfg.model_kwargs = format_model_kwargs({**given, name: getattr(backbone, name)})  # saved with the weights
    full = float(static_macs(VitDims.of(backbone)))
    log.info("%s %s = %s: %.3f of the static model's MACs", cfg.model, name, getattr(backbone, name),
             backbone.macs_per_image() / full)
    model = Normalized(backbone).to(device)
    train_set, test_set = splits(cfg, backbone)
    kd_weight = float(cfg.extra.get("kd_weight", KD_WEIGHT))

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(x)
        with torch.no_grad():
            soft = teacher(x).softmax(-1)
        ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        kd = F.kl_div(logits.log_softmax(-1), soft, reduction="batchmean")
        loss = ce + kd_weight * kd
        return loss, {"loss": loss.item(), "kd": kd.item(), "train_acc": (logits.argmax(1) == y).float().mean().item()}

    def evaluate() -> dict[str, Any]:
        budget = {"budget": cfg.budget} if cfg.budget is not None else {}
        return {**deterministic_metrics(model, test_set, device, full), **budget, name: getattr(backbone, name)}

    fit(cfg, backbone, list(model.parameters()), train_set, step, evaluate)
