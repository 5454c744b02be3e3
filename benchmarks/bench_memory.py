"""Peak resident memory of `miarobust run` for a small and a large n: evaluation streams batch by batch,
so the peak should not grow with n.

Default: PGD-10 on deit_s (random weights, written to a checkpoint file first, where none ship and no
--checkpoint is given: memory does not depend on the weights) on --data synthetic at 224x224, batches of 32,
CPU, n = 64 against n = 256. Each run is a fresh child process writing into a fresh results folder; its
peak RSS is the child's own ru_maxrss from os.wait4 (not the running maximum of RUSAGE_CHILDREN).

    python benchmarks/bench_memory.py                          # the full measurement (minutes on CPU)
    python benchmarks/bench_memory.py --sizes 2 4 --batch-size 2 --steps 1   # a smoke test
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def peak_rss(cmd: list[str], threads: int) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of `cmd` run as a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds  # Linux reports KiB


def shipped(model: str) -> bool:
    from miarobust.models.registry import weights_file

    return weights_file(model) is not None


def random_weights(model: str, folder: str) -> str:
    """A safetensors file of `model` with random weights (miarobust refuses to evaluate none at all)."""
    from safetensors.torch import save_file

    from miarobust.models import create

    path = os.path.join(folder, f"{model}-random.safetensors")
    save_file({k: v.contiguous() for k, v in create(model, pretrained=False).state_dict().items()}, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_s")
    ap.add_argument("--attack", default="pgd")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sizes", type=int, nargs=2, default=[64, 256], metavar=("N_SMALL", "N_LARGE"))
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--checkpoint", default=None, help="weights (default: shipped ones, else random ones)")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_weights_") as tmp:
        weights = ["--checkpoint", a.checkpoint or random_weights(a.model, tmp)] if a.checkpoint or not shipped(a.model) else []
        for n in a.sizes:
            with tempfile.TemporaryDirectory(prefix="bench_memory_") as out:
                cmd = [sys.executable, "-m", "miarobust", "run", "--model", a.model, *weights, "--data", "synthetic",
                       "--img-size", str(a.img_size), "--attack", a.attack, "--steps", str(a.steps), "-n", str(n),
                       "--batch-size", str(a.batch_size), "--checks", "off", "--out", out]
                mib, seconds = peak_rss(cmd, a.threads)
            rows.append((n, mib, seconds))
    print(f"{a.model} x {a.attack}-{a.steps} on synthetic {a.img_size}x{a.img_size}, batch {a.batch_size}, CPU, "
          f"{a.threads} threads")
    for n, mib, seconds in rows:
        print(f"  n={n:<6} peak RSS {mib:9.1f} MiB   {seconds:7.1f} s")
    print(f"  peak RSS ratio n={rows[1][0]} / n={rows[0][0]}: {rows[1][1] / rows[0][1]:.3f}")


if __name__ == "__main__":
    main()
