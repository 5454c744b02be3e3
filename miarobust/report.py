"""Tables and plots from results folders: report.md, report.csv, report.tex, four figures, RobustBench JSON.

Reads every run folder below a path (a folder holding config.json, as `miarobust run` writes it). A folder
still in progress (partial/ present or no summary.json) or unreadable (bad JSON or CSV) is skipped with a
warning and named in report.md. Every number comes from summary.json, which is checked against
samples.csv (each accuracy must be the mean of its *_correct column): a mismatch is flagged, not fatal.

The tidy table (report.csv) has one row per run x attack, plus a `worst-case` row for runs with more than
one attack (a sample counts as robust only if it survives every attack of the run). Its GMACs under attack
is the largest mean over the run's attacks, the most any of them made the model spend. A folder written by
`miarobust worst` (worst.py) reads as a run whose attacks are its source runs.

Figures (PNG, and PDF with `pdf=True`); each is always written, and says "no data" (with the run that
would fill it) when the runs hold nothing to plot, so a report always has the same four files:

- accuracy_vs_gmacs: clean and worst-case robust accuracy vs mean GMACs per image, 95% Wilson intervals,
  the efficiency frontier (Pareto: no other run has both fewer GMACs and higher accuracy) as a step line;
- robust_vs_eps: accuracy vs eps per model x attack, clean accuracy drawn at eps 0;
- gmacs_hist: per-image GMACs clean vs under each attack, from samples.csv;
- robust_vs_eot: accuracy of stochastic models vs EOT samples K per model x attack x eps.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from miarobust.errors import UserError
from miarobust.results import CONFIG, PARTIAL, SAMPLES, SUMMARY, atomic_write, write_json, write_text

log = logging.getLogger(__name__)

#: Accuracies in summary.json vs the mean of samples.csv: equal up to the CSV's 6 significant digits.
INTEGRITY_TOL = 1e-6
WORST = "worst-case"
PLOTS = ("accuracy_vs_gmacs", "robust_vs_eps", "gmacs_hist", "robust_vs_eot")
AUTOATTACKS = ("autoattack", "autoattack-rand")

#: Columns of report.csv that hold numbers (None where a run has none); anything else there is corruption.
NUMERIC = ("eps", "steps", "eval_samples", "n", "eot", "clean_acc", "clean_ci_lo", "clean_ci_hi", "robust_acc", "ci_lo",
           "ci_hi", "gmacs_clean", "gmacs_adv")

#: Columns of report.csv, in order.
COLUMNS = ["data", "model", "weights", "gate_mode", "params", "norm", "eps", "eps_text", "attack", "label", "eot", "steps",
           "eval_samples", "n", "clean_acc", "clean_ci_lo", "clean_ci_hi", "robust_acc", "ci_lo", "ci_hi",
           "gmacs_clean", "gmacs_adv", "flags", "integrity", "folder"]


class RunSkipped(Exception):
    """A run folder that cannot be reported: incomplete or corrupt (the message says which)."""


@dataclass
class Run:
    """One finished run folder: its config.json, summary.json and samples.csv."""

    folder: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    samples: pd.DataFrame
    integrity: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def attacks(self) -> list[str]:
        return list(self.summary["attacks"])


@dataclass
class Skipped:
    folder: Path
    reason: str


@dataclass
class Report:
    """What `write_report` read and wrote."""

    out: Path
    runs: list[Run]
    skipped: list[Skipped]
    table: pd.DataFrame
    files: list[Path]


# -- reading ------------------------------------------------------------------------------------------------


def find_run_folders(root: Path) -> list[Path]:
    """Every folder at or below `root` that holds a config.json, sorted."""
    return sorted(p.parent for p in root.rglob(CONFIG) if p.is_file())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunSkipped(f"corrupt: {path.name} is not valid JSON ({str(e).splitlines()[0][:80]})") from e
    if not isinstance(obj, dict):
        raise RunSkipped(f"corrupt: {path.name} holds no JSON object")
    return obj


def load_run(folder: Path) -> Run:
    """The run in `folder`; raises RunSkipped when it is in progress, incomplete or corrupt."""
    folder = Path(folder)
    if (folder / PARTIAL).exists():
        raise RunSkipped("in progress: partial/ present (finish it by running the same command again)")
    if not (folder / SUMMARY).is_file():
        raise RunSkipped("incomplete: no summary.json")
    if not (folder / SAMPLES).is_file():
        raise RunSkipped("incomplete: no samples.csv")
    config = _read_json(folder / CONFIG)
    summary = _read_json(folder / SUMMARY)
    try:
        samples = pd.read_csv(folder / SAMPLES)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise RunSkipped(f"corrupt: samples.csv cannot be parsed ({str(e).splitlines()[0][:80]})") from e
    missing = [k for k in ("model", "data", "n", "clean", "robust", "attacks", "gmacs") if k not in summary]
    if missing:
        raise RunSkipped(f"corrupt: summary.json lacks {', '.join(missing)}")
    need = ["clean_correct", "robust", "clean_gmacs", *(f"{a}_correct" for a in summary["attacks"])]
    absent = [c for c in need if c not in samples.columns]
    if absent:
        raise RunSkipped(f"corrupt: samples.csv lacks the columns {', '.join(absent)}")
    run = Run(folder, config, summary, samples)
    try:
        run.integrity = check_integrity(summary, samples)
        rows = run_rows(run, params=False)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
        raise RunSkipped(f"corrupt: summary.json has an unexpected layout ({type(e).__name__}: {e})") from e
    for row in rows:
        for col in NUMERIC:
            v = row[col]
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise RunSkipped(f"corrupt: summary.json gives {col} of {row['attack']} as {v!r}, not a number")
    for msg in run.integrity:
        log.warning("%s: %s", folder, msg)
    return run


def check_integrity(summary: dict[str, Any], samples: pd.DataFrame) -> list[str]:
    """Mismatches between summary.json's accuracies and n and the per-sample records ([] when consistent).

    Where summary.json names `headline_rows` (a worst case across runs, worst.py), its figures are over the
    rows whose column of that name is 1: the images every combined run covers."""
    problems = []
    if summary.get("headline_rows") is not None:
        samples = samples[samples[summary["headline_rows"]] == 1]
    n = len(samples)
    if summary.get("n") != n:
        problems.append(f"n is {summary.get('n')} in summary.json but samples.csv has {n} rows")
    entries = {"clean": ("clean_correct", summary["clean"]), "robust": ("robust", summary["robust"]),
               **{a: (f"{a}_correct", v) for a, v in summary["attacks"].items()}}
    for name, (col, entry) in entries.items():
        recomputed = float(pd.to_numeric(samples[col], errors="coerce").mean()) if n else 0.0
        stated = entry.get("acc") if isinstance(entry, dict) else None
        if not isinstance(stated, (int, float)) or not math.isfinite(recomputed) or abs(stated - recomputed) > INTEGRITY_TOL:
            problems.append(f"{name} accuracy is {stated} in summary.json but {recomputed:.6g} from samples.csv")
    return problems


def load_runs(root: str | Path, warn: bool = True) -> tuple[list[Run], list[Skipped]]:
    """Every reportable run below `root`, and the folders skipped (with why, logged as warnings unless `warn`
    is False). UserError when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: pass the folder that `miarobust run --out` wrote into.")
    folders = find_run_folders(root)
    if not folders:
        raise UserError(f"no run folder (a folder with config.json) below {root}: run `miarobust run --out {root}` first.")
    runs, skipped = [], []
    for folder in folders:
        try:
            runs.append(load_run(folder))
        except RunSkipped as e:
            skipped.append(Skipped(folder, str(e)))
    if not runs:  # one line that names every folder, not a warning for each first
        names = "; ".join(f"{s.folder.name} ({s.reason})" for s in skipped)
        raise UserError(f"no finished run below {root}, all {len(skipped)} skipped: {names}.")
    for s in skipped if warn else ():
        log.warning("skipping %s: %s", s.folder, s.reason)
    return runs, skipped


