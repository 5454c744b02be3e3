"""Shared fixtures: the CLI in-process and as a subprocess, and tiny generated data sets on disk."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # tests share 2 cores with whatever else runs

#: A run that takes well under a second of compute: untrained-or-shipped small ViT, 24 embedded images.
TINY = ["--model", "vit_fmnist", "--n", "24", "--batch-size", "8", "--steps", "2", "--checks", "off"]


@dataclass
class Result:
    code: int
    out: str
    err: str


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: one thread each, no colour, no tty progress bars."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Run `miarobust ARGS` in this process through the console entry point (main), as a user would."""
    from miarobust.cli import main

    def invoke(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["miarobust", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


def run_subprocess(*args: str, timeout: float = 300) -> Result:
    """Run `python -m miarobust ARGS` in a child process."""
    p = subprocess.run([sys.executable, "-m", "miarobust", *args], capture_output=True, text=True,
                       env=subprocess_env(), timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def files_under(path: Path) -> list[str]:
    """Every file and folder under `path` (hidden ones too), relative; [] when it does not exist."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CIFAR-10 in torchvision's cifar-10-batches-py pickle layout: 4 images per train file, 6 test."""
    root = tmp_path_factory.mktemp("cifar")
    base = root / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [*[(f"data_batch_{i}", 4) for i in range(1, 6)], ("test_batch", 6)]:
        entry = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n)], "filenames": [f"{i}.png" for i in range(n)]}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": 4, "num_vis": 3072}, f, protocol=2)
    return root


@pytest.fixture(scope="session")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder: 2 classes x 3 RGB PNGs of different sizes (40x30, 50x50, 64x48)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for i, (w, h) in enumerate([(40, 30), (50, 50), (64, 48)]):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root
