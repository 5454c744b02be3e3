"""miarobust/regress.py: the regression gate holds on an unchanged model and fails on a slightly worse one.

The "good" model is vit_fmnist whose head is fitted by least squares to the first 40 embedded images
(100% clean accuracy on them, so a drop is measurable on 40 images); the "slightly worse" one is the same
model that no longer predicts classes 0 and 1 (about 9 of 40 images lost).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from miarobust.config import requested_config as run_config
from miarobust.regress import REGRESSED, drop_test

N = 40


def fitted_checkpoint(path: Path, worse: bool = False) -> Path:
    """Write vit_fmnist with a least-squares head for the first N embedded images (or its worse variant)."""
    from safetensors.torch import save_file

    from miarobust.data import Geometry, load_dataset
    from miarobust.models import create
    from miarobust.models.normalize import Normalized

    torch.manual_seed(0)
    model = create("vit_fmnist", pretrained=False)
    data = load_dataset("embedded", Geometry.of(model))
    x = torch.stack([data[i][0] for i in range(N)])
    y = torch.tensor([data[i][1] for i in range(N)])
    net = Normalized(model)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features((x - net.mean) / net.std), pre_logits=True)
        design = torch.cat([feats, torch.ones(N, 1)], 1)
        sol = torch.linalg.lstsq(design, 10 * torch.nn.functional.one_hot(y, 10).float()).solution
        model.head.weight.copy_(sol[:-1].T)
        model.head.bias.copy_(sol[-1])
        if worse:
            model.head.bias[:2] -= 1e3  # classes 0 and 1 are never predicted any more
        assert (net(x).argmax(1) == y).float().mean() == (1.0 if not worse else (y > 1).float().mean())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def baseline(tmp_path: Path) -> tuple[Path, Path]:
    """A baseline folder with one run of the good checkpoint (PGD at 8/255): (baseline, checkpoint)."""
    from miarobust.evaluator import RunConfig, run

    ckpt = fitted_checkpoint(tmp_path / "model.safetensors")
    base = tmp_path / "baseline"
    run(RunConfig(model="vit_fmnist", checkpoint=str(ckpt), attacks=("pgd",), n=N, batch_size=N, steps=1, checks="off",
                  out=str(base)), progress=False)
    return base, ckpt


def rows(out: str) -> pd.DataFrame:
    """The printed table back as (status, attack) per row."""
    lines = [line.split() for line in out.splitlines()[1:-1]]
    return pd.DataFrame({"status": [w[1] if w[0] == "!!" else w[0] for w in lines],
                         "attack": [w[5] if w[0] == "!!" else w[4] for w in lines]})


def test_unchanged_model_passes(cli, baseline):
    base, _ = baseline
    r = cli("regress", "--baseline", str(base))
    assert r.code == 0, r.err
    table = rows(r.out)
    assert list(table["attack"]) == ["clean", "pgd"] and (table["status"] == "ok").all()
    assert "all 2 comparisons hold" in r.out


def test_slightly_worse_model_fails_on_the_right_rows(cli, baseline, tmp_path):
    base, ckpt = baseline
    fitted_checkpoint(ckpt, worse=True)  # the checkout's model is replaced, same path
    r = cli("regress", "--baseline", str(base), "--out", str(tmp_path / "new"))
    assert r.code == 1, r.err
    table = rows(r.out)
    # clean accuracy fell from 100% to 77.5% (9 discordant images, p = 2^-9); robust accuracy at 8/255 was and
    # is ~0 for this head, so its row holds
    assert table.set_index("attack")["status"].to_dict() == {"clean": REGRESSED, "pgd": "ok"}
    assert "!! REGRESSED" in r.out and "1 of 2 comparisons regressed" in r.out
    # the re-run is kept in --out under the baseline's folder name, so it can be read back with --runs
    new = tmp_path / "new"
    assert [p.name for p in new.iterdir()] == [p.name for p in base.iterdir()]
    again = cli("regress", "--baseline", str(base), "--runs", str(new))
    assert again.code == 1 and rows(again.out).equals(table)
    # a fixed tolerance larger than the drop lets it pass; a smaller one fails it
    assert cli("regress", "--baseline", str(base), "--runs", str(new), "--tolerance", "0.3").code == 0
    assert cli("regress", "--baseline", str(base), "--runs", str(new), "--tolerance", "0.1").code == 1


def test_read_runs_equal_to_the_baseline_pass(cli, baseline, tmp_path):
    base, _ = baseline
    shutil.copytree(base, tmp_path / "copy")
    r = cli("regress", "--baseline", str(base), "--runs", str(tmp_path / "copy"))
    assert r.code == 0, r.err
    assert (rows(r.out)["status"] == "ok").all() and "paired" in r.out


def test_parallel_reruns_give_the_same_table(cli, baseline, tmp_path):
    """--jobs 2 re-runs in two worker processes: same table as one process, and a worse model still fails."""
    from miarobust.evaluator import RunConfig, run

    base, ckpt = baseline
    run(RunConfig(model="vit_fmnist", checkpoint=str(ckpt), attacks=("fgsm",), n=N, batch_size=N, eps=2 / 255,
                  checks="off", out=str(base)), progress=False)  # a second baseline run, so both workers get one
    serial = cli("regress", "--baseline", str(base), "--out", str(tmp_path / "serial"))
    parallel = cli("regress", "--baseline", str(base), "--jobs", "2", "--out", str(tmp_path / "parallel"))
    assert serial.code == parallel.code == 0, parallel.err
    assert parallel.out == serial.out and "all 4 comparisons hold" in parallel.out
    for folder in (tmp_path / "serial").iterdir():
        assert (folder / "samples.csv").read_bytes() == (tmp_path / "parallel" / folder.name / "samples.csv").read_bytes()
    fitted_checkpoint(ckpt, worse=True)
    worse = cli("regress", "--baseline", str(base), "--jobs", "2")
    assert worse.code == 1 and "REGRESSED" in worse.out


def test_noise_is_not_a_regression():
    base = pd.DataFrame({"index": range(40), "c": [1] * 30 + [0] * 10})
    one_lost = base.assign(c=[0] + [1] * 29 + [0] * 10)
    t = drop_test(base, one_lost, "c")
    assert t["test"] == "paired" and t["drop"] == pytest.approx(0.025) and t["p"] == 0.5
    swapped = base.assign(c=[0] * 3 + [1] * 27 + [1] * 3 + [0] * 7)  # 3 lost, 3 gained: no drop at all
    assert drop_test(base, swapped, "c")["p"] > 0.5
    fractional = base.assign(c=[0.5] * 40)  # a stochastic model: mean over gate draws
    assert drop_test(base, fractional, "c")["test"] == "two-proportion"


def test_run_config_reproduces_the_folder_name(baseline):
    import json

    base, _ = baseline
    (folder,) = base.iterdir()
    cfg = run_config(json.loads((folder / "config.json").read_text()), folder.name)
    assert cfg.folder_name() == folder.name


def test_run_config_of_a_shipped_checkpoint_name(cli, tmp_path):
    """A run asked for `--checkpoint mia_vit_fmnist_b05` records the file relative to the package (the same on every
    machine); its re-run asks for the name."""
    import json

    r = cli("run", "--model", "mia_vit_fmnist", "--checkpoint", "mia_vit_fmnist_b05", "--n", "8", "--attack", "none",
            "--checks", "off", "--out", str(tmp_path))
    assert r.code == 0, r.err
    (folder,) = tmp_path.iterdir()
    recorded = json.loads((folder / "config.json").read_text())
    assert recorded["checkpoint"] == "miarobust/checkpoints/mia_vit_fmnist_b05.safetensors"
    cfg = run_config(recorded, folder.name)
    assert cfg.checkpoint == "mia_vit_fmnist_b05" and cfg.folder_name() == folder.name


@pytest.mark.parametrize("case", ["missing-baseline", "empty-baseline", "runs-lack-a-run", "bad-level", "bad-jobs",
                                  "config-of-wrong-types"])
def test_bad_input_exits_2(cli, baseline, tmp_path, case):
    base, _ = baseline
    if case == "config-of-wrong-types":  # valid JSON, but a string where the run's n belongs
        base = tmp_path / "tampered"
        shutil.copytree(baseline[0], base)
        config = next(base.glob("*/config.json"))
        config.write_text(json.dumps({**json.loads(config.read_text()), "n": "lots"}))
    args = {"config-of-wrong-types": ["--baseline", str(base)],
            "missing-baseline": ["--baseline", str(tmp_path / "nope")],
            "empty-baseline": ["--baseline", str((tmp_path / "empty").resolve())],
            "runs-lack-a-run": ["--baseline", str(base), "--runs", str(tmp_path / "empty")],
            "bad-level": ["--baseline", str(base), "--level", "1.5"],
            "bad-jobs": ["--baseline", str(base), "--jobs", "0"]}[case]
    (tmp_path / "empty").mkdir()
    r = cli("regress", *args)
    assert r.code == 2, (r.out, r.err)
    assert r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1
