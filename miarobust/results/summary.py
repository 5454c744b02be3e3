"""What a run folder's JSON files say beyond the records: the environment of config.json, and summary.json
computed from samples.csv alone (every number in it is recomputable from the per-sample records)."""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import pandas as pd

from miarobust.results.io import git_revision
from miarobust.stats import wilson

if TYPE_CHECKING:
    from miarobust.attacks import AttackConfig, AttackInfo
    from miarobust.evaluator import RunConfig


class Accuracy(TypedDict):
    """A proportion of the n images: its value and 95% Wilson interval."""

    acc: float
    ci95: list[float]
    n: int


class AttackSummary(Accuracy):
    """One attack: its accuracy, per-image GMACs under it, and how it saw the gates."""

    gmacs_mean: float
    gmacs_p5: float
    gmacs_p50: float
    gmacs_p95: float
    eot: int  # gate draws averaged per gradient
    adaptive: bool  # through EOT on a stochastic model (or a deterministic model: nothing to average)
    gate_grad: str  # none or straight-through
    label: str
    max_dist: float  # the largest perturbation, in the threat model's norm


class GmacsSummary(TypedDict, total=False):
    clean_mean: float
    clean_p5: float
    clean_p50: float
    clean_p95: float
    adv_mean: dict[str, float]
    static: float  # the backbone with every gate open
    clean_share_of_static: float
    adv_share_of_static: dict[str, float]


class Summary(TypedDict, total=False):
    """summary.json: what `summarize` computes from samples.csv, and what the evaluator adds (the checks, times,
    precision, folder). Requested and resolved settings are config.json's (config.RunRecord)."""

    model: str
    data: str
    gate_mode: str | None
    n: int
    norm: str
    eps: float
    eps_text: str
    steps: int
    eval_samples: int
    stochastic: bool
    clean: Accuracy
    attacks: dict[str, AttackSummary]
    robust: Accuracy
    non_adaptive: bool
    gmacs: GmacsSummary
    precision: str
    wall_seconds: float
    folder: str
    checks: dict[str, Any]
    checks_seconds: float
    checks_batches_resumed: int  # rerun batches of the checks read back from a killed run's partial/checks
    batch_warnings: dict[str, dict[str, list[str]]]  # AutoAttack's warnings by batch, where it warned
    reused: dict[str, Any]  # --reuse: the run the first batches were copied from (results/reuse.py)


@functools.cache
def source_sha256() -> str:
    """SHA-256 of the package's Python source (every miarobust/**/*.py with its path): the code that computed a run,
    committed or not, in a checkout or installed."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def environment() -> dict[str, Any]:
    """Package versions, git revision, the package source's hash and machine, for config.json."""
    import timm
    import torch
    import torchattacks

    import miarobust

    versions = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                "torchattacks": torchattacks.__version__, "miarobust": miarobust.__version__}
    try:
        from importlib.metadata import version

        versions["pyautoattack"] = version("pyautoattack")
    except Exception:  # noqa: BLE001
        versions["pyautoattack"] = None
    rev = git_revision()
    return {"versions": versions, "git_revision": rev, "source_sha256": source_sha256(), "machine": platform.machine(),
            "threads": torch.get_num_threads()}


def summarize(cfg: RunConfig, samples: pd.DataFrame, attacks: list[AttackInfo], draws: int, extra: dict[str, Any],
              acfg: AttackConfig | None = None) -> Summary:
    """summary.json from samples.csv: every number here is recomputable from the per-sample records. `acfg`: the
    attacks' resolved settings (the adaptive preset's EOT K), by default the config's."""
    n = len(samples)
    acfg = acfg or cfg.attack_config()

    def prop(col: str) -> Accuracy:
        s = float(samples[col].sum())
        lo, hi = wilson(s, n)
        return {"acc": s / n if n else 0.0, "ci95": [lo, hi], "n": n}

    stochastic = draws > 1
    per_attack = {}
    for info in attacks:
        if info.name == "none":
            continue
        a = info.name
        entry = prop(f"{a}_correct")
        entry.update({
            "gmacs_mean": float(samples[f"{a}_gmacs"].mean()),
            **{f"gmacs_p{q}": float(samples[f"{a}_gmacs"].quantile(q / 100)) for q in (5, 50, 95)},
            "eot": info.draws(acfg, stochastic),
            "adaptive": info.adaptive(acfg),
            "gate_grad": info.gate_grad,
            "label": (("adaptive" if info.adaptive(acfg) else "non-adaptive") if stochastic else "deterministic-model")
            + (", straight-through gates" if info.straight_through else ""),
            "max_dist": float(samples[f"{a}_dist"].max()) if n else 0.0,
        })
        per_attack[a] = entry
    gm = samples["clean_gmacs"]
    return {
        "model": cfg.model, "data": cfg.data, "gate_mode": extra.get("gate_mode"), "n": n,
        "norm": cfg.norm, "eps": cfg.eps, "eps_text": cfg.eps_text, "steps": cfg.steps,
        "eval_samples": draws, "stochastic": stochastic,
        "clean": prop("clean_correct"),
        "attacks": per_attack,
        "robust": prop("robust"),
        "non_adaptive": stochastic and any(not v["adaptive"] for v in per_attack.values()),
        "gmacs": {"clean_mean": float(gm.mean()), "clean_p5": float(gm.quantile(0.05)), "clean_p50": float(gm.quantile(0.5)),
                  "clean_p95": float(gm.quantile(0.95)),
                  "adv_mean": {a: v["gmacs_mean"] for a, v in per_attack.items()}},
        **{k: v for k, v in extra.items() if k != "gate_mode"},
    }
