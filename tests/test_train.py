"""`miarobust train` end to end on 256 synthetic images: static, MIA from it, and a further MIA stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import subprocess_env
from safetensors.torch import load_file

from miarobust.models import create
from miarobust.train.loop import without_timing


def train_static(cli, out) -> None:
    r = cli("train", "--model", "vit_fmnist", "--data", "synthetic", "--epochs", "1", "--batch-size", "64", "--out", str(out))
    assert r.code == 0, r.err
    assert {"model.safetensors", "log.csv", "curves.png", "state.pt", "config.json"} <= {p.name for p in out.iterdir()}
    assert len(pd.read_csv(out / "log.csv")) == 1


def test_mia_stages_from_static_then_from_mia(cli, tmp_path) -> None:
    static_run, first, second = tmp_path / "static", tmp_path / "mia1", tmp_path / "mia2"
    train_static(cli, static_run)
    common = ["train", "--model", "mia_vit_fmnist", "--data", "synthetic", "--epochs", "1", "--batch-size", "64",
              "--budget", "0.6"]
    r = cli(*common, "--init", str(static_run / "model.safetensors"), "--out", str(first))
    assert r.code == 0, r.err
    log = pd.read_csv(first / "log.csv")
    for column in ("test_acc", "flops_ratio", "det_ratio_p5", "det_ratio_p95", "det_kept_blocks", "test_acc_stochastic"):
        assert column in log.columns
    # the teacher is the static checkpoint the student started from
    assert json.loads((first / "config.json").read_text())["extra"]["teacher"] is None

    stage1 = load_file(str(first / "model.safetensors"))
    r = cli(*common, "--init", str(first / "model.safetensors"), "--teacher", str(static_run / "model.safetensors"),
            "--kd-weight", "2", "--augment", "--lr", "1e-9", "--out", str(second))
    assert r.code == 0, r.err
    cfg = json.loads((second / "config.json").read_text())
    assert cfg["augment"] and cfg["extra"]["kd_weight"] == 2.0
    assert cfg["extra"]["teacher"] == str(static_run / "model.safetensors")
    # the first stage moved the controller from its initial state; the second (at a negligible lr) kept it
    fresh = create("mia_vit_fmnist", pretrained=False).state_dict()["controller.0.cls.bias"]
    assert not torch.equal(stage1["controller.0.cls.bias"], fresh)
    stage2 = load_file(str(second / "model.safetensors"))
    assert stage2.keys() == stage1.keys()
    assert all(torch.allclose(stage2[k], stage1[k], atol=1e-5) for k in stage1)
    assert len(pd.read_csv(second / "log.csv")) == 1


def test_teacher_is_for_mia_only(cli, tmp_path) -> None:
    r = cli("train", "--model", "vit_fmnist", "--data", "synthetic", "--teacher", "x.safetensors", "--out", str(tmp_path / "t"))
    assert r.code == 2 and "mia_" in r.err and "Traceback" not in r.err


def test_mia_training_interrupted_then_resumed_equals_uninterrupted(cli, tmp_path, monkeypatch) -> None:
    """Stopped after epoch 1 and run again, the hybrid training ends where an uninterrupted run ends: the
    optimiser, the schedule and REINFORCE's moving-average baseline all carry over. `--init` takes a shipped name."""
    import miarobust.train.loop as loop

    common = ["train", "--model", "mia_vit_fmnist", "--init", "vit_fmnist", "--data", "synthetic", "--epochs", "2",
              "--batch-size", "64", "--budget", "0.6"]
    r = cli(*common, "--out", str(tmp_path / "whole"))
    assert r.code == 0, r.err

    plot = loop.plot_curves

    def stop_after_first_epoch(*args, **kwargs):  # called once an epoch's weights and state are written
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "plot_curves", stop_after_first_epoch)
    r = cli(*common, "--out", str(tmp_path / "split"))
    assert r.code != 0 and len(pd.read_csv(tmp_path / "split" / "log.csv")) == 1
    state = torch.load(tmp_path / "split" / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and isinstance(state["carried"]["b"], float)
    monkeypatch.setattr(loop, "plot_curves", plot)
    r = cli(*common, "--out", str(tmp_path / "split"))
    assert r.code == 0, r.err

    whole, split = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "split"))
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    a, b = (without_timing(pd.read_csv(tmp_path / d / "log.csv")) for d in ("whole", "split"))
    pd.testing.assert_frame_equal(a, b)


