"""Sanity checks that flag a weak or misleading robustness evaluation (Carlini et al. 2019, arXiv 1902.06705;
Athalye et al. 2018, arXiv 1802.00420; Croce & Hein 2020, arXiv 2003.01690).

Each check returns {"status": "pass" | "flag" | "skip", "value": ..., "message": ...}; a flag logs a warning
that says what it suggests. The checks, in summary.json under "checks":

1. ``robust_le_clean``: adversarial accuracy is not above clean accuracy (from samples.csv, free).
2. ``large_eps``: PGD at Linf eps 0.5, where any image can be turned into a grey one, brings accuracy down to
   at most 1/num_classes + 0.05; else the attack does not work on this model at all.
3. ``more_steps``: every attack whose strength follows --steps (PGD family, CW), rerun with twice the steps and
   one more restart (and a step no smaller than the default 2.5 eps / steps, so a step too small to cross the
   ball is caught too), lowers robust accuracy by at most the half-width of its 95% Wilson interval.
4. ``square_vs_white_box``: the black-box Square attack does not lower robust accuracy below what the run's
   white-box attacks reached by more than that half-width; else the gradients mislead (gradient masking).
5. ``eot_convergence``: for a stochastic model, the run's EOT attack rerun with 2K gate draws changes robust
   accuracy by at most that half-width; else K draws were not enough.
6. ``autoattack_flags``: AutoAttack's own checks (randomness, output range, Square's success) raised no warning;
   its randomness warning is expected, not a flag, where the run attacks a stochastic model through EOT.

How much is checked (--checks, RunConfig.checks), see `plan`: ``off`` runs check 1 only; ``on`` runs all on every
image, Square on the first 50 images with 5000 queries (AutoAttack's budget); ``auto`` runs all on every image
when n <= 200, else on the first 100 images, and Square on the first 20 images with 1000 queries, a weaker
probe that costs about as much as a 10-step PGD on 100 images. Square and the reruns use only images the run
did not already break, so a check on a model with robust accuracy 0 costs next to nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch

from miarobust.attacks import RANDOMNESS_WARNING, AttackConfig, AttackInfo, build_attack, expected_warning, get_attack  # noqa: F401  (RANDOMNESS_WARNING: re-exported)
from miarobust.attacks.threat import ThreatModel
from miarobust.stats import wilson

log = logging.getLogger(__name__)

LARGE_EPS = 0.5  # Linf: every image in [0, 1] reaches the all-grey image
CHANCE_SLACK = 0.05
AUTO_FULL_N = 200  # --checks auto: all images up to this n
AUTO_IMAGES = 100  # --checks auto: first images beyond it
SQUARE = {"on": (50, 5000), "auto": (20, 1000)}  # (images, queries) of check 4


@dataclass(frozen=True)
class Plan:
    """What --checks asks for: the checks to run, on how many first images, and Square's budget."""

    checks: tuple[str, ...]
    images: int
    square_images: int
    square_queries: int


CHECKS = ("robust_le_clean", "large_eps", "more_steps", "square_vs_white_box", "eot_convergence", "autoattack_flags")


def plan(mode: str, n: int) -> Plan:
    """The checks of mode 'off' | 'auto' | 'on' for a run of n images (see the module docstring)."""
    if mode == "off":
        return Plan(CHECKS[:1], 0, 0, 0)
    images = n if mode == "on" or n <= AUTO_FULL_N else min(n, AUTO_IMAGES)
    sq_images, queries = SQUARE["on" if mode == "on" else "auto"]
    return Plan(CHECKS, images, min(n, sq_images), queries)


def result(status: str, value: Any, message: str) -> dict[str, Any]:
    if status == "flag":
        log.warning("sanity check flagged: %s", message)
    return {"status": status, "value": value, "message": message}


def half_width(values: pd.Series | torch.Tensor) -> float:
    """Half-width of the 95% Wilson interval of the mean of per-image correctness values."""
    n = len(values)
    lo, hi = wilson(float(values.sum()), n)
    return (hi - lo) / 2


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


