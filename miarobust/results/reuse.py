"""Growing a run (`miarobust run --reuse`): a new run starts from the finished batches of the same run at another n.

Batch b of a run is a function of the run's identity, b and the batch's images alone (store.py), given the code
that computes it. So a finished run of the same request (every field but n, the same weights, attacks, EOT K,
device type and EOT chunk) holds every batch whose image range is the same in both runs: all its full batches
when the new run is larger. `--reuse` copies those batches' records and AutoAttack warnings into the new run's
partial/ before it starts, instead of recomputing them, after checking that the donor's images have the labels
the data set has now and its records the columns this code writes; the checks still run on the whole new run.

The code is the one thing a request does not fix. `--reuse same-code` takes a donor only where it was made by
this code: the same library versions and the same package source (the hash of its files, recorded in
config.json; for a donor that predates the hash, a git revision whose miarobust/ differs from this checkout in no
file, committed or not). `--reuse any-code` also takes donors made by other code,
for a user who has checked that what computes the batches did not change. Either way summary.json's `reused`
names the donor, its revision and the package files that differ, and the message says which donors were left out
and why.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from miarobust.config import Resolved, RunConfig, RunRecord
from miarobust.errors import UserError
from miarobust.results.io import csv_text, json_bytes, write_files
from miarobust.results.store import (
    CONFIG,
    PARTIAL,
    SAMPLES,
    SUMMARY,
    batch_range,
    is_complete,
    num_batches,
    partial_name,
    warnings_name,
)

log = logging.getLogger(__name__)

REUSED = "reused.json"  # in partial/: the batches copied from another run, until summary.json records them
PACKAGE = Path(__file__).resolve().parents[1]  # miarobust/


@dataclasses.dataclass(frozen=True)
class Donor:
    folder: Path
    batches: list[int]  # the batches whose image ranges are the same in both runs
    warnings: dict[int, dict[str, list[str]]]  # AutoAttack's warnings per batch (none: {})
    git_revision: str | None
    code_changes: list[str]  # how the code that made it differs from this one ([]: the same)


def same_request(cfg: RunConfig) -> dict[str, Any]:
    """What a donor must share: the run's identity without n, and what the identity leaves out that still changes
    the random draws of a stochastic model (the device type, the EOT chunk)."""
    key = cfg.identity()
    key.pop("n")
    return {**key, "device_type": cfg.device.split(":")[0], "eot_chunk": cfg.eot_chunk}


def batch_warnings(summary: dict[str, Any], autoattack: bool) -> dict[int, dict[str, list[str]]] | None:
    """A finished run's AutoAttack warnings per batch, or None where warnings that check 6 flags were raised but
    not kept per batch. A run whose check 6 passed raised none, or only AutoAttack's randomness warning on
    stochastic gates attacked through EOT, which check 6 expects there: its batches carry no warning that matters
    to the grown run's check 6 ({}), though the randomness warnings themselves are not copied."""
    if "batch_warnings" in summary:
        return {int(b): w for b, w in summary["batch_warnings"].items()}
    if not autoattack:
        return {}
    flags = (summary.get("checks") or {}).get("autoattack_flags") or {}
    return {} if flags.get("status") == "pass" else None


