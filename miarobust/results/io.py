"""Writing files: every file of the project is written through `atomic_write`, a temporary file in the same
folder, fsync, then `os.replace`, so a killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pandas as pd

from miarobust.errors import UserError

#: errno values of a write that failed for want of space (a full disk, a quota): a user's problem, told in one line.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class DiskFull(UserError):
    """A write ran out of space; the file it was writing, and every file before it, are as they were."""

    def __init__(self, path: Path):
        super().__init__(f"no space left on the device while writing {path}: it and the files written before it are "
                         "as they were (nothing half-written); free space, then run the same command again.")


def _stage(path: Path, write: Callable[[IO[bytes]], Any]) -> str:
    """Write `path`'s new content through `write(file)` into a temporary sibling, synced; returns its name."""
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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise DiskFull(path) from None
        raise
    return tmp


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Write `path` through `write(file)` into a temporary sibling, then rename it into place."""
    write_files({path: write})


def write_files(files: dict[str | os.PathLike[str], bytes | Callable[[IO[bytes]], Any]]) -> None:
    """Write several files as one step: every new content is staged and synced first, and only then renamed into
    place, so a write that fails (a full disk, a kill) leaves all of them as they were, not some old and some new.
    A value is the file's bytes or a function that writes them into the file it is given."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, content in files.items():
            write = content if callable(content) else (lambda f, data=content: f.write(data))
            staged.append((_stage(Path(path), write), Path(path)))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write a binary file."""
    atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write a text file."""
    write_bytes(path, text.encode())


def json_bytes(obj: Any) -> bytes:
    """JSON as the project writes it: sorted keys, indented, NaN refused."""
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write json_bytes(obj)."""
    write_bytes(path, json_bytes(obj))


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


def csv_text(frame: pd.DataFrame) -> str:
    """A CSV with a fixed float format, so equal results give equal bytes."""
    return frame.to_csv(index=False, float_format=CSV_FLOAT, lineterminator="\n")


def write_csv(path: str | os.PathLike[str], frame: pd.DataFrame) -> None:
    """Atomically write csv_text(frame)."""
    write_text(path, csv_text(frame))


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