# -- the tidy table -----------------------------------------------------------------------------------------

_PARAMS: dict[tuple[Any, ...], int | None] = {}


def param_count(model: str, num_classes: int | None = None, img_size: int | None = None) -> int | None:
    """Parameters of `model` (controller included), built on the meta device: no memory, no weights read."""
    key = (model, num_classes, img_size)
    if key not in _PARAMS:
        try:
            import timm
            import torch

            import miarobust.models  # noqa: F401  (registers the models with timm)

            kwargs = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
            with torch.device("meta"):
                m = timm.create_model(model, pretrained=False, **kwargs)
            _PARAMS[key] = sum(p.numel() for p in m.parameters())
        except Exception as e:  # noqa: BLE001  (a model this checkout cannot build still gets a report row)
            log.warning("cannot count the parameters of %s: %s", model, e)
            _PARAMS[key] = None
    return _PARAMS[key]


def weights_label(config: dict[str, Any]) -> str:
    """Which weights a run used, in a few characters: the checkpoint file's name without its suffix (a shipped
    checkpoint's name), with the start of its SHA-256 for a file of the user's; 'random' without one."""
    source = (config.get("combines") or [config])[0]  # a worst-case folder: its first source run's
    checkpoint, sha = source.get("checkpoint"), source.get("weights_sha256") or config.get("weights_sha256")
    if not checkpoint:
        return f"sha256 {sha[:8]}" if sha else "random"
    stem = Path(str(checkpoint)).name.removesuffix(".safetensors")
    shipped = Path(str(checkpoint)).parent.name == "checkpoints" and Path(str(checkpoint)).parent.parent.name == "miarobust"
    return stem if shipped or not sha else f"{stem} ({sha[:8]})"


