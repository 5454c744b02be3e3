"""Accuracy against MACs on the full Fashion-MNIST test set (10,000 images): the static model, MIA-Former's shipped
checkpoints and the dynamic-ViT peers, deterministic inference, one `miarobust run --attack none` per row (resumable;
results under --out).

    python benchmarks/peers_frontier.py [--out results/peers] [--only-table]

A row whose weights are missing (a peer not trained yet) is listed as such, not run. Then PAIRS: accuracy paired on
the same images, each peer against the MIA-Former checkpoint nearest its MACs (exact McNemar, Holm-adjusted).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    # ToMe and EViT fine-tuned with their reduction on (the r / keep rate nearest the budget, saved with the weights):
    ("ToMe fine-tuned, MACs budget 0.5", ["--model", "tome_vit_fmnist", "--checkpoint", "tome_vit_fmnist_b05"]),
    ("ToMe fine-tuned, MACs budget 0.65", ["--model", "tome_vit_fmnist", "--checkpoint", "tome_vit_fmnist_b065"]),
    ("EViT fine-tuned, MACs budget 0.5", ["--model", "evit_vit_fmnist", "--checkpoint", "evit_vit_fmnist_b05"]),
    ("EViT fine-tuned, MACs budget 0.65", ["--model", "evit_vit_fmnist", "--checkpoint", "evit_vit_fmnist_b065"]),
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


#: (row a, row b): paired on the same 10,000 images, each peer against the MIA-Former checkpoint nearest its MACs
#: (b05 at 0.49 of the static MACs, the default lat076 at 0.64, b07 at 0.70) and the answers to the paper's claim.
PAIRS = [
    ("DynamicViT, MACs budget 0.5", "MIA-Former, MACs budget 0.5 (b05)"),
    ("AdaViT, MACs budget 0.5", "MIA-Former, MACs budget 0.5 (b05)"),
    ("A-ViT, MACs budget 0.5", "MIA-Former, MACs budget 0.5 (b05)"),
    ("A-ViT, MACs budget 0.5", "MIA-Former, MACs budget 0.7 (b07)"),
    ("A-ViT, MACs budget 0.5", "MIA-Former, latency budget 0.76 (default)"),
    ("AdaViT, MACs budget 0.5", "MIA-Former, MACs budget 0.7 (b07)"),
    ("ToMe r = 6 (training-free)", "MIA-Former, latency budget 0.76 (default)"),
    ("DynamicViT, MACs budget 0.65", "MIA-Former, latency budget 0.76 (default)"),
    ("A-ViT, MACs budget 0.65", "MIA-Former, latency budget 0.76 (default)"),
    ("AdaViT, MACs budget 0.65", "MIA-Former, latency budget 0.76 (default)"),
    ("AdaViT, MACs budget 0.65", "MIA-Former, MACs budget 0.7 (b07)"),
    ("ToMe fine-tuned, MACs budget 0.5", "MIA-Former, MACs budget 0.5 (b05)"),
    ("ToMe fine-tuned, MACs budget 0.65", "MIA-Former, latency budget 0.76 (default)"),
    ("ToMe fine-tuned, MACs budget 0.5", "ToMe r = 8 (training-free)"),
    ("EViT fine-tuned, MACs budget 0.5", "MIA-Former, MACs budget 0.5 (b05)"),
    ("EViT fine-tuned, MACs budget 0.65", "MIA-Former, latency budget 0.76 (default)"),
]


def print_pairs(out: Path, rows_argv: list[tuple[str, list[str]]] | None = None,
                pairs: list[tuple[str, str]] | None = None) -> None:
    """Accuracy differences paired on the same images: discordant counts, exact McNemar (two-sided), Holm-adjusted
    over `pairs` (default PAIRS) of the rows `rows_argv` (default ROWS) run into `out`."""
    import pandas as pd

    from miarobust.stats import holm, mcnemar_p

    argv = dict(rows_argv or ROWS)
    rows = []
    for a, b in pairs or PAIRS:
        found = [find(out, argv[name], folder=True) for name in (a, b)]
        if None in found:
            continue
        (sa, fa), (sb, fb) = found
        both = pd.read_csv(fa / "samples.csv").merge(pd.read_csv(fb / "samples.csv"), on="index", suffixes=("_a", "_b"))
        ca, cb = both["clean_correct_a"], both["clean_correct_b"]
        only_a, only_b = int(((ca == 1) & (cb == 0)).sum()), int(((ca == 0) & (cb == 1)).sum())
        p = mcnemar_p(only_a, only_b)
        share = sa["gmacs"]["clean_share_of_static"], sb["gmacs"]["clean_share_of_static"]
        rows.append((a, b, len(both), 100 * ca.mean(), 100 * cb.mean(), only_a, only_b, share, p))
    if not rows:
        return
    adjusted = holm([r[-1] for r in rows])
    print(f"\nPaired on the same images (exact McNemar, two-sided; Holm over the {len(rows)} comparisons):\n")
    print("| model a | model b | n | top-1 % (a, b) | only a / only b right | MACs share (a, b) | a's MACs against b's | p "
          "| Holm p |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (a, b, n, pa, pb, only_a, only_b, (ma, mb), p), padj in zip(rows, adjusted):
        print(f"| {a} | {b} | {n} | {pa:.2f}, {pb:.2f} | {only_a} / {only_b} | {ma:.3f}, {mb:.3f} | "
              f"{100 * (ma / mb - 1):+.0f}% | {p:.2g} | {padj:.2g} |")


def find_all(out: Path, argv: list[str]) -> list[tuple[dict, Path]]:
    """(summary.json, folder) of each of the row's runs in `out`, matched on model, checkpoint and model arguments,
    in folder order."""
    model = argv[argv.index("--model") + 1]
    ckpt = argv[argv.index("--checkpoint") + 1] if "--checkpoint" in argv else None
    kwargs = argv[argv.index("--model-kwargs") + 1] if "--model-kwargs" in argv else ""
    found = []
    for path in sorted(out.glob("*/summary.json")):
        c = json.loads((path.parent / "config.json").read_text())
        asked = (c.get("requested") or {}).get("checkpoint", c.get("checkpoint"))
        if c["model"] == model and c.get("model_kwargs", "") == kwargs and (asked or None) == ckpt:
            found.append((json.loads(path.read_text()), path.parent))
    return found


def find(out: Path, argv: list[str], folder: bool = False) -> Any:
    """summary.json of the row's (first) run in `out` (with its folder: (summary, folder)); None when the row has
    not run."""
    found = find_all(out, argv)
    if not found:
        return None
    return found[0] if folder else found[0][0]


def top1(summary: dict) -> str:
    """A run's clean top-1 % with its 95% interval, as the tables print it."""
    c = summary["clean"]
    return f"{100 * c['acc']:.2f} [{100 * c['ci95'][0]:.2f}, {100 * c['ci95'][1]:.2f}]"


