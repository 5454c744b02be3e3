"""Wall time of MIA-Former's sliced execution relative to the static ViT, beside the MACs ratio.

For DeiT-S at 224 the gate decisions are fixed (every image keeps the same blocks, heads and tokens) at
MACs keep ratios of 0.5 and 0.7; for mia_vit_fmnist the trained controller decides per image (deterministic
gates, embedded Fashion-MNIST images). Static and MIA forwards are interleaved in one process and the
median of each is compared, so machine drift cancels. Goal (issue 3): at batch 1, time ratio <= MACs
ratio + 0.10.

    python benchmarks/bench_latency.py [--reps 20] [--threads 2] [--part all|deit|fmnist]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import miarobust.models  # noqa: F401
from miarobust.models.flops import VitDims, block_macs, controller_macs, static_macs
from miarobust.models.mia_former import DecisionHead


def fixed_structure(dims: VitDims, target: float) -> tuple[int, int, int]:
    """(blocks run, heads kept, patch tokens kept) with a MACs ratio (controller included) closest to target.

    All blocks run; heads keep about sqrt(target) of their number and the token count closes the gap, so
    the saving mixes head and token dropping.
    """
    full = static_macs(dims)
    heads = max(1, round(dims.num_heads * target**0.5))

    def ratio(tokens: int) -> float:
        return (dims.patch_macs + dims.head_macs + dims.depth * controller_macs(dims)
                + dims.depth * block_macs(dims, tokens + dims.num_prefix, heads)) / full

    tokens = min(range(1, dims.num_patches + 1), key=lambda t: abs(ratio(t) - target))
    return dims.depth, heads, tokens


def fix_controller(model: torch.nn.Module, blocks: int, heads: int, tokens: int) -> None:
    """Make every decision head return the same decisions for every image."""
    dims = VitDims.of(model)

    def forward(self: DecisionHead, x: torch.Tensor, num_prefix: int, i: int = 0):
        b = x.shape[0]
        z = self.norm(x)  # keep the controller's real cost in the timing
        self.block(z[:, 0]), self.heads(z[:, 0]), self.tokens(z[:, num_prefix:])
        big = 50.0
        blk = torch.full((b,), big if self.index < blocks else -big)
        hd = torch.full((b, dims.num_heads), -big)
        hd[:, :heads] = big
        tk = torch.full((b, x.shape[1] - num_prefix), -big)
        tk[:, :tokens] = big
        return blk, hd, tk

    for i, head in enumerate(model.controller):
        head.index = i
        head.forward = forward.__get__(head)


def timed(fn, x: torch.Tensor) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def compare(static: torch.nn.Module, mia: torch.nn.Module, x: torch.Tensor, reps: int) -> tuple[float, float, float]:
    """(static median s, MIA median s, MACs ratio) with interleaved repetitions."""
    with torch.inference_mode():
        for _ in range(2):
            static(x), mia(x)
        ts, tm = [], []
        for _ in range(reps):
            ts.append(timed(static, x))
            tm.append(timed(mia, x))
        ratio = mia.last.macs.mean().item() / static_macs(VitDims.of(static))
    return statistics.median(ts), statistics.median(tm), ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=["all", "deit", "fmnist"], default="all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    static = timm.create_model("deit_s").eval()
    dims = VitDims.of(static)
    for target in (0.5, 0.7) if args.part in ("all", "deit") else ():
        mia = timm.create_model("mia_deit_s", gate_mode="deterministic").eval()
        mia.load_state_dict(static.state_dict(), strict=False)
        structure = fixed_structure(dims, target)
        fix_controller(mia, *structure)
        for batch in (1, 64):
            x = torch.randn(batch, 3, 224, 224)
            ts, tm, ratio = compare(static, mia, x, args.reps if batch == 1 else max(3, args.reps // 6))
            rows.append((f"mia_deit_s keep {target} (blocks/heads/tokens {structure})", batch, ts, tm, ratio))
            print(f"# {rows[-1][0]} batch {batch}: time ratio {tm / ts:.3f}, MACs ratio {ratio:.3f}", flush=True)

    from miarobust.data import Geometry, embedded
    from miarobust.models import create

    st = create("vit_fmnist")
    mia = create("mia_vit_fmnist")
    data = embedded(None, "test", Geometry.of(st))
    images = torch.stack([data[i][0] for i in range(64)])
    mean, std = st.pretrained_cfg["mean"][0], st.pretrained_cfg["std"][0]
    for batch in (1, 64) if args.part in ("all", "fmnist") else ():
        if batch == 1:  # per-image decisions: average over 16 different images
            res = [compare(st, mia, (images[i : i + 1] - mean) / std, max(5, args.reps // 2)) for i in range(16)]
            ts, tm, ratio = (statistics.mean(r[k] for r in res) for k in range(3))
        else:
            ts, tm, ratio = compare(st, mia, (images - mean) / std, args.reps)
        rows.append(("mia_vit_fmnist (trained, deterministic)", batch, ts, tm, ratio))

    print(f"threads={args.threads} reps={args.reps}")
    print("| model | batch | static ms | MIA ms | time ratio | MACs ratio | time - MACs |")
    print("|---|---|---|---|---|---|---|")
    for name, batch, ts, tm, ratio in rows:
        print(f"| {name} | {batch} | {ts * 1e3:.2f} | {tm * 1e3:.2f} | {tm / ts:.3f} | {ratio:.3f} | {tm / ts - ratio:+.3f} |")


if __name__ == "__main__":
    main()
