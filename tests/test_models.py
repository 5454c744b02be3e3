"""Every registered model: output shape, a gradient on every parameter, no NaN (timm's test pattern)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import miarobust.models  # noqa: F401
from miarobust.errors import UserError
from miarobust.models import create, model_names
from miarobust.models.registry import read_state_dict

SMALL = dict(img_size=32, depth=2)  # keeps DeiT-B cheap: same widths, fewer blocks and tokens


@pytest.mark.parametrize("name", model_names())
def test_forward_backward(name: str) -> None:
    kwargs = {} if "fmnist" in name else SMALL
    model = timm.create_model(name, num_classes=7, **kwargs).train()
    c, h, w = model.pretrained_cfg["input_size"]
    x = torch.randn(2, c, h, w)
    if name.startswith(("mia_", "adavit_")):  # the decision heads learn through Gumbel gates
        model.set_gate_mode("gumbel")
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


def test_names_registered_with_timm() -> None:
    """Every name the package lists is a timm model built by this package's entrypoints, and none is missing."""
    from miarobust.models.registry import MIA_MODELS, PEER_MODELS, STATIC_MODELS

    assert model_names() == [*STATIC_MODELS, *MIA_MODELS, *PEER_MODELS]  # none filtered out: each is registered
    for name in model_names():
        assert timm.is_model(name) and timm.models.model_entrypoint(name).__module__.startswith("miarobust.")


def test_static_state_dict_loads_into_mia_with_only_controller_missing() -> None:
    static = timm.create_model("deit_s", **SMALL)
    mia = timm.create_model("mia_deit_s", **SMALL)
    result = mia.load_state_dict(static.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("controller.") for k in result.missing_keys)


def test_any_image_size_and_class_count_for_deit() -> None:
    model = create("deit_t", pretrained=False, img_size=64, num_classes=3)
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3)
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)


def test_checkpoint_round_trip_safetensors(tmp_path) -> None:
    from safetensors.torch import save_file

    model = create("vit_fmnist", pretrained=False)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = create("vit_fmnist", checkpoint=path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_checkpoint_for_another_class_count_is_a_user_error(tmp_path) -> None:
    from safetensors.torch import save_file

    model = create("vit_fmnist", pretrained=False, num_classes=5)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert create("vit_fmnist", checkpoint=path).num_classes == 5  # the checkpoint's head sets the class count
    with pytest.raises(UserError, match="class count"):
        create("vit_fmnist", checkpoint=path, num_classes=10)  # unless it is asked for another one


def test_shipped_checkpoints_load_with_safetensors() -> None:
    from miarobust.models.vit import shipped_checkpoint

    for name in ("vit_fmnist", "mia_vit_fmnist"):
        model = timm.create_model(name)
        path = shipped_checkpoint(model.pretrained_cfg["file"].rsplit("/", 1)[-1])
        sd = read_state_dict(path)
        assert set(sd) == set(model.state_dict())


def test_shipped_checkpoint_names() -> None:
    from miarobust.models.registry import resolve_checkpoint
    from miarobust.models.vit import shipped_names

    assert {"vit_fmnist", "mia_vit_fmnist_lat076", "mia_vit_fmnist_b07", "mia_vit_fmnist_b05"} <= set(shipped_names())
    default = create("mia_vit_fmnist")
    assert default.checkpoint.endswith("mia_vit_fmnist_lat076.safetensors")  # the latency-aware model
    b05 = create("mia_vit_fmnist", checkpoint="mia_vit_fmnist_b05")
    assert b05.checkpoint == resolve_checkpoint("mia_vit_fmnist_b05") != default.checkpoint
    assert not torch.equal(b05.controller[0].cls.weight, default.controller[0].cls.weight)
    assert resolve_checkpoint("runs/x.safetensors") == "runs/x.safetensors"  # paths are left alone
    with pytest.raises(UserError, match="does not exist.*shipped name.*mia_vit_fmnist_b05"):
        create("mia_vit_fmnist", checkpoint="mia_vit_fmnist_b99")


def test_a_file_named_like_a_shipped_checkpoint_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from miarobust.models.registry import resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mia_vit_fmnist_b05").write_bytes(b"")
    assert resolve_checkpoint("mia_vit_fmnist_b05") == "mia_vit_fmnist_b05"


@pytest.mark.parametrize("checkpoint,share", [(None, 0.70), ("mia_vit_fmnist_b07", 0.70), ("mia_vit_fmnist_b05", 0.55)])
def test_shipped_mia_checkpoints_keep_their_budget(cli, tmp_path: Path, checkpoint: str | None, share: float) -> None:
    """On the 1,000 embedded images with deterministic gates: within the MACs budget, per-image MACs that vary,
    and accuracy close to the static model's (the goal: within a point on the 10k test set; 2 points here)."""
    summaries = {}
    for model in ("vit_fmnist", "mia_vit_fmnist"):
        args = ["--checkpoint", checkpoint] if checkpoint and model != "vit_fmnist" else []
        r = cli("run", "--model", model, *args, "--attack", "none", "--checks", "off", "--out", str(tmp_path))
        assert r.code == 0, r.err
        (folder,) = tmp_path.glob(f"{model}-*")
        summaries[model] = json.loads((folder / "summary.json").read_text())
    static, mia = summaries.values()
    assert static["gmacs"]["clean_share_of_static"] == pytest.approx(1.0, rel=1e-9)  # its own reference
    assert mia["gmacs"]["clean_share_of_static"] <= share
    assert mia["gmacs"]["clean_p5"] < mia["gmacs"]["clean_p95"]
    assert mia["clean"]["acc"] >= static["clean"]["acc"] - (0.02 if share >= 0.7 else 0.03)
