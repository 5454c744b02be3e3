"""The report's tables: report.csv's rows as a readable table, GitHub markdown, LaTeX (booktabs) and report.md."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from miarobust.results.read import WORST, Run, Skipped

log = logging.getLogger(__name__)


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


def _run_level(table: pd.DataFrame) -> pd.DataFrame:
    """One robust row per run: its worst-case row, or its only attack row."""
    worst = table[table["attack"].isin([WORST, "none"])]
    single = table[~table["folder"].isin(worst["folder"])]
    return pd.concat([worst, single]).sort_values(["data", "model", "gate_mode", "eps"])


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
