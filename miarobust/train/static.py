"""Supervised training of a static ViT (cross-entropy with label smoothing, AdamW, cosine schedule)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from miarobust.data import Geometry, load_dataset
from miarobust.models.normalize import Normalized
from miarobust.train.loop import TrainConfig, fit


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Dataset, device: torch.device, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` (taking [0, 1] images) on `data`."""
    correct = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / len(data)


def train_static(cfg: TrainConfig) -> None:
    """Train `cfg.model` from scratch (or from cfg.init) on cfg.data; writes the run folder cfg.out."""
    from miarobust.models import create

    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    backbone = create(cfg.model, checkpoint=cfg.init, pretrained=False, num_classes=cfg.num_classes,
                      **cfg.model_args())
    model = Normalized(backbone).to(device)
    geometry = Geometry.of(backbone)
    train_set = load_dataset(cfg.data, geometry, cfg.data_root, "train", augment=cfg.timm_augment)
    test_set = load_dataset(cfg.data, geometry, cfg.data_root, "test")

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        return loss, {"loss": loss.item(), "train_acc": (logits.argmax(1) == y).float().mean().item()}

    fit(cfg, backbone, list(model.parameters()), train_set, step,
        lambda: {"test_acc": accuracy(model, test_set, device)})
