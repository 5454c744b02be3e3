"""Each image's worst case over several runs of the same model and threat model, written as a run folder.

A robust accuracy is an upper bound until the strongest attack agrees: the honest figure is each image's
worst case over every attack run on it (AutoAttack's rule, Croce & Hein 2020, applied across runs). Runs
are combined when they share the model, the weights (config.json `weights_sha256`), the data (name, split,
root), the norm, eps (up to float rounding), the resolved gate mode (stochastic and deterministic gates are
different inference procedures), num_classes and img_size. Per image, `robust` is the minimum over the runs
that cover it of each run's `robust` (on a stochastic model: the minimum over attacks of each attack's
estimate of the expected correctness, so the figure leans low, never high).

The output folder has a run's layout (config.json, samples.csv, summary.json), so `miarobust report` reads
it: one row per source run and a `worst-case` row. The headline n and accuracies are over the images every
source run covers (samples.csv column `in_all`, named by summary.json `headline_rows`); `robust_union` is
the worst case over every covered image, with its own n. A 200-image run combined with 1,000-image runs
gives a headline on 200 images and a separate figure on 1,000.
"""

from __future__ import annotations

import io
import json
import logging
import math
import platform
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from miarobust.errors import UserError
from miarobust.results import (
    CONFIG,
    SAMPLES,
    SUMMARY,
    csv_text,
    git_revision,
    json_bytes,
    run_id,
    write_json,
    write_text,
)
from miarobust.results.read import Run, find_run_folders, load_runs
from miarobust.stats import wilson

log = logging.getLogger(__name__)

KIND = "worst-case"
#: config.json fields that must be equal for runs to be combined (eps is compared apart, with a tolerance).
KEY = ("model", "model_kwargs", "weights_sha256", "data", "split", "data_root", "norm", "gate_mode", "num_classes",
       "img_size", "precision")
#: What a key field means where a run's files leave it out or empty (runs written before the field existed, and
#: the defaults that config.json's identity drops): ToMe at r = 6 and at r = 8 on the same weights are two models,
#: and an image fooled under bf16 need not be fooled under fp32, so neither may join the other's worst case.
KEY_DEFAULTS = {"model_kwargs": "", "precision": "fp32"}
#: Relative tolerance on eps: 8/255 parsed twice may differ in the last bits, 0.031 vs 8/255 is another radius.
EPS_RTOL = 1e-6
#: samples.csv column, 1 for the images every source run covers: the rows of the headline figures.
IN_ALL = "in_all"
#: Column names of samples.csv that a source's label must not produce.
RESERVED = {"index", "label", "clean", "robust", "runs", IN_ALL, "worst_by"}


@dataclass
class WorstResult:
    """One worst-case folder written by `worst_case`."""

    folder: Path
    config: dict[str, Any]
    summary: dict[str, Any]

    def line(self) -> str:
        """One line for the terminal: model, gate mode, eps, runs, n, worst-case accuracy and interval, folder."""
        s, r, u = self.summary, self.summary["robust"], self.summary["robust_union"]
        k = len(self.config["combines"])
        union = f"; on all {u['n']} covered: {u['acc']:.4f}" if u["n"] != r["n"] else ""
        return (f"{s['model']} [{weights_name(self.config)}] ({s.get('gate_mode') or 'static'}) {s['norm']} {s['eps_text']}: "
                f"{k} run{'s' * (k != 1)}, n={r['n']}, worst-case robust {r['acc']:.4f} "
                f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]{union}; results in {self.folder}")


def weights_name(config: dict[str, Any]) -> str:
    """The weights of a worst-case folder in a few characters: the first source's checkpoint file name without
    its suffix, else the start of the weights' SHA-256."""
    checkpoint = config["combines"][0].get("checkpoint")
    if checkpoint:
        return Path(str(checkpoint)).stem
    sha = config.get("weights_sha256")
    return f"sha256 {sha[:12]}" if sha else "no weights file"


def environment() -> dict[str, Any]:
    """Versions, git revision and machine for config.json (no torch: combining runs computes nothing on it)."""
    import miarobust

    return {"versions": {"python": platform.python_version(), "pandas": pd.__version__,
                         "miarobust": miarobust.__version__}, "git_revision": git_revision(), "machine": platform.machine()}


# -- reading and grouping -----------------------------------------------------------------------------------


def _field(run: Run, name: str) -> Any:
    """A group-key field of `run`: config.json's value, summary.json's where config.json lacks it, the field's
    default (KEY_DEFAULTS) where both leave it out or empty."""
    value = run.config[name] if name in run.config else run.summary.get(name)
    return KEY_DEFAULTS.get(name) if value in (None, "", {}) and name in KEY_DEFAULTS else value


def _eps(run: Run) -> float:
    return float(run.summary.get("eps", run.config.get("eps")))


