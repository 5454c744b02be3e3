"""A run folder while it is written: its layout, its lock, the batches saved so far and the resume rules.

    <out>/<folder name>/
        config.json    what was asked and what it resolved to (gate mode, weights, attacks, EOT K)
        partial/       batch_000000.csv ... (+ .warnings.json): finished batches, while the run is in progress
          checks/      <rerun key>-000000.json ...: the sanity checks' finished rerun batches, while they run
        samples.csv    one row per image, once every batch is done
        summary.json   the figures, written last: its presence marks the run complete

Batches are fixed by (n, batch_size) and batch b is seeded from (seed, b) alone (`batch_seed`), so a batch's
records do not depend on which batches ran before it, in this process or another rank's.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from miarobust.errors import UserError
from miarobust.results.io import remove_folders, write_files

CONFIG, SAMPLES, SUMMARY, PARTIAL = "config.json", "samples.csv", "summary.json", "partial"
CHECK_BATCHES = "checks"  # in partial/


def num_batches(n: int, batch_size: int) -> int:
    """How many batches n images make."""
    return -(-n // batch_size)


def batch_range(b: int, batch_size: int, n: int) -> tuple[int, int]:
    """The image indices [lo, hi) of batch b of a run of n images."""
    return b * batch_size, min((b + 1) * batch_size, n)


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch `batch`: independent of the batches before it."""
    return (seed * 1_000_003 + batch * 7919 + 12345) % (2**63 - 1)


class FolderLock:
    """An exclusive lock on a run folder: two processes never write the same run at once."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"

    def __enter__(self) -> FolderLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise UserError(f"cannot write the run folder {self.path.parent} ({e.strerror}): pass --out with a "
                            "writable folder.") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UserError(f"another miarobust process is writing {self.path.parent}: wait for it to finish.") from None
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class CheckBatches:
    """The finished batches of a run's sanity-check reruns, in partial/checks/ until summary.json is written, so
    that a run killed during its checks resumes them where they stopped. A batch is kept under the key of its rerun
    (checks.base.rerun_key: what decides its records) and its number, with the indices of the images it attacked,
    their records and AutoAttack's warnings. `resumed` counts the batches read back."""

    def __init__(self, folder: Path):
        self.folder = folder / PARTIAL / CHECK_BATCHES
        self.resumed = 0

    def _path(self, key: str, b: int) -> Path:
        return self.folder / f"{key}-{b:06d}.json"

    def get(self, key: str, b: int, index: list[int]) -> tuple[list[float], list[str]] | None:
        """Batch b's records of the images `index` and its AutoAttack warnings, if a killed run finished it."""
        try:
            saved = json.loads(self._path(key, b).read_text())
            if saved["index"] != index or len(saved["values"]) != len(index):
                return None
            values, warnings = [float(v) for v in saved["values"]], [str(w) for w in saved["warnings"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not finished, or not readable: computed again
        self.resumed += 1
        return values, warnings

    def put(self, key: str, b: int, index: list[int], values: list[float], warnings: list[str]) -> None:
        record = {"index": index, "values": values, "warnings": warnings}
        write_files({self._path(key, b): json.dumps(record).encode()})


def check_batches_done(folder: Path) -> int:
    """How many batches of the sanity checks' reruns partial/ holds."""
    return sum(1 for _ in (folder / PARTIAL / CHECK_BATCHES).glob("*.json"))


def partial_name(b: int) -> str:
    return f"batch_{b:06d}.csv"


def warnings_name(b: int) -> str:
    return f"batch_{b:06d}.warnings.json"


def is_complete(folder: Path) -> bool:
    """Whether the run in `folder` has finished (samples.csv and summary.json written)."""
    return (folder / SUMMARY).is_file() and (folder / SAMPLES).is_file()


def batches_done(folder: Path) -> int:
    """How many batches partial/ holds."""
    return sum(1 for _ in (folder / PARTIAL).glob("batch_*.csv"))


def batches_todo(folder: Path, num_batches: int, rank: int = 0, world: int = 1) -> Iterator[int]:
    """Batches of this rank (b % world == rank) not yet saved in folder/partial."""
    done = {p.name for p in (folder / PARTIAL).glob("batch_*.csv")}
    return (b for b in range(rank, num_batches, world) if partial_name(b) not in done)


def merge_partials(folder: Path, num_batches: int) -> tuple[pd.DataFrame, dict[int, dict[str, list[str]]]]:
    """Every batch's records in batch order, and the warnings each batch saved (whichever process ran it)."""
    parts = sorted((folder / PARTIAL).glob("batch_*.csv"))
    if len(parts) != num_batches:
        raise RuntimeError(f"{folder}: {len(parts)} of {num_batches} batches present after the run")
    samples = pd.concat([pd.read_csv(p) for p in parts], ignore_index=True)
    warnings = {}
    for b in range(num_batches):
        saved = folder / PARTIAL / warnings_name(b)
        if saved.is_file():
            warnings[b] = json.loads(saved.read_text())
    return samples, warnings


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a run folder, or {} when it is missing or unreadable."""
    try:
        got = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def check_same_weights(folder: Path, weights: str | None) -> None:
    """Refuse to resume or reuse a run folder made with other weights than `weights` (SHA-256 of the file).

    The folder name hashes the arguments, and `--checkpoint` unset means "the shipped weights", which a new
    release may replace: without this check a resume would mix, or a rerun reuse, another model's results.
    """
    recorded = read_config(folder).get("weights_sha256")  # an unreadable config.json is rewritten by this run
    if recorded is not None and weights is not None and recorded != weights:
        raise UserError(f"{folder} holds results of other weights (sha256 {recorded[:12]}..., these are "
                        f"{weights[:12]}...): delete the folder or choose another --out.")


def remove_if_nothing_finished(folder: Path, created: list[Path]) -> None:
    """After a failure: remove the run folder and the parents this run created (`missing_folders`), unless a
    batch is saved."""
    if folder not in created or any((folder / PARTIAL).glob("batch_*.csv")):
        return
    remove_folders(created)
