"""miarobust/cli.py: the eps parser, a tiny run end to end, and every bad input of docs/errors.md.

A bad input must give one line on stderr that says what to do, exit code 2, no traceback, and write
nothing: the --out folder must not even be created.
"""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY, files_under, run_subprocess

from miarobust.errors import UserError
from miarobust.values import Eps

# -- the eps parser ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [("8/255", 8 / 255), ("0.031", 0.031), ("1e-2", 0.01), (" 4/255 ", 4 / 255),
                                         ("0.5/1", 0.5), ("2", 2.0)])
def test_parse_eps(text, value):
    assert math.isclose(Eps.parse(text).value, value, rel_tol=1e-12) and Eps.parse(text).text == text.strip()


@pytest.mark.parametrize("text", ["abc", "-1", "1/0", "0", "0/255", "nan", "inf", "-inf", "8/", "/255", "", "8/255/2"])
def test_parse_eps_rejects(text):
    with pytest.raises(UserError, match=r"8/255"):
        Eps.parse(text)


# -- a good run ----------------------------------------------------------------------------------------


def test_tiny_run_writes_the_run_folder(cli, tmp_path):
    r = cli("run", *TINY, "--out", str(tmp_path))
    assert r.code == 0, r.err
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("vit_fmnist-embedded-pgd-Linf-8_255-")
    assert files_under(folder) == [".lock", "config.json", "samples.csv", "summary.json"]  # no partial/, no temp files
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["n"] == 24 and "pgd" in summary["attacks"]
    config = json.loads((folder / "config.json").read_text())
    assert config["seed"] == 0 and config["environment"]["versions"]["torch"] == torch.__version__
    assert f"results in {folder}" in r.out and "clean accuracy" in r.out
    again = cli("run", *TINY, "--out", str(tmp_path))  # complete: nothing recomputed, same summary
    assert again.code == 0 and again.out == r.out


def test_square_takes_the_query_budget_asked_for(cli, tmp_path, monkeypatch):
    """--queries reaches the Square that runs (here alone) and the run's record; the default leaves names alone."""
    import pyautoattack.autoattack as aa

    budgets = []
    square = aa.SquareAttack
    record = lambda self, x, y: (budgets.append(self.n_queries), square.perturb(self, x, y))[1]  # noqa: E731
    monkeypatch.setattr(aa, "SquareAttack", type("SquareAttack", (square,), {"perturb": record}))
    r = cli("run", *TINY, "--attack", "square", "--queries", "7", "--n", "4", "--out", str(tmp_path))
    assert r.code == 0, r.err
    (folder,) = tmp_path.iterdir()
    assert json.loads((folder / "config.json").read_text())["queries"] == 7 and budgets and set(budgets) == {7}


def test_list_comes_from_the_registries(cli):
    r = cli("list")
    assert r.code == 0
    for name in ("vit_fmnist", "mia_deit_s", "pgd", "eot-pgd", "autoattack", "cifar10", "synthetic"):
        assert name in r.out
    lines = [line.split() for line in r.out.splitlines()]
    assert ["mia_vit_fmnist_lat076", "mia_vit_fmnist", "(its", "default", "weights)"] in lines
    assert ["mia_vit_fmnist_b05", "mia_vit_fmnist"] in lines


def test_help_does_not_import_torch():
    code = "import sys; from miarobust.cli import cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- bad input: one line, exit 2, nothing written --------------------------------------------------------


def assert_user_error(r, out: Path, *needles: str) -> None:
    """One `error:` line naming every needle, exit 2, no traceback, and `out` never created."""
    assert r.code == 2, (r.code, r.err)
    lines = [ln for ln in r.err.splitlines() if ln.strip() and "batch/s" not in ln]  # a progress bar may precede it
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert "Traceback" not in r.err + r.out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists(), files_under(out)


