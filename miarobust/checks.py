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
   attack understate what an attacker reaches.

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
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F

from miarobust.attacks import (  # noqa: F401  (RANDOMNESS_WARNING: re-exported)
    ATTACKS,
    RANDOMNESS_WARNING,
    ST_SUFFIX,
    AttackConfig,
    AttackInfo,
    build_attack,
    expected_warning,
    get_attack,
)
from miarobust.attacks.threat import ThreatModel
from miarobust.results import CSV_FLOAT
from miarobust.stats import mcnemar_power, paired_drop_p, paired_mean_diff, wilson

log = logging.getLogger(__name__)

LARGE_EPS = 0.5  # Linf: every image in [0, 1] reaches the all-grey image
CHANCE_SLACK = 0.05
AUTO_FULL_N = 200  # --checks auto: all images up to this n
AUTO_IMAGES = 100  # --checks auto: first images beyond it
SQUARE = {"on": (200, 5000), "auto": (20, 1000)}  # (images, queries) of check 4
LEVEL = 0.05  # one-sided level of the paired tests (checks 3, 4, 5, 8)
SQUARE_GAP = 0.05  # check 4's power is for Square breaking this share of the images more than the white-box attacks
PROBE_FORWARDS = 4  # check 7: forwards of the same images
PROBE_TOLERANCE = 1e-4  # check 7: largest L2 distance of L2-normalised outputs that counts as equal (AutoAttack's)
SLOWDOWN = "slowdown"


@dataclass(frozen=True)
class Plan:
    """What --checks asks for: the checks to run, on how many first images, and Square's budget."""

    checks: tuple[str, ...]
    images: int
    square_images: int
    square_queries: int


CHECKS = ("robust_le_clean", "large_eps", "more_steps", "square_vs_white_box", "eot_convergence", "autoattack_flags",
          "randomness", "slowdown_steps")


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


class AutoAttackRun(NamedTuple):
    """An AutoAttack component a check ran: its attack, the EOT K it ran through, and its checks' warnings."""

    attack: str
    eot: int
    warnings: list[str]


# -- paired tests -----------------------------------------------------------------------------------------


def one_sided(diff: float, p_two_sided: float) -> float:
    """One-sided p-value that the mean difference is > 0, from a symmetric test's two-sided p and the sign."""
    return p_two_sided / 2 if diff > 0 else 1 - p_two_sided / 2


def paired(main: torch.Tensor, rerun: torch.Tensor, binary: bool) -> dict[str, Any]:
    """One-sided paired test that the rerun's per-image correctness (m,) is lower than the run's (m,) on the same
    images: exact McNemar on the discordant images for 0/1 records (`binary`), else the paired mean difference
    (normal approximation) for means over gate draws. Returns the test, its counts or difference, and p."""
    if binary:
        only_main = int(((main > 0.5) & (rerun < 0.5)).sum())  # robust in the run only
        only_rerun = int(((rerun > 0.5) & (main < 0.5)).sum())
        return {"test": "mcnemar", "only_main": only_main, "only_rerun": only_rerun,
                "p": paired_drop_p(only_main, only_rerun)}
    diff, lo, hi, p = paired_mean_diff(main.tolist(), rerun.tolist())
    return {"test": "paired_mean", "diff": diff, "ci95": [lo, hi], "p": one_sided(diff, p)}


def describe(test: dict[str, Any]) -> str:
    """The figures of a `paired` test, for a message."""
    if test["test"] == "mcnemar":
        return (f"{test['only_main']} images robust in the run only vs {test['only_rerun']} under the rerun only, "
                f"exact McNemar p = {test['p']:.3g}")
    return f"mean drop {test['diff']:.3f} (95% CI {test['ci95'][0]:.3f} to {test['ci95'][1]:.3f}), p = {test['p']:.3g}"


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


