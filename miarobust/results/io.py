"""Writing files: every file of the project is written through `atomic_write`, a temporary file in the same
folder, fsync, then `os.replace`, so a killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pandas as pd


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Write `path` through `write(file)` into a temporary sibling, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; results are for other users and CI too
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write a binary file."""
    atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write a text file."""
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write JSON (sorted keys, indented, NaN refused)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def missing_folders(folder: str | os.PathLike[str]) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first: what a run about to write into
    `folder` creates, and may remove again with `remove_folders` if it fails before finishing anything."""
    folder = Path(folder)
    return [p for p in (folder, *folder.parents) if not p.exists()]


def remove_folders(created: list[Path]) -> None:
    """Remove the folders `missing_folders` listed: the deepest with its contents, each parent only while empty
    (another run may have started writing into it)."""
    if not created:
        return
    shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:
        try:
            parent.rmdir()
        except OSError:
            break


CSV_FLOAT = "%.6g"  # six significant digits: last-bit noise of float arithmetic does not reach the file


def write_csv(path: str | os.PathLike[str], frame: pd.DataFrame) -> None:
    """Atomically write a CSV with a fixed float format, so equal results give equal bytes."""
    write_text(path, frame.to_csv(index=False, float_format=CSV_FLOAT, lineterminator="\n"))


def git_revision() -> str | None:
    """The git revision of the installed package's checkout, for config.json (None outside a checkout)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_id(config: dict[str, Any]) -> str:
    """A short, stable name for a run from the arguments that determine its numbers."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]
