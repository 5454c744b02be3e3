"""The slowdown (energy) attack on the variable-compute models: how much of its MACs savings each gives back.

Cells, each one `miarobust run ... --attack slowdown --eps 8/255 --n 500 --checks on` (resumable; results under
--out): A-ViT and AdaViT (their default weights, MACs budget 0.5) and MIA-Former `b05` at about the same MACs,
`b07` and the default latency-trained `lat076`. The fixed-compute peers (DynamicViT, ToMe, EViT) spend the same
MACs on every input: nothing to slow down. Then a table of the runs found in --out, each row over all of its
runs (10 PGD steps, and more where check 8 asked for them: `--steps 20`), each image's worst case, the run that
raised its MACs most: the MACs share of the static model clean and under the attack (mean, p5 / p50 / p95), the
share of the savings given back, the images that cost more, the paired difference of the per-image shares (95%
interval), the accuracy, and the checks of the row's run with the most steps.

    python benchmarks/slowdown_table.py [--rows REGEX] [--steps N] [--only-table] [--out results/slowdown]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd

from miarobust.stats import paired_mean_diff, wilson

sys.path.insert(0, str(Path(__file__).parent))
from peers_frontier import find_all  # noqa: E402  (a row's run folders, matched the same way)

MIA = ["--model", "mia_vit_fmnist"]
#: (row name, `miarobust run` model arguments).
ROWS = [
    ("A-ViT b05", ["--model", "avit_vit_fmnist"]),
    ("AdaViT b05", ["--model", "adavit_vit_fmnist"]),
    ("MIA-Former b05", [*MIA, "--checkpoint", "mia_vit_fmnist_b05"]),
    ("MIA-Former b07", [*MIA, "--checkpoint", "mia_vit_fmnist_b07"]),
    ("MIA-Former lat076 (default)", MIA),
]


def cell(argv: list[str], out: str, steps: int = 10) -> list[str]:
    more = ["--steps", str(steps)] if steps != 10 else []
    return ["run", *argv, "--attack", "slowdown", *more, "--eps", "8/255", "--n", "500", "--data", "embedded",
            "--checks", "on", "--out", out]


def worst_case(runs: list[tuple[dict, Path]]) -> pd.DataFrame:
    """index, clean_gmacs, clean_correct and, per image, the slowdown record of the run that raised its MACs most
    (slowdown_gmacs, slowdown_correct), over the images every run covers."""
    frames = [pd.read_csv(folder / "samples.csv").set_index("index") for _, folder in runs]
    common = frames[0].index
    for f in frames[1:]:
        common = common.intersection(f.index)
    gmacs = pd.concat([f.loc[common, "slowdown_gmacs"] for f in frames], axis=1, ignore_index=True)
    pick = gmacs.to_numpy().argmax(1)  # the first run among equals
    correct = pd.concat([f.loc[common, "slowdown_correct"] for f in frames], axis=1, ignore_index=True).to_numpy()
    base = frames[0].loc[common, ["clean_gmacs", "clean_correct"]].copy()
    base["slowdown_gmacs"] = gmacs.to_numpy()[range(len(common)), pick]
    base["slowdown_correct"] = correct[range(len(common)), pick]
    return base.reset_index()


def pct(k: float, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/slowdown")
    ap.add_argument("--rows", default=None, help="regular expression: run only the matching rows")
    ap.add_argument("--steps", type=int, default=10, help="PGD steps of the slowdown attack (check 8 reruns twice as many)")
    ap.add_argument("--only-table", action="store_true", help="run nothing, read the runs")
    args = ap.parse_args()
    if not args.only_table:
        for name, argv in ROWS:
            if args.rows is None or re.search(args.rows, name):
                cmd = cell(argv, args.out, args.steps)
                print("$ miarobust", shlex.join(cmd), flush=True)
                subprocess.run([sys.executable, "-m", "miarobust", *cmd], check=True)
    print("\n| model | n | steps | MACs share clean (p5 / p50 / p95) | under slowdown 8/255 (p5 / p50 / p95) | "
          "savings given back | images costing more / less | paired increase, points of static MACs | top-1 % clean | "
          "top-1 % under slowdown | checks (most steps) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, argv in ROWS:
        found = sorted(((json.loads((f / "config.json").read_text())["steps"], s, f)
                        for s, f in find_all(Path(args.out), argv)), key=lambda t: t[0])
        if not found:
            print(f"| {name} | not run | | | | | | | | | |")
            continue
        runs = [(s, f) for _, s, f in found]
        steps = ", ".join(str(k) for k, _, _ in found)
        s = runs[-1][0]
        static = s["gmacs"]["static"]
        d = worst_case(runs)
        clean, adv = d["clean_gmacs"] / static, d["slowdown_gmacs"] / static
        diff, lo, hi, _ = paired_mean_diff(adv.tolist(), clean.tolist())
        q = lambda v: f"{v.mean():.3f} ({v.quantile(.05):.3f} / {v.median():.3f} / {v.quantile(.95):.3f})"  # noqa: E731
        given = (adv.mean() - clean.mean()) / (1 - clean.mean())
        more, less = int((adv > clean + 1e-12).sum()), int((adv < clean - 1e-12).sum())
        checks = "; ".join(f"{k} {v['status']}" for k, v in s["checks"].items() if v["status"] != "skip")
        n = len(d)
        print(f"| {name} | {n} | {steps} | {q(clean)} | {q(adv)} | {100 * given:.0f}% | {more} / {less} | "
              f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | {pct(d['clean_correct'].sum(), n)} | "
              f"{pct(d['slowdown_correct'].sum(), n)} | {checks} |")


if __name__ == "__main__":
    main()
