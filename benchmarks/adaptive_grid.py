"""The adaptive grid: the gated models, the dynamic-ViT peers and the static one under the `adaptive` preset with
the sanity checks on, each image's worst case over every run made on it, and the paired comparisons with
Holm-corrected p-values.

Cells, each one `miarobust run ... --attack adaptive --checks on` (resumable; results under --out):
  static `vit_fmnist`; `mia_vit_fmnist` with the weights `mia_vit_fmnist_b07` and with its default weights
  (`mia_vit_fmnist_lat076`), deterministic gates and stochastic gates (10 draws per image, EOT K chosen by
  the preset's convergence probe); `mia_vit_fmnist_b05` and the peers AdaViT, A-ViT, DynamicViT (their default
  weights), ToMe (r = 8, training-free), ToMe fine-tuned at r = 8 (`tome_vit_fmnist_b05`) and EViT fine-tuned at
  keep rate 0.47 (`evit_vit_fmnist_b05`), deterministic decisions through straight-through where the mechanism has
  them; each on the first images of the embedded set (ROWS says how many). With --transfer, each gated row's cell
  is instead the transfer attack from the static `vit_fmnist` (TRANSFER_OUT). With --wide, every row's cell is
  instead PGD-10 on all 1,000 embedded images (WIDE_OUT): through the straight-through relaxation where the row has
  decisions, through EOT over WIDE_EOT gate draws on stochastic gates, checks auto; a cheap attack on ten times the
  images, printed as its own table of upper bounds beside how far each reads above the worst case where both run.
  With --autoattack [autoattack-st], every row's cell is instead standard AutoAttack (or its straight-through twin)
  on the first AUTOATTACK_N images into AUTOATTACK_OUT, checks auto: what the table of AutoAttack on 1,000 (or 500)
  images reads beside the --wide runs. Wherever AutoAttack's own check (autoattack_flags) says its Square broke
  images the attacks before it had left robust, the cell is followed by Square with another seed (SQUARE_SEED) on
  the same images, as AutoAttack advises; it joins the worst case like every other run.
Then `miarobust worst` writes, per model x model arguments x weights x gate mode x eps, each image's worst case over
the runs of --out, of the transfer runs and of the earlier grids (EARLIER) into --worst-out (a folder whose result
is unchanged is kept as it is, stale ones are removed), and the tables are printed from those folders.

    python benchmarks/adaptive_grid.py [--eps 1/255,2/255,4/255,8/255] [--n N] [--batch-size B] [--rows REGEX] [--reuse MODE]
        [--only-table | --transfer | --wide | --autoattack [autoattack-st]] [--out results/adaptive] [--worst-out results/worst]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from miarobust.stats import holm, mcnemar_p, paired_mean_diff, wilson
from miarobust.values import REUSE_MODES

B07 = ["--model", "mia_vit_fmnist", "--checkpoint", "mia_vit_fmnist_b07"]
LAT = ["--model", "mia_vit_fmnist"]  # its default weights, mia_vit_fmnist_lat076
B05 = ["--model", "mia_vit_fmnist", "--checkpoint", "mia_vit_fmnist_b05"]
#: Folders of earlier runs that join each image's worst case (runs of other weights or models are never combined).
EARLIER = ["results/grid", "results/grid-lat076"]
#: --transfer: PGD on the static `vit_fmnist` (every peer and gated model here is trained from it), evaluated on each
#: gated row, on the first TRANSFER_N images (no preset cell covers more), with the checks off: it never sees the
#: target, so it can only lower a worst case, and the checks that judge the target's attacks (Square and APGD rerun
#: on it) ran on the same images in the preset's run.
TRANSFER_OUT = "results/transfer"
TRANSFER_N = 200
#: --wide: PGD-10 (BPDA-PGD where the row has decisions) on every row on the first WIDE_N images, EOT WIDE_EOT on
#: stochastic gates (the preset's probe settles at 4 on all but one cell), checks auto (all checks on the first 100
#: images, Square with 1,000 queries on 20): a minute or two a cell on one core, the stochastic ones a few.
WIDE_OUT = "results/wide"
WIDE_N = 1000
WIDE_EOT = 4
#: --autoattack: standard AutoAttack on the first AUTOATTACK_N images (10-70 minutes a cell on one core, 8/255 the
#: cheapest), into AUTOATTACK_OUT beside the 1,000-image AutoAttack runs of the earlier grid, checks auto; where
#: AutoAttack has not run on all WIDE_N images of a row, its table on them falls back to the first AUTOATTACK_N.
AUTOATTACK_OUT = "results/grid"
AUTOATTACK_N = 500
#: Standard AutoAttack and its straight-through twin (not the `rand` version, which leaves out APGD-T, FAB and Square).
STANDARD_AUTOATTACK = ("autoattack", "autoattack-st")
#: --autoattack's follow-up on a cell whose Square AutoAttack's check flagged: Square again with this seed (AutoAttack's
#: runs use seed 0), 5,000 queries, on the same images (5-25 minutes a cell on one core, the
#: longest at 1 and 2/255, where most images survive to use every query).
SQUARE_SEED = 1


class Row(NamedTuple):
    """One row of the grid: its name, the model and weights it runs (the weights' file name, its model arguments as
    config.json records them), gate mode (None: static), `miarobust run` model arguments and images."""

    name: str
    model: str
    weights: str
    gate: str | None
    argv: list[str]
    n: int
    model_kwargs: str = ""


#: Images: what 2 cores allow (AutoAttack and its straight-through twin cost 20-30 min per 100 images on a gated model
#: with deterministic gates, about four times that through EOT K = 4 on stochastic gates, and a masked token-level
#: peer about twice a gated model; the checks as much again).
ROWS = [
    Row("vit_fmnist (static)", "vit_fmnist", "vit_fmnist", None, ["--model", "vit_fmnist"], 500),
    Row("b07, deterministic gates", "mia_vit_fmnist", "mia_vit_fmnist_b07", "deterministic",
        [*B07, "--gate-mode", "deterministic"], 200),
    Row("b07, stochastic gates", "mia_vit_fmnist", "mia_vit_fmnist_b07", "stochastic",
        [*B07, "--gate-mode", "stochastic", "--eval-samples", "10"], 100),
    Row("lat076, deterministic gates", "mia_vit_fmnist", "mia_vit_fmnist_lat076", "deterministic",
        [*LAT, "--gate-mode", "deterministic"], 200),
    Row("lat076, stochastic gates", "mia_vit_fmnist", "mia_vit_fmnist_lat076", "stochastic",
        [*LAT, "--gate-mode", "stochastic", "--eval-samples", "10"], 100),
    # MIA-Former at half the MACs and the dynamic-ViT peers (each with its default weights), deterministic decisions:
    Row("b05, deterministic gates", "mia_vit_fmnist", "mia_vit_fmnist_b05", "deterministic",
        [*B05, "--gate-mode", "deterministic"], 50),
    Row("AdaViT b05", "adavit_vit_fmnist", "adavit_vit_fmnist_b05", "deterministic",
        ["--model", "adavit_vit_fmnist", "--gate-mode", "deterministic"], 50),
    Row("A-ViT b05", "avit_vit_fmnist", "avit_vit_fmnist_b05", "deterministic",
        ["--model", "avit_vit_fmnist", "--gate-mode", "deterministic"], 50),
    Row("DynamicViT b05", "dynamicvit_vit_fmnist", "dynamicvit_vit_fmnist_b05", "deterministic",
        ["--model", "dynamicvit_vit_fmnist", "--gate-mode", "deterministic"], 50),
    Row("ToMe r = 8", "tome_vit_fmnist", "vit_fmnist", "deterministic",
        ["--model", "tome_vit_fmnist", "--model-kwargs", "r=8"], 50, "r=8"),
    Row("ToMe b05 (fine-tuned, r = 8)", "tome_vit_fmnist", "tome_vit_fmnist_b05", "deterministic",
        ["--model", "tome_vit_fmnist", "--checkpoint", "tome_vit_fmnist_b05"], 50),
    Row("EViT b05 (fine-tuned, keep 0.47)", "evit_vit_fmnist", "evit_vit_fmnist_b05", "deterministic",
        ["--model", "evit_vit_fmnist", "--checkpoint", "evit_vit_fmnist_b05"], 50),
]
#: (row a, row b): is a more robust than b on the same images? The gated models against the static one and their
#: stochastic gates against their deterministic ones; each peer against the static model and against the
#: MIA-Former checkpoint nearest its MACs (AdaViT 0.50, DynamicViT 0.50, ToMe 0.52 and EViT 0.51 of the static MACs
#: against b05's 0.49; A-ViT's 0.56 against the default lat076's 0.64, the nearest MIA-Former with the preset's runs).
PAIRS = [
    ("b07, deterministic gates", "vit_fmnist (static)"),
    ("b07, stochastic gates", "vit_fmnist (static)"),
    ("b07, stochastic gates", "b07, deterministic gates"),
    ("lat076, deterministic gates", "vit_fmnist (static)"),
    ("lat076, stochastic gates", "vit_fmnist (static)"),
    ("lat076, stochastic gates", "lat076, deterministic gates"),
    ("b05, deterministic gates", "vit_fmnist (static)"),
    ("AdaViT b05", "vit_fmnist (static)"),
    ("AdaViT b05", "b05, deterministic gates"),
    ("A-ViT b05", "vit_fmnist (static)"),
    ("A-ViT b05", "lat076, deterministic gates"),
    ("DynamicViT b05", "vit_fmnist (static)"),
    ("DynamicViT b05", "b05, deterministic gates"),
    ("ToMe r = 8", "vit_fmnist (static)"),
    ("ToMe r = 8", "b05, deterministic gates"),
    ("ToMe b05 (fine-tuned, r = 8)", "vit_fmnist (static)"),
    ("ToMe b05 (fine-tuned, r = 8)", "b05, deterministic gates"),
    ("EViT b05 (fine-tuned, keep 0.47)", "vit_fmnist (static)"),
    ("EViT b05 (fine-tuned, keep 0.47)", "b05, deterministic gates"),
]


def cell(argv: list[str], eps: str, n: int, out: str, batch_size: int | None = None, attack: str = "adaptive",
         checks: str = "on") -> list[str]:
    """`miarobust run` arguments of one cell (of the preset, or with attack="transfer" of --transfer)."""
    batch = ["--batch-size", str(batch_size)] if batch_size else []
    return ["run", *argv, "--attack", attack, "--eps", eps, "--n", str(n), *batch, "--data", "embedded",
            "--checks", checks, "--out", out]


def execute(cmd: list[str]) -> None:
    """Run `miarobust <cmd>`, echoing it first."""
    print("$ miarobust", shlex.join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "miarobust", *cmd], check=True)


def autoattack_cell(row: Row, eps: str, n: int, attack: str, batch_size: int | None, reuse: list[str]) -> None:
    """One --autoattack cell: `attack` (standard AutoAttack or its twin) on the first n images into AUTOATTACK_OUT,
    then, where its check says AutoAttack's Square broke images (square_flagged), Square with seed SQUARE_SEED on
    the same images (a finished run of either is found complete and left as it is)."""
    execute(cell(row.argv, eps, n, AUTOATTACK_OUT, batch_size, attack=attack, checks="auto") + reuse)
    if square_flagged(Path(AUTOATTACK_OUT), row, eps, n, attack):
        execute(cell([*row.argv, "--seed", str(SQUARE_SEED)], eps, n, AUTOATTACK_OUT, batch_size, attack="square",
                     checks="auto") + reuse)


def square_flagged(out: Path, row: Row, eps: str, n: int, attack: str) -> bool:
    """Whether a finished `attack` run of `row` at `eps` on n images in `out` has AutoAttack's check
    (autoattack_flags) warning that AutoAttack's Square broke images the attacks before it had left robust."""
    from miarobust.checks import SQUARE_SUCCESS

    key = cell_key(row, eps)
    for path in out.glob("*/summary.json"):
        cfg = json.loads((path.parent / "config.json").read_text())
        if cfg["attacks"] != [attack] or cfg["n"] != n or run_key(cfg) != key:
            continue
        flags = json.loads(path.read_text()).get("checks", {}).get("autoattack_flags", {})
        if flags.get("status") == "flag" and any(SQUARE_SUCCESS.search(w) for w in flags.get("value") or []):
            return True
    return False


