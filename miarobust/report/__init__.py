"""Tables and plots from results folders: report.md, report.csv, report.tex, four figures, RobustBench JSON.

Reads every run folder below a path (a folder holding config.json, as `miarobust run` writes it) through
miarobust.results.read: a folder in progress or unreadable is skipped with a warning and named in report.md,
and every number comes from summary.json checked against samples.csv. The tables are in tables.py, the
figures (always the same four files; a figure with nothing to plot says "no data" and which run would fill
it) in plots.py, the RobustBench export in export.py.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from miarobust.errors import UserError
from miarobust.report.export import robustbench_entries
from miarobust.report.plots import (
    PLOTS,
    plot_accuracy_vs_gmacs,
    plot_gmacs_hist,
    plot_robust_vs_eot,
    plot_robust_vs_eps,
    save_figure,
)
from miarobust.report.tables import display_table, latex_table, markdown_report, param_count
from miarobust.results import write_json, write_text
from miarobust.results.read import Run, Skipped, load_runs, tidy

__all__ = ["PLOTS", "Report", "write_report"]


@dataclass
class Report:
    """What `write_report` read and wrote."""

    out: Path
    runs: list[Run]
    skipped: list[Skipped]
    table: pd.DataFrame
    files: list[Path]


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
    table = tidy(runs, param_count if params else None)
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