def test_a_full_disk_at_the_epoch_end_keeps_the_last_finished_epoch_and_says_so(cli, tmp_path, monkeypatch) -> None:
    """The disk fills while epoch 2's resume state is written, after its weights and log were staged: one line,
    exit 2, and the weights, log and state all still epoch 1's (no mix of epochs, no temporary file); with space
    again the same command resumes from epoch 1 and finishes."""
    from test_resume import no_space_writing

    out = tmp_path / "t"
    common = ["train", "--model", "vit_fmnist", "--data", "synthetic", "--batch-size", "64", "--out", str(out)]
    assert cli(*common, "--epochs", "1").code == 0
    kept = ("model.safetensors", "log.csv", "state.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name in kept}
    no_space_writing(monkeypatch, "state.pt")
    r = cli(*common, "--epochs", "2")
    assert r.code == 2 and r.err.count("error:") == 1 and "Traceback" not in r.err, r.err
    assert r.err.strip().splitlines()[-1].startswith(f"error: no space left on the device while writing {out / 'state.pt'}")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in kept} == before
    assert not list(out.glob(".*.tmp"))  # nothing staged is left behind
    monkeypatch.undo()
    assert cli(*common, "--epochs", "2").code == 0
    assert len(pd.read_csv(out / "log.csv")) == 2
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 2


def test_folder_with_more_classes_than_outputs(cli, tmp_path) -> None:
    """Twelve class folders: refused in one line, nothing written, unless --num-classes gives the head room."""
    from PIL import Image

    root = tmp_path / "data"
    for i in range(12):
        (root / f"c{i:02d}").mkdir(parents=True)
        Image.new("L", (28, 28), color=20 * i).save(root / f"c{i:02d}" / "x.png")
    common = ["train", "--model", "vit_fmnist", "--data", "folder", "--data-root", str(root), "--epochs", "1"]
    r = cli(*common, "--out", str(tmp_path / "runs" / "t"))
    assert r.code == 2 and "has 12 classes but vit_fmnist outputs 10: pass --num-classes 12" in r.err
    assert not (tmp_path / "runs").exists()
    r = cli(*common, "--num-classes", "12", "--out", str(tmp_path / "runs" / "t"))
    assert r.code == 0, r.err
    assert load_file(str(tmp_path / "runs" / "t" / "model.safetensors"))["head.bias"].shape == (12,)


def test_failure_in_the_first_epoch_leaves_nothing(cli, tmp_path) -> None:
    from PIL import Image

    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.new("L", (28, 28)).save(root / c / "x.png")
    (root / "b" / "y.png").write_bytes(b"not a png")
    r = cli("train", "--model", "vit_fmnist", "--data", "folder", "--data-root", str(root), "--epochs", "1",
            "--out", str(tmp_path / "runs" / "t"))
    assert r.code == 2 and "cannot read image" in r.err and "y.png" in r.err
    assert not (tmp_path / "runs").exists()


def test_a_failed_train_leaves_a_sibling_run_alone(cli, tmp_path, monkeypatch) -> None:
    """Two trainings under one new parent: the one that fails before its first epoch removes its own folder and
    no parent that still holds the other's work."""
    import miarobust.train.static as static

    sweep = tmp_path / "sweep"

    def sibling_then_fail(cfg):
        (sweep / "a").mkdir(parents=True)
        (sweep / "a" / "state.pt").write_bytes(b"finished epochs of another run")
        (sweep / "b").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(static, "train_static", sibling_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):  # not a user error: it propagates
        cli("train", "--model", "vit_fmnist", "--data", "synthetic", "--epochs", "1", "--out", str(sweep / "b"))
    assert (sweep / "a" / "state.pt").is_file() and not (sweep / "b").exists()