@functools.cache  # each table reads it per row x eps: hash each shipped file once
def weights_sha256(name: str) -> str:
    from miarobust.models.registry import file_sha256
    from miarobust.models.vit import shipped_checkpoint

    return file_sha256(shipped_checkpoint(f"{name}.safetensors"))


def eps_value(text: str) -> float:
    from miarobust.values import Eps

    return Eps.parse(text).value


def wide_cell(row: Row, eps: str, n: int, batch_size: int | None) -> list[str]:
    """`miarobust run` arguments of one --wide cell (see WIDE_OUT)."""
    eot = ["--eot", str(WIDE_EOT)] if row.gate == "stochastic" else []
    return cell([*row.argv, *eot], eps, n, WIDE_OUT, batch_size, attack="pgd" if row.gate is None else "bpda-pgd",
                checks="auto")


def per_image_min(runs: list[pd.DataFrame]) -> pd.DataFrame:
    """index, robust, clean_correct: each image's lowest robust over `runs`, on the images every one covers."""
    out = runs[0]
    for more in runs[1:]:
        both = out.merge(more, on="index", suffixes=("", "_more"))
        out = both.assign(robust=both[["robust", "robust_more"]].min(axis=1))[["index", "robust", "clean_correct"]]
    return out


def worst_folders(root: Path) -> dict[tuple[str, str, str, str | None, float], Path]:
    """(model, model arguments, weights SHA-256, gate mode, eps) -> worst-case folder under `root`."""
    return worst_folders_of([p.parent for p in root.glob("*/config.json")])


