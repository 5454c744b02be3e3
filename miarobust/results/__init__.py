"""The results package: how a run folder is written (io: atomic files), kept while in progress (store: layout,
lock, partial batches, resume) and read back (read: finished runs and their rows of the tidy table). The
evaluator writes through it, and `report`, `regress` and `worst` read through it.
"""

from miarobust.results.io import (
    CSV_FLOAT,
    atomic_write,
    git_revision,
    missing_folders,
    remove_folders,
    run_id,
    write_bytes,
    write_csv,
    write_json,
    write_text,
)
from miarobust.results.store import CONFIG, PARTIAL, SAMPLES, SUMMARY, batch_seed

__all__ = ["CONFIG", "CSV_FLOAT", "PARTIAL", "SAMPLES", "SUMMARY", "atomic_write", "batch_seed", "git_revision",
           "missing_folders", "remove_folders", "run_id", "write_bytes", "write_csv", "write_json", "write_text"]