def rerun(ev: Any, name: str, acfg: AttackConfig, m: int, salt: int, todo: torch.Tensor | None = None,
          field: str = "correct", autoattack_runs: list[AutoAttackRun] | None = None) -> torch.Tensor:
    """Per-image `field` of Evaluation.predict ("correct": adversarial correctness, a mean over gate draws for a
    stochastic model; "gmacs") (m,) of attack `name` under `acfg` on the first m images, rounded as samples.csv
    stores them, so that equal outcomes compare equal with the run's records. Only images with `todo` set are
    attacked; the others get 0. The attack's output is checked against its threat model like any other; seeded
    per batch, so the result is reproducible. An AutoAttack component's warnings go to `autoattack_runs`.
    """
    from miarobust.evaluator import batch_seed

    info = get_attack(name, acfg)
    fn = build_attack(info, ev.victim, acfg)
    threat = ThreatModel(acfg.norm, acfg.eps)
    out = torch.zeros(m, dtype=torch.float64)
    from tqdm.auto import tqdm

    bar = tqdm(batches(ev, m), total=-(-m // ev.cfg.batch_size), desc=f"  check: {name}", unit="batch", leave=False,
               disable=not getattr(ev, "progress", False))
    for b, x, y in bar:
        lo = b * ev.cfg.batch_size
        sel = torch.arange(len(x)) if todo is None else todo[lo:lo + len(x)].nonzero().squeeze(1)
        if len(sel) == 0:
            continue
        sel_dev = sel.to(ev.device)
        xs, ys = x[sel_dev], y[sel_dev]
        torch.manual_seed(batch_seed(ev.cfg.seed, b) + salt)
        x_adv = fn(xs, ys).detach()
        threat.check(xs, x_adv, f"{name} (sanity check)")
        got = ev.predict(x_adv, ys)[field].cpu().tolist()
        out[lo + sel] = torch.tensor([float(CSV_FLOAT % v) for v in got], dtype=torch.float64)
    if autoattack_runs is not None and hasattr(fn, "warnings"):
        autoattack_runs.append(AutoAttackRun(name, info.eot(acfg, ev.victim.stochastic), list(fn.warnings)))
    return out


def column(rows: pd.DataFrame, col: str) -> torch.Tensor:
    return torch.tensor(rows[col].to_numpy(), dtype=torch.float64)


def more_steps_config(a: AttackConfig, restarts: int) -> AttackConfig:
    """`a` with twice the steps, `restarts` restarts and a step no smaller than the default 2.5 eps / steps."""
    steps = 2 * a.steps
    alpha = None if a.alpha is None else max(a.alpha, 2.5 * a.eps / steps)
    return replace(a, steps=steps, restarts=restarts, alpha=alpha)


# -- the checks that rerun attacks ----------------------------------------------------------------------------


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
    if ev.victim.mia is None:
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
    static = float(CSV_FLOAT % (static_macs(VitDims.of(ev.victim.mia)) / 1e9))
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


# -- the checks that probe the model or read the attacks' own warnings ------------------------------------------


def randomness(ev: Any) -> dict[str, Any]:
    """(7) Repeated forwards of the first batch's clean images give the same outputs, or the run treats the model
    as random: labelled stochastic, with a white-box attack averaging its draws through EOT."""
    from miarobust.evaluator import batch_seed

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
    runs = [AutoAttackRun(info.name, info.eot(ev.acfg), [w for batch in ev.warnings.values()
                                                         for w in batch.get(info.name, [])])
            for info, fn in zip(ev.attacks, ev.attack_fns) if hasattr(fn, "warnings")]
    runs += [r._replace(attack=f"{r.attack} (sanity check)") for r in autoattack_runs]
    if not runs:
        return result("skip", None, "no AutoAttack attack in this run or its checks")
    warned, expected = set(), set()
    for r in runs:
        for w in r.warnings:
            (expected if expected_warning(w, r.eot, ev.victim.stochastic) else warned).add(f"{r.attack}: {w}")
    where = ", ".join(dict.fromkeys(r.attack for r in runs))
    if warned:
        return result("flag", sorted(warned)[:5], "AutoAttack's checks warned: " + " | ".join(sorted(warned)[:3]))
    if expected:
        return result("pass", sorted(expected), f"AutoAttack's checks ({where}) raised only its randomness warning, "
                      "expected here: the attack averages the stochastic gates through EOT (check 5 judges K)")
    return result("pass", [], f"AutoAttack's checks ({where}) raised no warning")


def run_checks(cfg: Any, ev: Any, samples: pd.DataFrame, summary: dict[str, Any]) -> dict[str, Any]:
    """Run the checks that `cfg.checks` asks for (see `plan`); returns {check name: result}, in CHECKS order."""
    p = plan("on" if cfg.checks == "auto" and "adaptive" in cfg.attacks else cfg.checks, len(samples))  # the preset: on
    attacked = bool(summary["attacks"])
    skip = result("skip", None, "no attack in this run")
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
        else:
            log.info("sanity check %s", name)
            checks[name] = run[name]()
        if shown:
            tqdm.write(f"check {name}: {checks[name]['status']}: {checks[name]['message']}", file=sys.stderr)
    return {name: checks[name] for name in p.checks}