def _is_worst(run: Run) -> bool:
    return run.config.get("kind") == KIND


def read_sources(paths: list[str | Path]) -> tuple[list[Run], list[Path]]:
    """Every finished run below `paths` (each folder once, worst-case folders left out), sorted by folder name,
    and every run folder found (finished or not). UserError when a path has none."""
    if not paths:
        raise UserError("name at least one folder of runs: miarobust worst PATH [PATH ...] --out FOLDER.")
    runs: dict[Path, Run] = {}
    folders: list[Path] = []
    for path in map(Path, paths):
        found, _ = load_runs(path)
        folders += find_run_folders(path)
        usable = [r for r in found if not _is_worst(r)]
        if not usable:
            raise UserError(f"no finished run below {path}, only worst-case folders: pass the folders that "
                            "`miarobust run --out` wrote into.")
        for run in usable:
            runs.setdefault(run.folder.resolve(), run)
    out = []
    for run in sorted(runs.values(), key=lambda r: (r.name, str(r.folder))):
        why = _unusable(run)
        if why:
            log.warning("skipping %s: %s", run.folder, why)
        else:
            out.append(run)
    if not out:
        raise UserError(f"no run below {', '.join(map(str, paths))} has per-image results of an attack: "
                        "run `miarobust run --attack ...` first.")
    return out, folders


def _unusable(run: Run) -> str | None:
    """Why a finished run cannot be combined, or None."""
    if not run.summary["attacks"]:
        return "no attack (--attack none): nothing to take the worst case of"
    if "index" not in run.samples or "label" not in run.samples:
        return "samples.csv lacks the index or label column"
    if _numbers(run.samples, "index").isna().any() or _numbers(run.samples, "label").isna().any():
        return "samples.csv has an index or label that is not a number"
    if run.samples["index"].duplicated().any():
        return "samples.csv repeats an image index"
    return None


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs on the same model, weights, data, threat model and gate mode, in the order of `runs`."""
    groups: list[tuple[tuple[str, ...], float, list[Run]]] = []
    for run in runs:
        key = tuple(json.dumps(_field(run, k), sort_keys=True) for k in KEY)  # None equals None only
        eps = _eps(run)
        for k, e, members in groups:
            if k == key and math.isclose(e, eps, rel_tol=EPS_RTOL, abs_tol=0.0):
                members.append(run)
                break
        else:
            groups.append((key, eps, [run]))
    return [members for _, _, members in groups]


# -- labels and per-run figures ------------------------------------------------------------------------------


def _eot(run: Run) -> int:
    """Largest number of gate draws behind a gradient among the run's attacks (summary.json `eot`)."""
    return max((int(v.get("eot") or 1) for v in run.summary["attacks"].values()), default=1)


def _adaptive(run: Run) -> bool:
    """Whether an attack of the run averaged over gate draws: its per-image minimum is then at most that
    adaptive attack's, so the run's worst case counts as adaptive."""
    return any(bool(v.get("adaptive")) for v in run.summary["attacks"].values())


def labels(runs: list[Run]) -> list[str]:
    """A short label per run, unique within `runs`: its attacks, `-eotK` on a stochastic model, then the folder's hash
    where two runs share the rest, then a counter where they share the folder name too."""
    base = []
    for run in runs:
        label = "+".join(run.summary["attacks"])
        label += f"-eot{_eot(run)}" if run.summary.get("stochastic") else ""  # K means nothing without draws
        base.append(label if label not in RESERVED else f"{label}-run")
    count = Counter(base)
    named = [b if count[b] == 1 else f"{b}-{r.name.rsplit('-', 1)[-1]}" for b, r in zip(base, runs)]
    count, seen = Counter(named), Counter()
    out = []
    for label in named:
        seen[label] += 1
        out.append(label if count[label] == 1 else f"{label}-{seen[label]}")
    return out


