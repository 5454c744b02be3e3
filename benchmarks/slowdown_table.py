"""The slowdown (energy) attack on the variable-compute models: how much of its MACs savings each gives back.

Cells, each one `miarobust run ... --attack slowdown --eps 8/255 --n 500 --checks on` (resumable; results under
--out): A-ViT and AdaViT (their default weights, MACs budget 0.5) and MIA-Former `b05` at about the same MACs,
`b07` and the default latency-trained `lat076`. The fixed-compute peers (DynamicViT, ToMe, EViT) spend the same
MACs on every input: nothing to slow down. Then a table of the runs found in --out: the MACs share of the static
model clean and under the attack (mean, p5 / p50 / p95), the share of the savings given back, the images that
cost more, the paired difference of the per-image shares (95% interval) and the accuracy.

    python benchmarks/slowdown_table.py [--rows REGEX] [--only-table] [--out results/slowdown]
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd

from miarobust.stats import paired_mean_diff, wilson

sys.path.insert(0, str(Path(__file__).parent))
from peers_frontier import find  # noqa: E402  (a row's run folder, matched the same way)

MIA = ["--model", "mia_vit_fmnist"]
#: (row name, `miarobust run` model arguments).
ROWS = [
    ("A-ViT b05", ["--model", "avit_vit_fmnist"]),
    ("AdaViT b05", ["--model", "adavit_vit_fmnist"]),
    ("MIA-Former b05", [*MIA, "--checkpoint", "mia_vit_fmnist_b05"]),
    ("MIA-Former b07", [*MIA, "--checkpoint", "mia_vit_fmnist_b07"]),
    ("MIA-Former lat076 (default)", MIA),
]


def cell(argv: list[str], out: str) -> list[str]:
    return ["run", *argv, "--attack", "slowdown", "--eps", "8/255", "--n", "500", "--data", "embedded", "--checks",
            "on", "--out", out]


def pct(k: float, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/slowdown")
    ap.add_argument("--rows", default=None, help="regular expression: run only the matching rows")
    ap.add_argument("--only-table", action="store_true", help="run nothing, read the runs")
    args = ap.parse_args()
    if not args.only_table:
        for name, argv in ROWS:
            if args.rows is None or re.search(args.rows, name):
                cmd = cell(argv, args.out)
                print("$ miarobust", shlex.join(cmd), flush=True)
                subprocess.run([sys.executable, "-m", "miarobust", *cmd], check=True)
    print("\n| model | n | MACs share clean (p5 / p50 / p95) | under slowdown 8/255 (p5 / p50 / p95) | savings given "
          "back | images costing more / less | paired increase, points of static MACs | top-1 % clean | top-1 % "
          "under slowdown | checks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, argv in ROWS:
        found = find(Path(args.out), argv, folder=True)
        if found is None:
            print(f"| {name} | not run | | | | | | | | |")
            continue
        s, folder = found
        static = s["gmacs"]["static"]
        d = pd.read_csv(folder / "samples.csv")
        clean, adv = d["clean_gmacs"] / static, d["slowdown_gmacs"] / static
        diff, lo, hi, _ = paired_mean_diff(adv.tolist(), clean.tolist())
        q = lambda v: f"{v.mean():.3f} ({v.quantile(.05):.3f} / {v.median():.3f} / {v.quantile(.95):.3f})"  # noqa: E731
        given = (adv.mean() - clean.mean()) / (1 - clean.mean())
        more, less = int((adv > clean + 1e-12).sum()), int((adv < clean - 1e-12).sum())
        checks = "; ".join(f"{k} {v['status']}" for k, v in s["checks"].items() if v["status"] != "skip")
        n = len(d)
        print(f"| {name} | {n} | {q(clean)} | {q(adv)} | {100 * given:.0f}% | {more} / {less} | "
              f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | {pct(d['clean_correct'].sum(), n)} | "
              f"{pct(d['slowdown_correct'].sum(), n)} | {checks} |")


if __name__ == "__main__":
    main()
