"""Resume (miarobust/evaluator.py): an interrupted run, rerun, writes the same samples.csv as an uninterrupted
one; the folder lock keeps two processes out of one run folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, files_under, subprocess_env

from miarobust.evaluator import Evaluation, RunConfig, run
from miarobust.results.store import FolderLock, partial_name

CFG = dict(model="vit_fmnist", n=24, batch_size=8, steps=2, checks="off")


def samples_bytes(out: Path) -> bytes:
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return (folder / "samples.csv").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """samples.csv of the uninterrupted tiny run."""
    out = tmp_path_factory.mktemp("reference")
    run(RunConfig(**CFG, out=str(out)), progress=False)
    return samples_bytes(out)


def test_interrupted_in_process_then_resumed(tmp_path, monkeypatch, reference):
    """Ctrl-C during batch 2: batches 0 and 1 are kept and not recomputed; the result is byte-identical."""
    cfg = RunConfig(**CFG, out=str(tmp_path))
    real = Evaluation.run_batch
    calls: list[int] = []

    def interrupt_at_2(self, b):
        calls.append(b)
        if b == 2:
            raise KeyboardInterrupt
        return real(self, b)

    monkeypatch.setattr(Evaluation, "run_batch", interrupt_at_2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    folder = tmp_path / cfg.folder_name()
    assert files_under(folder) == [".lock", "config.json", "partial", f"partial/{partial_name(0)}",
                                   f"partial/{partial_name(1)}"]
    (folder / "partial" / ".batch_000002.csv.x.tmp").write_text("half a fi")  # what a kill mid-write leaves
    calls.clear()
    monkeypatch.setattr(Evaluation, "run_batch", lambda self, b: calls.append(b) or real(self, b))
    run(cfg, progress=False)
    assert calls == [2]
    assert samples_bytes(tmp_path) == reference
    assert files_under(folder) == [".lock", "config.json", "samples.csv", "summary.json"]


def test_interrupted_before_any_batch_leaves_nothing(cli, tmp_path, monkeypatch):
    def interrupt(self, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(Evaluation, "run_batch", interrupt)
    out = tmp_path / "out"
    r = cli("run", *TINY, "--out", str(out))
    assert r.code == 130 and "interrupted before any batch finished: nothing was written" in r.err
    assert not out.exists()


def test_interrupt_message_says_where_and_how(cli, tmp_path, monkeypatch):
    real = Evaluation.run_batch

    def interrupt_at_1(self, b):
        if b == 1:
            raise KeyboardInterrupt
        return real(self, b)

    monkeypatch.setattr(Evaluation, "run_batch", interrupt_at_1)
    r = cli("run", *TINY, "--out", str(tmp_path))
    (folder,) = tmp_path.iterdir()
    assert r.code == 130
    assert f"interrupted: 1 finished batches are kept in {folder / 'partial'}; run the same command again" in r.err
    assert "Traceback" not in r.err


def test_complete_run_is_not_recomputed(tmp_path, monkeypatch, reference):
    cfg = RunConfig(**CFG, out=str(tmp_path))
    first = run(cfg, progress=False)
    monkeypatch.setattr(Evaluation, "run_batch", lambda self, b: pytest.fail("recomputed a finished run"))
    again = run(cfg, progress=False)
    assert again.summary == first.summary and samples_bytes(tmp_path) == reference


def test_locked_folder(cli, tmp_path):
    """A second process on the same run folder stops at once with a clear message, and writes nothing."""
    folder = tmp_path / RunConfig(**CFG, out=str(tmp_path)).folder_name()
    with FolderLock(folder):  # flock conflicts between two open files, even in one process
        before = files_under(tmp_path)
        r = cli("run", *TINY, "--out", str(tmp_path))
        assert r.code == 2
        assert r.err.strip() == f"error: another miarobust process is writing {folder}: wait for it to finish."
        assert files_under(tmp_path) == before == [folder.name, f"{folder.name}/.lock"]


def test_different_arguments_use_different_folders(tmp_path):
    a = run(RunConfig(**CFG, out=str(tmp_path)), progress=False)
    b = run(RunConfig(**{**CFG, "seed": 1}, out=str(tmp_path)), progress=False)
    c = run(RunConfig(**{**CFG, "checks": "on"}, out=str(tmp_path), device="cpu"), progress=False)  # not part of the identity
    assert a.folder != b.folder and a.folder == c.folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.folder.name, b.folder.name])


# -- real processes --------------------------------------------------------------------------------------

#: Long enough (24 batches of 30 PGD steps) that a kill lands well before the end, short enough for CI.
LONG = ["--model", "vit_fmnist", "--n", "96", "--batch-size", "4", "--steps", "30", "--checks", "off"]


def start(out: Path) -> subprocess.Popen:
    # SIGINT back to its default in the child: a CI runner that starts the tests in the background has it
    # ignored, which Python would inherit (no KeyboardInterrupt), and the SIGINT case would test nothing
    return subprocess.Popen([sys.executable, "-m", "miarobust", "run", *LONG, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_batch(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """Poll until the process has saved at least one batch in partial/."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(out.glob("*/partial/batch_*.csv")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no batch finished in time")


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("long")  # in this process: one thread, as in the children
    run(RunConfig(**{**CFG, "n": 96, "batch_size": 4, "steps": 30}, out=str(out)), progress=False)  # = LONG
    return samples_bytes(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["SIGKILL", "SIGINT", "SIGTERM"])