def _numbers(frame: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(frame[col], errors="coerce")


# -- combining ----------------------------------------------------------------------------------------------


def combine(runs: list[Run], names: list[str]) -> pd.DataFrame:
    """samples.csv of the worst case: one row per image any run covers, sorted by index.

    Columns: index, label, clean_correct and clean_gmacs (means over the runs that cover the image),
    per run `<label>_correct` (its per-image `robust`, empty where it does not cover the image) and
    `<label>_gmacs` (the most its attacks made the model spend on the image), `runs` (how many cover it),
    `in_all` (1 when every run does), `robust` (the minimum over the runs) and `worst_by` (the label that
    gave it, the first in column order on ties).
    """
    per = {name: run.samples.set_index(_numbers(run.samples, "index").astype(int)) for name, run in zip(names, runs)}
    robust = pd.DataFrame({n: _numbers(s, "robust") for n, s in per.items()})
    index = robust.index.sort_values()
    robust = robust.reindex(index)
    lab = pd.DataFrame({n: _numbers(s, "label") for n, s in per.items()}).reindex(index)
    disagree = lab.nunique(axis=1) > 1
    if disagree.any():
        i = index[disagree.to_numpy()][0]
        who = ", ".join(f"{runs[names.index(n)].folder} says {int(v)}" for n, v in lab.loc[i].dropna().items())
        raise UserError(f"image {i} has different labels in runs that would be combined ({who}): they are not "
                        "on the same data; move one of them out of the folders given.")
    covered = robust.notna()
    clean = pd.DataFrame({n: _numbers(s, "clean_correct") for n, s in per.items()}).reindex(index)
    gmacs = pd.DataFrame({n: _numbers(s, "clean_gmacs") for n, s in per.items()}).reindex(index)
    frame = pd.DataFrame({"index": index.astype(int), "label": lab.max(axis=1).astype(int).to_numpy(),
                          "clean_correct": clean.where(covered).mean(axis=1).to_numpy(),
                          "clean_gmacs": gmacs.where(covered).mean(axis=1).to_numpy()})
    for name, run in zip(names, runs):
        frame[f"{name}_correct"] = robust[name].to_numpy()
        cols = [f"{a}_gmacs" for a in run.summary["attacks"] if f"{a}_gmacs" in run.samples]
        adv = per[name][cols].apply(pd.to_numeric, errors="coerce").max(axis=1) if cols else pd.Series(dtype=float)
        frame[f"{name}_gmacs"] = adv.reindex(index).where(covered[name]).to_numpy()
    frame["runs"] = covered.sum(axis=1).to_numpy()
    frame[IN_ALL] = (frame["runs"] == len(runs)).astype(int)
    frame["robust"] = robust.min(axis=1).to_numpy()
    frame["worst_by"] = robust.fillna(math.inf).idxmin(axis=1).to_numpy()
    return frame


def _prop(values: pd.Series) -> dict[str, Any]:
    """Accuracy, 95% Wilson interval and n of per-image correctness in [0, 1] (fractional for a stochastic model)."""
    n = len(values)
    s = float(values.sum())
    lo, hi = wilson(s, n)
    return {"acc": s / n if n else 0.0, "ci95": [lo, hi], "n": n}


def summarize(runs: list[Run], names: list[str], folders: list[str], samples: pd.DataFrame) -> dict[str, Any]:
    """summary.json of the worst case, from its samples.csv as written (report checks it against the file)."""
    first = runs[0].summary
    head = samples[samples[IN_ALL] == 1]
    stochastic = any(bool(r.summary.get("stochastic")) for r in runs)
    attacks = {}
    for name, run, folder in zip(names, runs, folders):
        adaptive = _adaptive(run)
        gm = _numbers(head, f"{name}_gmacs")
        attacks[name] = {
            **_prop(head[f"{name}_correct"]),
            "gmacs_mean": float(gm.mean()) if gm.notna().any() else None,
            "eot": _eot(run), "adaptive": adaptive,
            "label": ("adaptive" if adaptive else "non-adaptive") if stochastic else "deterministic-model",
            "folder": folder, "attacks": list(run.summary["attacks"]),
            "own": {"acc": run.summary["robust"]["acc"], "n": run.summary["n"]},
        }
    checks = {f"{name}/{check}": entry for name, run in zip(names, runs)
              for check, entry in (run.summary.get("checks") or {}).items() if isinstance(entry, dict)}
    return {
        "kind": KIND, "model": first["model"], "data": first["data"], "gate_mode": first.get("gate_mode"),
        "n": len(head), "norm": first.get("norm", runs[0].config.get("norm")), "eps": _eps(runs[0]),
        "eps_text": first.get("eps_text", runs[0].config.get("eps_text")), "steps": None,
        "eval_samples": max(int(r.summary.get("eval_samples") or 1) for r in runs), "stochastic": stochastic,
        "headline_rows": IN_ALL,
        "clean": _prop(head["clean_correct"]), "attacks": attacks, "robust": _prop(head["robust"]),
        "robust_union": _prop(samples["robust"]), "clean_union": _prop(samples["clean_correct"]),
        "non_adaptive": stochastic and not any(_adaptive(r) for r in runs),
        "worst_by": {name: int((head["worst_by"] == name).sum()) for name in names},
        "gmacs": {"clean_mean": float(head["clean_gmacs"].mean()) if len(head) else 0.0,
                  "adv_mean": {a: v["gmacs_mean"] for a, v in attacks.items()}},
        "checks": checks,
    }


def folder_name(runs: list[Run]) -> str:
    """`<model>-<data>-worst-<norm>-<eps>-<hash of the sorted source folder names and the weights>`."""
    s, c = runs[0].summary, runs[0].config
    eps = str(s.get("eps_text", c.get("eps_text"))).replace("/", "_")
    digest = run_id({"sources": sorted(r.name for r in runs), "weights": c.get("weights_sha256")})
    return f"{s['model']}-{s['data']}-worst-{s.get('norm', c.get('norm'))}-{eps}-{digest}"


def make_config(runs: list[Run], names: list[str], folders: list[str]) -> dict[str, Any]:
    """config.json: the group key, the source runs (attacks, EOT, weights, own robust accuracy, checks)."""
    combines = [{
        "folder": folder, "label": name, "attacks": list(run.summary["attacks"]), "eot": _eot(run),
        "steps": run.summary.get("steps", run.config.get("steps")), "n": run.summary["n"],
        "checkpoint": run.config.get("checkpoint"), "weights_sha256": run.config.get("weights_sha256"),
        "seed": run.config.get("seed"), "robust_acc": run.summary["robust"]["acc"],
        "checks": {k: v.get("status") for k, v in (run.summary.get("checks") or {}).items() if isinstance(v, dict)},
    } for name, run, folder in zip(names, runs, folders)]
    return {"kind": KIND, **{k: _field(runs[0], k) for k in KEY}, "eps": _eps(runs[0]),
            "eps_text": runs[0].summary.get("eps_text", runs[0].config.get("eps_text")),
            "combines": combines, "columns": {name: folder for name, folder in zip(names, folders)},
            "environment": environment()}


def _order(members: list[Run]) -> tuple[Any, ...]:
    """Reading order of the groups: model, data, weights, gate mode, norm, eps."""
    run = members[0]
    return (str(_field(run, "model")), str(_field(run, "data")), str(run.config.get("checkpoint")),
            str(_field(run, "weights_sha256")), str(_field(run, "gate_mode")), str(_field(run, "norm")), _eps(run))


# -- the whole job ------------------------------------------------------------------------------------------


def _check_out(out: Path, run_folders: list[Path]) -> None:
    """UserError unless `out` can hold the results: not a file, not under a file, not inside a run folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder for the worst-case results.")
    where = out.resolve()
    for folder in run_folders:
        if where.is_relative_to(folder.resolve()):
            raise UserError(f"--out {out} lies inside the run folder {folder}: pass a folder outside every run "
                            "folder, e.g. one next to them.")
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"--out {out} lies under the file {blocker}: pass a folder for the worst-case results.")


def worst_case(paths: str | Path | list[str | Path], out: str | Path) -> list[WorstResult]:
    """Write one worst-case folder per group of finished runs below `paths` into `out`; returns what was written.

    Everything is read, grouped and combined before the first file is written, so bad input (a missing
    path, no finished run, an `out` that is a file or inside a run folder, runs that disagree on an image's
    label) raises UserError and writes nothing. The same inputs write the same bytes again.
    """
    out = Path(out)
    runs, run_folders = read_sources([paths] if isinstance(paths, (str, Path)) else list(paths))
    _check_out(out, run_folders)
    planned = []
    for members in sorted(group_runs(runs), key=_order):
        names = labels(members)
        folders = [str(r.folder) for r in members]
        planned.append((members, names, folders, combine(members, names)))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write into {out} ({e.strerror or e}): pass --out with a folder you can write.") from None
    results = []
    for members, names, folders, frame in planned:
        folder = out / folder_name(members)
        config = make_config(members, names, folders)
        text = csv_text(frame)
        samples = pd.read_csv(io.StringIO(text))  # what samples.csv will hold, so summary == f(samples.csv)
        summary = {**summarize(members, names, folders, samples), "folder": folder.name}
        kept = _same_folder(folder, config, text, summary)
        if kept is not None:  # the same result already on disk: keep it, with the environment that wrote it
            results.append(WorstResult(folder, kept, summary))
            continue
        write_json(folder / CONFIG, config)
        write_text(folder / SAMPLES, text)
        write_json(folder / SUMMARY, summary)  # last: a folder with summary.json is finished
        results.append(WorstResult(folder, config, summary))
    return results


def _same_folder(folder: Path, config: dict[str, Any], samples: str, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The config.json of a finished folder that holds this very result (the same samples.csv and summary.json,
    the same config.json but for its `environment`), else None. Rerunning `worst` after a commit that changed no
    source run then rewrites nothing, and a folder's git revision stays the one that first wrote the result."""
    try:
        if (folder / SAMPLES).read_text() != samples or (folder / SUMMARY).read_bytes() != json_bytes(summary):
            return None
        old = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    new = json.loads(json_bytes(config))
    same = {k: v for k, v in old.items() if k != "environment"} == {k: v for k, v in new.items() if k != "environment"}
    return old if same else None
