"""What MIA-Former's reinforcement-learning half adds, separated from the trainer's revisions and from the training
seed: MIA-Former at MACs budget 0.5 trained by today's trainer (the recipe every peer got: 5 epochs from the shipped
`vit_fmnist`, its outputs as the distillation teacher) at seeds 0 and 1, against AdaViT (the same model and trainer
with the RL half off, `--rl-weight 0`: straight-through Gumbel decisions and a usage loss) at seeds 0 and 1; and
A-ViT, the most accurate model per MAC on the frontier, at a second seed, against its shipped seed 0 and against
MIA-Former's `b07`, whose accuracy it matches at fewer MACs.

    python benchmarks/trainer_seeds.py [--out results/seeds] [--only-table]

Trains what is missing (a row measured in --out already needs no weights; each `miarobust train` resumes its run
folder under runs/, and a finished one returns at once) and
copies each training log (config.json, log.csv, curves.png) to benchmarks/training/<run>, then runs each model without
attack on the full Fashion-MNIST test set (10,000 images, deterministic inference; one resumable `miarobust run` per
row into --out) and prints accuracy, MACs and training time per row and the paired comparisons (exact McNemar,
Holm-adjusted). AdaViT's seed 0 is its shipped checkpoint (`adavit_vit_fmnist_b05`, trained by the same command
at seed 0), as is A-ViT's (`avit_vit_fmnist_b05`; the trainer has changed since only in how the depth prior's log is
computed, the same values on 6 blocks); MIA-Former's shipped `b05` (an earlier trainer revision, no distillation)
is the reference row.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from peers_frontier import find, print_pairs, run_rows, top1  # noqa: E402  (the frontier's runs and paired tests)


def trained(name: str, model: str, seed: int) -> tuple[str, list[str], list[str], str]:
    """A row that `miarobust train` makes: budget 0.5, 5 epochs, `seed`, into runs/<model>-b0.5-seed<seed>."""
    run = f"runs/{model}-b0.5-seed{seed}"
    return (name, ["--model", model, "--budget", "0.5", "--epochs", "5", "--seed", str(seed)],
            ["--model", model, "--checkpoint", f"{run}/model.safetensors"], run)


#: (row, `miarobust train` arguments or None for shipped weights, the row's model arguments, its run folder, whose
#: training log lives in benchmarks/training/<the folder's name>)
TRAINED = [
    ("MIA-Former b05, shipped (earlier trainer, seed 0)", None,
     ["--model", "mia_vit_fmnist", "--checkpoint", "mia_vit_fmnist_b05"], "runs/mia_vit_fmnist-b0.5"),
    trained("MIA-Former b05, today's trainer, seed 0", "mia_vit_fmnist", 0),
    trained("MIA-Former b05, today's trainer, seed 1", "mia_vit_fmnist", 1),
    ("AdaViT b05, seed 0 (shipped)", None,
     ["--model", "adavit_vit_fmnist", "--checkpoint", "adavit_vit_fmnist_b05"], "runs/adavit_vit_fmnist-b0.5"),
    trained("AdaViT b05, seed 1", "adavit_vit_fmnist", 1),
    ("A-ViT b05, seed 0 (shipped)", None,
     ["--model", "avit_vit_fmnist", "--checkpoint", "avit_vit_fmnist_b05"], "runs/avit_vit_fmnist-b0.5"),
    trained("A-ViT b05, seed 1", "avit_vit_fmnist", 1),
    ("MIA-Former b07, shipped", None,
     ["--model", "mia_vit_fmnist", "--checkpoint", "mia_vit_fmnist_b07"], "runs/mia_vit_fmnist-b0.7"),
]
ROWS = [(name, argv) for name, _, argv, _ in TRAINED]
PAIRS = [
    ("AdaViT b05, seed 0 (shipped)", "MIA-Former b05, today's trainer, seed 0"),
    ("AdaViT b05, seed 1", "MIA-Former b05, today's trainer, seed 1"),
    ("MIA-Former b05, today's trainer, seed 1", "MIA-Former b05, today's trainer, seed 0"),
    ("AdaViT b05, seed 1", "AdaViT b05, seed 0 (shipped)"),
    ("MIA-Former b05, today's trainer, seed 0", "MIA-Former b05, shipped (earlier trainer, seed 0)"),
    ("A-ViT b05, seed 1", "A-ViT b05, seed 0 (shipped)"),
    ("A-ViT b05, seed 1", "MIA-Former b07, shipped"),
]


def log_dir(run: str) -> Path:
    return Path("benchmarks/training") / Path(run).name


def train_seconds(run: str) -> float | None:
    """Total training seconds in a run's committed log.csv (None when it has none, or no time column)."""
    log = log_dir(run) / "log.csv"
    frame = pd.read_csv(log) if log.is_file() else None
    return float(frame["train_seconds"].sum()) if frame is not None and "train_seconds" in frame else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/seeds")
    ap.add_argument("--only-table", action="store_true", help="run nothing, read the runs")
    args = ap.parse_args()
    if not args.only_table:
        for _, train, argv, run in TRAINED:
            if train is not None and find(Path(args.out), argv) is None:  # measured already: its weights not needed
                cmd = ["train", *train, "--out", run]
                print("$ miarobust", shlex.join(cmd), flush=True)
                subprocess.run([sys.executable, "-m", "miarobust", *cmd], check=True)
                log_dir(run).mkdir(parents=True, exist_ok=True)
                for name in ("config.json", "log.csv", "curves.png"):
                    shutil.copy2(Path(run) / name, log_dir(run) / name)
        run_rows(ROWS, args.out)
    print("\n| model | top-1 % (95% CI) | share of static MACs | training seconds (one core, shared) |")
    print("|---|---|---|---|")
    for name, _, argv, run in TRAINED:
        s = find(Path(args.out), argv)
        seconds = train_seconds(run)
        took = f"{seconds:.0f}" if seconds is not None else "-"
        if s is None:
            print(f"| {name} | not run | | {took} |")
            continue
        print(f"| {name} | {top1(s)} | {s['gmacs']['clean_share_of_static']:.3f} | {took} |")
    print_pairs(Path(args.out), ROWS, PAIRS)


if __name__ == "__main__":
    main()
