"""Does MIA-Former's robustness gain survive adaptive attacks? The robustness grid, as one markdown table.

For each eps, `mia_vit_fmnist` in stochastic mode under non-adaptive PGD, EOT-PGD (K = 1, 4, 16),
BPDA-PGD (straight-through gates, EOT 4), transfer from `vit_fmnist`, (at --aa-rand-n images) autoattack-rand and
(at --aa-eot-n images, if given) standard AutoAttack through EOT over K gate draws (--aa-eot-k, default 4);
beside the same model with deterministic gates (PGD, BPDA-PGD, AutoAttack: is a gain the randomness's or
the weights'?) and the static `vit_fmnist` under PGD and (at --aa-n images) AutoAttack standard. Each cell is one
`miarobust run` (results under --out, resumable); the table is read from the runs' summary.json files.

    python benchmarks/robustness_table.py [--n 1000] [--aa-n 100] [--aa-rand-n 30] [--aa-eot-n 0] [--eval-samples 10]
        [--aa-eot-k 4[,16]] [--eps 1/255,2/255,4/255,8/255] [--checkpoint FILE_OR_NAME] [--out results/grid] [--rows REGEX] [--only-table]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from miarobust.stats import mcnemar_p, paired_mean_diff


def cells(n: int, aa_n: int, aa_rand_n: int, eval_samples: int, aa_eot_n: int = 0,
          checkpoint: str | None = None, aa_eot_ks: tuple[int, ...] = (4,)) -> list[tuple[str, list[str]]]:
    """(row name, `miarobust run` arguments) of every cell at one eps; rows with n = 0 are left out.

    `checkpoint`: the MIA weights (a file or shipped name; None: the model's default weights); `aa_eot_ks`:
    the gate draws K of the standard AutoAttack-through-EOT rows, one row each.
    """
    weights = ["--checkpoint", checkpoint] if checkpoint else []
    mia = ["--model", "mia_vit_fmnist", *weights, "--gate-mode", "stochastic", "--eval-samples", str(eval_samples)]
    det = ["--model", "mia_vit_fmnist", *weights, "--gate-mode", "deterministic"]  # the control: same weights
    rows = [
        ("MIA stochastic, PGD (non-adaptive)", mia + ["--attack", "pgd", "--n", str(n)]),
        ("MIA stochastic, EOT-PGD K=4", mia + ["--attack", "eot-pgd", "--eot", "4", "--n", str(n)]),
        ("MIA stochastic, BPDA-PGD K=4", mia + ["--attack", "bpda-pgd", "--eot", "4", "--n", str(n)]),
        ("MIA stochastic, transfer from vit_fmnist", mia + ["--attack", "transfer", "--n", str(n)]),
        ("MIA stochastic, EOT-PGD K=1", mia + ["--attack", "eot-pgd", "--eot", "1", "--n", str(n)]),
        ("MIA stochastic, EOT-PGD K=16", mia + ["--attack", "eot-pgd", "--eot", "16", "--n", str(n)]),
        ("MIA stochastic, autoattack-rand", mia + ["--attack", "autoattack-rand", "--n", str(aa_rand_n)]),
        # standard AutoAttack (targeted APGD, FAB, Square too) on the EOT model: what the rand version leaves out
        *((f"MIA stochastic, AutoAttack EOT K={k}", mia + ["--attack", "autoattack", "--eot", str(k), "--n", str(aa_eot_n)])
          for k in aa_eot_ks),
        ("MIA deterministic, PGD", det + ["--attack", "pgd", "--n", str(n)]),
        ("MIA deterministic, BPDA-PGD", det + ["--attack", "bpda-pgd", "--n", str(n)]),
        ("MIA deterministic, AutoAttack", det + ["--attack", "autoattack", "--n", str(aa_n)]),
        ("vit_fmnist, PGD", ["--model", "vit_fmnist", "--attack", "pgd", "--n", str(n)]),
        ("vit_fmnist, AutoAttack", ["--model", "vit_fmnist", "--attack", "autoattack", "--n", str(aa_n)]),
    ]
    return [(name, argv) for name, argv in rows if int(argv[argv.index("--n") + 1]) > 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--aa-n", type=int, default=100, help="images for AutoAttack on the static model")
    ap.add_argument("--aa-rand-n", type=int, default=30, help="images for autoattack-rand (EOT 20: costly)")
    ap.add_argument("--aa-eot-n", type=int, default=0, help="images for standard AutoAttack with EOT 4 on the "
                    "stochastic model (0: leave the row out)")
    ap.add_argument("--aa-eot-k", default="4", help="comma-separated K of the AutoAttack-EOT rows (e.g. 4,16)")
    ap.add_argument("--eps", default="1/255,2/255,4/255,8/255")
    ap.add_argument("--checkpoint", default=None, help="mia_vit_fmnist weights, a file or shipped name (default: "
                    "its default weights); RESULTS.md's grid is of mia_vit_fmnist_b07")
    ap.add_argument("--eval-samples", type=int, default=10)
    ap.add_argument("--out", default="results/grid")
    ap.add_argument("--checks", default="on", choices=["on", "auto", "off"], help="sanity checks of each run (the "
                    "committed results/grid and results/grid-lat076 runs were made with off)")
    ap.add_argument("--only-table", action="store_true", help="read finished runs, run nothing")
    ap.add_argument("--rows", default=None, help="regular expression: run only the rows whose name matches "
                    "(re.search: e.g. 'AutoAttack|autoattack'; 'K=1' also matches 'K=16', so write 'K=1$'), so several "
                    "processes can share the grid; the table shows them all")
    args = ap.parse_args()
    eps_list = args.eps.split(",")
    aa_eot_ks = tuple(int(k) for k in args.aa_eot_k.split(","))
    table: dict[str, dict[str, str]] = {}
    folders: dict[tuple[str, str], Path] = {}  # (row, eps) -> run folder, for the paired comparisons
    for eps in eps_list:
        for name, argv in cells(args.n, args.aa_n, args.aa_rand_n, args.eval_samples, args.aa_eot_n, args.checkpoint, aa_eot_ks):
            cmd = [sys.executable, "-m", "miarobust", "run", *argv, "--eps", eps, "--data", "embedded",
                   "--checks", args.checks, "--out", args.out]
            if not args.only_table and (args.rows is None or re.search(args.rows, name)):
                print("$", shlex.join(["miarobust", *cmd[3:]]), flush=True)
                subprocess.run(cmd, check=True)
            found = find_summary(Path(args.out), argv, eps)
            if found is None:
                table.setdefault(name, {})[eps] = "-"
                continue
            folders[name, eps], summary = found
            (att,) = summary["attacks"].values()
            lo, hi = att["ci95"]
            table.setdefault(name, {})[eps] = f"{100 * att['acc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={att['n']})"
            table[name]["clean"] = f"{100 * summary['clean']['acc']:.1f}"
    print("| model, attack | clean % | " + " | ".join(f"eps {e}" for e in eps_list) + " |")
    print("|---|---|" + "---|" * len(eps_list))
    for name, row in table.items():
        print(f"| {name} | {row.get('clean', '-')} | " + " | ".join(row.get(e, "-") for e in eps_list) + " |")
    print_pairs(PAIRED, paired, folders, eps_list,
                "Paired on the same images (exact McNemar test on the images robust under one model only):",
                ["gated vs static", "eps", "n", "robust % (gated, static)", "robust under gated only",
                 "under static only", "two-sided p"])
    print_pairs(paired_stochastic(aa_eot_ks), paired_fractional, folders, eps_list,
                f"The stochastic model (per image: the share of {args.eval_samples} gate draws it gets right) against "
                "another row on the same images: mean difference with its 95% interval and two-sided p (paired, "
                "normal approximation):",
                ["stochastic gated vs", "eps", "n", "robust % (stochastic, other)", "difference, points [95% CI]",
                 "two-sided p"])


def print_pairs(pairs: list[tuple[str, str]], row: Callable[[str, str, str, Path, Path], str],
                folders: dict[tuple[str, str], Path], eps_list: list[str], intro: str, columns: list[str]) -> None:
    """One markdown table of `row` for each (row a, row b) pair and eps whose two runs both exist (none: nothing)."""
    lines = [row(name_a, name_b, eps, folders[name_a, eps], folders[name_b, eps])
             for name_a, name_b in pairs for eps in eps_list if (name_a, eps) in folders and (name_b, eps) in folders]
    if lines:
        print(f"\n{intro}\n")
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        print("\n".join(lines))

# deterministic gates against the static model: the same images, 0/1 outcomes, so a paired test applies
PAIRED = [("MIA deterministic, PGD", "vit_fmnist, PGD"), ("MIA deterministic, AutoAttack", "vit_fmnist, AutoAttack")]


def paired_stochastic(aa_eot_ks: tuple[int, ...]) -> list[tuple[str, str]]:
    """The stochastic rows' comparisons (a per-image outcome is a probability over gate draws: compared by the
    mean difference): with the static and deterministic AutoAttack, and the adaptive attacks with each other."""
    aa_rand, det_aa = "MIA stochastic, autoattack-rand", "MIA deterministic, AutoAttack"
    eot = [f"MIA stochastic, AutoAttack EOT K={k}" for k in aa_eot_ks]
    pairs = [(aa_rand, "vit_fmnist, AutoAttack"), (aa_rand, det_aa)]
    for name in eot:
        pairs += [(name, "vit_fmnist, AutoAttack"), (name, det_aa), (name, aa_rand), (name, "MIA stochastic, EOT-PGD K=16")]
    pairs += list(zip(eot[1:], eot[:-1]))  # AutoAttack-EOT at K against the K before it: converged in K?
    return pairs + [("MIA stochastic, EOT-PGD K=16", "vit_fmnist, PGD")]


def _shared(folder_a: Path, folder_b: Path) -> pd.DataFrame:
    """The two runs' per-image robust outcomes (robust_a, robust_b) on the images both evaluated."""
    a, b = (pd.read_csv(f / "samples.csv", usecols=["index", "robust"]) for f in (folder_a, folder_b))
    return a.merge(b, on="index", suffixes=("_a", "_b"))


