"""Sanity checks that flag a weak or misleading robustness evaluation (Carlini et al. 2019, arXiv 1902.06705;
Croce & Hein 2020). Each check returns {"status": "pass" | "flag" | "skip", "value": ..., "message": ...}
and a flag logs a warning that says what it suggests.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from miarobust.stats import wilson

log = logging.getLogger(__name__)


def result(status: str, value: Any, message: str) -> dict[str, Any]:
    if status == "flag":
        log.warning("sanity check flagged: %s", message)
    return {"status": status, "value": value, "message": message}


def robust_le_clean(samples: pd.DataFrame, summary: dict[str, Any]) -> dict[str, Any]:
    """(1) Accuracy on adversarial images must not exceed clean accuracy (beyond the interval)."""
    n = len(samples)
    clean = float(samples["clean_correct"].mean()) if n else 0.0
    lo, hi = wilson(clean * n, n)
    worst = {a: float(samples[f"{a}_adv_correct"].mean()) for a in summary["attacks"]}
    above = {a: v for a, v in worst.items() if v > hi}
    if above:
        return result("flag", worst, f"adversarial accuracy above clean ({above} > {clean:.3f}): the attack helps the "
                      "model, a sign of a broken attack or loss")
    return result("pass", worst, "adversarial accuracy <= clean accuracy for every attack")


def autoattack_flags(ev: Any) -> dict[str, Any]:
    """(6) AutoAttack's own checks (randomness, output range, dynamic model, square success)."""
    warned = [w for fn in ev.attack_fns for w in getattr(fn, "warnings", [])]
    if not any(hasattr(fn, "warnings") for fn in ev.attack_fns):
        return result("skip", None, "no AutoAttack attack in this run")
    if warned:
        return result("flag", sorted(set(warned))[:5], "AutoAttack's checks warned: " + " | ".join(sorted(set(warned))[:3]))
    return result("pass", [], "AutoAttack's checks raised no warning")


def run_checks(cfg: Any, ev: Any, samples: pd.DataFrame, summary: dict[str, Any]) -> dict[str, Any]:
    """Run the checks that `cfg.checks` asks for; returns {check name: result}."""
    checks: dict[str, Any] = {}
    if summary["attacks"]:
        checks["robust_le_clean"] = robust_le_clean(samples, summary)
    checks["autoattack_flags"] = autoattack_flags(ev)
    return checks
