"""Reading run folders: a finished run (config.json, summary.json, samples.csv) checked for completeness and
integrity, and its rows of the tidy table (report.csv) that `report`, `regress` and `worst` share.

A folder still in progress (partial/ present or no summary.json) or unreadable (bad JSON or CSV) raises
RunSkipped, whose message says why. summary.json is checked against samples.csv (each accuracy must be the
mean of its *_correct column): a mismatch is recorded in Run.integrity and logged, not fatal.

The tidy table has one row per run x attack, plus a `worst-case` row for runs with more than one attack (a
sample counts as robust only if it survives every attack of the run). Its GMACs under attack is the largest
mean over the run's attacks, the most any of them made the model spend. A folder written by `miarobust worst`
reads as a run whose attacks are its source runs.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from miarobust.errors import UserError
from miarobust.results.store import CONFIG, PARTIAL, SAMPLES, SUMMARY

log = logging.getLogger(__name__)

#: Accuracies in summary.json vs the mean of samples.csv: equal up to the CSV's 6 significant digits.
INTEGRITY_TOL = 1e-6
WORST = "worst-case"

#: Columns of report.csv that hold numbers (None where a run has none); anything else there is corruption.
NUMERIC = ("eps", "steps", "eval_samples", "n", "eot", "clean_acc", "clean_ci_lo", "clean_ci_hi", "robust_acc", "ci_lo",
           "ci_hi", "gmacs_clean", "gmacs_adv")

#: Columns of report.csv, in order.
COLUMNS = ["data", "model", "weights", "gate_mode", "params", "norm", "eps", "eps_text", "attack", "label", "eot", "steps",
           "eval_samples", "n", "clean_acc", "clean_ci_lo", "clean_ci_hi", "robust_acc", "ci_lo", "ci_hi",
           "gmacs_clean", "gmacs_adv", "flags", "integrity", "folder"]

#: (model, num_classes, img_size) -> its parameter count, or None where it cannot be built.
ParamCount = Callable[[str, "int | None", "int | None"], "int | None"]


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
        rows = run_rows(run)
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


def weights_label(config: dict[str, Any]) -> str:
    """Which weights a run used, in a few characters: the checkpoint file's name without its suffix (a shipped
    checkpoint's name), with the start of its SHA-256 for a file of the user's, and the timm model arguments that
    made a variant of the model (`--model-kwargs`), and a precision other than fp32; 'random' without weights."""
    source = (config.get("combines") or [config])[0]  # a worst-case folder: its first source run's
    checkpoint, sha = source.get("checkpoint"), source.get("weights_sha256") or config.get("weights_sha256")
    if not checkpoint:
        return f"sha256 {sha[:8]}" if sha else "random"
    stem = Path(str(checkpoint)).name.removesuffix(".safetensors")
    shipped = Path(str(checkpoint)).parent.name == "checkpoints" and Path(str(checkpoint)).parent.parent.name == "miarobust"
    label = stem if shipped or not sha else f"{stem} ({sha[:8]})"
    kwargs = source.get("model_kwargs") or config.get("model_kwargs")  # a variant of the model, e.g. ToMe's r=8
    label = f"{label}, {kwargs}" if kwargs else label
    precision = source.get("precision") or config.get("precision") or "fp32"  # evaluated under autocast
    return label if precision == "fp32" else f"{label}, {precision}"


def run_rows(run: Run, params: ParamCount | None = None) -> list[dict[str, Any]]:
    """The rows of report.csv for one run: one per attack, plus the worst case when it has several; `params`
    counts a model's parameters (the column is empty without it)."""
    s, c = run.summary, run.config
    flagged = [k for k, v in (s.get("checks") or {}).items() if isinstance(v, dict) and v.get("status") == "flag"]
    if run.integrity:
        flagged.append("integrity")
    base = {
        "data": s["data"], "model": s["model"], "weights": weights_label(c), "gate_mode": s.get("gate_mode") or "static",
        "params": params(s["model"], c.get("num_classes"), c.get("img_size")) if params else None,
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


def tidy(runs: list[Run], params: ParamCount | None = None) -> pd.DataFrame:
    """report.csv: one row per run x attack (+ worst case), columns COLUMNS, sorted for reading."""
    rows = [r for run in runs for r in run_rows(run, params)]
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["_worst"] = df["attack"].isin([WORST, "none"])
    df = df.sort_values(["data", "model", "weights", "gate_mode", "norm", "eps", "folder", "_worst", "attack"], kind="stable")
    return df.drop(columns="_worst").reset_index(drop=True)
