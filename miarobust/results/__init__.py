"""The results package: how a run folder is written (io: atomic files), kept while in progress (store: layout,
lock, partial batches, resume) and read back (read: finished runs and their rows of the tidy table). The
evaluator writes through it, and `report`, `regress` and `worst` read through it.
"""

from miarobust.results.io import (
    CSV_FLOAT,
    DiskFull,
    atomic_write,
    csv_text,
    git_revision,
    json_bytes,
    missing_folders,
    remove_folders,
    run_id,
    write_bytes,
    write_csv,
    write_files,
    write_json,
    write_text,
)
from miarobust.results.store import CONFIG, PARTIAL, SAMPLES, SUMMARY, batch_seed

__all__ = ["CONFIG", "CSV_FLOAT", "PARTIAL", "SAMPLES", "SUMMARY", "DiskFull", "atomic_write", "batch_seed", "csv_text",
           "git_revision", "json_bytes", "missing_folders", "remove_folders", "run_id", "write_bytes", "write_csv", "write_files",
           "write_json", "write_text"]