def run_rows(run: Run, params: bool = True) -> list[dict[str, Any]]:
    """The rows of report.csv for one run: one per attack, plus the worst case when it has several."""
    s, c = run.summary, run.config
    flagged = [k for k, v in (s.get("checks") or {}).items() if isinstance(v, dict) and v.get("status") == "flag"]
    if run.integrity:
        flagged.append("integrity")
    base = {
        "data": s["data"], "model": s["model"], "weights": weights_label(c), "gate_mode": s.get("gate_mode") or "static",
        "params": param_count(s["model"], c.get("num_classes"), c.get("img_size")) if params else None,
        "norm": s.get("norm", c.get("norm")), "eps": s.get("eps", c.get("eps")), "eps_text": s.get("eps_text", c.get("eps_text")),
        "steps": s.get("steps", c.get("steps")), "eval_samples": s.get("eval_samples", 1), "n": s["n"],
        "clean_acc": s["clean"]["acc"], "clean_ci_lo": s["clean"]["ci95"][0], "clean_ci_hi": s["clean"]["ci95"][1],
        "gmacs_clean": s["gmacs"]["clean_mean"], "integrity": "; ".join(run.integrity) or "ok", "folder": run.name,
    }
    rows = []
    for a, v in s["attacks"].items():
        flags = flagged + (["non-adaptive"] if v.get("label") == "non-adaptive" else [])
        rows.append({**base, "attack": a, "label": v.get("label"), "eot": v.get("eot"), "robust_acc": v["acc"],
                     "ci_lo": v["ci95"][0], "ci_hi": v["ci95"][1], "gmacs_adv": v.get("gmacs_mean"),
                     "flags": ";".join(flags)})
    if len(s["attacks"]) != 1:
        labels = {v.get("label") for v in s["attacks"].values()}
        label = labels.pop() if len(labels) == 1 else "mixed"
        flags = flagged + (["non-adaptive"] if s.get("non_adaptive") else [])
        adv = [v["gmacs_mean"] for v in s["attacks"].values() if v.get("gmacs_mean") is not None]
        rows.append({**base, "attack": WORST if s["attacks"] else "none", "label": label if s["attacks"] else None,
                     "eot": max((v.get("eot") or 1 for v in s["attacks"].values()), default=None),
                     "robust_acc": s["robust"]["acc"], "ci_lo": s["robust"]["ci95"][0], "ci_hi": s["robust"]["ci95"][1],
                     "gmacs_adv": max(adv) if adv else None, "flags": ";".join(flags)})
    return rows


def tidy(runs: list[Run], params: bool = True) -> pd.DataFrame:
    """report.csv: one row per run x attack (+ worst case), columns COLUMNS, sorted for reading."""
    rows = [r for run in runs for r in run_rows(run, params)]
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["_worst"] = df["attack"].isin([WORST, "none"])
    df = df.sort_values(["data", "model", "weights", "gate_mode", "norm", "eps", "folder", "_worst", "attack"], kind="stable")
    return df.drop(columns="_worst").reset_index(drop=True)


# -- tables -------------------------------------------------------------------------------------------------