@pytest.mark.parametrize("args, needles", [
    (["--model", "vit_fmnst"], ["unknown model 'vit_fmnst'", "Did you mean vit_fmnist", "miarobust list"]),
    (["--model", "deit-s"], ["unknown model", "deit_s"]),
    (["--attack", "pgdd"], ["unknown attack 'pgdd'", "Did you mean pgd"]),
    (["--attack", "pgd,eotpgd"], ["unknown attack 'eotpgd'", "eot-pgd"]),
    (["--attack", ","], ["--attack is empty"]),
    (["--data", "cifar"], ["unknown dataset 'cifar'", "cifar10"]),
    (["--eps", "abc"], ["'abc' is not a number", "8/255"]),
    (["--eps", "-1"], ["finite number > 0"]),
    (["--eps", "1/0"], ["'1/0' is not a number"]),
    (["--eps", "nan"], ["finite number > 0"]),
    (["--eps", "2"], ["--eps 2 is >= 1", "8/255"]),
    (["--alpha", "0"], ["--alpha", "finite number > 0"]),
    (["--steps", "0"], ["--steps", "0 is not in the range x>=1"]),
    (["--queries", "0"], ["--queries", "0 is not in the range x>=1"]),
    (["--n", "0"], ["--n"]),
    (["--norm", "L3"], ["--norm", "'L3' is not one of 'Linf', 'L2'"]),
    (["--attack", "fgsm", "--norm", "L2", "--eps", "0.5"], ["attack fgsm supports Linf only", "--norm"]),
    (["--gate-mode", "stochastic"], ["--gate-mode applies to input-adaptive models only"]),
    (["--model", "mia_vit_fmnist", "--gate-mode", "random"], ["unknown gate mode 'random'", "stochastic"]),
    (["--model", "mia_vit_fmnist", "--gate-mode", "gumbel"], ["gumbel", "is for training"]),
    (["--split", "val"], ["--split", "'val' is not one of"]),
    (["--num-classes", "5"], ["is for another architecture or class count", "--num-classes"]),
    (["--data", "cifar10"], ["--data-root is required for CIFAR-10"]),
    (["--data", "folder", "--data-root", "/nonexistent/images"], ["does not exist", "--data-root"]),
    (["--data", "embedded", "--split", "train"], ["only a test split", "fashion-mnist"]),
    (["--checkpoint", "/nonexistent/w.safetensors"], ["does not exist", "--checkpoint"]),
    (["--model", "mia_deit_t"], ["mia_deit_t has no shipped weights", "--checkpoint timm:deit_tiny_patch16_224"]),  # not random ones
    (["--attack", "transfer", "--surrogate", "deit_t"], ["deit_t has no shipped weights"]),
    (["--bogus-option", "1"], ["No such option"]),
])
def test_bad_argument(cli, tmp_path, args, needles):
    out = tmp_path / "out"
    assert_user_error(cli("run", *TINY, *args, "--out", str(out)), out, *needles)


@pytest.mark.parametrize("args, needles", [
    (["--lr", "-1"], ["--lr", "not in the range x>0"]),
    (["--lr", "nan"], ["--lr", "'nan' is not a finite number"]),
    (["--model", "mia_vit_fmnist", "--budget", "nan"], ["--budget", "not a finite number"]),
    (["--model", "mia_vit_fmnist", "--budget", "0.7", "--rl-weight", "inf"], ["--rl-weight", "not a finite number"]),
    (["--model", "mia_vit_fmnist", "--budget", "0.7", "--flops-lambda", "-1"], ["--flops-lambda", "x>=0"]),
    (["--seed", "-3"], ["--seed", "not in the range"]),
    (["--model", "mia_deit_t", "--budget", "0.7", "--data", "synthetic"], ["no shipped weights", "--init deit_t.pth"]),
])
def test_bad_training_argument(cli, tmp_path, args, needles):
    out = tmp_path / "out"
    assert_user_error(cli("train", "--epochs", "1", *args, "--out", str(out)), out, *needles)


def device_command(command: str, out: Path, baseline: Path) -> list[str]:
    """The arguments of `command` up to --device, writing under `out`."""
    return {"run": ["run", *TINY, "--out", str(out)], "train": ["train", "--epochs", "1", "--out", str(out)],
            "regress": ["regress", "--baseline", str(baseline), "--out", str(out)]}[command]


@pytest.mark.parametrize("device, needles", [("xyz", ["is not a device", "cpu, cuda or cuda:N"]),
                                             ("mps", ["miarobust runs on cpu, cuda or cuda:N"])])