def worst_folders_of(folders: list[Path]) -> dict[tuple[str, str, str, str | None, float], Path]:
    """worst_folders' keys of `folders` (each holding a config.json)."""
    return {run_key(json.loads((folder / "config.json").read_text())): folder for folder in folders}


def run_key(cfg: dict) -> tuple[str, str, str, str | None, float]:
    """worst_folders' key of a run's or worst case's config.json: (model, model arguments, weights SHA-256, gate
    mode, eps)."""
    return (cfg["model"], cfg.get("model_kwargs") or "", cfg.get("weights_sha256"), cfg.get("gate_mode"),
            round(float(cfg["eps"]), 9))


def rewrite_worst(sources: list[str], out: Path) -> dict:
    """Each image's worst case over every run below `sources`, written into `out`: a folder whose result did not
    change is left as it is, and every other worst-case folder in `out` is removed (none of a run that is gone or
    has been joined by another lingers); the folders by worst_folders' key."""
    from miarobust.worst import KIND, worst_case

    written = {r.folder.resolve() for r in worst_case([p for p in sources if Path(p).is_dir()], out)}
    for old in out.glob("*/config.json"):
        if json.loads(old.read_text()).get("kind") == KIND and old.parent.resolve() not in written:
            shutil.rmtree(old.parent)
    return worst_folders(out)


