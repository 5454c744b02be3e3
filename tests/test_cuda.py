"""The CUDA path: the whole run (model, attacks, EOT, MACs accounting) on a GPU. Skipped without one."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("extra", [
    ["--model", "vit_fmnist", "--attack", "pgd,fgsm"],
    ["--model", "mia_vit_fmnist", "--gate-mode", "stochastic", "--eval-samples", "2", "--attack", "eot-pgd,bpda-pgd",
     "--eot", "2"],
    ["--model", "mia_vit_fmnist", "--attack", "slowdown,apgd-ce"],
])
def test_run_on_cuda_matches_cpu_closely(cli, tmp_path, extra):
    common = ["run", *extra, "--n", "32", "--batch-size", "16", "--steps", "3", "--checks", "off"]
    summaries = {}
    for device in ("cpu", "cuda"):
        res = cli(*common, "--device", device, "--out", str(tmp_path / device))
        assert res.code == 0, res.err
        (path,) = (tmp_path / device).glob("*/summary.json")
        summaries[device] = json.loads(path.read_text())
    cpu, gpu = summaries["cpu"], summaries["cuda"]
    assert gpu["clean"]["acc"] == pytest.approx(cpu["clean"]["acc"], abs=0.1)
    assert gpu["gmacs"]["clean_mean"] == pytest.approx(cpu["gmacs"]["clean_mean"], rel=0.05)
    for att in gpu["attacks"].values():
        assert att["acc"] <= gpu["clean"]["acc"] + 1e-9
        assert att["max_dist"] <= gpu["eps"] * (1 + 1e-5) + 1e-5


def test_mia_sliced_equals_masked_on_cuda():
    import timm

    import miarobust.models  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("mia_deit_s", img_size=64).cuda().eval()
    for head in model.controller:
        for lin in (head.cls, head.tokens):
            torch.nn.init.normal_(lin.weight, std=0.5)
            torch.nn.init.constant_(lin.bias, 0.3)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    outs = {}
    with torch.no_grad():
        for execution in ("masked", "sliced"):
            model.execution = execution
            outs[execution] = model(x)
    assert (outs["masked"] - outs["sliced"]).abs().max().item() < 1e-3