@pytest.mark.parametrize("command", ["run", "train", "regress"])
def test_bad_device_in_every_command(cli, tmp_path, command, device, needles):
    out = tmp_path / "out"
    assert_user_error(cli(*device_command(command, out, tmp_path), "--device", device), out, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("command", ["run", "train", "regress"])
def test_cuda_without_cuda(cli, tmp_path, command):
    out = tmp_path / "out"
    assert_user_error(cli(*device_command(command, out, tmp_path), "--device", "cuda"), out, "CUDA is not available",
                      "--device cpu")


def test_cuda_device_beyond_the_count(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "out"
    assert_user_error(cli("run", *TINY, "--device", "cuda:7", "--out", str(out)), out,
                      "this machine has 1 CUDA devices, cuda:0 to cuda:0")


def test_device_that_does_not_exist(cli, tmp_path):
    out = tmp_path / "out"
    assert_user_error(cli("run", *TINY, "--device", "tpu", "--out", str(out)), out, "not a device", "cpu, cuda or cuda:N")


def test_out_is_a_file(cli, tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    r = cli("run", *TINY, "--out", str(out))
    assert r.code == 2 and r.err.startswith("error: cannot write the run folder") and "writable folder" in r.err, r.err
    assert "Traceback" not in r.err and out.read_text() == "keep me"


def test_data_root_is_a_file(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out"
    r = cli("run", *TINY, "--data", "folder", "--data-root", str(tmp_path / "file"), "--out", str(out))
    assert_user_error(r, out, "is not a folder")


def test_data_root_unreadable(cli, tmp_path, monkeypatch):
    """os.access is faked so this holds where tests run as root, who reads every folder."""
    import os

    root = tmp_path / "images"
    root.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == root else real(p, mode, **kw))
    out = tmp_path / "out"
    assert_user_error(cli("run", *TINY, "--data", "folder", "--data-root", str(root), "--out", str(out)), out,
                      "is not readable", "permissions")


def test_cifar_without_files(cli, tmp_path):
    out = tmp_path / "out"
    r = cli("run", *TINY, "--data", "cifar10", "--data-root", str(tmp_path), "--out", str(out))
    assert_user_error(r, out, "has no test_batch", "cifar-10-python.tar.gz")


def test_image_folder_without_images(cli, tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    out = tmp_path / "out"
    r = cli("run", *TINY, "--data", "folder", "--data-root", str(tmp_path / "imgs"), "--out", str(out))
    assert_user_error(r, out, "is not an image folder")


def test_image_folder_with_corrupt_png(cli, tmp_path, image_root):
    """The bad file is found only while loading batch 0, after the run folder was opened: it must go again."""
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "0.png").write_bytes((image_root / "cat" / "0.png").read_bytes())
    (root / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    r = cli("run", *TINY, "--data", "folder", "--data-root", str(root), "--out", str(out))
    assert_user_error(r, out, "cannot read image", "1.png", "remove or replace the file")


def test_failure_after_finished_batches_keeps_them(cli, tmp_path, image_root):
    """A bad image in batch 1: batch 0 is kept for the resume, the error is still one line."""
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    for i in range(3):
        (root / "cat" / f"{i}.png").write_bytes((image_root / "cat" / "0.png").read_bytes())
    (root / "cat" / "9.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    r = cli("run", *TINY, "--batch-size", "3", "--data", "folder", "--data-root", str(root), "--out", str(out))
    assert r.code == 2 and "cannot read image" in r.err and "Traceback" not in r.err
    (folder,) = out.iterdir()
    assert files_under(folder) == [".lock", "config.json", "partial", "partial/batch_000000.csv"]


def test_n_larger_than_the_data_is_clamped(cli, tmp_path, caplog):
    """Documented behaviour: a warning, then all of the data set."""
    r = cli("run", "--model", "vit_fmnist", "--attack", "none", "--n", "5000", "--batch-size", "500",
            "--checks", "off", "--out", str(tmp_path))
    assert r.code == 0, r.err
    assert "--n 5000 is larger than embedded (1000 images): evaluating all 1000" in caplog.text + r.err
    (folder,) = tmp_path.iterdir()
    assert json.loads((folder / "summary.json").read_text())["n"] == 1000


# -- checkpoints ---------------------------------------------------------------------------------------


def save_state(path: Path, model: torch.nn.Module) -> Path:
    from safetensors.torch import save_file

    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def vit_fmnist_weights(tmp_path_factory) -> dict[str, Path]:
    from miarobust.models import create

    d = tmp_path_factory.mktemp("ckpt")
    good = create("vit_fmnist", pretrained=False)
    return {
        "good": save_state(d / "good.safetensors", good),
        "good_pth": save_state(d / "good.pth", good),
        "classes5": save_state(d / "classes5.safetensors", create("vit_fmnist", pretrained=False, num_classes=5)),
        "narrow": save_state(d / "narrow.pth", create("vit_fmnist", pretrained=False, embed_dim=32)),
        "shallow": save_state(d / "shallow.safetensors", create("vit_fmnist", pretrained=False, depth=3)),
    }


def test_good_checkpoints_load(cli, tmp_path, vit_fmnist_weights):
    for key in ("good", "good_pth"):
        out = tmp_path / key
        r = cli("run", *TINY, "--n", "8", "--attack", "none", "--checkpoint", str(vit_fmnist_weights[key]), "--out", str(out))
        assert r.code == 0, r.err
        (folder,) = out.iterdir()
        assert json.loads((folder / "config.json").read_text())["checkpoint"] == str(vit_fmnist_weights[key])


@pytest.mark.parametrize("key, needles", [
    ("classes5", ["vit_fmnist outputs 5 classes but embedded has 10", "trained for other labels"]),  # its own head
    ("narrow", ["another architecture or class count", "--model"]),
    ("shallow", ["does not match the model", "missing keys", "--model"]),
])
def test_checkpoint_of_another_model(cli, tmp_path, vit_fmnist_weights, key, needles):
    out = tmp_path / "out"
    r = cli("run", *TINY, "--checkpoint", str(vit_fmnist_weights[key]), "--out", str(out))
    assert_user_error(r, out, *needles)


@pytest.mark.parametrize("key", ["good", "good_pth"])
def test_truncated_checkpoint(cli, tmp_path, vit_fmnist_weights, key):
    src = vit_fmnist_weights[key]
    cut = tmp_path / f"cut{src.suffix}"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    out = tmp_path / "out"
    assert_user_error(cli("run", *TINY, "--checkpoint", str(cut), "--out", str(out)), out,
                      "cannot be read safely", "truncated", ".safetensors")


def test_checkpoint_that_is_not_a_state_dict(cli, tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], str(path))
    out = tmp_path / "out"
    assert_user_error(cli("run", *TINY, "--checkpoint", str(path), "--out", str(out)), out, "holds no state dict")


class MakesMarker:
    """Unpickling this creates a file: the proof that loading ran code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("error")  # a warning would print more lines than the one error line
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_checkpoint_pickle_with_code_does_not_run(cli, tmp_path, how):
    marker = tmp_path / "code-ran"
    path = tmp_path / "x.pth"
    payload = {"head.weight": MakesMarker(marker)}
    if how == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, str(path))
    out = tmp_path / "out"
    assert_user_error(cli("run", *TINY, "--checkpoint", str(path), "--out", str(out)), out,
                      "cannot be read safely", "carries code")
    assert not marker.exists()


# -- the console script itself -----------------------------------------------------------------------


@pytest.mark.slow
def test_console_script_error_is_one_line(tmp_path):
    """The same contract through a real process: what a user's shell sees."""
    out = tmp_path / "out"
    r = run_subprocess("run", *TINY, "--model", "vit_fmnst", "--out", str(out), timeout=120)
    assert r.code == 2 and r.err.strip().count("\n") == 0 and r.err.startswith("error: unknown model"), r.err
    assert not out.exists()


# -- report ---------------------------------------------------------------------------------------------


def test_report_on_a_missing_folder(cli, tmp_path):
    out = tmp_path / "report"
    r = cli("report", str(tmp_path / "missing"), "--out", str(out))
    assert_user_error(r, out, "is not a folder", "miarobust run --out")
    assert not (tmp_path / "missing").exists()


def test_report_on_an_empty_folder(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "report"
    r = cli("report", str(tmp_path / "empty"), "--out", str(out))
    assert_user_error(r, out, "no run folder", "miarobust run --out")
    assert files_under(tmp_path / "empty") == []
    r = cli("report", str(tmp_path / "empty"))  # the report goes into the folder itself by default
    assert r.code == 2 and files_under(tmp_path / "empty") == []


def test_every_row_of_docs_errors_names_a_test():
    """docs/errors.md: each row's last column names test functions that exist."""
    import re

    tests = Path(__file__).parent
    rows = [ln for ln in (tests.parent / "docs" / "errors.md").read_text().splitlines()
            if ln.startswith("| ") and not ln.startswith(("| ---", "| bad input"))]
    assert len(rows) > 40
    for row in rows:
        named = re.findall(r"(test_\w+)::(test_\w+)", row.rsplit("|", 2)[-2])
        if not named:
            assert "test_distributed (uses `-n`)" in row, row
        for module, func in named:
            assert f"def {func}(" in (tests / f"{module}.py").read_text(), (module, func)


@pytest.mark.parametrize("args,says", [
    (["--norm", "L2", "--eps", "1e20"], "the L2 diameter"),
    (["--norm", "L2", "--eps", "28"], "the L2 diameter"),  # sqrt(1 x 28 x 28): the ball covers the image box
    (["--img-size", "9"], "not a multiple of vit_fmnist's patch size 4"),
])
def test_radius_or_size_the_model_cannot_take_exits_2(cli, tmp_path, args, says):
    r = cli("run", "--model", "vit_fmnist", "-n", "4", "--checks", "off", *args, "--out", str(tmp_path / "out"))
    assert r.code == 2 and says in r.err and len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert not (tmp_path / "out").exists()


def test_an_attack_named_twice_or_a_folder_as_checkpoint_exits_2(cli, tmp_path):
    r = cli("run", "--attack", "fgsm,pgd,fgsm", "-n", "2", "--out", str(tmp_path / "out"))
    assert r.code == 2 and "names fgsm twice" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("run", "--checkpoint", str(tmp_path), "-n", "2", "--out", str(tmp_path / "out"))
    assert r.code == 2 and "is a folder" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_static_weights_in_an_mia_model_warn_of_the_untrained_controller(caplog):
    import logging

    from miarobust.models import create

    with caplog.at_level(logging.WARNING):
        create("mia_vit_fmnist", checkpoint="vit_fmnist")
    assert "untrained controller" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create("mia_vit_fmnist", checkpoint="vit_fmnist", pretrained=False)  # training from it: expected, silent
        create("mia_vit_fmnist")
    assert "untrained controller" not in caplog.text


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_own_deit_variant_is_read_from_its_checkpoint(cli, tmp_path, suffix):
    """A 1-channel 28x28 patch-4 DeiT-T saved by timm: the checkpoint's shapes build the model (no options);
    the same weights with 1000 classes on the 10-class embedded data are refused, nothing written."""
    import timm
    from safetensors.torch import save_file

    for classes in (10, 1000):
        torch.manual_seed(0)
        model = timm.create_model("deit_tiny_patch16_224", in_chans=1, patch_size=4, img_size=28, num_classes=classes,
                                  depth=2)
        path = tmp_path / f"deit_t_{classes}{suffix}"
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
        out = tmp_path / f"out{classes}"
        r = cli("run", "--model", "deit_t", "--model-kwargs", "depth=2", "--checkpoint", str(path), "--attack", "fgsm",
                "--n", "4", "--checks", "off", "--out", str(out))
        if classes == 10:
            assert r.code == 0, r.err
            (folder,) = out.iterdir()
            assert "model_kwargs" in (folder / "config.json").read_text() and (folder / "summary.json").is_file()
        else:
            assert_user_error(r, out, "outputs 1000 classes but embedded has 10", "trained")


def test_timm_weights_load_from_a_planted_hub_cache_and_are_refused_in_one_line_without(cli, tmp_path, monkeypatch):
    """`--checkpoint timm:NAME` reads timm's pretrained weights where timm keeps them, the Hugging Face cache
    (planted here: no network); with no cache and no network, one line says how to fetch them."""
    from safetensors.torch import save_file

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    r = cli("run", "--model", "deit_t", "--checkpoint", "timm:deit_tiny_patch16_224", "--data", "synthetic", "--n", "2",
            "--attack", "none", "--out", str(out))
    assert_user_error(r, out, "not in the Hugging Face cache", "pretrained=True", "models--timm--deit_tiny_patch16_224")
    r = cli("run", "--model", "deit_t", "--checkpoint", "timm:no_such_model", "--out", str(out))
    assert_user_error(r, out, "timm has no pretrained weights named 'no_such_model'")
    torch.manual_seed(0)
    weights = timm.create_model("deit_tiny_patch16_224").state_dict()  # timm's own model and key names
    snapshot = cache / "models--timm--deit_tiny_patch16_224.fb_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(snapshot / "model.safetensors"))
    (cache / "models--timm--deit_tiny_patch16_224.fb_in1k" / "refs").mkdir()
    (cache / "models--timm--deit_tiny_patch16_224.fb_in1k" / "refs" / "main").write_text("0123abcd")
    r = cli("run", "--model", "mia_deit_t", "--checkpoint", "timm:deit_tiny_patch16_224", "--data", "synthetic", "--n",
            "2", "--attack", "none", "--checks", "off", "--out", str(out))
    assert r.code == 0, r.err
    (folder,) = out.iterdir()
    config = json.loads((folder / "config.json").read_text())
    assert config["checkpoint"] == str(snapshot / "model.safetensors")
    assert config["requested"]["checkpoint"] == "timm:deit_tiny_patch16_224"


def test_model_kwargs_and_weight_messages(cli, tmp_path):
    out = tmp_path / "out"
    assert_user_error(cli("run", *TINY, "--model-kwargs", "in_chans", "--out", str(out)), out, "is not NAME=VALUE")
    r = cli("run", "--model", "deit_s", "--n", "2", "--out", str(out))
    assert_user_error(r, out, "no shipped weights", "--checkpoint timm:deit_small_patch16_224", "pretrained=True")
    whole = tmp_path / "whole.pth"
    torch.save(torch.nn.Linear(2, 2), whole)  # a whole module, not its state dict
    assert_user_error(cli("run", *TINY, "--checkpoint", str(whole), "--out", str(out)), out,
                      "torch.save(model.state_dict(), path)")


def test_precision_is_asked_for_recorded_and_named(cli, tmp_path):
    """--precision bf16 runs the model under autocast: summary.json and the folder name say so, the answers mostly
    agree with fp32's, and fp32 keeps the folder names made before the option existed."""
    import pandas as pd

    from miarobust.config import RunConfig

    common = ["run", "--model", "vit_fmnist", "--n", "16", "--batch-size", "16", "--attack", "fgsm", "--checks", "off"]
    r = cli(*common, "--precision", "bf16", "--out", str(tmp_path / "bf16"))
    assert r.code == 0, r.err
    r = cli(*common, "--out", str(tmp_path / "fp32"))
    assert r.code == 0, r.err
    (half,), (full,) = (tmp_path / "bf16").iterdir(), (tmp_path / "fp32").iterdir()
    assert "-bf16-" in half.name and "fp32" not in full.name
    assert json.loads((half / "summary.json").read_text())["precision"] == "bf16"
    a, b = pd.read_csv(half / "samples.csv"), pd.read_csv(full / "samples.csv")
    assert (a.clean_pred == b.clean_pred).mean() >= 0.9
    assert RunConfig().identity() == RunConfig(precision="fp32").identity() and "precision" not in RunConfig().identity()
    from miarobust.results.read import weights_label

    labels = [weights_label(json.loads((f / "config.json").read_text())) for f in (half, full)]
    assert labels[0] == labels[1] + ", bf16"  # their own series in the report
    r = cli(*common, "--precision", "fp8", "--out", str(tmp_path / "x"))
    assert r.code == 2 and not (tmp_path / "x").exists()
