"""Growing a run (`miarobust run --reuse`): a new run starts from the finished batches of the same run at another n.

Batch b of a run is a function of the run's identity, b and the batch's image range alone (store.py), so a finished
run of the same request (every field but n, the same weights, attacks and EOT K) holds every batch whose image
range is the same in both runs: all its full batches when the new run is larger. `--reuse` copies those batches'
records and AutoAttack warnings into the new run's partial/ before it starts, instead of recomputing them; the
checks still run on the whole new run. summary.json's `reused` names the run the batches came from and the code
revision that made them: a donor made by other code gives that code's numbers, so reuse across revisions only
where the model and the attacks did not change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from miarobust.config import Resolved, RunConfig, RunRecord
from miarobust.errors import UserError
from miarobust.results.io import csv_text, json_bytes, write_files
from miarobust.results.store import CONFIG, PARTIAL, SAMPLES, SUMMARY, is_complete, partial_name, warnings_name

log = logging.getLogger(__name__)

REUSED = "reused.json"  # in partial/: the batches copied from another run, until summary.json records them


@dataclasses.dataclass(frozen=True)
class Donor:
    folder: Path
    batches: list[int]  # the batches whose image ranges are the same in both runs
    warnings: dict[int, dict[str, list[str]]]  # AutoAttack's warnings per batch (none: {})
    git_revision: str | None


def batch_range(b: int, batch_size: int, n: int) -> tuple[int, int]:
    return b * batch_size, min((b + 1) * batch_size, n)


def same_request(cfg: RunConfig) -> dict[str, Any]:
    """A run's identity without n: what a donor must share."""
    key = cfg.identity()
    key.pop("n")
    return key


def batch_warnings(summary: dict[str, Any], autoattack: bool) -> dict[int, dict[str, list[str]]] | None:
    """A finished run's AutoAttack warnings per batch, or None where they were raised but not kept per batch."""
    if "batch_warnings" in summary:
        return {int(b): w for b, w in summary["batch_warnings"].items()}
    if not autoattack:
        return {}
    flags = summary.get("checks", {}).get("autoattack_flags", {})
    return {} if flags.get("status") == "pass" and flags.get("value") == [] else None


def find_donor(folder: Path, cfg: RunConfig, resolved: Resolved, n: int, autoattack: bool) -> tuple[Donor | None, list[str]]:
    """The finished run beside `folder` that holds the most of this run's batches (None: none does), and the runs
    of the same request left out because their AutoAttack warnings were not kept per batch.

    autoattack: whether the run holds an AutoAttack attack (whose warnings check 6 reads per batch)."""
    key, bs = same_request(cfg), cfg.batch_size
    want = dataclasses.replace(resolved, checkpoint=None)  # the weights' hash decides, not where the file lay
    num = -(-n // bs)
    best: Donor | None = None
    unattributed: list[str] = []
    for other in sorted(p for p in folder.parent.iterdir() if p != folder and is_complete(p)):
        try:
            config = json.loads((other / CONFIG).read_text())
            record = RunRecord.read(config, other.name)
            summary = json.loads((other / SUMMARY).read_text())
            m = int(summary["n"])
        except (OSError, ValueError, KeyError, TypeError, UserError):
            continue
        if same_request(record.requested) != key or dataclasses.replace(record.resolved, checkpoint=None) != want:
            continue
        warnings = batch_warnings(summary, autoattack)
        if warnings is None:
            unattributed.append(other.name)
            continue
        batches = [b for b in range(num) if b * bs < m and batch_range(b, bs, n) == batch_range(b, bs, m)]
        if batches and (best is None or len(batches) > len(best.batches)):
            best = Donor(other, batches, {b: w for b, w in warnings.items() if b in batches},
                         config.get("environment", {}).get("git_revision"))
    return best, unattributed


def copy_batches(folder: Path, donor: Donor, batch_size: int, n: int) -> int:
    """Write the donor's batches into folder/partial/ (with reused.json); how many images they hold (0: none copied,
    the donor's samples.csv did not hold every image of them)."""
    try:
        samples = pd.read_csv(donor.folder / SAMPLES)
        index = samples["index"]
    except (OSError, ValueError, KeyError) as e:  # a damaged donor is no donor
        log.warning("%s: samples.csv unreadable (%s): nothing reused", donor.folder.name, e)
        return 0
    files: dict[Path, bytes] = {}
    for b in donor.batches:
        lo, hi = batch_range(b, batch_size, n)
        rows = samples[(index >= lo) & (index < hi)].sort_values("index")
        if rows["index"].tolist() != list(range(lo, hi)):
            log.warning("%s lacks images %d-%d of its batch %d: nothing reused", donor.folder.name, lo, hi - 1, b)
            return 0
        files[folder / PARTIAL / partial_name(b)] = csv_text(rows).encode()
        if donor.warnings.get(b):
            files[folder / PARTIAL / warnings_name(b)] = json_bytes(donor.warnings[b])
    images = sum(hi - lo for lo, hi in (batch_range(b, batch_size, n) for b in donor.batches))
    files[folder / PARTIAL / REUSED] = json_bytes({"run": donor.folder.name, "batches": donor.batches,
                                                   "images": images, "git_revision": donor.git_revision})
    write_files(files)
    return images


def reused_record(folder: Path) -> dict[str, Any] | None:
    """What partial/reused.json says was copied, for summary.json (None: nothing)."""
    path = folder / PARTIAL / REUSED
    return json.loads(path.read_text()) if path.is_file() else None