def headline(folder: Path) -> pd.DataFrame:
    """index, robust, clean_correct of the images every source run of a worst-case folder covers."""
    s = pd.read_csv(folder / "samples.csv")
    return s[s["in_all"] == 1][["index", "robust", "clean_correct"]]


def pct(acc: float, n: int) -> str:
    lo, hi = wilson(acc * n, n)
    return f"{100 * acc:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={n})"


def compare(a: pd.DataFrame, b: pd.DataFrame) -> tuple[int, float, float, str, float]:
    """On the images both cover: n, robust of a and b, the difference as text, and the two-sided p (McNemar for
    0/1 outcomes, else the paired mean difference)."""
    both = a.merge(b, on="index", suffixes=("_a", "_b"))
    ra, rb = both.robust_a, both.robust_b
    if set(ra.unique()) <= {0, 1} and set(rb.unique()) <= {0, 1}:
        only_a, only_b = int(((ra == 1) & (rb == 0)).sum()), int(((ra == 0) & (rb == 1)).sum())
        p = mcnemar_p(only_a, only_b)
        return len(both), ra.mean(), rb.mean(), f"{100 * (ra.mean() - rb.mean()):+.1f} ({only_a} vs {only_b} images)", p
    diff, lo, hi, p = paired_mean_diff(ra.tolist(), rb.tolist())
    return len(both), ra.mean(), rb.mean(), f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]", p