def test_killed_process_resumes_byte_identical(cli, tmp_path, sig, long_reference):
    """A real `miarobust run` killed after its first batch; the same command again finishes it, byte-identical.

    While it runs, a second writer of the same run folder (this process) stops at the lock with exit 2,
    and a run with other arguments goes to its own folder undisturbed.
    """
    proc = start(tmp_path)
    try:
        wait_for_batch(proc, tmp_path)
        (folder,) = tmp_path.iterdir()
        if sig == signal.SIGKILL:
            second = cli("run", *LONG, "--out", str(tmp_path))
            assert proc.poll() is None, "the first run ended before the second tried the lock"
            assert second.code == 2
            assert second.err.strip() == f"error: another miarobust process is writing {folder}: wait for it to finish."
            other = cli("run", *TINY, "--out", str(tmp_path))
            assert other.code == 0, other.err
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    kept = list((folder / "partial").glob("batch_*.csv"))
    assert 1 <= len(kept) < 24 and not (folder / "samples.csv").exists()
    if sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or a kill: the same cleanup and message
        assert proc.returncode == (130 if sig == signal.SIGINT else 143)
        said = "interrupted" if sig == signal.SIGINT else "stopped"
        assert f"{said}: {len(kept)} finished batches are kept in {folder / 'partial'}; run the same command " \
               "again to resume." in err
        assert "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    resumed = cli("run", *LONG, "--out", str(tmp_path))  # the kernel released the dead process's lock
    assert resumed.code == 0, resumed.err
    assert (folder / "samples.csv").read_bytes() == long_reference
    assert not (folder / "partial").exists()
    assert len(list(tmp_path.iterdir())) == (2 if sig == signal.SIGKILL else 1)


def no_space_writing(monkeypatch, name: str) -> None:
    """Every write of a file called `name` fails as on a full disk (ENOSPC), part-way through the file."""
    import errno

    import miarobust.results.io as io

    real = io._stage

    def stage(path, write):
        if path.name != name:
            return real(path, write)

        def half_then_full(f):
            f.write(b"half a fi")
            raise OSError(errno.ENOSPC, "No space left on device")

        return real(path, half_then_full)

    monkeypatch.setattr(io, "_stage", stage)


def test_a_full_disk_while_saving_a_batch_keeps_the_earlier_batches_and_says_so(cli, tmp_path, monkeypatch, reference):
    """The disk fills while batch 1 is saved: one line, exit 2, batch 0 kept whole, no trace of batch 1; with space
    again the same command resumes at batch 1 and ends byte-identical to an uninterrupted run."""
    args = ["run", "--model", "vit_fmnist", "--n", "24", "--batch-size", "8", "--steps", "2", "--checks", "off",
            "--out", str(tmp_path)]
    no_space_writing(monkeypatch, partial_name(1))
    r = cli(*args)
    (folder,) = tmp_path.iterdir()
    assert r.code == 2 and r.err.count("error:") == 1 and "Traceback" not in r.err
    assert r.err.strip().splitlines()[-1].startswith(f"error: no space left on the device while writing {folder / 'partial' / partial_name(1)}")
    assert "free space, then run the same command again" in r.err
    assert files_under(folder) == [".lock", "config.json", "partial", f"partial/{partial_name(0)}"]
    monkeypatch.undo()
    assert cli(*args).code == 0
    assert samples_bytes(tmp_path) == reference