def test_mixed_precision_training_on_the_cpu(cli, tmp_path) -> None:
    """--amp bf16 trains an MIA model through autocast on the CPU (the MACs budget still counted in fp32) and
    resumes; fp16, which needs CUDA's gradient scaler, is refused in one line."""
    common = ["train", "--model", "mia_vit_fmnist", "--init", "vit_fmnist", "--data", "synthetic", "--batch-size", "64",
              "--budget", "0.6", "--amp", "bf16", "--out", str(tmp_path / "bf16")]
    r = cli(*common, "--epochs", "1")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["amp"] == "bf16"
    log = pd.read_csv(tmp_path / "bf16" / "log.csv")
    assert log["loss"].notna().all() and 0.3 < log["train_ratio"].iloc[0] < 1.0
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["controller.0.cls.bias"].dtype == torch.float32
    r = cli(*common, "--epochs", "2")  # resumes after epoch 1
    assert r.code == 0, r.err
    assert len(pd.read_csv(tmp_path / "bf16" / "log.csv")) == 2
    r = cli("train", "--model", "vit_fmnist", "--data", "synthetic", "--amp", "fp16", "--out", str(tmp_path / "fp16"))
    assert r.code == 2 and "fp16 is for CUDA" in r.err and not (tmp_path / "fp16").exists()
    r = cli("train", "--model", "vit_fmnist", "--data", "synthetic", "--epochs", "1", "--batch-size", "64",
            "--out", str(tmp_path / "cpu"))
    assert r.code == 0 and json.loads((tmp_path / "cpu" / "config.json").read_text())["amp"] == "off"  # the CPU default


def torchrun_train(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "miarobust", "train", *args], capture_output=True, text=True, env=subprocess_env(),
                          timeout=600)


