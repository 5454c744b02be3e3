"""Wall time of MIA-Former's sliced execution relative to the static ViT, beside the MACs ratio.

For DeiT-S at 224 the gate decisions are fixed (every image keeps the same blocks, heads and tokens) at
MACs keep ratios of 0.5 and 0.7, in two mixes (see fixed_structure); beside each, a plain ViT of the same
reduced shape (no controller, no gathers) is timed too: the floor that any gating overhead adds to,
since smaller matmuls run at a lower rate than the static model's. For mia_vit_fmnist the trained controller decides per image (deterministic
gates, embedded Fashion-MNIST images), for each shipped checkpoint and each `--checkpoint` (e.g. a
latency-aware one, `miarobust train --cost latency`); beside each, the time ratio that a latency table
(models/latency.py) measured at the start of the part predicts from the same images' decisions, a check of
the table that latency-aware training relies on. Static and MIA forwards are interleaved in one process and the
median of each is compared, so machine drift cancels. Goal: at batch 1, time ratio <= MACs
ratio + 0.10.

    python benchmarks/bench_latency.py [--reps 20] [--threads 2] [--part all|deit|fmnist] [--checkpoint PATH_OR_NAME ...]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import miarobust.models  # noqa: F401
from miarobust.models.flops import VitDims, block_macs, controller_macs, static_macs
from miarobust.models.latency import LatencyTable, fix_controller, timed


def fixed_structure(dims: VitDims, target: float, mix: str) -> tuple[int, int, int]:
    """(blocks run, heads kept, patch tokens kept) with a MACs ratio (controller included) closest to target.

    mix 'all': blocks and heads each keep about target^(1/3) of their number, as a trained controller
    spreads its savings over the three grains (the MACs-trained mia_vit_fmnist_b07 keeps 0.83 of its blocks,
    0.90 of the heads and 0.84 of the tokens at 0.65); 'heads+tokens': every block runs and heads keep about
    sqrt(target). The token count closes the gap in both.
    """
    full = static_macs(dims)
    share = target ** (1 / 3) if mix == "all" else target**0.5
    blocks = dims.depth if mix != "all" else max(1, round(dims.depth * share))
    heads = max(1, round(dims.num_heads * share))

    def ratio(tokens: int) -> float:
        return (dims.patch_macs + dims.head_macs + dims.depth * controller_macs(dims)
                + blocks * block_macs(dims, tokens + dims.num_prefix, heads)) / full

    tokens = min(range(1, dims.num_patches + 1), key=lambda t: abs(ratio(t) - target))
    return blocks, heads, tokens


def dense_equivalent(static: VisionTransformer, blocks: int, heads: int, tokens: int) -> torch.nn.Module:
    """A plain ViT of the reduced shape, with no controller and no gathers: the static model's first
    `blocks` blocks cut to `heads` heads (q/k/v and proj weights sliced once), run on the first `tokens`
    patch tokens. Its time is what the sub-model costs with zero gating overhead."""
    model = copy.deepcopy(static)
    model.blocks = model.blocks[:blocks]
    for blk in model.blocks:
        a = blk.attn
        d, hd = a.qkv.in_features, a.head_dim
        qkv, proj = nn.Linear(d, 3 * heads * hd), nn.Linear(heads * hd, d)
        qkv.weight.data = a.qkv.weight.data.view(3, a.num_heads, hd, d)[:, :heads].reshape(-1, d).clone()
        qkv.bias.data = a.qkv.bias.data.view(3, a.num_heads, hd)[:, :heads].reshape(-1).clone()
        proj.weight.data, proj.bias.data = a.proj.weight.data[:, : heads * hd].clone(), a.proj.bias.data
        a.qkv, a.proj, a.num_heads, a.attn_dim = qkv, proj, heads, heads * hd
    keep = model.num_prefix_tokens + tokens

    def features(x: torch.Tensor, **_: object) -> torch.Tensor:
        x = model._pos_embed(model.patch_embed(x))[:, :keep]
        return model.norm(model.blocks(x))

    model.forward_features = features
    return model.eval()


def compare(static: torch.nn.Module, mia: torch.nn.Module, x: torch.Tensor, reps: int,
            dense: torch.nn.Module | None = None) -> tuple[float, float, float, float]:
    """(static median s, MIA median s, MACs ratio, dense-equivalent median s or nan), interleaved."""
    models = [static, mia] + ([dense] if dense is not None else [])
    with torch.inference_mode():
        for _ in range(2):
            for m in models:
                m(x)
        times: list[list[float]] = [[] for _ in models]
        for _ in range(reps):
            for m, t in zip(models, times):
                t.append(timed(m, x))
        ratio = mia.last.macs.mean().item() / static_macs(VitDims.of(static))
    med = [statistics.median(t) for t in times]
    return med[0], med[1], ratio, med[2] if dense is not None else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (timings CUDA-synchronised)")
    ap.add_argument("--part", choices=["all", "deit", "fmnist"], default="all")
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="mia_vit_fmnist checkpoint (file or shipped name) to time besides the shipped ones "
                    "(repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    rows = []
    static = timm.create_model("deit_s").eval().to(device)
    dims = VitDims.of(static)
    for mix in ("all", "heads+tokens"):
        for target in (0.5, 0.7) if args.part in ("all", "deit") else ():
            mia = timm.create_model("mia_deit_s", gate_mode="deterministic").eval().to(device)
            mia.load_state_dict(static.state_dict(), strict=False)
            structure = fixed_structure(dims, target, mix)
            fix_controller(mia)(*structure)
            dense = dense_equivalent(static, *structure)
            for batch in (1, 64):
                x = torch.randn(batch, 3, 224, 224, device=device)
                ts, tm, ratio, td = compare(static, mia, x, args.reps if batch == 1 else max(3, args.reps // 6), dense)
                rows.append((f"mia_deit_s keep {target}, {mix} (blocks/heads/tokens {structure})", batch, ts, tm, ratio, td,
                             float("nan")))
                print(f"# {rows[-1][0]} batch {batch}: time ratio {tm / ts:.3f}, MACs ratio {ratio:.3f}, "
                      f"dense same-shape ratio {td / ts:.3f}", flush=True)

    from miarobust.data import Geometry, embedded
    from miarobust.models import create

    st = create("vit_fmnist").to(device)
    data = embedded(None, "test", Geometry.of(st))
    images = torch.stack([data[i][0] for i in range(64)]).to(device)
    mean, std = st.pretrained_cfg["mean"][0], st.pretrained_cfg["std"][0]
    checkpoints = [("default: latency budget 0.76, mia_vit_fmnist_lat076", None),
                   ("MACs budget 0.7, mia_vit_fmnist_b07", "mia_vit_fmnist_b07"),
                   ("MACs budget 0.5, mia_vit_fmnist_b05", "mia_vit_fmnist_b05")]
    checkpoints += [(Path(c).name, c) for c in args.checkpoint]
    table = LatencyTable.measure(create("mia_vit_fmnist"), st, device=device) if args.part in ("all", "fmnist") else None
    for label, checkpoint in checkpoints if table is not None else ():
        mia = create("mia_vit_fmnist", checkpoint=checkpoint).to(device)
        for batch in (1, 64):
            predicted = float("nan")
            if batch == 1:  # per-image decisions: average over 16 different images
                res, guesses = [], []
                for i in range(16):
                    res.append(compare(st, mia, (images[i : i + 1] - mean) / std, max(5, args.reps // 2)))
                    guesses.append(table.ratio(mia.last.blocks, mia.last.heads, mia.last.tokens).item())
                ts, tm, ratio = (statistics.mean(r[k] for r in res) for k in range(3))
                predicted = statistics.mean(guesses)
            else:
                ts, tm, ratio, _ = compare(st, mia, (images - mean) / std, args.reps)
            rows.append((f"mia_vit_fmnist ({label}, deterministic)", batch, ts, tm, ratio, float("nan"), predicted))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, threads={args.threads}"
    print(f"{where} reps={args.reps}")
    if table is not None:
        print(f"latency table (mia_vit_fmnist, batch 1): {table}")
    print("| model | batch | static ms | MIA ms | time ratio | MACs ratio | time - MACs | dense same-shape ratio "
          "| predicted time ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, batch, ts, tm, ratio, td, predicted in rows:
        dense = "-" if td != td else f"{td / ts:.3f}"
        guess = "-" if predicted != predicted else f"{predicted:.3f}"
        print(f"| {name} | {batch} | {ts * 1e3:.2f} | {tm * 1e3:.2f} | {tm / ts:.3f} | {ratio:.3f} | {tm / ts - ratio:+.3f} "
              f"| {dense} | {guess} |")


if __name__ == "__main__":
    main()