def test_folder_of_other_weights_is_not_reused(cli, tmp_path):
    from safetensors.torch import save_file

    from miarobust.models import create

    ckpt = tmp_path / "weights.safetensors"
    save_file(create("vit_fmnist").state_dict(), str(ckpt))
    args = ["run", *TINY, "--attack", "none", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]
    assert cli(*args).code == 0
    (folder,) = (tmp_path / "out").iterdir()
    before = sorted(p.read_bytes() for p in folder.rglob("*") if p.is_file())
    save_file(create("vit_fmnist", pretrained=False).state_dict(), str(ckpt))  # same path, other weights
    r = cli(*args)
    assert r.code == 2 and "other weights" in r.err and "delete the folder or choose another --out" in r.err
    assert sorted(p.read_bytes() for p in folder.rglob("*") if p.is_file()) == before  # nothing rewritten


def test_autoattack_warnings_of_earlier_batches_survive_a_resume(tmp_path, monkeypatch):
    """Check 6 reads AutoAttack's warnings of every batch, including those of a process that stopped before
    the summary (they are kept in partial/ beside the batch's records): same verdict as one uninterrupted run."""
    from miarobust import checks, evaluator

    monkeypatch.setattr(checks, "CHECKS", ("robust_le_clean", "autoattack_flags"))  # the other checks: not tested here
    cfg = RunConfig(model="mia_vit_fmnist", gate_mode="stochastic", eval_samples=2, attacks=("apgd-ce",), n=2,
                    batch_size=1, checks="on", out=str(tmp_path))
    finish = evaluator.finish

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluator, "finish", stop)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    monkeypatch.setattr(evaluator, "finish", finish)
    monkeypatch.setattr(Evaluation, "run_batch", lambda self, b: pytest.fail("a finished batch was recomputed"))
    flags = run(cfg, progress=False).summary["checks"]["autoattack_flags"]
    # APGD without EOT on the stochastic gates: AutoAttack's randomness warning, a flag (as in one process)
    assert flags["status"] == "flag" and any(checks.RANDOMNESS_WARNING in w for w in flags["value"]), flags


