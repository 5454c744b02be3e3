"""MIA-Former's hybrid supervised + reinforcement training, starting from a trained static ViT.

Per step (Yu et al. 2022 train the controller with a hybrid of SL and RL; the losses here are ours):

    SL:  CE(student) + w_kd * KL(teacher || student)
         + w_budget * [(mean cost ratio - budget)^2 + (mean deterministic cost ratio - budget)^2]
         with straight-through Gumbel-sigmoid gates (AdaViT, Meng et al. 2022), dense masked execution; the
         second term (gates p > 0.5 along the same path, sigmoid gradients) keeps deterministic inference,
         which opens every gate with p > 0.5, within the budget too;
    RL:  -(R - b) * log pi(drawn gates),  R = correct - lambda * cost ratio   (REINFORCE, Williams 1992)
         with Bernoulli gates drawn from the controller and b a moving-average baseline.

The cost ratio is the MACs ratio against the static model (`extra["cost"] == "macs"`, the paper's budget), or
with "latency" the predicted batch-1 time ratio of `models.latency.LatencyTable`: measured on the training
device when the run starts (or read from `extra["latency_table"]`) and kept in the run folder as
latency.json, which a resumed run reads back, so one run trains against one table.

The teacher is a static model: `extra["teacher"]`, else the static checkpoint the student starts from,
else the shipped one. The student starts from `init`: a static checkpoint (the controller starts with every
gate open) or an MIA checkpoint of the same model (a further training stage, e.g. with augmentation).
The controller learns at 10x the backbone's rate.
Per epoch the log records, on the test set: deterministic accuracy, its MACs ratio (mean, spread and
percentiles over images), the share of blocks/heads/tokens kept, and stochastic accuracy and ratio.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from miarobust.data import Geometry, load_dataset
from miarobust.errors import UserError
from miarobust.models.flops import VitDims, mia_macs
from miarobust.models.latency import LatencyTable, dims_key
from miarobust.models.normalize import Normalized
from miarobust.train.loop import TrainConfig, fit
from miarobust.train.ranks import batch_mean

log = logging.getLogger(__name__)

KD_WEIGHT = 1.0  # default of extra["kd_weight"]
BUDGET_WEIGHT = 20.0
BASELINE_MOMENTUM = 0.9


@torch.no_grad()
def gated_metrics(model: Normalized, data: Dataset, device: torch.device, full_macs: float, mode: str,
                  table: LatencyTable | None = None, batch_size: int = 500) -> dict[str, float]:
    """Accuracy, MACs ratio statistics and kept shares of an MIA model in `mode` on `data`; with a latency
    table, its mean predicted batch-1 time ratio too."""
    mia = model.model
    before = mia.gate_mode
    mia.set_gate_mode(mode)
    correct, ratios, kept, latency = 0, [], {"blocks": [], "heads": [], "tokens": []}, []
    try:
        for x, y in DataLoader(data, batch_size=batch_size):
            pred = model(x.to(device)).argmax(1).cpu()
            correct += (pred == y).sum().item()
            ratios.append(mia.last.macs.cpu() / full_macs)
            for k, v in mia.last.kept().items():
                kept[k].append(v.cpu())
            if table is not None:
                rec = mia.last
                latency.append(table.ratio(rec.blocks, rec.heads, rec.tokens).cpu())
    finally:
        mia.set_gate_mode(before)
    r = torch.cat(ratios)
    out = {"acc": correct / len(data), "ratio": r.mean().item(), "ratio_std": r.std().item(),
           "ratio_p5": r.quantile(0.05).item(), "ratio_p50": r.quantile(0.5).item(), "ratio_p95": r.quantile(0.95).item()}
    out.update({f"kept_{k}": torch.cat(v).mean().item() for k, v in kept.items()})
    if latency:
        out["latency_ratio"] = torch.cat(latency).mean().item()
    return out


def cost_ratio(cfg: TrainConfig, mia: torch.nn.Module, static: torch.nn.Module, dims: VitDims,
               full_macs: float) -> tuple[Callable[..., torch.Tensor], LatencyTable | None]:
    """The cost the budget and the reward see, as a function of gates (blocks, heads, tokens) -> (B,) ratio
    to the static model, and the latency table behind it (None for MACs)."""
    kind = cfg.extra.get("cost", "macs")
    if kind == "macs":
        return (lambda *gates: mia_macs(dims, *gates) / full_macs), None
    kept = Path(cfg.out) / "latency.json"
    given = cfg.extra.get("latency_table")
    table = LatencyTable.load(given) if given else None
    resumed = kept.is_file()
    if resumed:  # a resumed run trains on against its own table
        own = LatencyTable.load(kept, fix=f"delete it to measure a new one, or start a new --out than {cfg.out}")
        if table is not None and table != own:
            raise UserError(f"{cfg.out} was trained against its own latency.json, not {given}: leave "
                            "--latency-table out to resume, or start a new --out.")
        table = own
    elif table is None:
        table = LatencyTable.measure(mia, static, device=cfg.device)
    key = dims_key(dims)
    if table.model and table.model != key:
        raise UserError(f"the latency table was measured on another model ({table.model}; this one: {key}): "
                        "use a table of this model, or leave --latency-table out to measure one.")
    log.info("latency table: %s", table)
    if not resumed:
        table.save(kept)
    return table.ratio, table


def load_teacher(cfg: TrainConfig, static_name: str) -> tuple[torch.nn.Module, str]:
    """The static teacher (`extra["teacher"]`, else a static `cfg.init`, else the shipped `static_name`) and the
    checkpoint the student starts from (`cfg.init`, a static or an adaptive one, else the teacher's)."""
    from miarobust.models import create
    from miarobust.models.registry import read_state_dict, resolve_checkpoint, weights_file

    init_file = resolve_checkpoint(cfg.init) if cfg.init is not None else None  # a file or a shipped name
    init_is_adaptive = init_file is not None and any(k.startswith("controller.") for k in read_state_dict(init_file))
    teacher_file = cfg.extra.get("teacher") or (None if init_is_adaptive else init_file)
    if teacher_file is None and weights_file(static_name) is None:
        raise UserError(f"{cfg.model} trains from a trained {static_name}, which has no shipped weights: pass "
                        f"--init {static_name}.pth (a timm-format checkpoint), or --teacher with one.")
    # shipped static weights when None
    teacher = create(static_name, checkpoint=teacher_file, num_classes=cfg.num_classes)
    return teacher, init_file or teacher.checkpoint


def setup(cfg: TrainConfig, *prefixes: str) -> tuple[Normalized, str | None, torch.device]:
    """The start of every adaptive family's training: seeds, device, and the frozen teacher (the trained static
    model that `cfg.model` without its family's prefix names) with the weights to start the student from."""
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    static_name = cfg.model
    for prefix in prefixes:
        static_name = static_name.removeprefix(prefix)
    teacher_backbone, init = load_teacher(cfg, static_name)
    teacher = Normalized(teacher_backbone).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, init, device


def splits(cfg: TrainConfig, backbone: torch.nn.Module) -> tuple[Any, Any]:
    """The train and test sets of `cfg.data`, fitted to the model's input."""
    geometry = Geometry.of(backbone)
    return (load_dataset(cfg.data, geometry, cfg.data_root, "train", augment=cfg.timm_augment),
            load_dataset(cfg.data, geometry, cfg.data_root, "test"))


def train_mia(cfg: TrainConfig) -> None:
    """Train `cfg.model` (an mia_* model, or an adavit_* one: the same without RL) at cost budget `cfg.budget` from
    the checkpoint `cfg.init`."""
    from miarobust.models import create
    from miarobust.models.flops import static_macs

    teacher, init, device = setup(cfg, "mia_", "adavit_")
    teacher_backbone = teacher.model
    backbone = create(cfg.model, checkpoint=init, pretrained=False, gate_mode="gumbel", num_classes=cfg.num_classes,
                      **cfg.model_args())
    model = Normalized(backbone).to(device)
    dims = VitDims.of(backbone)
    full = float(static_macs(dims))
    train_set, test_set = splits(cfg, backbone)
    rl_weight = float(cfg.extra.get("rl_weight", 1.0))
    flops_lambda = float(cfg.extra.get("flops_lambda", 1.0))
    kd_weight = float(cfg.extra.get("kd_weight", KD_WEIGHT))
    cost, table = cost_ratio(cfg, backbone, teacher_backbone, dims, full)
    baseline: dict[str, float | None] = {"b": None}  # carried across epochs and resumes by `fit`

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        backbone.set_gate_mode("gumbel")
        logits = model(x)
        rec = backbone.last
        ratio = cost(rec.blocks, rec.heads, rec.tokens)
        det_ratio = cost(*rec.threshold_gates())
        with torch.no_grad():
            soft = teacher(x).softmax(-1)
        ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        kd = F.kl_div(logits.log_softmax(-1), soft, reduction="batchmean")
        # the sampled structure and the deterministic (p > 0.5) one are both held to the budget
        budget = (batch_mean(ratio) - cfg.budget) ** 2 + (batch_mean(det_ratio) - cfg.budget) ** 2  # global batch
        loss = ce + kd_weight * kd + BUDGET_WEIGHT * budget
        metrics = {"loss": loss.item(), "train_acc": (logits.argmax(1) == y).float().mean().item(),
                   "train_ratio": ratio.mean().item(), "train_det_ratio": det_ratio.mean().item()}
        if rl_weight > 0:
            backbone.set_gate_mode("stochastic")
            # every other image: the policy gradient needs fewer samples than the supervised part (on every
            # rank's shard the same images as in one process's global batch)
            half, y_half = x[::2], y[::2]
            rl_logits = model(half)
            rec = backbone.last
            reward = (rl_logits.argmax(1) == y_half).float() - flops_lambda * cost(rec.blocks, rec.heads, rec.tokens).detach()
            mean_reward = batch_mean(reward).item()
            b = mean_reward if baseline["b"] is None else baseline["b"]
            rl = -((reward - b) * rec.log_prob).mean()
            baseline["b"] = BASELINE_MOMENTUM * b + (1 - BASELINE_MOMENTUM) * mean_reward
            loss = loss + rl_weight * rl
            metrics["reward"] = reward.mean().item()
        backbone.set_gate_mode("gumbel")
        return loss, metrics

    def evaluate() -> dict[str, float]:
        det = gated_metrics(model, test_set, device, full, "deterministic", table)
        sto = gated_metrics(model, test_set, device, full, "stochastic", table)
        row = {"test_acc": det["acc"], "flops_ratio": det["ratio"], "budget": cfg.budget}
        row.update({f"det_{k}": v for k, v in det.items() if k not in ("acc", "ratio", "latency_ratio")})
        row.update({"test_acc_stochastic": sto["acc"], "flops_ratio_stochastic": sto["ratio"]})
        if table is not None:
            row.update({"latency_ratio": det["latency_ratio"], "latency_ratio_stochastic": sto["latency_ratio"]})
        return row

    controller = [p for n, p in model.named_parameters() if ".controller." in f".{n}"]
    others = [p for n, p in model.named_parameters() if ".controller." not in f".{n}"]
    groups = [{"params": others, "lr": cfg.lr}, {"params": controller, "lr": cfg.lr * 10, "weight_decay": 0.0}]
    fit(cfg, backbone, groups, train_set, step, evaluate, carried=baseline)
