"""Training throughput: `miarobust train` against a plain timm/torch training loop of the same model, batch and
precision, and the data loader against the training step it feeds.

1. Images per second of one epoch on the 256 synthetic images: `miarobust train --model deit_s` (log.csv's
   img_per_s: the epoch's training, its evaluation left out) against a plain loop (timm model, AdamW, label-smoothed
   cross-entropy, backward, gradients clipped at norm 5 as miarobust's recipe does, step) on the same images, batch
   and thread count: what miarobust's loop adds (sharding, autocast and scaler calls, the schedule, metrics, the
   progress bar); and `miarobust train --model
   mia_deit_s --budget 0.7` (the controller's Gumbel forward, the REINFORCE half, the teacher) against the same
   plain loop: MIA-Former's training overhead. The runs alternate, --reps times, and the medians are compared.
   On the CPU the DeiTs run at --img-size (a random DeiT-S of that size, saved as the --init of every run).
2. The loader: images per second of an ImageFolder of JPEGs (--jpegs images, 320x240, decoded, DeiT's training
   augmentation, 224 px) at 0, 1 and 2 workers, against the images per second of a plain DeiT-S training step at
   224 px: the loader is not the bottleneck where it delivers more.

    python benchmarks/bench_train.py [--img-size 64] [--batch-size 16] [--reps 3] [--threads 2] [--jpegs 256]
        [--amp off] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


def miarobust_train(args: argparse.Namespace, model: str, init: Path, out: Path, *extra: str) -> float:
    """Images per second of one `miarobust train` epoch (log.csv)."""
    cmd = [sys.executable, "-m", "miarobust", "train", "--model", model, "--init", str(init), "--data", "synthetic",
           "--epochs", "1", "--batch-size", str(args.batch_size), "--device", args.device, "--amp", args.amp,
           "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return float(pd.read_csv(out / "log.csv")["img_per_s"].iloc[-1])


def plain_train(args: argparse.Namespace, init: Path) -> float:
    """Images per second of the same epoch in a plain timm/torch loop."""
    from miarobust.data import Geometry, load_dataset
    from miarobust.models import create
    from miarobust.models.normalize import Normalized

    device = torch.device(args.device)
    backbone = create("deit_s", checkpoint=str(init))
    model = Normalized(backbone).to(device).train()
    data = load_dataset("synthetic", Geometry.of(backbone), split="train")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen, started = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # the same recipe as miarobust's: clipped at 5
        opt.step()
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def write_jpegs(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        base = (np.sin(xx / (7 + i % 13)) + np.cos(yy / (5 + i % 11))) * 60 + 128
        img = np.clip(base[..., None] + rng.normal(0, 12, (240, 320, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"c{i % 2}" / f"{i}.jpg", quality=90)


def loader_rate(root: Path, workers: int, batch_size: int) -> float:
    from miarobust.data import Geometry, load_dataset

    data = load_dataset("folder", Geometry(3, 224, 224), root=str(root), split="train", augment=True)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    seen, started = 0, time.perf_counter()
    for x, _ in loader:
        seen += len(x)
    return seen / (time.perf_counter() - started)


def step_rate_224(args: argparse.Namespace, steps: int = 3) -> float:
    """Images per second of a plain DeiT-S training step at 224 px (random weights and images)."""
    from miarobust.models import create

    device = torch.device(args.device)
    model = create("deit_s", pretrained=False).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    x, y = torch.rand(args.batch_size, 3, 224, 224, device=device), torch.randint(0, 1000, (args.batch_size,), device=device)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return args.batch_size / statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jpegs", type=int, default=256)
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    from miarobust.models import create

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        init = work / f"deit_s_{args.img_size}.safetensors"
        save_file({k: v.contiguous() for k, v in create("deit_s", pretrained=False, img_size=args.img_size).state_dict().items()},
                  str(init))
        rates: dict[str, list[float]] = {"miarobust train deit_s": [], "plain timm/torch loop": [],
                                         "miarobust train mia_deit_s (budget 0.7)": []}
        for r in range(args.reps):
            rates["miarobust train deit_s"].append(miarobust_train(args, "deit_s", init, work / f"s{r}"))
            rates["plain timm/torch loop"].append(plain_train(args, init))
            rates["miarobust train mia_deit_s (budget 0.7)"].append(
                miarobust_train(args, "mia_deit_s", init, work / f"m{r}", "--budget", "0.7"))
            print(f"round {r + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        plain = med["plain timm/torch loop"]
        print(f"\n{args.device}, {args.threads} thread(s), DeiT-S at {args.img_size} px, batch {args.batch_size}, amp "
              f"{args.amp}, 256 synthetic images per epoch, median of {args.reps} alternating runs\n")
        print("| training | img/s (median) | runs | ratio to the plain loop |")
        print("|---|---|---|---|")
        for k, v in rates.items():
            print(f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} | {med[k] / plain:.3f} |")
        root = work / "jpegs"
        write_jpegs(root, args.jpegs)
        need = step_rate_224(args)
        print(f"\nloader: {args.jpegs} JPEGs 320x240 -> DeiT's training augmentation at 224 px, batch {args.batch_size}; "
              f"a plain DeiT-S training step at 224 px takes {need:.1f} img/s\n")
        print("| workers | loader img/s | loader / training step |")
        print("|---|---|---|")
        for w in (0, 1, 2):
            rate = loader_rate(root, w, args.batch_size)
            print(f"| {w} | {rate:.1f} | {rate / need:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