def paired_fractional(name_a: str, name_b: str, eps: str, folder_a: Path, folder_b: Path) -> str:
    """One markdown row: mean per-image difference of robust outcomes in [0, 1], its interval and p."""
    both = _shared(folder_a, folder_b)
    diff, lo, hi, p = paired_mean_diff(both.robust_a.tolist(), both.robust_b.tolist())
    label = f"{name_a.split(', ', 1)[1]} vs {name_b}"
    return (f"| {label} | {eps} | {len(both)} | {100 * both.robust_a.mean():.1f}, {100 * both.robust_b.mean():.1f} "
            f"| {100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | {p:.3g} |")


def paired(name_a: str, name_b: str, eps: str, folder_a: Path, folder_b: Path) -> str:
    """One markdown row: the two runs' per-image robust outcomes on their shared images, and McNemar's p."""
    both = _shared(folder_a, folder_b)
    only_a = int(((both.robust_a >= 0.5) & (both.robust_b < 0.5)).sum())
    only_b = int(((both.robust_a < 0.5) & (both.robust_b >= 0.5)).sum())
    p = mcnemar_p(only_a, only_b)
    attack = name_a.split(", ", 1)[1]
    return (f"| {attack} | {eps} | {len(both)} | {100 * both.robust_a.mean():.1f}, {100 * both.robust_b.mean():.1f} "
            f"| {only_a} | {only_b} | {p:.3g} |")