def run_rows(rows: list[tuple[str, list[str]]], out: str) -> None:
    """One `miarobust run --attack none` per row whose weights exist (each resumes or returns its finished run)."""
    for _, argv in rows:
        if available(argv):
            cmd = command(argv, out)
            print("$ miarobust", shlex.join(cmd), flush=True)
            subprocess.run([sys.executable, "-m", "miarobust", *cmd], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/peers")
    ap.add_argument("--only-table", action="store_true", help="run nothing, read the runs")
    args = ap.parse_args()
    if not args.only_table:
        run_rows(ROWS, args.out)
    print("\n| model | top-1 % (95% CI) | mean GMACs | share of static | GMACs p5 / p50 / p95 |")
    print("|---|---|---|---|---|")
    for name, argv in ROWS:
        s = find(Path(args.out), argv)
        if s is None:
            print(f"| {name} | not run ({'no weights yet' if not available(argv) else 'run this script'}) | | | |")
            continue
        g = s["gmacs"]
        print(f"| {name} | {top1(s)} | {g['clean_mean']:.5f} | {g['clean_share_of_static']:.3f} | "
              f"{g['clean_p5']:.5f} / {g['clean_p50']:.5f} / {g['clean_p95']:.5f} |")
    print_pairs(Path(args.out))


if __name__ == "__main__":
    main()
