"""The sanity checks that rerun attacks: large eps, more steps, Square vs the white-box attacks, EOT
convergence and the slowdown attack's strength (see miarobust.checks)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pandas as pd
import torch

from miarobust.attacks import ATTACKS, ST_SUFFIX, AttackInfo
from miarobust.checks.base import (
    CHANCE_SLACK,
    LARGE_EPS,
    LEVEL,
    SLOWDOWN,
    SQUARE_GAP,
    AutoAttackRun,
    column,
    describe,
    first_rows,
    more_steps_config,
    one_sided,
    paired,
    rerun,
    result,
)
from miarobust.results import CSV_FLOAT
from miarobust.stats import mcnemar_power, paired_mean_diff


def large_eps(ev: Any, samples: pd.DataFrame, m: int, autoattack_runs: list[AutoAttackRun] | None = None
              ) -> dict[str, Any]:
    """(2) PGD at Linf eps 0.5 must bring accuracy to chance (1/num_classes + 0.05) or below."""
    if m == 0:
        return result("skip", None, "no images")
    rows = first_rows(samples, m)
    k = max((info.eot(ev.acfg) for info in ev.attacks if info.white_box), default=1) if ev.victim.stochastic else 1
    acfg = replace(ev.acfg, norm="Linf", eps=LARGE_EPS, alpha=None, steps=max(ev.acfg.steps, 10), restarts=1, eot=k)
    clean = column(rows, "clean_correct")
    todo = clean > 0
    adv = rerun(ev, "pgd", acfg, m, salt=20_011, todo=todo, autoattack_runs=autoattack_runs)
    acc = float(torch.minimum(clean, adv).mean())
    bound = 1 / ev.num_classes + CHANCE_SLACK
    value = {"acc": acc, "bound": bound, "eps": LARGE_EPS, "steps": acfg.steps, "eot": k, "images": m}
    if acc > bound:
        return result("flag", value, f"PGD at Linf eps {LARGE_EPS} (enough to turn any image grey) leaves accuracy "
                      f"{acc:.3f} > {bound:.3f} on the first {m} images: the attack does not work on this model. "
                      "Suspect masked or obfuscated gradients (try bpda-pgd, eot-pgd, square), a broken loss or "
                      "a bug in the attack; do not trust the robust accuracy of this run.")
    return result("pass", value, f"PGD at Linf eps {LARGE_EPS} brings accuracy to {acc:.3f} <= {bound:.3f}")


def more_steps(ev: Any, samples: pd.DataFrame, m: int, autoattack_runs: list[AutoAttackRun] | None = None
               ) -> dict[str, Any]:
    """(3) Twice the steps and one more restart must not break significantly more of the same images (paired)."""
    stepped = [info for info in ev.attacks if info.stepped]
    if not stepped:
        return result("skip", None, "no attack in this run whose strength follows --steps/--restarts "
                      "(AutoAttack and Square run fixed budgets; slowdown has check 8)")
    if m == 0:
        return result("skip", None, "no images")
    rows = first_rows(samples, m)
    clean = column(rows, "clean_correct")
    main = clean.clone()
    for info in stepped:
        main = torch.minimum(main, column(rows, f"{info.name}_correct"))
    acfg = more_steps_config(ev.acfg, ev.acfg.restarts + 1)
    stronger = clean.clone()
    for i, info in enumerate(stepped):
        adv = rerun(ev, info.name, acfg, m, salt=30_011 + i, todo=stronger > 0, autoattack_runs=autoattack_runs)
        stronger = torch.minimum(stronger, adv)
    test = paired(main, stronger, binary=ev.draws == 1)
    r, s = float(main.mean()), float(stronger.mean())
    names = "+".join(i.name for i in stepped)
    value = {"acc_main": r, "acc_rerun": s, **test, "level": LEVEL, "steps": acfg.steps, "restarts": acfg.restarts,
             "step_size": acfg.step_size, "attacks": [i.name for i in stepped], "images": m}
    if test["p"] < LEVEL:
        return result("flag", value, f"{acfg.steps} steps and {acfg.restarts} restarts break significantly more of the "
                      f"first {m} images than the run's {names} (robust accuracy {r:.3f} -> {s:.3f}; {describe(test)} "
                      f"< {LEVEL}): the attack was too weak; rerun with --steps {acfg.steps} --restarts "
                      f"{acfg.restarts} or more (and a larger --alpha).")
    return result("pass", value, f"{acfg.steps} steps and {acfg.restarts} restarts: robust accuracy {r:.3f} -> {s:.3f} "
                  f"on the first {m} images, not significantly lower ({describe(test)})")


def reference_attacks(ev: Any) -> list[str]:
    """The white-box attacks check 4 reruns: the white-box parts of each run attack that includes Square
    (AutoAttack: APGD-CE and APGD-T, through straight-through gates where the attack is), or those two where
    the run has no white-box attack at all."""
    parts = ["apgd-ce", "apgd-t" if "apgd-t" in ATTACKS else "apgd-dlr"]
    names = [p + ST_SUFFIX if info.straight_through else p for info in ev.attacks if info.includes_square for p in parts]
    if not names and not any(info.white_box for info in ev.attacks):
        names = parts
    return list(dict.fromkeys(names))


def square_vs_white_box(ev: Any, samples: pd.DataFrame, m: int, queries: int,
                        autoattack_runs: list[AutoAttackRun] | None = None) -> dict[str, Any]:
    """(4) Square (black-box) must not break significantly more of the same images than the white-box attacks."""
    if m == 0:
        return result("skip", None, "no images")
    rows = first_rows(samples, m)
    clean = column(rows, "clean_correct")
    white = [info for info in ev.attacks if info.white_box and not info.includes_square]
    wb = clean.clone()
    for info in white:
        wb = torch.minimum(wb, column(rows, f"{info.name}_correct"))
    rerun_names = reference_attacks(ev)  # AutoAttack holds Square: its white-box parts are rerun on their own
    for i, name in enumerate(rerun_names):
        adv = rerun(ev, name, ev.acfg, m, salt=40_021 + i, todo=wb > 0, autoattack_runs=autoattack_runs)
        wb = torch.minimum(wb, adv)
    names = [info.name for info in white] + rerun_names
    sq = rerun(ev, "square", replace(ev.acfg, queries=queries), m, salt=40_011, todo=clean > 0,
               autoattack_runs=autoattack_runs)
    square = torch.minimum(clean, sq)
    test = paired(wb, square, binary=ev.draws == 1)
    power = mcnemar_power(m, SQUARE_GAP, LEVEL)
    r, s, joined = float(wb.mean()), float(square.mean()), "+".join(names)
    value = {"white_box": r, "square": s, **test, "level": LEVEL, "power": power, "power_gap": SQUARE_GAP,
             "queries": queries, "attacks": names, "rerun": rerun_names, "images": m}
    power_text = (f"power {power:.2f} to flag Square breaking an extra {SQUARE_GAP:.0%} of the {m} images "
                  "(200 images: 0.97)")
    if test["p"] < LEVEL:
        return result("flag", value, f"Square (black-box, {queries} queries) breaks significantly more of the first "
                      f"{m} images than {joined}: robust accuracy {r:.3f} vs {s:.3f} ({describe(test)} < {LEVEL}). A "
                      "black-box attack beats the gradient attacks, a sign of gradient masking (Athalye et al. 2018). "
                      "Try bpda-pgd / eot-pgd / more restarts, and include square (or autoattack) in the reported "
                      f"worst case; {power_text}.")
    return result("pass", value, f"Square ({queries} queries): robust accuracy {s:.3f} vs {r:.3f} of {joined} on the "
                  f"first {m} images, not significantly lower ({describe(test)}); {power_text}")


def eot_convergence(ev: Any, samples: pd.DataFrame, m: int, autoattack_runs: list[AutoAttackRun] | None = None
                    ) -> dict[str, Any]:
    """(5) For a stochastic model, the EOT attack with 2K draws must not be significantly stronger than with K."""
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
    clean, at_k = column(rows, "clean_correct"), column(rows, f"{info.name}_correct")
    adv = rerun(ev, info.name, replace(ev.acfg, eot=2 * k), m, salt=50_011, todo=clean > 0,
                autoattack_runs=autoattack_runs)
    at_2k = torch.minimum(clean, adv)
    test = paired(at_k, at_2k, binary=ev.draws == 1)
    r, s = float(at_k.mean()), float(at_2k.mean())
    value = {"attack": info.name, "eot": k, "acc_k": r, "acc_2k": s, **test, "level": LEVEL, "images": m}
    if test["p"] < LEVEL:
        return result("flag", value, f"{info.name} with EOT {2 * k} breaks significantly more of the first {m} images "
                      f"than with EOT {k}: robust accuracy {r:.3f} -> {s:.3f} ({describe(test)} < {LEVEL}): not "
                      f"converged in K = {k} gate draws; rerun with --eot {4 * k} or more.")
    return result("pass", value, f"{info.name}: EOT {k} -> {2 * k} changes robust accuracy {r:.3f} -> {s:.3f} on the "
                  f"first {m} images, not significantly lower ({describe(test)})")


def slowdown_steps(ev: Any, samples: pd.DataFrame, m: int) -> dict[str, Any]:
    """(8) The slowdown attack with twice the steps must not raise the per-image GMACs significantly (paired)."""
    if not any(info.name == SLOWDOWN for info in ev.attacks):
        return result("skip", None, "no slowdown attack in this run")
    if ev.victim.adaptive is None:
        return result("skip", None, "static model: its MACs are fixed, the slowdown attack has nothing to raise")
    if m == 0:
        return result("skip", None, "no images")
    from miarobust.models.flops import VitDims, static_macs

    rows = first_rows(samples, m)
    before = column(rows, f"{SLOWDOWN}_gmacs")
    acfg = more_steps_config(ev.acfg, ev.acfg.restarts)  # slowdown runs one PGD: no restarts
    after = rerun(ev, SLOWDOWN, acfg, m, salt=80_011, field="gmacs")
    diff, lo, hi, p2 = paired_mean_diff(after.tolist(), before.tolist())
    p = one_sided(diff, p2)
    static = float(CSV_FLOAT % (static_macs(VitDims.of(ev.victim.adaptive)) / 1e9))
    g0, g1 = float(before.mean()), float(after.mean())
    value = {"gmacs": g0, "gmacs_rerun": g1, "share_of_static": g0 / static, "share_of_static_rerun": g1 / static,
             "test": "paired_mean", "diff": diff, "ci95": [lo, hi], "p": p, "level": LEVEL, "steps": acfg.steps,
             "step_size": acfg.step_size, "images": m}
    shares = f"MACs share of the static model {g0 / static:.3f} -> {g1 / static:.3f}"
    if p < LEVEL:
        return result("flag", value, f"slowdown with {acfg.steps} steps raises the MACs of the first {m} images "
                      f"significantly ({shares}; mean rise {diff:.4g} GMACs, p = {p:.3g} < {LEVEL}): the slowdown "
                      f"attack was too weak; rerun with --steps {acfg.steps} or more (and a larger --alpha).")
    return result("pass", value, f"slowdown with {acfg.steps} steps: {shares} on the first {m} images, not "
                  f"significantly higher (p = {p:.3g})")