def print_preset_runs(out: Path) -> None:
    """The preset's own runs: each attack's robust accuracy, the run's worst case and its sanity checks."""
    found = sorted(out.glob("*/summary.json")) if out.is_dir() else []
    if not found:
        return
    print(f"\nThe preset's runs in {out} (robust %, 95% interval; each image robust only if it survives every attack), "
          "with the sanity checks:\n")
    print("| model, weights, gates | eps | n | clean % | per attack | worst case | checks |")
    print("|---|---|---|---|---|---|---|")
    for path in found:
        s, c = json.loads(path.read_text()), json.loads((path.parent / "config.json").read_text())
        weights = Path(c.get("checkpoint") or "-").name.removesuffix(".safetensors")
        budget = f" ({c['steps']} steps x {c['restarts']} restarts)" if (c["steps"], c["restarts"]) != (10, 1) else ""
        budget += f" ({c['queries']} queries)" if c.get("queries", 5000) != 5000 else ""
        parts = ", ".join(f"{a} {100 * v['acc']:.1f}" + (f" (EOT {v['eot']})" if v.get("eot", 1) > 1 else "")
                          for a, v in s["attacks"].items()) + budget
        checks = "; ".join(f"{k} {v['status']}" for k, v in s.get("checks", {}).items() if v["status"] != "skip")
        r = s["robust"]
        print(f"| {s['model']}, {weights}, {s.get('gate_mode') or 'static'} | {s['eps_text']} | {s['n']} | "
              f"{100 * s['clean']['acc']:.1f} | {parts} | {pct(r['acc'], s['n'])} | {checks} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eps", default="1/255,2/255,4/255,8/255", help="comma-separated radii (default: the four of the "
                    "grid; with --only-table, the tables' columns)")
    ap.add_argument("--n", type=int, default=None, help="images of every cell (default: each row's, see ROWS)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per saved batch (default: miarobust's 100); "
                    "smaller batches save progress more often on slow cells")
    ap.add_argument("--out", default="results/adaptive")
    ap.add_argument("--worst-out", default="results/worst")
    ap.add_argument("--reuse", choices=REUSE_MODES, default=None, help="grow each cell from a finished "
                    "run of it at another --n (`miarobust run --reuse`): the batches of the same images are copied")
    ap.add_argument("--rows", default=None, help="regular expression: run only the matching rows (several processes "
                    "can share the grid); the tables show them all")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--only-table", action="store_true", help="run nothing, read the runs")
    mode.add_argument("--wide", action="store_true", help=f"run, instead of the preset, PGD-10 on every row into "
                      f"{WIDE_OUT} (first --n images, default {WIDE_N}; BPDA-PGD where the row has decisions, EOT "
                      f"{WIDE_EOT} on stochastic gates; checks auto)")
    mode.add_argument("--transfer", action="store_true", help=f"run, instead of the preset, the transfer attack from the "
                      f"static vit_fmnist on every gated row into {TRANSFER_OUT} (first --n images, default "
                      f"{TRANSFER_N}; checks off)")
    mode.add_argument("--autoattack", nargs="?", const="autoattack", choices=STANDARD_AUTOATTACK,
                      help=f"run, instead of the preset, standard AutoAttack (or its straight-through twin) on every "
                      f"row into {AUTOATTACK_OUT} (first --n images, default {AUTOATTACK_N}; checks auto), each "
                      f"followed by Square with seed {SQUARE_SEED} where AutoAttack's check flagged its Square")
    args = ap.parse_args()
    eps_list = args.eps.split(",")
    reuse = ["--reuse", args.reuse] if args.reuse else []
    if not args.only_table:
        for eps in eps_list:
            for row in ROWS:
                # the static row: with --transfer the surrogate itself (white-box PGD-10, nothing to transfer); with
                # the twin, no decisions to relax (it is AutoAttack)
                if row.gate is None and (args.transfer or args.autoattack == "autoattack-st"):
                    continue
                if args.rows is None or re.search(args.rows, row.name):
                    if args.transfer:
                        execute(cell([*row.argv, "--surrogate", "vit_fmnist"], eps, args.n or TRANSFER_N, TRANSFER_OUT,
                                     args.batch_size, attack="transfer", checks="off") + reuse)
                    elif args.wide:
                        execute(wide_cell(row, eps, args.n or WIDE_N, args.batch_size) + reuse)
                    elif args.autoattack:
                        autoattack_cell(row, eps, args.n or AUTOATTACK_N, args.autoattack, args.batch_size, reuse)
                    else:
                        execute(cell(row.argv, eps, args.n or row.n, args.out, args.batch_size) + reuse)
    sources = [args.out, TRANSFER_OUT, WIDE_OUT, *EARLIER]
    folders = rewrite_worst(sources, Path(args.worst_out))
    table: dict[str, dict[str, pd.DataFrame]] = {}
    print(f"\nEach image's worst case over every run on it ({', '.join(sources)}), on the images all "
          "those runs cover:\n")
    print("| model, gates | clean % | " + " | ".join(f"eps {e}" for e in eps_list) + " | runs combined |")
    print("|---|---|" + "---|" * len(eps_list) + "---|")
    upper_bounds = False
    for row in ROWS:
        cells, clean, runs = [], "-", set()
        for eps in eps_list:
            folder = folders.get(cell_key(row, eps))
            if folder is None:
                cells.append("-")
                continue
            h = headline(folder)
            combines = json.loads((folder / "config.json").read_text())["combines"]
            if any(Path(r["folder"]).parent == Path(args.out) for r in combines):
                table.setdefault(row.name, {})[eps] = h
                cells.append(pct(h.robust.mean(), len(h)))
            else:  # only the earlier, weaker attacks reached these images: an upper bound, compared with nothing
                cells.append(f"({pct(h.robust.mean(), len(h))}) †")
                upper_bounds = True
            clean = f"{100 * h.clean_correct.mean():.1f}"
            runs.add(len(combines))
        print(f"| {row.name} | {clean} | " + " | ".join(cells) + f" | {'/'.join(map(str, sorted(runs))) or '-'} |")
    if upper_bounds:  # the footnote of the cells marked †, only where there are some
        print(f"\n† No run of the adaptive preset at this eps (none in {args.out}): each image's worst case over the "
              f"other runs only ({', '.join(sources[1:])}: PGD transferred from the static model and the earlier grids' "
              "attacks), which ran without the sanity checks and are weaker than the preset (a transfer attack never "
              "sees the model; the earlier grids ran, on stochastic gates, without straight-through gradients or "
              "per-image candidates): an upper bound, left out of the paired comparisons.")
    print_preset_runs(Path(args.out))
    print_pairs(table, eps_list, "\nPaired on the same images; p two-sided (exact McNemar for 0/1 outcomes, else the paired "
                "mean difference of expected correctness), Holm-adjusted over the {} comparisons of this table:\n")
    print_wide(eps_list, folders, table)
    print_wide_autoattack(eps_list, folders)


