"""Wall time of one `miarobust run` on CPU in 2 torchrun processes (gloo) against 1 process, in one run.

Both are timed as whole commands (start-up, model build, evaluation, merge), with the same total number of
threads: the single process gets --threads, each of the 2 ranks half of it. Each timing writes into a fresh
results folder, so nothing is resumed. Prints both wall times, the speed-up, and whether the two samples.csv
are byte-identical (with other thread counts per process they may differ in the last float digit).

    python benchmarks/bench_distributed.py [--model vit_fmnist] [-n 400] [--batch-size 50] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], threads: int) -> tuple[float, bytes]:
    """Run `cmd ... --out <fresh folder>` with `threads` OpenMP threads per process; (seconds, samples.csv)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        p = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
        (folder,) = out.iterdir()
        return seconds, (folder / "samples.csv").read_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_fmnist")
    ap.add_argument("--attack", default="pgd")
    ap.add_argument("-n", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--data", default="embedded")
    ap.add_argument("--threads", type=int, default=2, help="threads in all (the 2 ranks get half each)")
    a = ap.parse_args()
    run_args = ["run", "--model", a.model, "--attack", a.attack, "--data", a.data, "-n", str(a.n),
                "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--checks", "off"]
    one, one_csv = timed([sys.executable, "-m", "miarobust", *run_args], a.threads)
    two, two_csv = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "miarobust", *run_args], max(a.threads // 2, 1))
    batches = -(-a.n // a.batch_size)
    print(f"{a.model} x {a.attack}, n={a.n}, {batches} batches of {a.batch_size}, PGD steps {a.steps}, "
          f"{a.threads} threads in all")
    print(f"  1 process        {one:8.1f} s")
    print(f"  2 ranks (gloo)   {two:8.1f} s")
    print(f"  speed-up (1 / 2) {one / two:8.2f} x")
    print(f"  samples.csv identical: {one_csv == two_csv}")


if __name__ == "__main__":
    main()