def test_checks_killed_midway_resume_their_finished_batches(tmp_path, monkeypatch, cli):
    """A run stopped during its sanity checks keeps each finished batch of their reruns in partial/checks (the
    message says so); run again, it computes only the rest, and its checks, AutoAttack's warnings among them, are
    those of an uninterrupted run, with summary.json counting the batches read back."""
    import json

    from miarobust import checks
    from miarobust.checks import base

    monkeypatch.setitem(checks.SQUARE, "on", (200, 50))  # check 4's Square: 50 queries, enough to run it here
    args = ["--model", "mia_vit_fmnist", "--gate-mode", "stochastic", "--data", "embedded", "--attack", "apgd-ce",
            "--steps", "2", "--n", "2", "--batch-size", "1", "--eval-samples", "2", "--checks", "on"]
    real = base.build_attack
    calls: list[str] = []

    def counted(stop_at: int):
        def build(info, victim, acfg):
            fn = real(info, victim, acfg)

            def attack(x, y):
                calls.append(info.name)
                if len(calls) == stop_at:
                    raise KeyboardInterrupt
                return fn(x, y)

            if hasattr(fn, "warnings"):
                attack.warnings = fn.warnings  # the same list: the rerun reads it as the attack's
            return attack
        return build

    monkeypatch.setattr(base, "build_attack", counted(stop_at=0))
    assert cli("run", *args, "--out", str(tmp_path / "whole")).code == 0
    whole, total = json.loads(next((tmp_path / "whole").glob("*/summary.json")).read_text()), len(calls)
    assert total >= 6 and "checks_batches_resumed" not in whole

    calls.clear()
    monkeypatch.setattr(base, "build_attack", counted(stop_at=total // 2 + 1))
    r = cli("run", *args, "--out", str(tmp_path / "split"))
    kept = total // 2
    assert r.code == 130 and f"2 finished batches and {kept} batches of its sanity checks are kept in" in r.err
    (folder,) = (tmp_path / "split").iterdir()
    assert len(list((folder / "partial" / "checks").glob("*.json"))) == kept and not (folder / "summary.json").exists()

    calls.clear()
    monkeypatch.setattr(base, "build_attack", counted(stop_at=0))
    assert cli("run", *args, "--out", str(tmp_path / "split")).code == 0
    assert len(calls) == total - kept  # only the batches not kept
    split = json.loads((folder / "summary.json").read_text())
    assert split["checks_batches_resumed"] == kept and not (folder / "partial").exists()
    randomness = split["checks"].pop("randomness")  # forwards of the clean images, not a rerun: computed again
    assert randomness["status"] == whole["checks"].pop("randomness")["status"] and split["checks"] == whole["checks"]
    assert any(checks.RANDOMNESS_WARNING in w for w in split["checks"]["autoattack_flags"]["value"])


# -- --reuse: a run grown from the same run at another n (miarobust/results/reuse.py) -----------------------------


def count_batches(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = Evaluation.run_batch
    monkeypatch.setattr(Evaluation, "run_batch", lambda self, b: calls.append(b) or real(self, b))
    return calls


def test_reuse_grows_a_run_to_the_same_records(tmp_path, monkeypatch, reference):
    """n=16 then n=24 with --reuse: batches 0-1 are copied, only batch 2 is computed, and samples.csv is the
    byte-identical one of a fresh n=24 run; the summary names the donor. Smaller from larger: only the batches
    whose images are the same (n=12: batch 0, not the half batch 1), again as a fresh run would write them."""
    import json

    small = run(RunConfig(**{**CFG, "n": 16}, out=str(tmp_path)), progress=False)
    calls = count_batches(monkeypatch)
    grown = run(RunConfig(**CFG, out=str(tmp_path)), progress=False, reuse="same-code")
    assert calls == [2]
    assert (grown.folder / "samples.csv").read_bytes() == reference
    reused = grown.summary["reused"]
    assert reused["run"] == small.folder.name and reused["batches"] == [0, 1] and reused["images"] == 16
    assert reused["code_changes"] == [] and json.loads((grown.folder / "summary.json").read_text())["reused"] == reused
    calls.clear()
    part = run(RunConfig(**{**CFG, "n": 12}, out=str(tmp_path)), progress=False, reuse="same-code")
    assert calls == [1] and part.summary["reused"]["batches"] == [0]
    fresh = run(RunConfig(**{**CFG, "n": 12}, out=str(tmp_path / "fresh")), progress=False)
    assert (part.folder / "samples.csv").read_bytes() == (fresh.folder / "samples.csv").read_bytes()


@pytest.mark.parametrize("other", [{"seed": 1}, {"steps": 3}, {"batch_size": 12}, {"eps": 4 / 255}, {"eot_chunk": 4}])
def test_reuse_takes_only_the_same_request(tmp_path, monkeypatch, capsys, other):
    run(RunConfig(**{**CFG, "n": 16, **other}, out=str(tmp_path)), progress=False)
    calls = count_batches(monkeypatch)
    res = run(RunConfig(**CFG, out=str(tmp_path)), progress=True, reuse="same-code")
    assert calls == [0, 1, 2] and "reused" not in res.summary
    assert "no finished run in" in capsys.readouterr().err


def test_reuse_skips_a_donor_whose_autoattack_warnings_have_no_batch():
    """A finished run that predates per-batch warnings: reusable only if check 6 passed (AutoAttack warned nowhere,
    or only its randomness warning, expected on stochastic gates through EOT)."""
    from miarobust.results.reuse import batch_warnings

    kept = {"batch_warnings": {"1": {"autoattack": ["w"]}}}
    assert batch_warnings(kept, autoattack=True) == {1: {"autoattack": ["w"]}}
    assert batch_warnings({}, autoattack=False) == {}
    clean = {"checks": {"autoattack_flags": {"status": "pass", "value": []}}}
    assert batch_warnings(clean, autoattack=True) == {}
    expected = {"checks": {"autoattack_flags": {"status": "pass", "value": [
        'autoattack: it seems to be a randomized defense! Please use version="rand".']}}}  # stochastic gates, EOT
    assert batch_warnings(expected, autoattack=True) == {}
    for warned in ({"checks": {"autoattack_flags": {"status": "flag", "value": ["autoattack: w"]}}}, {"checks": {}},
                   {"checks": None}):
        assert batch_warnings(warned, autoattack=True) is None


def test_reuse_leaves_out_other_code_other_labels_and_damaged_donors(tmp_path):
    """A donor is taken only if it was made by this code (same-code; any-code takes it, naming the difference), its
    images carry the labels the data set has now and its samples.csv is readable; each one left out is named."""
    import dataclasses
    import json

    from miarobust.config import RunRecord
    from miarobust.results.reuse import copy_batches, find_donor
    from miarobust.results.summary import environment

    donor = run(RunConfig(**{**CFG, "n": 16}, out=str(tmp_path)), progress=False)
    grown = RunConfig(**CFG, out=str(tmp_path))
    new = tmp_path / grown.folder_name()
    new.mkdir()
    config = json.loads((donor.folder / "config.json").read_text())
    resolved, now = RunRecord.read(config).resolved, environment()
    ev = Evaluation.from_config(grown)
    labels = lambda b: ev.batch(b)[1].tolist()  # noqa: E731

    found, left = find_donor(new, grown, resolved, 24, autoattack=True, mode="same-code", now=now)
    assert found is not None and found.batches == [0, 1] and found.code_changes == [] and left == []
    assert copy_batches(new, found, 8, 24, ev.sample_columns(), lambda b: [9] * 8) == 0  # other labels
    assert copy_batches(new, found, 8, 24, ev.sample_columns()[:-1], labels) == 0  # other columns
    assert not (new / "partial").exists()
    for otherwise, said in (({"eot": 8}, "EOT K None there, 8 here"),  # the adaptive preset's probe chose another K
                            ({"weights_sha256": "f" * 64}, f"there, {'f' * 12} here")):  # the checkpoint changed since
        found, left = find_donor(new, grown, dataclasses.replace(resolved, **otherwise), 24, autoattack=True,
                                 mode="same-code", now=now)
        assert found is None and len(left) == 1 and "the same request resolved otherwise there" in left[0]
        assert left[0].startswith(donor.folder.name) and said in left[0]

    config["environment"]["versions"]["torch"] = "0.0.1"  # made by other code
    (donor.folder / "config.json").write_text(json.dumps(config))
    found, left = find_donor(new, grown, resolved, 24, autoattack=True, mode="same-code", now=now)
    assert found is None and left and "torch 0.0.1 ->" in left[0] and "any-code" in left[0]
    found, left = find_donor(new, grown, resolved, 24, autoattack=True, mode="any-code", now=now)
    assert found is not None and "torch 0.0.1 ->" in found.code_changes[0]

    (donor.folder / "samples.csv").write_text("not,a\ncsv")  # damaged: no batch copied, no error
    assert copy_batches(new, found, 8, 24, ev.sample_columns(), labels) == 0 and not (new / "partial").exists()
    summary = json.loads((donor.folder / "summary.json").read_text())
    del summary["batch_warnings"]
    summary["checks"]["autoattack_flags"] = {"status": "flag", "value": ["autoattack: Square broke more"]}
    (donor.folder / "summary.json").write_text(json.dumps(summary))
    found, left = find_donor(new, grown, resolved, 24, autoattack=True, mode="any-code", now=now)
    assert found is None and left == [f"{donor.folder.name} (AutoAttack warned there, and in which batch was not kept)"]


def test_sample_columns_are_the_records_columns(tmp_path):
    res = run(RunConfig(**{**CFG, "n": 8, "attacks": ("pgd", "fgsm")}, out=str(tmp_path)), progress=False)
    ev = Evaluation.from_config(RunConfig(**{**CFG, "n": 8, "attacks": ("pgd", "fgsm")}, out=str(tmp_path)))
    assert list(pd.read_csv(res.folder / "samples.csv").columns) == ev.sample_columns()


def test_code_changes_says_how_the_donors_code_differs():
    from miarobust.results.reuse import code_changes

    now = {"versions": {"torch": "2"}, "git_revision": "a" * 40, "source_sha256": "s"}
    assert code_changes({"versions": {"torch": "2"}, "source_sha256": "s"}, now) == []
    assert code_changes({"versions": {"torch": "1"}, "source_sha256": "s"}, now) == ["torch 1 -> 2"]
    older = code_changes({"versions": {"torch": "2"}, "source_sha256": "t", "git_revision": "0" * 40}, now)
    assert older[0] == "the package source differs" and "is not in this checkout" in older[1]
    assert code_changes({"versions": {"torch": "2"}}, now) == ["code revision unknown (not made in a git checkout)"]
