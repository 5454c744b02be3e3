"""Sanity checks that flag a weak or misleading robustness evaluation (Carlini et al. 2019, arXiv 1902.06705;
Athalye et al. 2018, arXiv 1802.00420; Croce & Hein 2020, arXiv 2003.01690).

Each check returns {"status": "pass" | "flag" | "skip", "value": ..., "message": ...}; a flag logs a warning
that says what it suggests. The checks, in summary.json under "checks":

1. ``robust_le_clean``: adversarial accuracy is not above clean accuracy (from samples.csv, free).
2. ``large_eps``: PGD at Linf eps 0.5, where any image can be turned into a grey one, brings accuracy down to
   at most 1/num_classes + 0.05; else the attack does not work on this model at all.
3. ``more_steps``: the attacks whose strength follows --steps (PGD family, CW), rerun with twice the steps and
   one more restart (and a step no smaller than the default 2.5 eps / steps, so a step too small to cross the
   ball is caught too), do not break significantly more of the same images than the run's (paired test).
4. ``square_vs_white_box``: the black-box Square attack does not break significantly more of the same images
   than the run's white-box attacks (paired test); else the gradients mislead (gradient masking). Attacks
   that run Square themselves (AttackInfo.includes_square: standard AutoAttack) are no white-box reference:
   their white-box parts, APGD-CE and APGD-T (through straight-through gates for `autoattack-st`), are rerun
   as part of the reference, and so are these two where the run has no white-box attack. The value records the test's power to flag Square breaking an extra 5% of the images
   (`stats.mcnemar_power`).
5. ``eot_convergence``: for a stochastic model, the run's EOT attack rerun with 2K gate draws is not
   significantly stronger on the same images than with K (paired test); else K draws were not enough.
6. ``autoattack_flags``: AutoAttack's own checks (randomness, output range, Square's success) raised no warning,
   in the run's AutoAttack attacks or in the AutoAttack components the other checks rerun (Square, APGD); its
   randomness warning is expected, not a flag, where the attack averages a stochastic model's draws through EOT.
7. ``randomness``: a few forwards of the first batch's clean images give the same outputs; where they vary, the
   run treats the model as stochastic and one of its white-box attacks averages the draws (EOT), else the
   robust accuracy is an upper bound.
8. ``slowdown_steps``: the slowdown attack, rerun with twice the steps (and a step no smaller than the
   default), does not raise the per-image GMACs significantly (paired test); else the MACs reported under
   attack understate what an attacker reaches. A run whose only attack is slowdown skips checks 2-5, which
   judge attacks on accuracy (ACCURACY_RERUNS).

The paired tests compare, image by image, a rerun's adversarial correctness with the run's on the same images
(`paired`): the exact McNemar test on the discordant images for 0/1 records (a deterministic model), the paired
mean difference for means over gate draws (a stochastic model) and for GMACs; one-sided, at level LEVEL. The
rerun is judged on its own, not merged with the run's result, so images each breaks that the other does not
both count.

How much is checked (--checks, RunConfig.checks), see `plan`: ``off`` runs check 1 only; ``on`` runs all on every
image, Square on the first 200 images with 5000 queries (AutoAttack's budget; power 0.97 for a 5-point gap);
``auto`` runs all on every image when n <= 200, else on the first 100 images, and Square on the first 20 images
with 1000 queries, a cheap probe that only catches gross masking (power 0.003 for a 5-point gap, 0.8 for a
32-point one; the value records it).
The reruns of checks 3, 4 and 5 attack every clean-correct image of the check (check 8: every image), so that
discordance both ways is seen; an attack rerun after another in the same check (check 3's attacks, check 4's
reference) attacks only the images the earlier ones left robust.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from miarobust.attacks import RANDOMNESS_WARNING, expected_warning
from miarobust.checks.base import (
    CHANCE_SLACK,
    LARGE_EPS,
    LEVEL,
    PROBE_FORWARDS,
    PROBE_TOLERANCE,
    SLOWDOWN,
    SQUARE_GAP,
    AutoAttackRun,
    paired,
    rerun,
    result,
)
from miarobust.checks.reruns import eot_convergence, large_eps, more_steps, slowdown_steps, square_vs_white_box
from miarobust.results import batch_seed
from miarobust.results.store import batch_range
from miarobust.stats import wilson

__all__ = ["ACCURACY_RERUNS", "CHANCE_SLACK", "CHECKS", "LARGE_EPS", "LEVEL", "RANDOMNESS_WARNING", "SLOWDOWN", "SQUARE",
           "SQUARE_GAP", "AutoAttackRun", "Plan", "autoattack_flags", "eot_convergence", "large_eps", "more_steps", "paired", "plan",
           "randomness", "rerun", "result", "robust_le_clean", "run_checks", "slowdown_steps", "square_vs_white_box"]

log = logging.getLogger(__name__)

AUTO_FULL_N = 200  # --checks auto: all images up to this n
AUTO_IMAGES = 100  # --checks auto: first images beyond it
SQUARE = {"on": (200, 5000), "auto": (20, 1000)}  # (images, queries) of check 4


@dataclass(frozen=True)
class Plan:
    """What --checks asks for: the checks to run, on how many first images, and Square's budget."""

    checks: tuple[str, ...]
    images: int
    square_images: int
    square_queries: int


