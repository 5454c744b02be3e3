"""The report's four figures (PNG, and PDF on request); each is always drawn and says "no data", with the run
that would fill it, when the runs hold nothing to plot.

- accuracy_vs_gmacs: clean and worst-case robust accuracy vs mean GMACs per image, 95% Wilson intervals,
  the efficiency frontier (Pareto: no other run has both fewer GMACs and higher accuracy) as a step line;
- robust_vs_eps: accuracy vs eps per model x attack, clean accuracy drawn at eps 0, one panel per model;
- gmacs_hist: per-image GMACs clean vs under each attack, from samples.csv;
- robust_vs_eot: accuracy of stochastic models vs EOT samples K per model x attack x eps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from miarobust.report.tables import _run_level
from miarobust.results import atomic_write
from miarobust.results.read import WORST, Run

PLOTS = ("accuracy_vs_gmacs", "robust_vs_eps", "gmacs_hist", "robust_vs_eot")


#: one hue per model family, its members in shades of it, so a plot with many runs reads family by family
FAMILY_MAPS = {"static ViT": "Greys", "MIA-Former": "Blues", "DynamicViT": "Oranges", "A-ViT": "Greens",
               "AdaViT": "Purples", "ToMe": "Reds", "EViT": "YlOrBr"}


def family_of(key: Any) -> str | None:
    """The model family (models.registry.FAMILIES) a series label starts with, or None."""
    from miarobust.models.registry import FAMILIES

    text = str(key)
    best = None
    for family, members in FAMILIES.items():
        for m in members:
            if text.startswith(m) and (best is None or len(m) > len(best[1])):
                best = (family, m)
    return best[0] if best else None


def _series_colors(keys: list[Any]) -> dict[Any, Any]:
    """A color per series: the shades of its family's hue where every series belongs to a known family, else the
    categorical palette. Sorted family by family."""
    from matplotlib import colormaps

    unique = sorted(set(keys), key=str)
    families = {k: family_of(k) for k in unique}
    if not unique or any(f is None for f in families.values()):
        cmap = colormaps["tab10" if len(unique) <= 10 else "tab20"]
        return {k: cmap(i % cmap.N) for i, k in enumerate(unique)}
    order = list(FAMILY_MAPS)
    colors: dict[Any, Any] = {}
    for family in order:
        members = [k for k in unique if families[k] == family]
        cmap = colormaps[FAMILY_MAPS[family]]
        for i, k in enumerate(members):  # shades from 0.45 to 0.95 of the map: light enough to see, never white
            colors[k] = cmap(0.95 - 0.5 * i / max(1, len(members) - 1) if len(members) > 1 else 0.8)
    return colors


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
    attacked = runs[runs["attack"] != "none"]  # a run without attack has a clean point only
    datasets = sorted(table["data"].unique())
    fig, axes = _figure(max(1, len(datasets)), size=(9.6, 4.8))
    colors = _series_colors([f"{m} ({g})" for m, g in zip(table["model"], table["gate_mode"])])
    threats = sorted({(n, e, t) for n, e, t in zip(attacked["norm"], attacked["eps"], attacked["eps_text"])})
    markers = {th: m for th, m in zip(threats, "s^vD<>pP*Xh" * 3)}
    for ax, data in zip(axes, datasets):
        df = runs[runs["data"] == data]
        clean = df.drop_duplicates(["model", "gate_mode", "gmacs_clean", "clean_acc"])
        for r in clean.itertuples():
            ax.errorbar(r.gmacs_clean, 100 * r.clean_acc, yerr=_yerr(r.clean_acc, r.clean_ci_lo, r.clean_ci_hi),
                        fmt="o", color=colors[f"{r.model} ({r.gate_mode})"], capsize=3, ms=7)
        for r in df[df["attack"] != "none"].itertuples():
            x = r.gmacs_adv if not pd.isna(r.gmacs_adv) else r.gmacs_clean
            ax.errorbar(x, 100 * r.robust_acc, yerr=_yerr(r.robust_acc, r.ci_lo, r.ci_hi), capsize=3, ms=7, mfc="white",
                        fmt=markers[(r.norm, r.eps, r.eps_text)], color=colors[f"{r.model} ({r.gate_mode})"])
        front = _frontier([(r.gmacs_clean, 100 * r.clean_acc) for r in clean.itertuples()])
        if len(front) > 1:
            ax.step(*zip(*front), where="post", ls="--", color="0.45", lw=1, zorder=0)
        for _, g in df[df["attack"] != "none"].groupby(["norm", "eps"]):
            front = _frontier([(r.gmacs_adv if not pd.isna(r.gmacs_adv) else r.gmacs_clean, 100 * r.robust_acc)
                               for r in g.itertuples()])
            if len(front) > 1:
                ax.step(*zip(*front), where="post", ls=":", color="0.45", lw=1, zorder=0)
        shown = {f"{m} ({g})" for m, g in zip(df["model"], df["gate_mode"])}
        handles = [Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colors.items() if k in shown]
        handles += [Line2D([], [], marker="o", color="0.3", ls="", label="clean")]
        handles += [Line2D([], [], marker=markers[th], mfc="white", color="0.3", ls="", label=f"robust, {th[0]} {th[2]}")
                    for th in threats if ((df["norm"] == th[0]) & (df["eps"] == th[1]) & (df["attack"] != "none")).any()]
        handles += [Line2D([], [], ls="--", color="0.45", label="frontier, clean")]
        if (df["attack"] != "none").any():
            handles += [Line2D([], [], ls=":", color="0.45", label="frontier, robust (per ε)")]
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