def print_pairs(cells: dict[str, dict[str, pd.DataFrame]], eps_list: list[str], heading: str,
                skip_empty: bool = False) -> None:
    """The paired comparisons of PAIRS between the rows of `cells` (row -> eps -> index, robust), Holm-adjusted over
    them, under `heading` (its {} takes their number); nothing when `skip_empty` and there are none."""
    rows = [(a, b, eps, *compare(cells[a][eps], cells[b][eps]))
            for a, b in PAIRS for eps in eps_list if eps in cells.get(a, {}) and eps in cells.get(b, {})]
    if skip_empty and not rows:
        return
    adjusted = holm([r[-1] for r in rows])
    print(heading.format(len(rows)))
    print("| more robust? | than | eps | n | robust % (a, b) | difference, points | p | Holm p |")
    print("|---|---|---|---|---|---|---|---|")
    for (a, b, eps, n, ra, rb, diff, p), padj in zip(rows, adjusted):
        print(f"| {a} | {b} | {eps} | {n} | {100 * ra:.1f}, {100 * rb:.1f} | {diff} | {p:.3g} | {padj:.3g} |")


def covering_worst(folder: Path, n: int) -> tuple[pd.DataFrame, list[str]] | None:
    """index, robust, clean_correct of the first n images of worst-case `folder`, each image's minimum over only the
    runs that cover all n, with those runs' attacks; None when no run covers them."""
    s = pd.read_csv(folder / "samples.csv")
    s = s[s["index"] < n]
    if len(s) < n:
        return None
    runs = [c for c in json.loads((folder / "config.json").read_text())["combines"]
            if s[f"{c['label']}_correct"].notna().all()]
    if not runs:
        return None
    worst = s[[f"{c['label']}_correct" for c in runs]].min(axis=1)
    return (s.assign(robust=worst)[["index", "robust", "clean_correct"]],
            sorted({a for c in runs for a in c["attacks"]}))


def autoattack_worst(folder: Path) -> tuple[pd.DataFrame, list[str]] | None:
    """covering_worst of `folder` on the first WIDE_N images or, failing that, AUTOATTACK_N, the first where the runs
    covering them all include STANDARD_AUTOATTACK; None where neither does."""
    for n in (WIDE_N, AUTOATTACK_N):
        found = covering_worst(folder, n)
        if found is not None and set(STANDARD_AUTOATTACK) & set(found[1]):
            return found
    return None


