"""Wall time of every Fashion-MNIST row of the peers' frontier relative to the static ViT, beside its MACs ratio:
MIA-Former's checkpoints and the dynamic-ViT peers, deterministic inference, at batch 1 and batch 64.

Each row's model and the static `vit_fmnist` are timed interleaved in one process on the same embedded images
(batch 1: each of the first --images images in turn; batch 64: the first 64 as one batch), --reps rounds, and the
medians are compared, so the machine's drift cancels. The MACs ratio is the same images' mean executed MACs over
the static model's. A row whose weights are not shipped is listed as such.

    python benchmarks/peers_time.py [--reps 20] [--images 16] [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from peers_frontier import ROWS, available  # noqa: E402  (the frontier's rows, one list)


def build(argv: list[str], device: torch.device) -> torch.nn.Module:
    from miarobust.models import create
    from miarobust.models.normalize import Normalized
    from miarobust.models.registry import parse_model_kwargs

    def arg(flag: str) -> str | None:
        return argv[argv.index(flag) + 1] if flag in argv else None

    model = create(arg("--model"), checkpoint=arg("--checkpoint"), **parse_model_kwargs(arg("--model-kwargs") or ""))
    return Normalized(model).to(device).eval()


@torch.no_grad()
def medians(models: list[torch.nn.Module], batches: list[torch.Tensor], reps: int) -> list[float]:
    """Median seconds of each model's forward over the batches, the models interleaved batch by batch."""
    from miarobust.models.latency import timed

    times: list[list[float]] = [[] for _ in models]
    for m in models:  # warm-up: caches, lazy allocations
        for x in batches[:2]:
            m(x)
    for _ in range(reps):
        for x in batches:
            for i, m in enumerate(models):
                times[i].append(timed(m, x))
    return [statistics.median(t) for t in times]


@torch.no_grad()
def macs_ratio(model: torch.nn.Module, static_macs: float, x: torch.Tensor) -> float:
    from miarobust.models.adaptive import adaptive_core

    model(x)
    core = adaptive_core(model)
    return float(core.last.macs.float().mean()) / static_macs if core is not None else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--images", type=int, default=16, help="images timed one by one at batch 1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from miarobust.data import Geometry, load_dataset
    from miarobust.models.flops import module_macs

    static = build(["--model", "vit_fmnist"], device)
    data = load_dataset("embedded", Geometry.of(static.model))
    images = torch.stack([data[i][0] for i in range(64)]).to(device)
    full = float(module_macs(static.model, (1, 28, 28)))
    print(f"{args.device}, {args.threads} thread(s), median of {args.reps} rounds, embedded Fashion-MNIST images\n")
    print("| model | MACs ratio | batch-1 static ms | batch-1 ms | batch-1 time ratio | batch-64 static ms | "
          "batch-64 ms | batch-64 time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, argv in ROWS[1:]:
        if not available(argv):
            print(f"| {name} | not shipped | | | | | | |")
            continue
        model = build(argv, device)
        ratio = macs_ratio(model, full, images)
        one = medians([static, model], [images[i : i + 1] for i in range(args.images)], args.reps)
        many = medians([static, model], [images], max(3, args.reps // 4))
        print(f"| {name} | {ratio:.3f} | {1e3 * one[0]:.2f} | {1e3 * one[1]:.2f} | {one[1] / one[0]:.3f} | "
              f"{1e3 * many[0]:.1f} | {1e3 * many[1]:.1f} | {many[1] / many[0]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