# -- rerunning attacks on the first images -----------------------------------------------------------------


def first_rows(samples: pd.DataFrame, m: int) -> pd.DataFrame:
    """The records of the first m images of the data set, in order."""
    rows = samples[samples["index"] < m].sort_values("index").reset_index(drop=True)
    if len(rows) != m:
        raise RuntimeError(f"samples.csv holds {len(rows)} of the first {m} images")
    return rows


def batches(ev: Any, m: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(batch number, images, labels) of the run's batches, cut at the first m images."""
    b = 0
    while b * ev.cfg.batch_size < m:
        x, y, idx = ev.batch(b)
        keep = idx < m
        yield b, x[keep].to(ev.device), y[keep].to(ev.device)
        b += 1


def rerun(ev: Any, name: str, acfg: AttackConfig, m: int, salt: int, todo: torch.Tensor | None = None) -> torch.Tensor:
    """Adversarial correctness (m,) of attack `name` under `acfg` on the first m images (a mean over gate
    draws for a stochastic model). Only images with `todo` set are attacked; the others get 0. The attack's
    output is checked against its threat model like any other; seeded per batch, so the result is reproducible.
    """
    from miarobust.evaluate import batch_seed

    info = get_attack(name, acfg)
    fn = build_attack(info, ev.victim, acfg)
    threat = ThreatModel(acfg.norm, acfg.eps)
    out = torch.zeros(m)
    for b, x, y in batches(ev, m):
        lo = b * ev.cfg.batch_size
        sel = torch.arange(len(x)) if todo is None else todo[lo:lo + len(x)].nonzero().squeeze(1)
        if len(sel) == 0:
            continue
        sel_dev = sel.to(ev.device)
        xs, ys = x[sel_dev], y[sel_dev]
        torch.manual_seed(batch_seed(ev.cfg.seed, b) + salt)
        x_adv = fn(xs, ys).detach()
        threat.check(xs, x_adv, f"{name} (sanity check)")
        out[lo + sel] = ev.predict(x_adv, ys)["correct"].float().cpu()
    return out


def correct(rows: pd.DataFrame, col: str) -> torch.Tensor:
    return torch.tensor(rows[col].to_numpy(), dtype=torch.float32)


# -- the checks that rerun attacks ----------------------------------------------------------------------------


def large_eps(ev: Any, samples: pd.DataFrame, m: int) -> dict[str, Any]:
    """(2) PGD at Linf eps 0.5 must bring accuracy to chance (1/num_classes + 0.05) or below."""
    if m == 0:
        return result("skip", None, "no images")
    rows = first_rows(samples, m)
    k = max((info.eot(ev.acfg) for info in ev.attacks if info.white_box), default=1) if ev.victim.stochastic else 1
    acfg = replace(ev.acfg, norm="Linf", eps=LARGE_EPS, alpha=None, steps=max(ev.acfg.steps, 10), restarts=1, eot=k)
    clean = correct(rows, "clean_correct")
    todo = clean > 0
    acc = float(torch.minimum(clean, rerun(ev, "pgd", acfg, m, salt=20_011, todo=todo)).mean())
    bound = 1 / ev.model.model.num_classes + CHANCE_SLACK
    value = {"acc": acc, "bound": bound, "eps": LARGE_EPS, "steps": acfg.steps, "eot": k, "images": m}
    if acc > bound:
        return result("flag", value, f"PGD at Linf eps {LARGE_EPS} (enough to turn any image grey) leaves accuracy "
                      f"{acc:.3f} > {bound:.3f} on the first {m} images: the attack does not work on this model. "
                      "Suspect masked or obfuscated gradients (try bpda-pgd, eot-pgd, square), a broken loss or "
                      "a bug in the attack; do not trust the robust accuracy of this run.")
    return result("pass", value, f"PGD at Linf eps {LARGE_EPS} brings accuracy to {acc:.3f} <= {bound:.3f}")


def more_steps(ev: Any, samples: pd.DataFrame, m: int) -> dict[str, Any]:
    """(3) Twice the steps and one more restart must not lower robust accuracy beyond the CI half-width."""
    stepped = [info for info in ev.attacks if info.stepped]
    if not stepped:
        return result("skip", None, "no attack in this run whose strength follows --steps/--restarts "
                      "(AutoAttack and Square run fixed budgets)")
    if m == 0:
        return result("skip", None, "no images")
    rows = first_rows(samples, m)
    robust = correct(rows, "robust")
    a = ev.acfg
    steps = 2 * a.steps
    alpha = None if a.alpha is None else max(a.alpha, 2.5 * a.eps / steps)
    acfg = replace(a, steps=steps, restarts=a.restarts + 1, alpha=alpha)
    stronger = robust.clone()
    for i, info in enumerate(stepped):
        adv = rerun(ev, info.name, acfg, m, salt=30_011 + i, todo=stronger > 0)
        stronger = torch.minimum(stronger, adv)
    r, s, hw = float(robust.mean()), float(stronger.mean()), half_width(robust)
    value = {"robust": r, "stronger": s, "drop": r - s, "ci_half_width": hw, "steps": steps,
             "restarts": acfg.restarts, "attacks": [i.name for i in stepped], "images": m}
    if r - s > hw:
        return result("flag", value, f"{steps} steps and {acfg.restarts} restarts lower robust accuracy on the first "
                      f"{m} images from {r:.3f} to {s:.3f} (more than the CI half-width {hw:.3f}): the attack was too "
                      f"weak; rerun with --steps {steps} --restarts {acfg.restarts} or more (and a larger --alpha).")
    return result("pass", value, f"{steps} steps and {acfg.restarts} restarts: robust accuracy {r:.3f} -> {s:.3f}, "
                  f"within the CI half-width {hw:.3f}")


def square_vs_white_box(ev: Any, samples: pd.DataFrame, m: int, queries: int) -> dict[str, Any]:
    """(4) Square (black-box) must not beat the run's white-box attacks beyond the CI half-width."""
    white = [info for info in ev.attacks if info.white_box]
    if not white:
        return result("skip", None, "no white-box attack in this run to compare Square with")
    if m == 0:
        return result("skip", None, "no images")
    rows = first_rows(samples, m)
    wb = correct(rows, "clean_correct")
    for info in white:
        wb = torch.minimum(wb, correct(rows, f"{info.name}_correct"))
    acfg = replace(ev.acfg, queries=queries)
    square = rerun(ev, "square", acfg, m, salt=40_011, todo=wb > 0)
    both = torch.minimum(wb, square)
    r, s, hw = float(wb.mean()), float(both.mean()), half_width(wb)
    names = "+".join(i.name for i in white)
    value = {"white_box": r, "with_square": s, "drop": r - s, "ci_half_width": hw, "queries": queries,
             "attacks": [i.name for i in white], "images": m}
    if r - s > hw:
        return result("flag", value, f"Square (black-box, {queries} queries) lowers robust accuracy on the first {m} "
                      f"images from {r:.3f} ({names}) to {s:.3f}: a black-box attack beats the gradient attacks, a sign "
                      "of gradient masking (Athalye et al. 2018). Try bpda-pgd / eot-pgd / more restarts, and include "
                      "square (or autoattack) in the reported worst case.")
    return result("pass", value, f"Square ({queries} queries): {r:.3f} -> {s:.3f} on the first {m} images, within "
                  f"the CI half-width {hw:.3f} of {names}")


def eot_convergence(ev: Any, samples: pd.DataFrame, m: int) -> dict[str, Any]:
    """(5) For a stochastic model, the EOT attack with 2K draws must agree with K draws within the CI half-width."""
    if not ev.victim.stochastic:
        return result("skip", None, "deterministic model: no gate draws to average")
    eligible: list[AttackInfo] = [i for i in ev.attacks if i.white_box and i.own_eot == 0]
    if not eligible:
        return result("skip", None, "no gradient attack with the EOT wrapper in this run (autoattack-rand runs its own "
                      "EOT 20): add eot-pgd to check convergence in K")
    if m == 0:
        return result("skip", None, "no images")
    info = next((i for i in eligible if i.stepped), eligible[0])  # the cheapest to rerun
    k = info.eot(ev.acfg)
    rows = first_rows(samples, m)
    clean, at_k = correct(rows, "clean_correct"), correct(rows, f"{info.name}_correct")
    at_2k = torch.minimum(clean, rerun(ev, info.name, replace(ev.acfg, eot=2 * k), m, salt=50_011, todo=clean > 0))
    r, s, hw = float(at_k.mean()), float(at_2k.mean()), half_width(at_k)
    value = {"attack": info.name, "eot": k, "acc_k": r, "acc_2k": s, "diff": r - s, "ci_half_width": hw, "images": m}
    if abs(r - s) > hw:
        return result("flag", value, f"{info.name} with EOT {2 * k} gives robust accuracy {s:.3f} vs {r:.3f} with EOT "
                      f"{k} on the first {m} images (more than the CI half-width {hw:.3f}): not converged in K = {k} "
                      f"gate draws; rerun with --eot {4 * k} or more.")
    return result("pass", value, f"{info.name}: EOT {k} -> {2 * k} changes robust accuracy {r:.3f} -> {s:.3f}, "
                  f"within the CI half-width {hw:.3f}")




def autoattack_flags(ev: Any) -> dict[str, Any]:
    """(6) AutoAttack's own checks (randomness, output range, dynamic model, square success).

    On a stochastic model attacked through EOT (K >= 2 gate draws per gradient) AutoAttack's randomness
    warning is expected, not a flag: the model is random by design, the run averages over its draws, and
    check 5 judges whether K draws are enough. Without EOT it flags, as AutoAttack advises."""
    runs = [info for info, fn in zip(ev.attacks, ev.attack_fns) if hasattr(fn, "warnings")]
    if not runs:
        return result("skip", None, "no AutoAttack attack in this run")
    warned, expected = set(), set()
    for info in runs:
        for w in (w for batch in ev.warnings.values() for w in batch.get(info.name, [])):
            (expected if expected_warning(w, info.eot(ev.acfg), ev.victim.stochastic) else warned).add(w)
    if warned:
        return result("flag", sorted(warned)[:5], "AutoAttack's checks warned: " + " | ".join(sorted(warned)[:3]))
    if expected:
        return result("pass", sorted(expected), "AutoAttack's checks raised only its randomness warning, expected "
                      "here: the run attacks the stochastic gates through EOT (check 5 judges K)")
    return result("pass", [], "AutoAttack's checks raised no warning")


def run_checks(cfg: Any, ev: Any, samples: pd.DataFrame, summary: dict[str, Any]) -> dict[str, Any]:
    """Run the checks that `cfg.checks` asks for (see `plan`); returns {check name: result}."""
    p = plan(cfg.checks, len(samples))
    attacked = bool(summary["attacks"])
    skip = result("skip", None, "no attack in this run")
    run: dict[str, Any] = {
        "robust_le_clean": lambda: robust_le_clean(samples, summary),
        "large_eps": lambda: large_eps(ev, samples, p.images),
        "more_steps": lambda: more_steps(ev, samples, p.images),
        "square_vs_white_box": lambda: square_vs_white_box(ev, samples, p.square_images, p.square_queries),
        "eot_convergence": lambda: eot_convergence(ev, samples, p.images),
        "autoattack_flags": lambda: autoattack_flags(ev),
    }
    checks: dict[str, Any] = {}
    for name in p.checks:
        if not attacked and name != "autoattack_flags":
            checks[name] = skip
            continue
        log.info("sanity check %s", name)
        checks[name] = run[name]()
    return checks