def _git(*args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(["git", *args], cwd=PACKAGE, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None


def code_changes(environment: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How the code recorded in a donor's config.json `environment` differs from `now` (this process's) ([]: the
    same): library versions, and the package source, by its hash where both record one, else by the package files
    git says changed since the donor's revision (committed or not)."""
    was, is_ = environment.get("versions") or {}, now.get("versions") or {}
    changes = [f"{k} {was.get(k)} -> {v}" for k, v in is_.items() if was.get(k) != v]
    if environment.get("source_sha256") and now.get("source_sha256"):
        if environment["source_sha256"] == now["source_sha256"]:
            return changes
        changes.append("the package source differs")
    revision = environment.get("git_revision")
    if not revision:
        return [*changes, "code revision unknown (not made in a git checkout)"]
    diff = _git("diff", "--name-only", revision, "--", ".")  # against the working tree: uncommitted edits count
    if diff is None or diff.returncode != 0:
        return [*changes, f"revision {revision[:12]} is not in this checkout"]
    return changes + [f"{path} changed since {revision[:12]}" for path in diff.stdout.split()]


def _resolved_differences(there: Resolved, here: Resolved) -> list[str]:
    """How a donor's resolution of the same request differs from this run's, the weights' file aside ([]: not at
    all): other weights (the checkpoint changed since), another preset expansion, or another EOT K (the adaptive
    preset probes K on the run's own images, so a grown run can need more draws than its first images did)."""
    labels = {"weights_sha256": "weights sha256", "gate_mode": "gate mode", "eot": "EOT K",
              "gate_grad": "gradient through the gates"}
    out = []
    for f in (f.name for f in dataclasses.fields(Resolved) if f.name != "checkpoint"):
        a, b = getattr(there, f), getattr(here, f)
        if a != b:
            a, b = (v[:12] if f == "weights_sha256" and v else v for v in (a, b))
            out.append(f"{labels.get(f, f)} {a} there, {b} here")
    return out


def find_donor(folder: Path, cfg: RunConfig, resolved: Resolved, n: int, autoattack: bool, mode: str,
               now: dict[str, Any]) -> tuple[Donor | None, list[str]]:
    """The finished run beside `folder` that holds the most of this run's batches (None: none does), and the runs
    of the same request left out, each with why.

    autoattack: whether the run holds an AutoAttack attack (whose warnings check 6 reads per batch). mode:
    same-code or any-code (the module docstring). now: this process's environment (results.summary.environment)."""
    key, bs = same_request(cfg), cfg.batch_size
    best: Donor | None = None
    left: list[str] = []
    for other in sorted(p for p in folder.parent.iterdir() if p != folder and is_complete(p)):
        try:
            config = json.loads((other / CONFIG).read_text())
            record = RunRecord.read(config, other.name)
            if same_request(record.requested) != key:
                continue
            resolved_otherwise = _resolved_differences(record.resolved, resolved)
            if resolved_otherwise:
                left.append(f"{other.name} (the same request resolved otherwise there: {'; '.join(resolved_otherwise)})")
                continue
            summary = json.loads((other / SUMMARY).read_text())
            m = int(summary["n"])
            warnings = batch_warnings(summary, autoattack)
            environment = config.get("environment") or {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError):
            continue  # not a readable run folder: no donor
        if warnings is None:
            left.append(f"{other.name} (AutoAttack warned there, and in which batch was not kept)")
            continue
        changes = code_changes(environment, now)
        if changes and mode == "same-code":
            left.append(f"{other.name} (made by other code: {'; '.join(changes[:3])}"
                        f"{f'; {len(changes) - 3} more' if len(changes) > 3 else ''}; --reuse any-code takes it)")
            continue
        batches = [b for b in range(num_batches(n, bs)) if b * bs < m and batch_range(b, bs, n) == batch_range(b, bs, m)]
        if batches and (best is None or len(batches) > len(best.batches)):
            best = Donor(other, batches, {b: w for b, w in warnings.items() if b in batches},
                         environment.get("git_revision"), changes)
    return best, left


def copy_batches(folder: Path, donor: Donor, batch_size: int, n: int, columns: list[str],
                 labels: Callable[[int], list[int]]) -> int:
    """Write the donor's batches into folder/partial/ (reused.json first); how many images they hold. 0: nothing
    copied, because the donor's samples.csv is unreadable, lacks an image of a batch, has other columns than this
    code writes (`columns`) or other labels than the data set has now (`labels(b)`, batch b's)."""
    try:
        samples = pd.read_csv(donor.folder / SAMPLES)
        index = pd.to_numeric(samples["index"], errors="raise")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: samples.csv unreadable (%s): nothing reused", donor.folder.name, e)
        return 0
    if list(samples.columns) != columns:
        log.warning("%s: its samples.csv has other columns than this run writes: nothing reused", donor.folder.name)
        return 0
    files: dict[Path, bytes] = {}
    for b in donor.batches:
        lo, hi = batch_range(b, batch_size, n)
        rows = samples[(index >= lo) & (index < hi)].sort_values("index")
        if rows["index"].tolist() != list(range(lo, hi)) or rows["label"].tolist() != labels(b):
            log.warning("%s: images %d-%d (its batch %d) are missing or labelled otherwise than the data set now: "
                        "nothing reused", donor.folder.name, lo, hi - 1, b)
            return 0
        files[folder / PARTIAL / partial_name(b)] = csv_text(rows).encode()
        if donor.warnings.get(b):
            files[folder / PARTIAL / warnings_name(b)] = json_bytes(donor.warnings[b])
    images = sum(hi - lo for lo, hi in (batch_range(b, batch_size, n) for b in donor.batches))
    record = {"run": donor.folder.name, "batches": donor.batches, "images": images,
              "git_revision": donor.git_revision, "code_changes": donor.code_changes}
    # the record first: a kill mid-way leaves it naming batches that the resumed run then computes (the same records)
    write_files({folder / PARTIAL / REUSED: json_bytes(record), **files})
    return images


def reused_record(folder: Path) -> dict[str, Any] | None:
    """What partial/reused.json says was copied, for summary.json (None: nothing)."""
    path = folder / PARTIAL / REUSED
    return json.loads(path.read_text()) if path.is_file() else None