def find_summary(out: Path, argv: list[str], eps: str) -> tuple[Path, dict] | None:
    """(folder, summary) of the finished run with these arguments (matched on its config.json and summary.json,
    the weights on their SHA-256)."""
    want = dict(zip(argv[::2], argv[1::2]))
    weights = weights_sha256(want["--model"], want.get("--checkpoint"))
    for path in out.glob("*/summary.json"):
        cfg = json.loads((path.parent / "config.json").read_text())
        if cfg["model"] != want["--model"] or cfg["eps_text"] != eps or list(cfg["attacks"]) != [want["--attack"]]:
            continue
        if cfg.get("weights_sha256") != weights:
            continue
        if cfg["n"] != int(want["--n"]) or cfg.get("gate_mode") != want.get("--gate-mode", cfg.get("gate_mode")):
            continue
        summary = json.loads(path.read_text())
        # EOT cells match on the K the attack used (summary.json), not on the --eot it was given
        if "--eot" in want and summary["attacks"][want["--attack"]].get("eot") != int(want["--eot"]):
            continue
        return path.parent, summary
    return None


@functools.cache
def weights_sha256(model: str, checkpoint: str | None) -> str | None:
    """SHA-256 of the weights `miarobust run --model model [--checkpoint checkpoint]` loads."""
    from miarobust.models.registry import file_sha256, weights_file

    path = weights_file(model, checkpoint)
    return file_sha256(path) if path else None


if __name__ == "__main__":
    main()
