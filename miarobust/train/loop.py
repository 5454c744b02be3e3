"""The epoch loop shared by every trainer: batches, progress bar, evaluation, per-epoch resume, curves.

Per epoch it writes (atomically) into the run folder: `model.safetensors` (weights only), `state.pt`
(optimizer, scheduler, epoch and the trainer's own running values, such as REINFORCE's baseline; tensors
and plain values, loaded with weights_only=True; no RNG state: each epoch reseeds from the seed),
`log.csv` (one row per epoch) and `curves.png`.
"""

from __future__ import annotations

import io
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from miarobust.errors import UserError
from miarobust.results import csv_text, write_bytes, write_files, write_json

log = logging.getLogger(__name__)

Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
Evaluate = Callable[[], dict[str, float]]


@dataclass
class TrainConfig:
    """Arguments of `miarobust train`; what goes into the run folder's config.json."""

    model: str
    data: str = "fashion-mnist"
    data_root: str | None = None
    out: str = "runs/train"
    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.3
    label_smoothing: float = 0.1
    augment: bool = False  # random 2-px shifts and flips of the batch (array data sets)
    timm_augment: bool = False  # DeiT's per-image training augmentation (image-folder data sets; data.DEIT_AUGMENT)
    seed: int = 0
    device: str = "cpu"
    init: str | None = None
    num_classes: int | None = None  # None: the model's own (10 for the Fashion-MNIST models, 1000 for DeiT)
    budget: float | None = None
    amp: str = "off"  # "bf16" | "fp16" | "off": autocast precision of the training steps (resolve_amp)
    accum_steps: int = 1  # micro-batches of batch_size (per rank) whose gradients make one optimizer step
    workers: int = 0  # DataLoader worker processes (persistent, memory pinned for CUDA): deterministic, but the
    # shuffle and augmentation draws interleave differently than in-process, so not the images order of 0
    model_kwargs: str = ""  # more timm model arguments (ToMe's r=8), canonical "k=v,..."; saved with the weights
    extra: dict[str, Any] = field(default_factory=dict)

    def model_args(self) -> dict[str, Any]:
        """model_kwargs as the model's constructor takes them."""
        from miarobust.models.registry import parse_model_kwargs

        return parse_model_kwargs(self.model_kwargs)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random shifts by up to `pad` pixels and horizontal flips, on a batch (B, C, H, W) in [0, 1]."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)
    out = padded[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def plot_curves(frame: pd.DataFrame, path: Path, title: str) -> None:
    """Accuracy (and FLOPs ratio, when logged) per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in ("train_acc", "test_acc") if c in frame]
    extra = [c for c in ("flops_ratio", "flops_ratio_stochastic") if c in frame]
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(10 if extra else 5.5, 4), squeeze=False)
    ax = axes[0, 0]
    for c in cols:
        ax.plot(frame["epoch"], 100 * frame[c], marker="o", label=c.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    if extra:
        ax2 = axes[0, 1]
        for c in extra:
            ax2.plot(frame["epoch"], frame[c], marker="o", label=c.replace("_", " "))
        if "budget" in frame:
            ax2.axhline(frame["budget"].iloc[-1], ls="--", color="grey", label="budget")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("GMACs / static GMACs")
        ax2.grid(alpha=0.3)
        ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def weights_metadata(cfg: TrainConfig, epoch: int) -> dict[str, str]:
    """The safetensors metadata of a trained model.safetensors: its epoch, and the model and model arguments it was
    trained with, which `models.create` builds it with again (registry.saved_model_kwargs)."""
    return {"epoch": str(epoch), "model": cfg.model, **({"model_kwargs": cfg.model_kwargs} if cfg.model_kwargs else {})}


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero, as a factor of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def resolve_amp(amp: str | None, device: torch.device) -> str:
    """The precision `--amp` asks for on `device`: None means bf16 on CUDA, off elsewhere; fp16 needs CUDA."""
    if amp is None:
        return "bf16" if device.type == "cuda" else "off"
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp {amp}: use bf16, fp16 or off.")
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 is for CUDA (with a gradient scaler): use bf16 or off on the CPU.")
    return amp


def optimizer_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, sched: Any, flat: list[torch.nn.Parameter],
                   pending: int, accum_steps: int) -> None:
    """One optimizer step on the gradients of `pending` micro-batches, each backpropagated as loss / accum_steps:
    averaged over the ranks, rescaled to a mean over the window where it was shorter, clipped, stepped."""
    from miarobust.train.ranks import average_gradients

    average_gradients(flat)
    scaler.unscale_(opt)  # clip the true gradients (a no-op without fp16)
    if pending != accum_steps:
        for p in flat:
            if p.grad is not None:
                p.grad.mul_(accum_steps / pending)
    torch.nn.utils.clip_grad_norm_(flat, 5.0)
    scaler.step(opt)
    scaler.update()
    sched.step()
    opt.zero_grad(set_to_none=True)


#: the log's columns that measure the machine, not the training: equal runs differ in these alone
TIMING_COLUMNS = ("train_seconds", "img_per_s")


def without_timing(log: pd.DataFrame) -> pd.DataFrame:
    """A training log without its TIMING_COLUMNS, for comparing what was trained."""
    return log.drop(columns=[c for c in TIMING_COLUMNS if c in log.columns])


def fit(
    cfg: TrainConfig,
    model: torch.nn.Module,
    params: list[torch.nn.Parameter] | list[dict[str, Any]],
    train_set: Dataset,
    step: Step,
    evaluate: Evaluate,
    on_epoch_start: Callable[[int], None] | None = None,
    carried: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Train for cfg.epochs, resuming from cfg.out/state.pt; returns the per-epoch log.

    carried: the trainer's running values that `step` updates in place (plain numbers or None), saved with
    each epoch and restored on resume, so a resumed run continues as if it had not stopped.
    """
    from safetensors.torch import save

    from miarobust.models.gates import sharded
    from miarobust.train.ranks import rank, reduce_sums, shard, world

    out = Path(cfg.out)
    device = torch.device(cfg.device)
    r, w = rank(), world()  # w ranks: global batches of w * cfg.batch_size, rank r takes part r (train/ranks.py)
    classes, outputs = getattr(train_set, "num_classes", None), getattr(model, "num_classes", None)
    if classes is not None and outputs is not None and classes > outputs:
        raise UserError(f"{cfg.data} has {classes} classes but {cfg.model} outputs {outputs}: pass --num-classes {classes}.")
    fused = device.type == "cuda"  # AdamW's fused kernel where there is one
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))
    amp = AMP_DTYPES[resolve_amp(cfg.amp, device)]
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    flat = [p for g in opt.param_groups for p in g["params"]]
    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * w * cfg.accum_steps))
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, warmup))
    rows: list[dict[str, Any]] = []
    start = 0
    state_file = out / "state.pt"
    if state_file.is_file():
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"], strict=True)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            start = int(state["epoch"])
            if carried is not None:
                carried.update(state.get("carried", {}))
            rows = pd.read_csv(out / "log.csv").to_dict("records")[:start]
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot resume from {out} ({e}): delete the folder or choose another --out.") from e
        log.info("resuming %s after epoch %d", out, start)
    if r == 0:
        write_json(out / "config.json", {**asdict(cfg), "ranks": w})
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(start, cfg.epochs):
        gen.manual_seed(cfg.seed * 1000 + epoch)  # the epoch's shuffle and augmentation do not depend on resumes
        torch.manual_seed(cfg.seed * 1000 + epoch)
        random.seed(cfg.seed * 1000 + epoch)  # timm's RandAugment draws from Python's and NumPy's generators
        np.random.seed((cfg.seed * 1000 + epoch) % 2**32)  # NumPy takes 32-bit seeds; --seed goes to 2**63 - 1
        if on_epoch_start:
            on_epoch_start(epoch)
        loader = DataLoader(train_set, batch_size=cfg.batch_size * w, shuffle=True, generator=gen, drop_last=False,
                            num_workers=cfg.workers, persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda")
        model.train()
        sums: dict[str, float] = {}
        seen = 0
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False, disable=r != 0)
        pending = 0  # micro-batches whose gradients wait for the optimizer step
        opt.zero_grad(set_to_none=True)
        for x, y in bar:
            if len(y) < w:  # a last global batch too small to give every rank an image: skipped by all alike
                continue
            x = augment(x, gen) if cfg.augment else x  # the global batch's augmentation, the same on every rank
            x, y = shard(x, r, w).to(device), shard(y, r, w).to(device)
            with sharded(r, w), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, metrics = step(x, y)
            scaler.scale(loss / cfg.accum_steps).backward()
            pending += 1
            if pending == cfg.accum_steps:
                optimizer_step(opt, scaler, sched, flat, pending, cfg.accum_steps)
                pending = 0
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * len(y)
            seen += len(y)
            rate = seen * w / max(time.perf_counter() - started, 1e-9)  # images of the global batch per second
            bar.set_postfix({**{k: f"{v / seen:.3f}" for k, v in sums.items()}, "img/s": f"{rate:.0f}"})
        if pending:  # the epoch's last, shorter window
            optimizer_step(opt, scaler, sched, flat, pending, cfg.accum_steps)
        sums, seen = reduce_sums(sums, seen)
        seconds = time.perf_counter() - started  # the epoch's training, its evaluation left out
        model.eval()
        if r != 0:  # rank 0 evaluates and writes; the others go on to the next epoch's first all-reduce
            rows.append({"epoch": epoch + 1})
            continue
        row = {"epoch": epoch + 1, "lr": sched.get_last_lr()[0], **{k: v / seen for k, v in sums.items()}, **evaluate(),
               "train_seconds": seconds, "img_per_s": seen / max(seconds, 1e-9)}
        rows.append(row)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
        tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"),
                   file=sys.stderr)
        frame = pd.DataFrame(rows)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        buf = io.BytesIO()
        torch.save({"model": weights, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1,
                    "carried": dict(carried or {}), **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {})}, buf)
        # one step: a full disk or a kill leaves the weights, the log and the resume state all of the same epoch
        write_files({out / "model.safetensors": save(weights, metadata=weights_metadata(cfg, epoch + 1)),
                     out / "log.csv": csv_text(frame).encode(), state_file: buf.getvalue()})
        plot_curves(frame, out / "curves.png", f"{cfg.model} on {cfg.data}")
    return pd.DataFrame(rows)