def test_two_ranks_train_what_one_process_trains_with_the_doubled_batch_and_resume_on_one(cli, tmp_path) -> None:
    """MIA-Former (Gumbel and Bernoulli draws, budget penalty, REINFORCE baseline): 2 gloo ranks at batch 32 give the
    weights and log of one process at batch 64 (4 steps an epoch), to float rounding (1e-4); a run of 2 ranks
    resumed by one process at the same global batch ends with the uninterrupted run's log."""
    common = ["--model", "mia_vit_fmnist", "--init", "vit_fmnist", "--data", "synthetic", "--budget", "0.6"]
    p = torchrun_train(*common, "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path / "ranks"))
    assert p.returncode == 0, p.stderr[-2000:]
    r = cli("train", *common, "--epochs", "1", "--batch-size", "64", "--out", str(tmp_path / "one"))
    assert r.code == 0, r.err
    a, b = load_file(str(tmp_path / "ranks" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-4, worst
    assert json.loads((tmp_path / "ranks" / "config.json").read_text())["ranks"] == 2
    log_a, log_b = (without_timing(pd.read_csv(tmp_path / d / "log.csv")) for d in ("ranks", "one"))
    pd.testing.assert_frame_equal(log_a, log_b, atol=1e-4, rtol=0)
    # resume the two-rank run on one rank (the same global batch), against one process throughout
    r = cli("train", *common, "--epochs", "2", "--batch-size", "64", "--out", str(tmp_path / "ranks"))
    assert r.code == 0, r.err
    r = cli("train", *common, "--epochs", "2", "--batch-size", "64", "--out", str(tmp_path / "one"))
    assert r.code == 0, r.err
    log_a, log_b = (without_timing(pd.read_csv(tmp_path / d / "log.csv")) for d in ("ranks", "one"))
    assert len(log_a) == 2
    pd.testing.assert_frame_equal(log_a, log_b, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_stops_the_run_in_one_line_and_the_rerun_resumes(cli, tmp_path) -> None:
    """SIGKILL to rank 1 once an epoch has finished: torchrun stops rank 0, which says why in one line and where
    the finished epochs are; the same command (here on one process) resumes from the last finished epoch."""
    import os
    import signal
    import time
    from pathlib import Path

    out = tmp_path / "t"
    common = ["train", "--model", "vit_fmnist", "--data", "synthetic", "--batch-size", "64", "--out", str(out)]
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "miarobust", *common, "--epochs", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=subprocess_env())
    try:
        deadline = time.time() + 300
        while not (out / "state.pt").exists():
            assert p.poll() is None and time.time() < deadline, p.communicate()[1][-2000:]
            time.sleep(0.01)
        ranks = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()  # the agent's two workers
        os.kill(int(ranks[-1]), signal.SIGKILL)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert "exitcode  : -9" in err  # torchrun's own report names the killed rank
    lines = [x for x in err.splitlines() if x.startswith(("rank 0: ", "rank 1: "))]  # the survivor's
    assert len(lines) == 1, err[-4000:]
    line = lines[0]
    assert line[len("rank 0: "):] == ("stopped because another rank of this torchrun failed or was killed (torchrun's report "
                    f"names it); finished epochs are kept in {out}: run the same command again, on any number of "
                    "ranks, to resume.")
    finished = torch.load(out / "state.pt", weights_only=True)["epoch"]
    log = pd.read_csv(out / "log.csv")
    assert 1 <= finished < 50 and len(log) == finished
    r = cli(*common, "--epochs", str(finished + 1))
    assert r.code == 0, r.err
    resumed = pd.read_csv(out / "log.csv")
    assert len(resumed) == finished + 1
    pd.testing.assert_frame_equal(without_timing(resumed.iloc[:finished]), without_timing(log))


def test_loader_workers_are_deterministic(cli, tmp_path) -> None:
    """--workers 2 loads in worker processes; two runs give the same weights, and config.json records the count."""
    common = ["train", "--model", "vit_fmnist", "--data", "synthetic", "--epochs", "1", "--batch-size", "64", "--augment",
              "--workers", "2"]
    for run in ("a", "b"):
        r = cli(*common, "--out", str(tmp_path / run))
        assert r.code == 0, r.err
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["workers"] == 2


def test_gradient_accumulation_trains_what_the_larger_batch_trains(cli, tmp_path) -> None:
    """--accum-steps 2 at batch 32 steps the optimizer on the same 64-image windows as batch 64 (256 images: 4 equal
    windows), so the weights agree to float rounding; a shorter last window is rescaled to a mean, not dropped."""
    common = ["train", "--model", "vit_fmnist", "--init", "vit_fmnist", "--data", "synthetic", "--epochs", "1",
              "--lr", "1e-3"]
    r = cli(*common, "--batch-size", "64", "--out", str(tmp_path / "big"))
    assert r.code == 0, r.err
    r = cli(*common, "--batch-size", "32", "--accum-steps", "2", "--out", str(tmp_path / "acc"))
    assert r.code == 0, r.err
    a, b = load_file(str(tmp_path / "big" / "model.safetensors")), load_file(str(tmp_path / "acc" / "model.safetensors"))
    for k in a:
        if k.endswith("qkv.bias"):  # the key bias: no gradient at all (softmax ignores it), Adam steps on float noise
            third = len(a[k]) // 3
            a[k], b[k] = torch.cat([a[k][:third], a[k][2 * third:]]), torch.cat([b[k][:third], b[k][2 * third:]])
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    start = create("vit_fmnist").state_dict()
    assert max((a[k] - start[k]).abs().max().item() for k in a if a[k].shape == start[k].shape) > 1e-4  # it trained
    assert json.loads((tmp_path / "acc" / "config.json").read_text())["accum_steps"] == 2
    r = cli(*common, "--batch-size", "48", "--accum-steps", "2", "--seed", str(2**40),  # a seed past NumPy's 2**32
            "--out", str(tmp_path / "odd"))  # windows of 96 + 96 + 64
    assert r.code == 0, r.err


def test_timm_augment_trains_on_an_image_folder_and_is_refused_elsewhere(cli, tmp_path, image_root) -> None:
    common = ["train", "--model", "vit_fmnist", "--epochs", "1", "--batch-size", "4", "--timm-augment"]
    r = cli(*common, "--data", "folder", "--data-root", str(image_root), "--out", str(tmp_path / "f"))
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "f" / "config.json").read_text())["timm_augment"] is True
    r = cli(*common, "--data", "synthetic", "--out", str(tmp_path / "s"))
    assert r.code == 2 and "--augment" in r.err and not (tmp_path / "s").exists()