def _pct(x: Any) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _num(x: Any, fmt: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """The human-readable table of one data set: percentages, intervals, M params, units in the headers."""
    return pd.DataFrame({
        "Model": df["model"], "Weights": df["weights"], "Gate mode": df["gate_mode"],
        "Params (M)": [_num(p / 1e6 if p is not None and not pd.isna(p) else None, ".3f") for p in df["params"]],
        "GMACs clean": [_num(x, ".4g") for x in df["gmacs_clean"]],
        "GMACs adv": [_num(x, ".4g") for x in df["gmacs_adv"]],
        "Clean acc (%)": [_pct(x) for x in df["clean_acc"]],
        "Attack": df["attack"], "Norm": df["norm"], "Eps": df["eps_text"], "Steps": df["steps"],
        "Robust acc (%)": [_pct(x) for x in df["robust_acc"]],
        "95% CI (%)": [f"[{_pct(lo)}, {_pct(hi)}]" for lo, hi in zip(df["ci_lo"], df["ci_hi"])],
        "n": df["n"], "EOT": df["eot"], "Label": df["label"], "Flags": df["flags"].replace("", "-"),
    })


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub markdown of `df`: pandas' to_markdown (needs tabulate), else a plain pipe table."""
    try:
        return df.to_markdown(index=False)
    except ImportError:
        def cell(v: Any) -> str:
            return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).replace("|", "\\|")

        head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
        rule = "|" + "|".join("---" for _ in df.columns) + "|"
        body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
        return "\n".join([head, rule, *body])