CHECKS = ("robust_le_clean", "large_eps", "more_steps", "square_vs_white_box", "eot_convergence", "autoattack_flags",
          "randomness", "slowdown_steps")


#: The checks that rerun attacks on accuracy: a run whose only attack is slowdown skips them (check 8 is its own).
ACCURACY_RERUNS = ("large_eps", "more_steps", "square_vs_white_box", "eot_convergence")


def plan(mode: str, n: int) -> Plan:
    """The checks of mode 'off' | 'auto' | 'on' for a run of n images (see the module docstring)."""
    if mode == "off":
        return Plan(CHECKS[:1], 0, 0, 0)
    images = n if mode == "on" or n <= AUTO_FULL_N else min(n, AUTO_IMAGES)
    sq_images, queries = SQUARE["on" if mode == "on" else "auto"]
    return Plan(CHECKS, images, min(n, sq_images), queries)


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


# -- the checks that probe the model or read the attacks' own warnings ------------------------------------------


def randomness(ev: Any) -> dict[str, Any]:
    """(7) Repeated forwards of the first batch's clean images give the same outputs, or the run treats the model
    as random: labelled stochastic, with a white-box attack averaging its draws through EOT."""

    if ev.n == 0:
        return result("skip", None, "no images")
    x, _, _ = ev.batch(0)
    x = x.to(ev.device)
    torch.manual_seed(batch_seed(ev.cfg.seed, 0) + 70_011)
    with torch.no_grad():
        outs = [F.normalize(ev.model(x).double().flatten(1), dim=1) for _ in range(PROBE_FORWARDS)]
    spread = max(float((o - outs[0]).norm(dim=1).max()) for o in outs[1:])
    stochastic = ev.victim.stochastic
    averaged = [i.name for i in ev.attacks if i.white_box and (i.eot(ev.acfg, stochastic) > 1 or i.own_eot > 1)]
    value = {"forwards": PROBE_FORWARDS, "images": len(x), "max_distance": spread, "tolerance": PROBE_TOLERANCE,
             "varies": spread > PROBE_TOLERANCE, "stochastic": stochastic, "eot_attacks": averaged}
    if spread <= PROBE_TOLERANCE:
        return result("pass", value, f"{PROBE_FORWARDS} forwards of {len(x)} images give the same outputs")
    varies = (f"the model's outputs vary over {PROBE_FORWARDS} forwards of the same {len(x)} images (largest distance "
              f"of the normalised outputs {spread:.3g} > {PROBE_TOLERANCE:g})")
    why = []
    if not stochastic:
        why.append("the run treats it as a deterministic model (one draw per prediction, --eot has no effect)")
    if not averaged:
        why.append("no white-box attack of the run averages its draws (EOT K = 1)")
    if why:
        return result("flag", value, f"{varies}, but {' and '.join(why)}: the attacks were not adaptive to its "
                      "randomness, so the robust accuracies are upper bounds. Evaluate it as a random model and "
                      "average the draws: --eot K (e.g. --attack eot-pgd, or autoattack --eot 4) on a stochastic "
                      "gate mode, or autoattack-rand.")
    return result("pass", value, f"{varies}; the run treats it as stochastic and {', '.join(averaged)} average its "
                  "draws through EOT (check 5 judges K)")


