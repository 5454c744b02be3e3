"""miarobust/api.py and the package's import: README's Python examples run as written, a user's own nn.Module
agrees per image with the command line on the same weights, and `import miarobust` registers with timm."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

README = Path(__file__).parents[1] / "README.md"


@pytest.fixture
def short_autoattack(monkeypatch: pytest.MonkeyPatch) -> None:
    """AutoAttack with 3 APGD / FAB iterations and 50 Square queries: the tests are about the plumbing."""
    import pyautoattack.autoattack as aa

    for cls_name in ("APGDAttack", "APGDAttack_targeted", "FABAttack_PT"):
        cls = getattr(aa, cls_name)
        init = lambda self, *a, _cls=cls, **k: _cls.__init__(self, *a, **{**k, "n_iter": 3})  # noqa: E731
        monkeypatch.setattr(aa, cls_name, type(cls_name, (cls,), {"__init__": init}))
    square = aa.SquareAttack  # the query budget miarobust sets is capped at 50
    capped = property(lambda self: self.__dict__.get("_queries", 50), lambda self, v: self.__dict__.update(_queries=min(v, 50)))
    monkeypatch.setattr(aa, "SquareAttack", type("SquareAttack", (square,), {"n_queries": capped}))


def python_blocks() -> list[str]:
    """The ```python blocks of README.md, in order."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_api_examples() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 2 and "miarobust.evaluate(Mine()" in blocks[0] and "miarobust.Attack(" in blocks[1]
    assert len([line for line in blocks[0].splitlines() if line.strip() and not line.startswith(("import", "class", " "))]) <= 3


@pytest.mark.slow
def test_readme_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short_autoattack: None) -> None:
    monkeypatch.chdir(tmp_path)
    for block in python_blocks():
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)  # noqa: S102  (the README's own examples)
    (folder,) = (tmp_path / "runs" / "api").iterdir()
    assert (folder / "summary.json").is_file() and folder.name.startswith("Mine-")
    assert scope["x_adv"].shape == (4, 1, 28, 28)


class Wrapped(nn.Module):
    """A user's model, registered nowhere: timm's vit_fmnist inside, fed normalised images."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        import timm

        self.inner = timm.create_model("vit_fmnist")
        self.inner.load_state_dict(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.slow
def test_own_module_agrees_with_the_cli_per_image(cli, tmp_path: Path, short_autoattack: None) -> None:
    """The shipped vit_fmnist's weights as a user's module through the API, and by name and file through the
    CLI: AutoAttack's per-image decisions, GMACs and folder layout are the same."""
    import miarobust
    from miarobust.models import create

    state = create("vit_fmnist").state_dict()
    result = miarobust.evaluate(Wrapped(state), attack="autoattack", eps="8/255", n=8, batch_size=8, checks="off",
                                mean=(0.286,), std=(0.353,), input_size=(1, 28, 28), out=str(tmp_path / "api"))
    r = cli("run", "--model", "vit_fmnist", "--attack", "autoattack", "--eps", "8/255", "--n", "8", "--batch-size", "8",
            "--checks", "off", "--out", str(tmp_path / "cli"))
    assert r.code == 0, r.err
    (folder,) = (tmp_path / "cli").iterdir()
    api, ref = pd.read_csv(result.folder / "samples.csv"), pd.read_csv(folder / "samples.csv")
    assert list(api.columns) == list(ref.columns)
    for col in ("clean_pred", "clean_correct", "autoattack_pred", "robust", "clean_gmacs"):
        assert api[col].tolist() == ref[col].tolist(), col
    assert result.summary["gmacs"]["static"] == pytest.approx(0.0118, abs=1e-4)  # the ViT's MACs, attention included


def test_any_module_gets_macs_and_a_named_folder(tmp_path: Path) -> None:
    """A non-ViT module: MACs from FlopCounterMode; no pretrained_cfg and no input_size is one clear error."""
    import miarobust
    from miarobust.errors import UserError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    result = miarobust.evaluate(net, attack="fgsm", eps=0.1, n=10, checks="off", input_size=(1, 28, 28),
                                out=str(tmp_path))
    assert result.summary["gmacs"]["static"] == pytest.approx(784 * 10 / 1e9)
    assert result.folder.name.startswith("Sequential-") and result.summary["n"] == 10
    again = miarobust.evaluate(net, attack="fgsm", eps=0.1, n=10, checks="off", input_size=(1, 28, 28), out=str(tmp_path))
    assert again.folder == result.folder  # same weights, same folder: complete already
    as_given = miarobust.evaluate(net, attack="fgsm", eps=0.1, n=10, checks="off", input_size=(1, 28, 28),
                                  mean=(0.0,), std=(1.0,), out=str(tmp_path))
    assert as_given.folder == result.folder  # the normalisation it had by default, spelled out: the same run
    other = miarobust.evaluate(net, attack="fgsm", eps=0.1, n=10, checks="off", input_size=(1, 28, 28),
                               mean=(0.5,), std=(0.25,), out=str(tmp_path))
    assert other.folder != result.folder  # the same weights fed other inputs: another run, not a resume
    with torch.no_grad():
        net[1].bias += 1
    assert miarobust.evaluate(net, attack="fgsm", eps=0.1, n=10, checks="off", input_size=(1, 28, 28),
                              out=str(tmp_path)).folder != result.folder  # other weights, another folder
    with pytest.raises(UserError, match="input_size"):
        miarobust.evaluate(net, attack="fgsm", n=2, out=str(tmp_path))
    with pytest.raises(UserError, match="unknown options"):
        miarobust.evaluate(net, attack="fgsm", n=2, input_size=(1, 28, 28), stepz=3, out=str(tmp_path))
    with pytest.raises(UserError, match="finite number"):
        miarobust.evaluate(net, eps="-1", input_size=(1, 28, 28), out=str(tmp_path))


def test_attack_is_a_callable_checked_against_the_threat_model() -> None:
    import miarobust
    from miarobust.models import create

    model = create("vit_fmnist")
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    atk = miarobust.Attack("pgd", model, eps="4/255", steps=3)
    adv = atk(x, y)
    assert adv.shape == x.shape and float((adv - x).abs().max()) <= 4 / 255 + 1e-6
    assert "pgd" in repr(atk)


def test_import_registers_with_timm_and_the_cli_stays_light() -> None:
    code = ("import sys, miarobust; assert 'torch' not in sys.modules; import timm; "
            "m = timm.create_model('mia_vit_fmnist'); print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "MIAFormer"
    code = "import timm, miarobust; print(timm.is_model('mia_deit_s'))"  # timm imported first: registered at once
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"


def test_own_images_as_tensors_or_a_dataset(tmp_path: Path) -> None:
    """data=(images, labels) and data=Dataset give, per image, the records of the same images by name; the folder
    is named by the images' hash; a wrong shape, range or label type is one clear error."""
    import miarobust
    from miarobust.data import Geometry, load_dataset
    from miarobust.errors import UserError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    named = load_dataset("embedded", Geometry(1, 28, 28))
    x = torch.stack([named[i][0] for i in range(10)])
    y = torch.tensor([named[i][1] for i in range(10)])
    common = dict(attack="fgsm", eps=0.1, checks="off", input_size=(1, 28, 28))
    by_name = miarobust.evaluate(net, data="embedded", n=10, out=str(tmp_path / "a"), **common)
    tensors = miarobust.evaluate(net, data=(x, y), out=str(tmp_path / "b"), **common)
    dataset = miarobust.evaluate(net, data=torch.utils.data.TensorDataset(x, y), out=str(tmp_path / "c"), **common)
    ref = pd.read_csv(by_name.folder / "samples.csv")
    double = miarobust.evaluate(net, data=torch.utils.data.TensorDataset(x.double(), y), out=str(tmp_path / "e"),
                                **common)  # float64 images are evaluated as float32
    assert pd.read_csv(double.folder / "samples.csv")["clean_pred"].tolist() == pd.read_csv(
        by_name.folder / "samples.csv")["clean_pred"].tolist()
    for got in (tensors, dataset):
        frame = pd.read_csv(got.folder / "samples.csv")
        for col in ("label", "clean_pred", "fgsm_pred", "robust"):
            assert frame[col].tolist() == ref[col].tolist(), col
    assert "-tensors-" in tensors.folder.name and "-TensorDataset-" in dataset.folder.name
    assert tensors.folder.name.split("-tensors-")[1][:10] == dataset.folder.name.split("-TensorDataset-")[1][:10]
    other = miarobust.evaluate(net, data=(x.flip(0), y.flip(0)), out=str(tmp_path / "b"), **common)
    assert other.folder != tensors.folder  # other images, another folder
    bad = [((x[:, :, :14], y), "shape"), ((x * 255, y), r"\[0, 1\]"), ((x, y.float()), "class indices"),
           ((x, y[:5]), "same N"), ([x, y], "torch Dataset"), ((x, y + 10), "outputs 10 classes"),
           (torch.utils.data.TensorDataset((x * 255).byte(), y), "float images"),
           (torch.utils.data.TensorDataset(x, y.float()), "class indices")]
    for data, match in bad:
        with pytest.raises(UserError, match=match):
            miarobust.evaluate(net, data=data, out=str(tmp_path / "d"), **common)
    assert not (tmp_path / "d").exists()