def latex_table(df: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table (\\toprule/\\midrule/\\bottomrule) through pandas' Styler, LaTeX-escaped."""
    styler = df.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    tex = styler.to_latex(hrules=True, caption=caption, label=label, position="htbp", position_float="centering",
                          column_format="l" * len(df.columns))
    return tex.replace("\\centering\n", "\\centering\n\\scriptsize\n", 1)  # 16 columns: small type to fit a page


def markdown_report(root: Path, table: pd.DataFrame, runs: list[Run], skipped: list[Skipped], plots: list[Path],
                    notes: list[str]) -> str:
    """report.md: one table per data set, then integrity notes, skipped folders and the figures."""
    lines = [f"# Robustness report: {root}", "",
             f"{len(runs)} runs read, {len(skipped)} skipped. Accuracies in %, with n and the 95% Wilson interval; "
             f"GMACs = multiply-adds per image (1e9), clean and under attack. `{WORST}`: a sample counts only if it "
             "survives every attack of the run. Label: `adaptive` (the attack averaged over gate draws, EOT) or "
             "`non-adaptive` for a stochastic model, `deterministic-model` otherwise. Flags: sanity checks that "
             "flagged (see the run's summary.json), `integrity` (summary.json disagrees with samples.csv), "
             "`non-adaptive` (a number on a stochastic model from an attack without EOT).", ""]
    for data, df in table.groupby("data", sort=True):
        lines += [f"## {data}", "", markdown_table(display_table(df)), ""]
    bad = [r for r in runs if r.integrity]
    if bad:
        lines += ["## Integrity", ""]
        lines += [f"- {r.name}: {'; '.join(r.integrity)}" for r in bad]
        lines.append("")
    if skipped:
        lines += ["## Skipped", ""]
        lines += [f"- Skipped: {s.folder.relative_to(root) if s.folder.is_relative_to(root) else s.folder} ({s.reason})"
                  for s in skipped]
        lines.append("")
    lines += ["## Figures", ""]
    for p in plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    if notes:
        lines += ["Notes on the figures:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


# -- figures ------------------------------------------------------------------------------------------------


def _series_colors(keys: list[Any]) -> dict[Any, Any]:
    from matplotlib import colormaps

    unique = sorted(set(keys), key=str)
    cmap = colormaps["tab10" if len(unique) <= 10 else "tab20"]
    return {k: cmap(i % cmap.N) for i, k in enumerate(unique)}


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no data\n{what}", ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.35",
            wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _eps_axis(norm: str) -> tuple[float, str]:
    """Scale and label of an eps axis: Linf in 1/255 steps of [0, 1] pixels, L2 in [0, 1] pixel units."""
    if norm == "Linf":
        return 255.0, "ε (L∞, in 1/255 of the [0, 1] pixel range)"
    return 1.0, f"ε ({norm}, [0, 1] pixel units)"


def _run_level(table: pd.DataFrame) -> pd.DataFrame:
    """One robust row per run: its worst-case row, or its only attack row."""
    worst = table[table["attack"].isin([WORST, "none"])]
    single = table[~table["folder"].isin(worst["folder"])]
    return pd.concat([worst, single]).sort_values(["data", "model", "gate_mode", "eps"])


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto frontier (fewest GMACs, highest accuracy), left to right."""
    best: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not best or y > best[-1][1]:
            best.append((x, y))
    return best


def _yerr(acc: Any, lo: Any, hi: Any) -> list[Any]:
    """Error bars in percentage points from an interval (clipped at 0: rounding may put lo a hair above acc)."""
    import numpy as np

    acc, lo, hi = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (acc, lo, hi))
    return [np.clip(100 * (acc - lo), 0, None), np.clip(100 * (hi - acc), 0, None)]


def _figure(ncols: int, nrows: int = 1, size: tuple[float, float] = (6.4, 4.4)) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _legend(ax: Any, **kw: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=8, **kw)


def plot_accuracy_vs_gmacs(table: pd.DataFrame) -> Any:
    """Clean and worst-case robust accuracy vs mean GMACs per image, with the efficiency frontiers."""
    from matplotlib.lines import Line2D

    runs = _run_level(table)
    datasets = sorted(table["data"].unique())
    fig, axes = _figure(max(1, len(datasets)), size=(9.6, 4.8))
    colors = _series_colors([f"{m} ({g})" for m, g in zip(table["model"], table["gate_mode"])])
    threats = sorted({(n, e, t) for n, e, t in zip(runs["norm"], runs["eps"], runs["eps_text"])})
    markers = {th: m for th, m in zip(threats, "s^vD<>pP*Xh" * 3)}
    for ax, data in zip(axes, datasets):
        df = runs[runs["data"] == data]
        clean = df.drop_duplicates(["model", "gate_mode", "gmacs_clean", "clean_acc"])
        for r in clean.itertuples():
            ax.errorbar(r.gmacs_clean, 100 * r.clean_acc, yerr=_yerr(r.clean_acc, r.clean_ci_lo, r.clean_ci_hi),
                        fmt="o", color=colors[f"{r.model} ({r.gate_mode})"], capsize=3, ms=7)
        for r in df.itertuples():
            x = r.gmacs_adv if not pd.isna(r.gmacs_adv) else r.gmacs_clean
            ax.errorbar(x, 100 * r.robust_acc, yerr=_yerr(r.robust_acc, r.ci_lo, r.ci_hi), capsize=3, ms=7, mfc="white",
                        fmt=markers[(r.norm, r.eps, r.eps_text)], color=colors[f"{r.model} ({r.gate_mode})"])
        front = _frontier([(r.gmacs_clean, 100 * r.clean_acc) for r in clean.itertuples()])
        if len(front) > 1:
            ax.step(*zip(*front), where="post", ls="--", color="0.45", lw=1, zorder=0)
        for _, g in df.groupby(["norm", "eps"]):
            front = _frontier([(r.gmacs_adv if not pd.isna(r.gmacs_adv) else r.gmacs_clean, 100 * r.robust_acc)
                               for r in g.itertuples()])
            if len(front) > 1:
                ax.step(*zip(*front), where="post", ls=":", color="0.45", lw=1, zorder=0)
        shown = {f"{m} ({g})" for m, g in zip(df["model"], df["gate_mode"])}
        handles = [Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colors.items() if k in shown]
        handles += [Line2D([], [], marker="o", color="0.3", ls="", label="clean")]
        handles += [Line2D([], [], marker=markers[th], mfc="white", color="0.3", ls="", label=f"robust, {th[0]} {th[2]}")
                    for th in threats if ((df["norm"] == th[0]) & (df["eps"] == th[1])).any()]
        handles += [Line2D([], [], ls="--", color="0.45", label="frontier, clean"),
                    Line2D([], [], ls=":", color="0.45", label="frontier, robust (per ε)")]
        ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.set_xlabel("mean GMACs per image (multiply-adds × 1e9)")
        ax.set_ylabel("accuracy (%), 95% interval")
        ax.set_ylim(-3, 103)
        ax.set_title(f"Accuracy vs compute ({data}): clean and worst-case robust")
        ax.grid(alpha=0.3)
    return fig


def _dodge(i: int, m: int, width: float) -> float:
    """Offset of series i of m, so error bars at the same x do not hide each other."""
    return (i - (m - 1) / 2) * width


def _legend_right(ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))


def _attack_series(df: pd.DataFrame) -> pd.Series:
    """The attack's name, with its EOT K where one attack ran at several K (each K is its own line)."""
    eot = pd.to_numeric(df["eot"], errors="coerce")
    several = df.assign(_k=eot).groupby("attack")["_k"].transform("nunique") > 1
    return df["attack"].where(~several, df["attack"] + " K=" + eot.fillna(1).astype(int).astype(str))


def plot_robust_vs_eps(table: pd.DataFrame, columns: int = 3) -> Any:
    """Accuracy vs eps, one panel per data set x norm x model x gate mode (weights included where a model ran with
    several), one line per attack (x EOT K where several; clean at eps 0): readable with many runs."""
    panels = sorted({(d, n, m, g) for d, n, m, g in zip(table["data"], table["norm"], table["model"], table["gate_mode"])})
    cols = max(1, min(columns, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = _figure(cols, rows, size=(5.6, 4.0))
    attacks = sorted(set(table["attack"]))
    table = table.assign(series=_attack_series(table))
    colors = _series_colors(sorted(set(table["series"])))
    markers = dict(zip(attacks, "osD^v<>pP*Xh" * 3))
    for ax, (data, norm, model, gate) in zip(axes, panels):
        scale, xlabel = _eps_axis(norm)
        df = table[(table["data"] == data) & (table["norm"] == norm) & (table["model"] == model)
                   & (table["gate_mode"] == gate)]
        # one point per series and eps: the run with the most samples
        df = df.sort_values("n", kind="stable").drop_duplicates(["series", "eps"], keep="last")
        groups = list(df.groupby(["series", "attack"]))
        width = 0.008 * float(df["eps"].max() * scale)
        for i, ((series, attack), g) in enumerate(groups):
            g = g.sort_values("eps")
            best_clean = g.loc[g["n"].idxmax()]
            xs = [x + _dodge(i, len(groups), width) for x in [0.0, *(g["eps"] * scale)]]
            acc = [best_clean["clean_acc"], *g["robust_acc"]]
            yerr = _yerr(acc, [best_clean["clean_ci_lo"], *g["ci_lo"]], [best_clean["clean_ci_hi"], *g["ci_hi"]])
            ax.errorbar(xs, [100 * a for a in acc], yerr=yerr, color=colors[series], marker=markers[attack],
                        capsize=3, ms=5, label=series)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("accuracy (%), 95% interval", fontsize=8)
        ax.set_ylim(-3, 103)
        ax.set_title(f"{model} ({gate}): {data}, {norm}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if not panels:
        axes[0].set_visible(True)
        _no_data(axes[0], "no run")
    return fig


def plot_gmacs_hist(runs: list[Run], max_panels: int = 6, max_attacks: int = 4) -> tuple[Any, list[str]]:
    """Histograms of per-image GMACs, clean vs under each attack, one panel per data set x model x gate mode.

    Per attack, the run at the largest eps (then the most samples) is drawn: the strongest perturbation.
    """
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        s = run.summary
        groups.setdefault((s["data"], s["model"], s.get("gate_mode") or "static"), []).append(run)
    keys = sorted(groups)
    notes = []
    if len(keys) > max_panels:
        notes.append(f"gmacs_hist shows {max_panels} of {len(keys)} model groups; left out: "
                     + ", ".join(f"{m} ({g}) on {d}" for d, m, g in keys[max_panels:]))
        keys = keys[:max_panels]
    ncols = min(3, max(1, len(keys)))
    nrows = max(1, math.ceil(len(keys) / ncols))
    fig, axes = _figure(ncols, nrows, size=(5.6, 4.0))
    for ax, key in zip(axes, keys):
        members = sorted(groups[key], key=lambda r: (-len(r.samples), r.name))
        series = [("clean", members[0].samples["clean_gmacs"])]
        strongest: dict[str, Run] = {}
        for run in members:
            for a in run.attacks:
                old = strongest.get(a)
                if f"{a}_gmacs" in run.samples and (old is None or run.summary.get("eps", 0) > old.summary.get("eps", 0)):
                    strongest[a] = run
        for a, run in sorted(strongest.items())[:max_attacks]:
            series.append((f"{a}, {run.summary.get('norm', '')} {run.summary.get('eps_text', '')}", run.samples[f"{a}_gmacs"]))
        if len(strongest) > max_attacks:
            notes.append(f"gmacs_hist, {key[1]} ({key[2]}): {len(strongest) - max_attacks} attacks left out")
        values = pd.concat([v for _, v in series]).dropna()
        lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
        constant = hi - lo < 1e-9 * max(1.0, abs(hi))
        if constant:
            pad = max(abs(hi) * 0.02, 1e-6)
            lo, hi = lo - pad, hi + pad
        bins = [lo + (hi - lo) * i / 30 for i in range(31)]
        for i, (label, v) in enumerate(series):
            ax.hist(v.dropna(), bins=bins, histtype="step" if i else "stepfilled", lw=1.8 if i else 1,
                    alpha=0.35 if i == 0 else 0.9, ls=["-", "--", "-.", ":"][i % 4] if i else "-",
                    label=f"{label} (mean {v.mean():.4g})")
        if constant:
            ax.text(0.98, 0.6, "same GMACs for\nevery image", transform=ax.transAxes, ha="right", fontsize=8, color="0.35")
        ax.set_xlabel("GMACs per image (multiply-adds × 1e9)")
        ax.set_ylabel("images")
        ax.set_title(f"{key[1]} ({key[2]}), {key[0]}", fontsize=10)
        ax.grid(alpha=0.3)
        _legend(ax, loc="upper left")
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    if not keys:
        _no_data(axes[0], "no run")
    fig.suptitle("Per-image compute, clean vs adversarial (largest ε per attack)")
    return fig, notes


def plot_robust_vs_eot(table: pd.DataFrame) -> tuple[Any, list[str]]:
    """Accuracy of stochastic models vs EOT K, one line per model x gate mode x attack x eps."""
    df = table[(table["eval_samples"] > 1) & ~table["attack"].isin([WORST, "none"])]
    fig, axes = _figure(1, size=(10.0, 4.8))
    ax = axes[0]
    notes = []
    if df.empty:
        _no_data(ax, "no stochastic model in these runs:\nrun e.g. `miarobust run --gate-mode stochastic "
                     "--attack eot-pgd --eot K`\nfor several K")
        notes.append("robust_vs_eot has no data: no run of a stochastic model (--gate-mode stochastic)")
    else:
        df = df.sort_values("n", kind="stable").drop_duplicates(
            ["data", "model", "gate_mode", "attack", "norm", "eps", "eot"], keep="last")
        several = df["data"].nunique() > 1
        groups = list(df.groupby(["data", "model", "gate_mode", "attack", "norm", "eps", "eps_text"]))
        labels = [f"{m} ({g}), {a}, {n} {t}" + (f" [{d}]" if several else "") for (d, m, g, a, n, _, t), _ in groups]
        colors = _series_colors(labels)
        attacks = sorted(set(df["attack"]))
        markers = dict(zip(attacks, "osD^v<>pP*Xh" * 3))
        for i, (((_, _, _, attack, _, _, _), g), label) in enumerate(zip(groups, labels)):
            g = g.sort_values("eot")
            # dodge by at most +-1/8 octave in all, so a point stays readable at its K (20 next to 16)
            ax.errorbar(g["eot"] * 2 ** _dodge(i, len(groups), min(0.04, 0.25 / len(groups))), 100 * g["robust_acc"],
                        capsize=3,
                        yerr=_yerr(g["robust_acc"], g["ci_lo"], g["ci_hi"]), color=colors[label], marker=markers[attack],
                        label=label)
        ks = sorted({int(k) for k in df["eot"]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlim(min(ks) / 1.6, max(ks) * 1.6)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("EOT samples K (gate draws averaged per gradient, log scale)")
        ax.set_ylabel("robust accuracy (%), 95% interval")
        ax.grid(alpha=0.3)
        _legend_right(ax)
        if len(ks) < 2:
            notes.append(f"robust_vs_eot has a single EOT value (K = {ks[0]}): run more K to see a trend")
    ax.set_title("Robust accuracy of stochastic models vs EOT samples")
    return fig, notes


def save_figure(fig: Any, path: Path, pdf: bool) -> list[Path]:
    """Write `fig` as path.png (and path.pdf), atomically."""
    out = [path.with_suffix(".png")]
    atomic_write(out[0], lambda f: fig.savefig(f, format="png", dpi=120))
    if pdf:
        out.append(path.with_suffix(".pdf"))
        atomic_write(out[1], lambda f: fig.savefig(f, format="pdf"))
    return out


# -- RobustBench ---------------------------------------------------------------------------------------------


def robustbench_entries(table: pd.DataFrame) -> dict[Path, dict[str, Any]]:
    """RobustBench model-info JSON per model x gate mode (and eps, when there are several), by relative path.

    autoattack_acc is AutoAttack's accuracy when a run used it (`autoattack`, `autoattack-rand`), else the
    lowest worst-case robust accuracy of the model's runs at that eps, and `attacks` says which was used.
    """
    out: dict[Path, dict[str, Any]] = {}
    runs = _run_level(table)
    for (data, norm, model, gate), g in table.groupby(["data", "norm", "model", "gate_mode"]):
        eps_values = sorted(g["eps"].unique())
        for eps in eps_values:
            rows = g[g["eps"] == eps]
            aa = rows[rows["attack"].isin(AUTOATTACKS)]
            pick = aa if len(aa) else runs[(runs["data"] == data) & (runs["norm"] == norm) & (runs["model"] == model)
                                           & (runs["gate_mode"] == gate) & (runs["eps"] == eps)]
            best = pick.loc[pick["robust_acc"].idxmin()]
            attacks = sorted(set(table.loc[table["folder"] == best["folder"], "attack"]) - {WORST})
            name = model if gate == "static" else f"{model}_{gate}"
            if len(eps_values) > 1:
                name += "_eps" + str(best["eps_text"]).replace("/", "_")
            out[Path(str(data)) / str(norm) / f"{name}.json"] = {
                "link": "", "name": f"{model} ({gate})", "authors": "", "additional_data": False,
                "number_forward_passes": int(best["eval_samples"]), "dataset": str(data), "venue": "",
                "architecture": str(model), "eps": str(best["eps_text"]), "clean_acc": f"{100 * best['clean_acc']:.2f}",
                "reported": "", "autoattack_acc": f"{100 * best['robust_acc']:.2f}",
                # ours
                "gmacs": float(best["gmacs_clean"]), "gate_mode": None if gate == "static" else str(gate),
                "eot": int(best["eot"]) if not pd.isna(best["eot"]) else 1, "n": int(best["n"]),
                "attacks": attacks if not len(aa) else [str(best["attack"])], "source": str(best["folder"]),
            }
    return out


# -- the whole report ----------------------------------------------------------------------------------------


def write_report(root: str | Path, out: str | Path | None = None, pdf: bool = False, robustbench: bool = False,
                 params: bool = True) -> Report:
    """Read every run below `root` and write report.md/.csv/.tex and the figures into `out` (default root)."""
    root = Path(root)
    runs, skipped = load_runs(root)
    out = Path(out) if out is not None else root
    try:  # a folder this process can write into, before anything is written
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UserError(f"cannot write the report into {out} ({e.strerror or e}): pass --out with a folder you can "
                        "write.") from None
    table = tidy(runs, params)
    files: list[Path] = []

    write_text(out / "report.csv", table.to_csv(index=False, lineterminator="\n"))  # full precision
    files.append(out / "report.csv")

    plots: list[Path] = []
    notes: list[str] = []
    # each set of weights its own series where a model ran with several
    several = table.groupby("model")["weights"].transform("nunique") > 1
    series = table.assign(model=table["model"].where(~several, table["model"] + " [" + table["weights"] + "]"))
    makers: list[tuple[str, Callable[[], Any]]] = [
        ("accuracy_vs_gmacs", lambda: (plot_accuracy_vs_gmacs(series), [])),
        ("robust_vs_eps", lambda: (plot_robust_vs_eps(series), [])),
        ("gmacs_hist", lambda: plot_gmacs_hist(runs)),
        ("robust_vs_eot", lambda: plot_robust_vs_eot(series)),
    ]
    for name, make in makers:
        fig, more = make()
        written = save_figure(fig, out / name, pdf)
        plots.append(written[0])
        files += written
        notes += more

    write_text(out / "report.md", markdown_report(root, table, runs, skipped, plots, notes))
    files.append(out / "report.md")

    tex = ["% miarobust report; needs \\usepackage{booktabs}"]
    for data, df in table.groupby("data", sort=True):
        tex.append(latex_table(display_table(df), caption=f"Accuracy and compute on {data} (accuracies in \\%).",
                               label=f"tab:miarobust-{data}"))
    write_text(out / "report.tex", "\n".join(tex))
    files.append(out / "report.tex")

    if robustbench:
        for rel, entry in robustbench_entries(table).items():
            write_json(out / "robustbench" / rel, entry)
            files.append(out / "robustbench" / rel)
    return Report(out, runs, skipped, table, files)