def autoattack_flags(ev: Any, autoattack_runs: Sequence[AutoAttackRun] = ()) -> dict[str, Any]:
    """(6) AutoAttack's own checks (randomness, output range, dynamic model, square success), in the run's
    AutoAttack attacks and in the AutoAttack components the other checks reran (`autoattack_runs`).

    On a stochastic model attacked through EOT (K >= 2 gate draws per gradient) AutoAttack's randomness
    warning is expected, not a flag: the model is random by design, the attack averages over its draws, and
    check 5 judges whether K draws are enough. Without EOT it flags, as AutoAttack advises."""
    # (attack, EOT K, [(batch, warning)]): the run's attacks batch by batch, the checks' reruns as one batch
    runs = [(info.name, info.eot(ev.acfg), [(b, w) for b, batch in sorted(ev.warnings.items())
                                            for w in batch.get(info.name, [])])
            for info, fn in zip(ev.attacks, ev.attack_fns) if hasattr(fn, "warnings")]
    runs += [(f"{r.attack} (sanity check)", r.eot, [(None, w) for w in r.warnings]) for r in autoattack_runs]
    if not runs:
        return result("skip", None, "no AutoAttack attack in this run or its checks")
    warned: list[tuple[str, int | None, str]] = []  # every warning, batch by batch: nothing merged away
    expected: list[str] = []
    for attack, eot, warnings in runs:
        for b, w in warnings:
            if expected_warning(w, eot, ev.victim.stochastic):
                expected.append(f"{attack}: {w}")
            else:
                warned.append((attack, b, w))
    where = ", ".join(dict.fromkeys(attack for attack, _, _ in runs))
    if warned:
        value = [f"{a}{'' if b is None else f', batch {b}'}: {w}" for a, b, w in warned]
        return result("flag", value, "AutoAttack's checks warned: " + _warnings_summary(ev, warned))
    if expected:
        return result("pass", sorted(set(expected)), f"AutoAttack's checks ({where}) raised only its randomness "
                      "warning, expected here: the attack averages the stochastic gates through EOT (check 5 judges K)")
    return result("pass", [], f"AutoAttack's checks ({where}) raised no warning")


SQUARE_SUCCESS = re.compile(r"Square Attack has decreased the robust accuracy of ([\d.]+)%")


def _warnings_summary(ev: Any, warned: list[tuple[str, int | None, str]]) -> str:
    """AutoAttack's warnings in a few words, counted over batches: how many images its Square broke that the
    attacks before it had left robust (each warning gives a share of its batch), then each other warning once,
    with its count."""
    square: dict[str, list[int]] = {}
    other: dict[tuple[str, str], int] = {}
    for attack, b, w in warned:
        m = SQUARE_SUCCESS.search(w)
        if m and b is not None:
            lo, hi = batch_range(b, ev.cfg.batch_size, ev.n)
            square.setdefault(attack, []).append(round(float(m.group(1)) / 100 * (hi - lo)))
        else:
            other[attack, w] = other.get((attack, w), 0) + 1
    parts = [f"{a}: Square broke {sum(k)} image{'s' if sum(k) != 1 else ''} the attacks before it had left robust, in "
             f"{len(k)} of {ev.num_batches} batches" for a, k in square.items()]
    parts += [f"{a}: {w}" + (f" ({k} times)" if k > 1 else "") for (a, w), k in other.items()]
    advice = (" (AutoAttack: its evaluation may be unreliable; run Square with more queries, another seed or an "
              "adaptive attack)") if square else ""
    return " | ".join(parts) + advice


def run_checks(cfg: Any, ev: Any, samples: pd.DataFrame, summary: dict[str, Any]) -> dict[str, Any]:
    """Run the checks that `cfg.checks` asks for (see `plan`); returns {check name: result}, in CHECKS order."""
    p = plan("on" if cfg.checks == "auto" and "adaptive" in cfg.attacks else cfg.checks, len(samples))  # the preset: on
    attacked = bool(summary["attacks"])
    skip = result("skip", None, "no attack in this run")
    slowdown_only = attacked and all(info.name == SLOWDOWN for info in ev.attacks)
    not_accuracy = result("skip", None, "slowdown-only run: it measures the MACs an attacker reaches, not robust "
                          "accuracy; check 8 (slowdown_steps) judges its strength")
    reruns: list[AutoAttackRun] = []  # the AutoAttack components the checks run, for autoattack_flags
    run: dict[str, Any] = {
        "robust_le_clean": lambda: robust_le_clean(samples, summary),
        "large_eps": lambda: large_eps(ev, samples, p.images, reruns),
        "more_steps": lambda: more_steps(ev, samples, p.images, reruns),
        "square_vs_white_box": lambda: square_vs_white_box(ev, samples, p.square_images, p.square_queries, reruns),
        "eot_convergence": lambda: eot_convergence(ev, samples, p.images, reruns),
        "autoattack_flags": lambda: autoattack_flags(ev, reruns),
        "randomness": lambda: randomness(ev),
        "slowdown_steps": lambda: slowdown_steps(ev, samples, p.images),
    }
    checks: dict[str, Any] = {}
    from tqdm.auto import tqdm

    shown = getattr(ev, "progress", False)
    order = sorted(p.checks, key=lambda c: c == "autoattack_flags")  # last: it judges the others' reruns
    for name in tqdm(order, desc="sanity checks", unit="check", disable=not shown):
        if not attacked and name != "autoattack_flags":
            checks[name] = skip
        elif slowdown_only and name in ACCURACY_RERUNS:
            checks[name] = not_accuracy
        else:
            log.info("sanity check %s", name)
            checks[name] = run[name]()
        if shown:
            tqdm.write(f"check {name}: {checks[name]['status']}: {checks[name]['message']}", file=sys.stderr)
    return {name: checks[name] for name in p.checks}
