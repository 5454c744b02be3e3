"""What the sanity checks share: their levels and budgets, the result record, the paired tests, and
rerunning an attack on a run's first images (see miarobust.checks for the checks themselves)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, NamedTuple

import pandas as pd
import torch

from miarobust.attacks import AttackConfig, build_attack, get_attack
from miarobust.attacks.threat import ThreatModel
from miarobust.results import CSV_FLOAT, batch_seed
from miarobust.stats import paired_drop_p, paired_mean_diff

log = logging.getLogger("miarobust.checks")

LARGE_EPS = 0.5  # Linf: every image in [0, 1] reaches the all-grey image
CHANCE_SLACK = 0.05
LEVEL = 0.05  # one-sided level of the paired tests (checks 3, 4, 5, 8)
SQUARE_GAP = 0.05  # check 4's power is for Square breaking this share of the images more than the white-box attacks
PROBE_FORWARDS = 4  # check 7: forwards of the same images
PROBE_TOLERANCE = 1e-4  # check 7: largest L2 distance of L2-normalised outputs that counts as equal (AutoAttack's)
SLOWDOWN = "slowdown"


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


def rerun_key(name: str, acfg: AttackConfig, m: int, salt: int, field: str, todo: torch.Tensor | None) -> str:
    """What decides a rerun's records besides the run and the batch: its attack, attack config, images, seed salt,
    record field and which images it attacks (the key of its finished batches, results.store.CheckBatches)."""
    what = {"attack": name, "config": dataclasses.asdict(acfg), "images": m, "salt": salt, "field": field,
            "todo": None if todo is None else todo.nonzero().squeeze(1).tolist()}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rerun(ev: Any, name: str, acfg: AttackConfig, m: int, salt: int, todo: torch.Tensor | None = None,
          field: str = "correct", autoattack_runs: list[AutoAttackRun] | None = None) -> torch.Tensor:
    """Per-image `field` of Evaluation.predict ("correct": adversarial correctness, a mean over gate draws for a
    stochastic model; "gmacs") (m,) of attack `name` under `acfg` on the first m images, rounded as samples.csv
    stores them, so that equal outcomes compare equal with the run's records. Only images with `todo` set are
    attacked; the others get 0. The attack's output is checked against its threat model like any other; seeded
    per batch, so the result is reproducible. An AutoAttack component's warnings go to `autoattack_runs`.
    Where `ev.check_batches` is a results.store.CheckBatches (a run's checks), each finished batch is kept there
    and read back on resume.
    """

    info = get_attack(name, acfg)
    fn = build_attack(info, ev.victim, acfg)
    threat = ThreatModel(acfg.norm, acfg.eps)
    out = torch.zeros(m, dtype=torch.float64)
    from tqdm.auto import tqdm

    bar = tqdm(batches(ev, m), total=-(-m // ev.cfg.batch_size), desc=f"  check: {name}", unit="batch", leave=False,
               disable=not getattr(ev, "progress", False))
    cache = getattr(ev, "check_batches", None)
    key = rerun_key(name, acfg, m, salt, field, todo) if cache is not None else ""
    warns = getattr(fn, "warnings", None)
    for b, x, y in bar:
        lo = b * ev.cfg.batch_size
        sel = torch.arange(len(x)) if todo is None else todo[lo:lo + len(x)].nonzero().squeeze(1)
        if len(sel) == 0:
            continue
        index = (lo + sel).tolist()
        saved = cache.get(key, b, index) if cache is not None else None
        if saved is not None:
            values, warned = saved
            if warns is not None:
                warns.extend(warned)
        else:
            sel_dev = sel.to(ev.device)
            xs, ys = x[sel_dev], y[sel_dev]
            torch.manual_seed(batch_seed(ev.cfg.seed, b) + salt)
            before = len(warns) if warns is not None else 0
            x_adv = fn(xs, ys).detach()
            threat.check(xs, x_adv, f"{name} (sanity check)")
            values = [float(CSV_FLOAT % v) for v in ev.predict(x_adv, ys)[field].cpu().tolist()]
            if cache is not None:
                cache.put(key, b, index, values, list(warns[before:]) if warns is not None else [])
        out[lo + sel] = torch.tensor(values, dtype=torch.float64)
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
