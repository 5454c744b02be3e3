"""Regression gate: compare clean and robust accuracy of new runs against a committed baseline.

For every run folder of the baseline, the new run is either read from `runs` (the folder with the same
name: same name = same config identity, see RunConfig.folder_name) or re-run here from the baseline's
config.json. Accuracy is compared per model x attack x eps (clean, each attack, and the worst case when a
run has several attacks), on the per-sample records:

- same images, 0/1 records (a deterministic model): exact one-sided McNemar test on the discordant samples
  (stats.paired_drop_p), which pairs each image with itself;
- otherwise (fractional records of a stochastic model, or different images): one-sided pooled
  two-proportion z-test (stats.two_proportion_drop_p), which ignores the pairing and is conservative.

A drop is a regression when its p-value is below `level`, or, when `tolerance` is given, when the drop
is larger than that fixed tolerance (in accuracy, 0..1): never on a drop within the noise alone.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from miarobust.config import requested_config
from miarobust.errors import UserError
from miarobust.results.read import Run, RunSkipped, find_run_folders, load_run, load_runs
from miarobust.stats import paired_drop_p, two_proportion_drop_p

log = logging.getLogger(__name__)

OK, REGRESSED = "ok", "REGRESSED"


@dataclass(frozen=True)
class RegressConfig:
    """What `miarobust regress` compares, and how strictly."""

    baseline: str
    runs: str | None = None
    level: float = 0.01
    tolerance: float | None = None
    out: str | None = None
    device: str | None = None
    jobs: int = 1  # re-runs in this many worker processes, the CPU threads split between them


def _rerun_folder(config: dict[str, Any], name: str, out: str, device: str | None, threads: int | None = None) -> str:
    """Run one baseline config again into `out` (a complete run already there is reused); its folder.

    Module level and plain arguments: a worker process of `rerun_all` runs it.
    """
    import torch

    from miarobust.evaluator import run

    if threads is not None:
        torch.set_num_threads(threads)
    # the gate compares accuracies; the baseline's sanity checks ran when it was made
    cfg = dataclasses.replace(requested_config(config, name), out=out, checks="off")
    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
    log.info("re-running %s", name)
    return str(run(cfg, progress=False).folder)


def rerun_all(runs: list[Run], out: Path, device: str | None = None, jobs: int = 1) -> list[Run]:
    """The re-runs of `runs`, in their order; with jobs > 1 in that many worker processes, longest first.

    The baseline's small CPU runs are bound by per-operation overhead, not arithmetic, so two processes of
    one thread each finish sooner than one process of two threads (the committed baseline on 2 cores:
    220 s against 356 s). Results do not depend on it: every batch is seeded on its own (see evaluator.py).
    """
    if jobs <= 1 or len(runs) <= 1:
        return [load_run(Path(_rerun_folder(b.config, b.name, str(out), device))) for b in runs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    # the longest (recorded wall time of evaluation and checks) first, so the last to finish is a short one
    order = sorted(range(len(runs)), key=lambda i: -sum(float(runs[i].summary.get(k) or 0.0)
                                                       for k in ("wall_seconds", "checks_seconds")))
    ctx = multiprocessing.get_context("spawn")  # no fork of a process whose thread pools are running
    with ProcessPoolExecutor(max_workers=min(jobs, len(runs)), mp_context=ctx) as pool:
        futures = {i: pool.submit(_rerun_folder, runs[i].config, runs[i].name, str(out), device, threads) for i in order}
        return [load_run(Path(futures[i].result())) for i in range(len(runs))]


def index_runs(root: Path) -> dict[str, Path]:
    """Run folders below `root` by folder name; UserError when a name occurs twice."""
    found: dict[str, Path] = {}
    for folder in find_run_folders(root):
        if folder.name in found:
            raise UserError(f"two runs named {folder.name} below {root} ({found[folder.name]} and {folder}): keep one.")
        found[folder.name] = folder
    return found


def _metrics(run: Run) -> list[tuple[str, str]]:
    """(row name, samples.csv column) pairs compared for a run."""
    rows = [("clean", "clean_correct")] + [(a, f"{a}_correct") for a in run.attacks]
    if len(run.attacks) > 1:
        rows.append(("worst-case", "robust"))
    return rows


def drop_test(base: pd.DataFrame, new: pd.DataFrame, col: str) -> dict[str, Any]:
    """Accuracies, drop and one-sided p-value of `col` between two samples.csv frames."""
    b, c = base[col].astype(float), new[col].astype(float)
    paired = ("index" in base and "index" in new and len(base) == len(new)
              and base["index"].to_numpy().tolist() == new["index"].to_numpy().tolist())
    binary = bool(np.isin(b, (0.0, 1.0)).all() and np.isin(c, (0.0, 1.0)).all())
    if paired and binary:
        bv, cv = b.to_numpy(), c.to_numpy()
        only_base, only_new = int(((bv == 1) & (cv == 0)).sum()), int(((bv == 0) & (cv == 1)).sum())
        test, p = "paired", paired_drop_p(only_base, only_new)
    else:
        test, p = "two-proportion", two_proportion_drop_p(float(b.sum()), len(b), float(c.sum()), len(c))
        only_base = only_new = None
    base_acc = float(b.mean()) if len(b) else 0.0
    new_acc = float(c.mean()) if len(c) else 0.0
    return {"base_acc": base_acc, "new_acc": new_acc, "drop": base_acc - new_acc, "n_base": len(b), "n_new": len(c),
            "test": test, "only_base": only_base, "only_new": only_new, "p": p}


def compare(base: Run, new: Run, level: float = 0.01, tolerance: float | None = None) -> list[dict[str, Any]]:
    """One row per metric (clean, each attack, worst case) of a baseline run vs its new run, with a status."""
    s = base.summary
    rows = []
    for name, col in _metrics(base):
        if col not in new.samples:
            raise UserError(f"{new.folder} has no column {col}: it is not the same run as the baseline {base.name}.")
        t = drop_test(base.samples, new.samples, col)
        regressed = t["drop"] > tolerance if tolerance is not None else (t["drop"] > 0 and t["p"] < level)
        rows.append({"model": s["model"], "gate_mode": s.get("gate_mode") or "static", "data": s["data"],
                     "attack": name, "norm": s.get("norm"), "eps": s.get("eps_text"), **t,
                     "status": REGRESSED if regressed else OK, "run": base.name})
    return rows


def regress(cfg: RegressConfig) -> pd.DataFrame:
    """The comparison table of every baseline run (column `status`: ok or REGRESSED)."""
    if not 0 < cfg.level < 1:
        raise UserError(f"--level {cfg.level} must be between 0 and 1, e.g. 0.01.")
    if cfg.tolerance is not None and not 0 <= cfg.tolerance < 1:
        raise UserError(f"--tolerance {cfg.tolerance} is an accuracy drop in [0, 1), e.g. 0.02.")
    if cfg.jobs < 1:
        raise UserError(f"--jobs {cfg.jobs} must be at least 1, e.g. 2 on a 2-core CPU.")
    baseline = Path(cfg.baseline)
    runs, skipped = load_runs(baseline, warn=False)  # any skipped run is an error, which names it
    if skipped:
        raise UserError(f"the baseline {baseline} has unfinished or corrupt runs: "
                        + "; ".join(f"{s.folder.name} ({s.reason})" for s in skipped) + ". Fix or remove them.")
    bad = [r.name for r in runs if r.integrity]
    if bad:
        raise UserError(f"summary.json and samples.csv disagree in the baseline runs {', '.join(bad)}: regenerate them.")
    if cfg.runs is not None:
        new_root = Path(cfg.runs)
        if not new_root.is_dir():
            raise UserError(f"--runs {new_root} is not a folder: pass the folder your new runs were written into.")
        found = index_runs(new_root)
        missing = [r.name for r in runs if r.name not in found]
        if missing:
            raise UserError(f"--runs {new_root} lacks the baseline runs {', '.join(missing)}: run them with the "
                            "baseline's config (same name), or leave out --runs to re-run them.")
        pairs = []
        for r in runs:
            try:
                pairs.append((r, load_run(found[r.name])))
            except RunSkipped as e:
                raise UserError(f"{found[r.name]} cannot be compared: {e}.") from None
        return _compare_all(pairs, cfg)
    if cfg.out is not None:
        out = Path(cfg.out).resolve()
        if out == baseline.resolve() or baseline.resolve() in out.parents:
            raise UserError(f"--out {cfg.out} is inside the baseline: re-runs there would just read the baseline back.")
        return _compare_all(list(zip(runs, rerun_all(runs, out, cfg.device, cfg.jobs))), cfg)
    with tempfile.TemporaryDirectory(prefix="miarobust-regress-") as tmp:
        return _compare_all(list(zip(runs, rerun_all(runs, Path(tmp), cfg.device, cfg.jobs))), cfg)


def _compare_all(pairs: list[tuple[Run, Run]], cfg: RegressConfig) -> pd.DataFrame:
    """The comparison table of (baseline run, new run) pairs."""
    return _table([row for b, n in pairs for row in compare(b, n, cfg.level, cfg.tolerance)])


def _table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    cols = ["status", "model", "gate_mode", "data", "attack", "norm", "eps", "base_acc", "new_acc", "drop", "n_base",
            "n_new", "test", "only_base", "only_new", "p", "run"]
    return pd.DataFrame(rows, columns=cols)


def format_table(df: pd.DataFrame, level: float, tolerance: float | None) -> str:
    """The table for the terminal, regressed rows marked, and a one-line verdict."""
    shown = df.drop(columns=["only_base", "only_new"]).copy()
    shown["status"] = ["!! " + s if s == REGRESSED else s for s in shown["status"]]
    for c in ("base_acc", "new_acc", "drop"):
        shown[c] = [f"{v:.4f}" for v in shown[c]]
    shown["p"] = [f"{v:.3g}" for v in shown["p"]]
    bad = int((df["status"] == REGRESSED).sum())
    rule = f"drop > tolerance {tolerance:g}" if tolerance is not None else f"one-sided p < {level:g}"
    verdict = (f"{bad} of {len(df)} comparisons regressed ({rule})" if bad
               else f"all {len(df)} comparisons hold ({rule} for none)")
    return shown.to_string(index=False) + "\n" + verdict
