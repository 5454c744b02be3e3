"""The latency model of MIA-Former's batch-1 inference: its formula, forced structures, the measurement's
shape (never its speed: no timed assertion), files, and latency-aware training end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from miarobust.errors import UserError
from miarobust.models import create
from miarobust.models.latency import LatencyTable, fix_controller

TABLE = LatencyTable(static=2.0, fixed=0.5, block=0.1, token=0.01, head=0.02, gather=0.05, head_token=0.001)


def test_seconds_follow_the_executed_structure() -> None:
    blocks = torch.tensor([[1.0, 1.0, 0.0]])
    heads = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]])
    tokens = torch.ones(1, 3, 5)
    tokens[0, 1, 3] = 0  # block 1 drops a token: it gathers
    tokens[0, 2, 2] = 0  # block 2 drops one too, but does not run: nothing counts
    expected = 0.5 + (0.1 + 5 * 0.01 + 2 * 0.02 + 0.001 * 2 * 5) + (0.1 + 4 * 0.01 + 1 * 0.02 + 0.001 * 1 * 4 + 0.05)
    assert TABLE.seconds(blocks, heads, tokens).item() == pytest.approx(expected)
    assert TABLE.ratio(blocks, heads, tokens).item() == pytest.approx(expected / 2.0)


def test_seconds_are_differentiable_in_every_gate() -> None:
    gates = [torch.full(s, 0.9, requires_grad=True) for s in ((2, 3), (2, 3, 2), (2, 3, 5))]
    TABLE.seconds(*gates).sum().backward()
    blocks, heads, tokens = (g.grad for g in gates)
    assert bool((blocks > 0).all()) and bool((heads > 0).all())
    # a kept token costs its own time (more with more heads) but makes the gather less likely: here (2 heads
    # and 4 other tokens at 0.9) the gather wins
    assert tokens[0, 0, 0].item() == pytest.approx(0.9 * (0.01 + 0.001 * 1.8 - 0.05 * 0.9**4))


def test_forced_structure_is_what_runs() -> None:
    mia = create("mia_vit_fmnist", pretrained=False).eval()
    force = fix_controller(mia)
    x = torch.randn(2, 1, 28, 28)
    for batch in (1, 2):
        for blocks, heads, tokens in ((6, 4, 49), (3, 1, 10), (0, 4, 49)):
            force(blocks, heads, tokens)
            with torch.inference_mode():
                mia(x[:batch])
            rec = mia.last
            assert rec.blocks.sum(1).tolist() == [blocks] * batch
            if blocks:
                assert rec.heads[:, 0].sum(-1).tolist() == [heads] * batch
                assert rec.tokens[:, 0].sum(-1).tolist() == [tokens + 1] * batch  # the CLS token always runs


def test_measure_gives_a_complete_table_and_leaves_the_model_alone(tmp_path) -> None:
    mia = create("mia_vit_fmnist", pretrained=False)
    before = {k: v.clone() for k, v in mia.state_dict().items()}
    table = LatencyTable.measure(mia, create("vit_fmnist", pretrained=False), reps=2)
    assert table.static > 0 and table.fixed > 0 and table.block >= 0
    assert min(table.token, table.head, table.gather) >= 0 and table.residual >= 0
    assert table.threads == torch.get_num_threads() and table.device == "cpu"
    assert all(torch.equal(v, before[k]) for k, v in mia.state_dict().items())
    assert "forward" not in vars(mia.controller[0])
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json") == table


def test_bad_table_files_say_what_to_do(cli, tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        LatencyTable.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"static": 1.0}))
    with pytest.raises(UserError, match="leave --latency-table out"):
        LatencyTable.load(tmp_path / "bad.json")
    # a run folder's own table that went bad: deleting it (or another --out) is what helps
    run = tmp_path / "run"
    run.mkdir()
    (run / "latency.json").write_text("{}")
    r = cli("train", "--model", "mia_vit_fmnist", "--data", "synthetic", "--budget", "0.6", "--cost", "latency",
            "--out", str(run))
    assert r.code == 2 and "delete it" in r.err and "Traceback" not in r.err
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(UserError, match="is not a latency.json"):
        LatencyTable.load(tmp_path / "bad.json")


@pytest.mark.parametrize("content", ['{"static": NaN, "fixed": 1, "block": 1, "token": 1, "head": 1, "gather": 1}',
                                     '{"static": "2", "fixed": 1, "block": 1, "token": 1, "head": 1, "gather": 1}',
                                     '{"static": 0, "fixed": 1, "block": 1, "token": 1, "head": 1, "gather": 1}',
                                     '{"static": 1, "fixed": -1, "block": 1, "token": 1, "head": 1, "gather": 1}',
                                     '[1, 2]', "DIR"])
def test_invalid_tables_are_refused(tmp_path, content) -> None:
    path = tmp_path / "t.json"
    if content == "DIR":
        path.mkdir()
    else:
        path.write_text(content)
    with pytest.raises(UserError, match="is not a latency.json"):
        LatencyTable.load(path)


def test_nonnegative_fit_refits_without_the_negative_term() -> None:
    from miarobust.models.latency import _nonnegative_lstsq

    rng = np.random.default_rng(0)
    a = np.c_[np.ones(20), rng.uniform(0, 1, 20), rng.uniform(0, 1, 20)]
    b = 2 + 3 * a[:, 1] - 0.5 * a[:, 2] + rng.normal(0, 0.01, 20)  # the last term is negative
    coef = _nonnegative_lstsq(a, b)
    assert coef[2] == 0 and (coef >= 0).all()
    assert np.allclose(coef[:2], np.linalg.lstsq(a[:, :2], b, rcond=None)[0])


def test_latency_aware_training_keeps_one_table_across_resumes(cli, tmp_path) -> None:
    table_file = tmp_path / "given.json"
    TABLE.save(table_file)
    out = tmp_path / "run"
    common = ["train", "--model", "mia_vit_fmnist", "--data", "synthetic", "--batch-size", "64", "--budget", "0.6",
              "--cost", "latency", "--out", str(out)]
    r = cli(*common, "--epochs", "1", "--latency-table", str(table_file))
    assert r.code == 0, r.err
    assert LatencyTable.load(out / "latency.json") == TABLE
    log = pd.read_csv(out / "log.csv")
    assert {"latency_ratio", "latency_ratio_stochastic", "flops_ratio"} <= set(log.columns)
    # the budget saw the given table: its all-open ratio is 2.9 (fixed 0.5 + 6 x 0.88 over a static 2.0),
    # while the MACs ratio of any structure is at most about 1
    assert log["train_ratio"].iloc[0] > 1.5 and log["latency_ratio"].iloc[0] > 1.5
    assert json.loads((out / "config.json").read_text())["extra"]["cost"] == "latency"
    r = cli(*common, "--epochs", "2")  # resumes: trains on against the run's own table, measures nothing
    assert r.code == 0, r.err
    assert LatencyTable.load(out / "latency.json") == TABLE and len(pd.read_csv(out / "log.csv")) == 2
    other = tmp_path / "other.json"
    dataclasses.replace(TABLE, static=3.0).save(other)
    r = cli(*common, "--epochs", "3", "--latency-table", str(other))  # not the run's own: refused
    assert r.code == 2 and "its own latency.json" in r.err and len(pd.read_csv(out / "log.csv")) == 2


def test_a_table_of_another_model_is_refused(cli, tmp_path) -> None:
    table = tmp_path / "deit.json"
    dataclasses.replace(TABLE, model="depth=12 dim=384 heads=6 mlp=1536 patches=196 prefix=1").save(table)
    r = cli("train", "--model", "mia_vit_fmnist", "--data", "synthetic", "--budget", "0.6", "--cost", "latency",
            "--latency-table", str(table), "--out", str(tmp_path / "run"))
    assert r.code == 2 and "another model" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [["--model", "vit_fmnist", "--cost", "latency"], ["--model", "mia_vit_fmnist"],
                                  ["--model", "mia_vit_fmnist", "--budget", "0.6", "--latency-table", "t.json"]])
def test_latency_options_misused(cli, tmp_path, args) -> None:
    r = cli("train", "--data", "synthetic", *args, "--out", str(tmp_path / "x"))
    assert r.code == 2 and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