def print_wide_autoattack(eps_list: list[str], worst: dict) -> None:
    """Where a row's runs on all WIDE_N images, or the first AUTOATTACK_N, include standard AutoAttack: each image's
    worst case over every run covering them (autoattack_worst), and the paired comparisons of PAIRS between such
    rows on the images both cover (Holm over this table's)."""
    cells: dict[str, dict[str, pd.DataFrame]] = {}
    lines = []
    for row in ROWS:
        for eps in eps_list:
            folder = worst.get(cell_key(row, eps))
            found = autoattack_worst(folder) if folder is not None else None
            if found is None:
                continue
            frame, attacks = found
            cells.setdefault(row.name, {})[eps] = frame
            lines.append(f"| {row.name} | {eps} | {', '.join(attacks)} | {pct(frame.robust.mean(), len(frame))} |")
    if not lines:
        return
    print(f"\nOn the first {WIDE_N} images, or the first {AUTOATTACK_N} where AutoAttack has run on no more, wherever "
          "standard AutoAttack is among the runs covering them all: each image's worst case over every run that covers "
          "all of them (from every folder the worst case reads):\n")
    print("| model, gates | eps | attacks | robust % |")
    print("|---|---|---|---|")
    print("\n".join(lines))
    print_pairs(cells, eps_list, "\nPaired on the images both cover, Holm-adjusted over the {} comparisons of this "
                "table:\n", skip_empty=True)


def cell_key(row: Row, eps: str) -> tuple[str, str, str, str | None, float]:
    """worst_folders' key of a row at `eps`: (model, model arguments, weights SHA-256, gate mode, eps)."""
    return row.model, row.model_kwargs, weights_sha256(row.weights), row.gate, round(eps_value(eps), 9)


def print_wide(eps_list: list[str], worst: dict, table: dict[str, dict[str, pd.DataFrame]]) -> None:
    """The --wide runs (if any): robust % on all their images, how far above each image's worst case they read on
    the images the worst case covers, their flagged checks, and the paired comparisons of PAIRS on their images."""
    wide: dict[tuple, list[Path]] = {}  # every finished --wide run by worst_folders' key: a cell may hold several
    for path in sorted(Path(WIDE_OUT).glob("*/summary.json")):
        wide.setdefault(run_key(json.loads((path.parent / "config.json").read_text())), []).append(path.parent)
    if not wide:
        return
    runs: dict[str, dict[str, pd.DataFrame]] = {}
    print(f"\nPGD-10 on every image of the --wide runs ({WIDE_OUT}: BPDA-PGD through the straight-through relaxation where "
          f"the row has decisions, EOT {WIDE_EOT} on stochastic gates, and each image's worst case where a cell holds more "
          "than one run; checks auto), robust % with 95% interval: an upper bound, beside (in brackets) how many points "
          "it reads above each image's worst case over every run on the images that covers:\n")
    print("| model, gates | clean % | " + " | ".join(f"eps {e}" for e in eps_list) + " |")
    print("|---|---|" + "---|" * len(eps_list))
    flags = []
    for row in ROWS:
        cells, clean = [], "-"
        for eps in eps_list:
            found = wide.get(cell_key(row, eps), [])
            if not found:
                cells.append("-")
                continue
            s = per_image_min([pd.read_csv(f / "samples.csv")[["index", "robust", "clean_correct"]] for f in found])
            runs.setdefault(row.name, {})[eps] = s
            clean = f"{100 * s.clean_correct.mean():.1f}"
            text = pct(s.robust.mean(), len(s))
            if eps in table.get(row.name, {}):
                both = table[row.name][eps].merge(s, on="index", suffixes=("_worst", ""))
                text += f" ({100 * (both.robust.mean() - both.robust_worst.mean()):+.1f} on {len(both)})"
            cells.append(text)
            for folder in found:
                summary = json.loads((folder / "summary.json").read_text())
                flags += [f"{row.name} at {eps} ({folder.name}): {k}: {v['message']}"
                          for k, v in summary.get("checks", {}).items() if v["status"] == "flag"]
        if any(c != "-" for c in cells):
            print(f"| {row.name} | {clean} | " + " | ".join(cells) + " |")
    print("\nFlagged checks of the --wide runs: " + ("none" if not flags else ""))
    for line in flags:
        print(f"- {line}")
    print_pairs(runs, eps_list, "\nThe --wide runs paired on the same images (as above), Holm-adjusted over the {} "
                "comparisons of this table:\n")


if __name__ == "__main__":
    main()
