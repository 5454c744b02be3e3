"""Accuracy against MACs on the full Fashion-MNIST test set (10,000 images): the static model, MIA-Former's shipped
checkpoints and the dynamic-ViT peers, deterministic inference, one `miarobust run --attack none` per row (resumable;
results under --out).

    python benchmarks/peers_frontier.py [--out results/peers] [--only-table]

A row whose weights are missing (a peer not trained yet) is listed as such, not run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

#: (row, model arguments): every row runs deterministic inference on the whole test set.
ROWS = [
    ("vit_fmnist (static)", ["--model", "vit_fmnist"]),
    ("MIA-Former, latency budget 0.76 (default)", ["--model", "mia_vit_fmnist"]),
    ("MIA-Former, MACs budget 0.7 (b07)", ["--model", "mia_vit_fmnist", "--checkpoint", "mia_vit_fmnist_b07"]),
    ("MIA-Former, MACs budget 0.5 (b05)", ["--model", "mia_vit_fmnist", "--checkpoint", "mia_vit_fmnist_b05"]),
    ("ToMe r = 6 (training-free)", ["--model", "tome_vit_fmnist", "--model-kwargs", "r=6"]),
    ("ToMe r = 8 (training-free)", ["--model", "tome_vit_fmnist", "--model-kwargs", "r=8"]),
    ("EViT keep rate 0.7 (training-free)", ["--model", "evit_vit_fmnist"]),
    ("EViT keep rate 0.5 (training-free)", ["--model", "evit_vit_fmnist", "--model-kwargs", "keep_rate=0.5"]),
    ("DynamicViT, MACs budget 0.5", ["--model", "dynamicvit_vit_fmnist", "--checkpoint", "dynamicvit_vit_fmnist_b05"]),
    ("A-ViT, MACs budget 0.5", ["--model", "avit_vit_fmnist", "--checkpoint", "avit_vit_fmnist_b05"]),
    ("AdaViT, MACs budget 0.5", ["--model", "adavit_vit_fmnist", "--checkpoint", "adavit_vit_fmnist_b05"]),
    ("DynamicViT, MACs budget 0.65", ["--model", "dynamicvit_vit_fmnist", "--checkpoint", "dynamicvit_vit_fmnist_b065"]),
    ("A-ViT, MACs budget 0.65", ["--model", "avit_vit_fmnist", "--checkpoint", "avit_vit_fmnist_b065"]),
    ("AdaViT, MACs budget 0.65", ["--model", "adavit_vit_fmnist", "--checkpoint", "adavit_vit_fmnist_b065"]),
]


def command(argv: list[str], out: str) -> list[str]:
    return ["run", *argv, "--data", "fashion-mnist", "--attack", "none", "--batch-size", "500", "--out", out]


def available(argv: list[str]) -> bool:
    """Whether the row's weights exist (a shipped checkpoint name or the model's own shipped weights)."""
    if "--checkpoint" not in argv:
        return True
    from miarobust.models.vit import shipped_names

    name = argv[argv.index("--checkpoint") + 1]
    return name in shipped_names() or Path(name).is_file()


def find(out: Path, argv: list[str]) -> dict | None:
    """summary.json of the row's run in `out`, matched on model, checkpoint and model arguments."""
    model = argv[argv.index("--model") + 1]
    ckpt = argv[argv.index("--checkpoint") + 1] if "--checkpoint" in argv else None
    kwargs = argv[argv.index("--model-kwargs") + 1] if "--model-kwargs" in argv else ""
    for path in sorted(out.glob("*/summary.json")):
        c = json.loads((path.parent / "config.json").read_text())
        asked = (c.get("requested") or {}).get("checkpoint", c.get("checkpoint"))
        if c["model"] == model and c.get("model_kwargs", "") == kwargs and (asked or None) == ckpt:
            return json.loads(path.read_text())
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/peers")
    ap.add_argument("--only-table", action="store_true", help="run nothing, read the runs")
    args = ap.parse_args()
    for _, argv in ROWS:
        if not args.only_table and available(argv):
            cmd = command(argv, args.out)
            print("$ miarobust", shlex.join(cmd), flush=True)
            subprocess.run([sys.executable, "-m", "miarobust", *cmd], check=True)
    print("\n| model | top-1 % (95% CI) | mean GMACs | share of static | GMACs p5 / p50 / p95 |")
    print("|---|---|---|---|---|")
    for name, argv in ROWS:
        s = find(Path(args.out), argv)
        if s is None:
            print(f"| {name} | not run ({'no weights yet' if not available(argv) else 'run this script'}) | | | |")
            continue
        c, g = s["clean"], s["gmacs"]
        print(f"| {name} | {100 * c['acc']:.2f} [{100 * c['ci95'][0]:.2f}, {100 * c['ci95'][1]:.2f}] | "
              f"{g['clean_mean']:.5f} | {g['clean_share_of_static']:.3f} | "
              f"{g['clean_p5']:.5f} / {g['clean_p50']:.5f} / {g['clean_p95']:.5f} |")


if __name__ == "__main__":
    main()
