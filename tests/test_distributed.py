"""miarobust/distributed.py with evaluator.run: batches sharded over torchrun ranks (gloo on CPU), rank 0 merges.

The merged samples.csv must equal a single process's; a rank resumes its own batches; rank 0 holds the
folder lock and writes config.json before any rank starts, and a failure on one rank stops every rank.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import files_under, subprocess_env

from miarobust import evaluator
from miarobust.errors import UserError
from miarobust.evaluator import Evaluation, RunConfig, run
from miarobust.results import write_csv
from miarobust.results.store import FolderLock, batches_todo, partial_name

#: n = 101 with batches of 10: 11 batches, the last one short, 6 on rank 0 and 5 on rank 1.
ARGS = ["--model", "vit_fmnist", "-n", "101", "--batch-size", "10", "--steps", "2", "--checks", "off"]
CFG = dict(model="vit_fmnist", n=101, batch_size=10, steps=2, checks="off")


def torchrun(out: Path, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "miarobust", "run", *ARGS, "--out", str(out)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=timeout)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, bytes]:
    """Run folder name and samples.csv of the single-process run."""
    out = tmp_path_factory.mktemp("single")
    res = run(RunConfig(**CFG, out=str(out)), progress=False)
    return res.folder, (res.folder / "samples.csv").read_bytes()


def test_batches_are_sharded_round_robin(tmp_path):
    assert list(batches_todo(tmp_path, 11, 0, 2)) == [0, 2, 4, 6, 8, 10]
    assert list(batches_todo(tmp_path, 11, 1, 2)) == [1, 3, 5, 7, 9]
    write_csv(tmp_path / "partial" / partial_name(3), pd.DataFrame({"a": [1]}))
    assert list(batches_todo(tmp_path, 11, 1, 2)) == [1, 5, 7, 9]  # a rank resumes its own batches only
    assert sorted(b for r in range(3) for b in batches_todo(tmp_path, 11, r, 3)) == [b for b in range(11) if b != 3]


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, single):
    p = torchrun(tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    folder = tmp_path / single[0].name
    assert (folder / "samples.csv").read_bytes() == single[1]
    # rank 1 wrote only partial batches, which rank 0 merged and removed: nothing else is left
    assert files_under(tmp_path) == [folder.name, *(f"{folder.name}/{f}" for f in
                                                     (".lock", "config.json", "samples.csv", "summary.json"))]
    assert p.stdout.count("results in") == 1  # the summary is printed by rank 0 only


@pytest.mark.slow
def test_each_rank_resumes_its_batches(tmp_path, single):
    """Batches 2 (rank 0) and 5 (rank 1) are saved already, marked: the merged file keeps them as saved."""
    folder = tmp_path / single[0].name
    reference = pd.read_csv(single[0] / "samples.csv")
    for b in (2, 5):
        frame = reference.iloc[b * 10:(b + 1) * 10].copy()
        frame["clean_gmacs"] = 123.0
        write_csv(folder / "partial" / partial_name(b), frame)
    p = torchrun(tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    merged = pd.read_csv(folder / "samples.csv")
    marked = merged["clean_gmacs"] == 123.0
    assert marked.sum() == 20 and set(merged.loc[marked, "index"] // 10) == {2, 5}
    unmarked = ~marked.to_numpy()
    pd.testing.assert_frame_equal(merged[unmarked].reset_index(drop=True), reference[unmarked].reset_index(drop=True))


@pytest.mark.slow
def test_a_failing_rank_stops_both_without_hanging(tmp_path, image_root):
    """A corrupt image in rank 1's batch: both ranks exit with the error, rank 0's finished batch is kept."""
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    for i in (0, 1, 3):
        (root / "cat" / f"{i}.png").write_bytes((image_root / "cat" / "0.png").read_bytes())
    (root / "cat" / "2.png").write_bytes(b"not a png")  # batch 1 = images 2 and 3: rank 1's
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "miarobust", "run", "--model", "vit_fmnist", "--data", "folder", "--data-root", str(root),
                        "--batch-size", "2", "--steps", "1", "--checks", "off", "--out", str(out)],
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert p.returncode != 0
    assert "error: rank 1 failed: cannot read image" in p.stderr and "2.png" in p.stderr  # rank 0's line
    (folder,) = out.iterdir()
    assert files_under(folder) == [".lock", "config.json", "partial", f"partial/{partial_name(0)}"]


# -- the rank protocol, one rank at a time (the collectives replaced by what the other ranks would send) -----


def test_rank0_lock_busy_stops_every_rank(tmp_path, monkeypatch):
    cfg = RunConfig(**{**CFG, "n": 20}, out=str(tmp_path))
    folder = tmp_path / cfg.folder_name()
    sent = []
    monkeypatch.setattr(evaluator, "_broadcast", lambda obj: sent.append(obj) or obj)
    with FolderLock(folder):
        with pytest.raises(UserError, match="another miarobust process is writing"):
            run(cfg, progress=False, rank=0, world=2)
    assert sent == [("failed", f"another miarobust process is writing {folder}: wait for it to finish.")]
    assert files_under(folder) == [".lock"]  # no config.json: rank 0 wrote nothing
    monkeypatch.setattr(evaluator, "_broadcast", lambda obj: sent[0])  # what rank 1 receives
    with pytest.raises(UserError, match="another miarobust process"):
        run(cfg, progress=False, rank=1, world=2)
    assert files_under(folder) == [".lock"]


def test_config_is_written_by_rank0_before_the_go(tmp_path, monkeypatch):
    cfg = RunConfig(**{**CFG, "n": 20}, out=str(tmp_path))
    folder = tmp_path / cfg.folder_name()
    seen = []
    monkeypatch.setattr(evaluator, "_broadcast", lambda obj: seen.append(files_under(folder)) or ("go", ""))
    monkeypatch.setattr(evaluator, "_gather_failures", lambda error, world: [])
    run(cfg, progress=False, rank=1, world=2)  # rank 1: its batch 1 only, no config.json, no merge
    assert files_under(folder) == ["partial", f"partial/{partial_name(1)}"]
    seen.clear()
    run(cfg, progress=False, rank=0, world=2)
    assert seen == [[".lock", "config.json", "partial", f"partial/{partial_name(1)}"]]
    assert files_under(folder) == [".lock", "config.json", "samples.csv", "summary.json"]


def test_failure_on_another_rank_stops_rank0(tmp_path, monkeypatch):
    """Rank 1 failed before saving a batch: rank 0 raises too, and removes the folder nothing was saved in."""
    cfg = RunConfig(**{**CFG, "n": 10}, out=str(tmp_path / "out"))  # one batch: rank 0's
    monkeypatch.setattr(evaluator, "_broadcast", lambda obj: obj)
    monkeypatch.setattr(Evaluation, "run_batch", lambda self, b: (_ for _ in ()).throw(UserError("bad image x.png")))
    monkeypatch.setattr(evaluator, "_gather_failures", lambda error, world: [(0, str(error)), (1, "bad image y.png")])
    with pytest.raises(UserError, match="bad image x.png"):
        run(cfg, progress=False, rank=0, world=2)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(evaluator, "_gather_failures", lambda error, world: [(1, "bad image y.png")])
    monkeypatch.setattr(Evaluation, "run_batch", lambda self, b: pytest.fail("rank 1 has no batch here"))
    cfg = RunConfig(**{**CFG, "n": 10}, out=str(tmp_path / "out2"))
    with pytest.raises(UserError, match="rank 1 failed: bad image y.png"):
        run(cfg, progress=False, rank=1, world=2)


# -- --device cuda under torchrun (CUDA faked: the checks come before any CUDA call) ----------------------


@pytest.mark.parametrize("device, local, needle", [
    ("cuda:1", "1", "use --device cuda, each rank takes the GPU of its LOCAL_RANK"),
    ("cuda", "1", "LOCAL_RANK 1 needs GPU 1, but 1 are visible: lower --nproc_per_node"),
])
def test_cuda_rank_checks(monkeypatch, device, local, needle):
    import torch

    from miarobust.distributed import distributed_context

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=needle):
        with distributed_context(RunConfig(device=device)):
            pytest.fail("entered")


def test_cuda_picks_the_local_rank_gpu(monkeypatch):
    import torch
    import torch.distributed as dist

    from miarobust.distributed import distributed_context

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append(("barrier",)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    with distributed_context(RunConfig(device="cuda")) as (rank, world):
        assert (rank, world) == (1, 2)
    assert calls == [("set_device", 1), ("init", "nccl"), ("barrier",), ("destroy",)]


def test_sigterm_stops_once_and_never_cuts_a_failure_s_handling_short() -> None:
    """The first SIGTERM raises RankStopped; later ones are ignored. A rank that sees a lost peer and sets `stopping`
    first ignores the SIGTERM torchrun sends at about that moment, so its one-line message is always written."""
    import os
    import signal

    from miarobust.distributed import RankStopped, stop_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    with stop_on_sigterm() as sigterm:
        with pytest.raises(RankStopped):
            os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one while stopping: ignored
        assert sigterm.stopping
    assert signal.getsignal(signal.SIGTERM) is before
    handled = []
    with stop_on_sigterm() as sigterm:
        try:
            raise RuntimeError("Connection closed by peer")  # what gloo raises when the other rank dies
        except RuntimeError:
            sigterm.stopping = True
            os.kill(os.getpid(), signal.SIGTERM)  # torchrun's, landing inside the handling
            handled.append("message written")
    assert handled == ["message written"]
