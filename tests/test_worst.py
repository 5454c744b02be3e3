"""miarobust/worst.py: each image's worst case across runs, checked against the runs' own samples.csv.

The CLI runs are real but tiny (vit_fmnist and mia_vit_fmnist, 8 to 24 images, 2 steps); the fractional
records of a stochastic model are planted as files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, files_under

from miarobust.errors import UserError
from miarobust.results import write_csv, write_json
from miarobust.results.read import load_run, run_rows
from miarobust.stats import wilson
from miarobust.worst import IN_ALL, worst_case


def miarobust(*args: str) -> None:
    """`miarobust ARGS` through the console entry point, outside a test function (module fixtures)."""
    from miarobust.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["miarobust", *args])
        try:
            main()
        except SystemExit as e:
            assert not e.code, args


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six finished runs in three folders: vit_fmnist at 8/255 under pgd and fgsm (24 images) and pgd-cw (16,
    in b/), vit_fmnist at 2/255 (16), mia_vit_fmnist with deterministic and with stochastic gates (8 each)."""
    root = tmp_path_factory.mktemp("runs")
    miarobust("run", *TINY, "--attack", "pgd", "--out", str(root / "a"))
    miarobust("run", *TINY, "--attack", "fgsm", "--out", str(root / "a"))
    miarobust("run", *TINY, "--attack", "pgd-cw", "--n", "16", "--out", str(root / "b"))
    miarobust("run", *TINY, "--attack", "pgd", "--n", "16", "--eps", "2/255", "--out", str(root / "a"))
    mia = [*TINY, "--model", "mia_vit_fmnist", "--n", "8", "--attack", "pgd", "--out", str(root / "mia")]
    miarobust("run", *mia)
    miarobust("run", *mia, "--gate-mode", "stochastic", "--eval-samples", "2", "--eot", "2")
    return root


@pytest.fixture(scope="module")
def out(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("worst")
    worst_case([root / "a", root / "b", root / "mia"], out)
    return out


def read(folder: Path) -> tuple[dict, dict, pd.DataFrame]:
    return (json.loads((folder / "config.json").read_text()), json.loads((folder / "summary.json").read_text()),
            pd.read_csv(folder / "samples.csv"))


def test_worst_case_is_the_per_image_minimum_over_the_runs(root, out):
    (folder,) = out.glob("vit_fmnist-embedded-worst-Linf-8_255-*")
    config, summary, samples = read(folder)
    sources = {Path(c["folder"]).name: c["label"] for c in config["combines"]}
    assert sorted(sources.values()) == ["fgsm", "pgd", "pgd-cw"]
    runs = {sources[p.parent.name]: pd.read_csv(p).set_index("index")
            for p in root.rglob("samples.csv") if p.parent.name in sources}
    robust = pd.DataFrame({label: s["robust"] for label, s in runs.items()})  # independent of worst.py
    assert samples["index"].tolist() == list(range(24)) and samples["runs"].tolist() == [3] * 16 + [2] * 8
    assert samples["robust"].tolist() == robust.min(axis=1).tolist()
    assert all(row[f"{row['worst_by']}_correct"] == row["robust"] for _, row in samples.iterrows())
    for label, s in runs.items():
        assert samples.set_index("index")[f"{label}_correct"].dropna().tolist() == s["robust"].tolist()
    clean = pd.DataFrame({label: s["clean_correct"] for label, s in runs.items()}).mean(axis=1)
    assert samples["clean_correct"].tolist() == pytest.approx(clean.tolist())
    # the headline is the intersection (the 16 images pgd-cw covers); the union is stated apart
    strict = robust.min(axis=1).iloc[:16]
    assert summary["n"] == summary["robust"]["n"] == 16 and samples[IN_ALL].sum() == 16
    assert summary["robust"]["acc"] == pytest.approx(strict.mean())
    assert summary["robust"]["ci95"] == pytest.approx(list(wilson(strict.sum(), 16)))
    assert summary["robust_union"]["n"] == 24 and summary["robust_union"]["acc"] == pytest.approx(robust.min(axis=1).mean())
    for label, s in runs.items():
        assert summary["attacks"][label]["acc"] == pytest.approx(s["robust"].iloc[:16].mean())
        assert summary["attacks"][label]["own"]["n"] == len(s)
    assert summary["robust"]["acc"] <= min(v["acc"] for v in summary["attacks"].values())
    assert config["weights_sha256"] and config["columns"] == {c["label"]: c["folder"] for c in config["combines"]}
    for c in config["combines"]:  # each source's sanity checks, by status
        own = json.loads((Path(c["folder"]) / "summary.json").read_text())["checks"]
        assert c["checks"] == {k: v["status"] for k, v in own.items()}


def test_another_eps_model_or_gate_mode_is_never_combined(out):
    groups = {}
    for folder in out.iterdir():
        config, summary, _ = read(folder)
        groups[(summary["model"], summary["gate_mode"], summary["eps_text"])] = len(config["combines"])
    assert groups == {("vit_fmnist", None, "8/255"): 3, ("vit_fmnist", None, "2/255"): 1,
                      ("mia_vit_fmnist", "deterministic", "8/255"): 1, ("mia_vit_fmnist", "stochastic", "8/255"): 1}
    (stochastic,) = [f for f in out.iterdir() if read(f)[1]["gate_mode"] == "stochastic"]
    _, summary, samples = read(stochastic)
    assert summary["stochastic"] and list(summary["attacks"]) == ["pgd-eot2"] and summary["eval_samples"] == 2
    assert samples["robust"].tolist() == samples["pgd-eot2_correct"].tolist()


def test_report_reads_the_worst_case_folder(cli, out, tmp_path):
    r = cli("report", str(out), "--out", str(tmp_path))
    assert r.code == 0, r.err
    assert "4 runs reported, 0 skipped" in r.out
    table = pd.read_csv(tmp_path / "report.csv")
    (folder,) = out.glob("vit_fmnist-embedded-worst-Linf-8_255-*")
    _, summary, _ = read(folder)
    rows = table[table["folder"] == folder.name].set_index("attack")
    assert sorted(rows.index) == ["fgsm", "pgd", "pgd-cw", "worst-case"]
    assert (rows["integrity"] == "ok").all() and (rows["n"] == 16).all()
    assert rows.loc["worst-case", "robust_acc"] == summary["robust"]["acc"]
    assert rows.loc["pgd-cw", "robust_acc"] == summary["attacks"]["pgd-cw"]["acc"]


def test_cli_prints_one_line_per_group_and_rewrites_the_same_bytes(cli, root, out, tmp_path):
    r = cli("worst", str(root / "a"), str(root / "b"), str(root / "mia"), "--out", str(tmp_path))
    assert r.code == 0, r.err
    lines = r.out.strip().splitlines()
    assert len(lines) == 4
    line = next(ln for ln in lines if "vit_fmnist [vit_fmnist] (static) Linf 8/255" in ln)
    assert "3 runs, n=16, worst-case robust" in line and "on all 24 covered" in line and "results in" in line
    assert files_under(tmp_path) == files_under(out)
    for f in out.rglob("*.*"):
        assert (tmp_path / f.relative_to(out)).read_bytes() == f.read_bytes(), f


@pytest.mark.parametrize("case", ["missing", "empty", "out-a-file", "out-in-a-run", "no-out"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(cli, root, tmp_path, case):
    before = files_under(root)
    target = tmp_path / "out"
    args = [str(root / "a"), "--out", str(target)]
    if case == "missing":
        args[0] = str(tmp_path / "nothing")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[0] = str(tmp_path / "empty")
    elif case == "out-a-file":
        target.write_text("a file")
    elif case == "out-in-a-run":
        target = next((root / "a").iterdir()) / "worst"
        args[-1] = str(target)
    else:
        args = args[:1]
    r = cli("worst", *args)
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert files_under(root) == before
    assert (target.read_text() == "a file") if case == "out-a-file" else not target.exists()


# -- planted runs: fractional records of a stochastic model --------------------------------------------------


def plant(folder: Path, attack: str, robust: list[float], clean: list[float], eot: int, gate_mode: str = "stochastic",
          labels: list[int] | None = None, checks: dict | None = None, config: dict | None = None) -> Path:
    """A finished run folder as `miarobust run` writes it, with the given per-image records."""
    n = len(robust)

    def prop(v: list[float]) -> dict:
        return {"acc": sum(v) / n, "ci95": list(wilson(sum(v), n)), "n": n}

    samples = pd.DataFrame({"index": range(n), "label": labels or [i % 10 for i in range(n)], "clean_correct": clean,
                            "clean_gmacs": 0.007, f"{attack}_correct": robust, f"{attack}_gmacs": 0.008, "robust": robust})
    write_csv(folder / "samples.csv", samples)
    threat = {"model": "mia_vit_fmnist", "data": "embedded", "gate_mode": gate_mode, "norm": "Linf", "eps": 8 / 255,
              "eps_text": "8/255"}
    stochastic = gate_mode == "stochastic"
    write_json(folder / "config.json", {**threat, "weights_sha256": "ab" * 32, "checkpoint": "/w/mia_b07.safetensors",
                                        "split": "test", "data_root": None, "num_classes": None, "img_size": None,
                                        "attacks": [attack], "eot": eot, "seed": 0, "steps": 10, **(config or {})})
    label = ("adaptive" if eot > 1 else "non-adaptive") if stochastic else "deterministic-model"
    write_json(folder / "summary.json", {
        **threat, "n": n, "steps": 10, "eval_samples": 10 if stochastic else 1, "stochastic": stochastic,
        "clean": prop(clean), "robust": prop(robust), "checks": checks or {},
        "attacks": {attack: {**prop(robust), "eot": eot, "adaptive": eot > 1, "label": label, "gmacs_mean": 0.008}},
        "gmacs": {"clean_mean": 0.007}})
    return folder


def test_fractional_records_take_the_minimum_estimate_per_image(tmp_path):
    runs = tmp_path / "runs"
    flag = {"eot_converged": {"status": "flag", "message": "K vs 2K differ"}}
    plant(runs / "a", "eot-pgd", [1, .7, .5, 0, .9, .3], [1, .8, .9, .1, 1, .6], eot=4, checks=flag)
    plant(runs / "b", "eot-pgd", [.9, .8, .5, .2], [1, .9, .8, .3], eot=16)
    plant(runs / "c", "pgd", [0, 0, 0, 0], [1, 1, 1, 1], eot=1, gate_mode="deterministic")  # never combined
    results = worst_case([runs], tmp_path / "out")
    assert [r.summary["gate_mode"] for r in results] == ["deterministic", "stochastic"]
    res = results[1]
    _, summary, samples = read(res.folder)
    assert samples["robust"].tolist() == [.9, .7, .5, 0, .9, .3]
    assert samples["worst_by"].tolist() == ["eot-pgd-eot16"] + ["eot-pgd-eot4"] * 5  # a tie goes to the first
    assert samples["clean_correct"].tolist() == pytest.approx([1, .85, .85, .2, 1, .6])
    assert summary["n"] == 4 and summary["robust"]["acc"] == pytest.approx(.525)
    assert summary["clean"]["acc"] == pytest.approx(.725)
    assert summary["robust_union"] == {"acc": pytest.approx(.55), "ci95": pytest.approx(list(wilson(3.3, 6))), "n": 6}
    assert summary["attacks"]["eot-pgd-eot4"]["own"] == {"acc": pytest.approx(3.4 / 6), "n": 6}
    assert not summary["non_adaptive"] and summary["worst_by"] == {"eot-pgd-eot4": 3, "eot-pgd-eot16": 1}
    assert res.config["combines"][0]["checks"] == {"eot_converged": "flag"}
    run = load_run(res.folder)  # report's reader: consistent, and the source's flagged check flags the rows
    assert run.integrity == []
    worst = next(row for row in run_rows(run) if row["attack"] == "worst-case")
    assert worst["flags"] == "eot-pgd-eot4/eot_converged" and worst["n"] == 4 and worst["eot"] == 16


def test_model_arguments_and_precision_part_runs_and_their_defaults_join_them(tmp_path):
    runs = tmp_path / "runs"
    det = {"gate_mode": "deterministic"}
    plant(runs / "r6", "pgd", [1, 1], [1, 1], eot=1, **det, config={"model_kwargs": "r=6"})
    plant(runs / "r8", "pgd", [0, 0], [1, 1], eot=1, **det, config={"model_kwargs": "r=8"})
    plant(runs / "bf16", "pgd", [0, 1], [1, 1], eot=1, **det, config={"precision": "bf16"})
    plant(runs / "old", "pgd", [1, 0], [1, 1], eot=1, **det)  # written before either field: no arguments, fp32
    plant(runs / "new", "autoattack", [1, 1], [1, 1], eot=1, **det, config={"model_kwargs": "", "precision": "fp32"})
    results = worst_case([runs], tmp_path / "out")
    combined = sorted(sorted(c["folder"].split("/")[-1] for c in r.config["combines"]) for r in results)
    assert combined == [["bf16"], ["new", "old"], ["r6"], ["r8"]]
    plain = next(r for r in results if len(r.config["combines"]) == 2)
    assert plain.config["model_kwargs"] == "" and plain.config["precision"] == "fp32"
    assert read(plain.folder)[2]["robust"].tolist() == [1, 0]


def test_a_worst_case_folder_below_the_input_is_not_combined_again(tmp_path):
    runs = tmp_path / "runs"
    plant(runs / "a", "eot-pgd", [1, .5], [1, 1], eot=4)
    plant(runs / "b", "eot-pgd", [.5, 1], [1, 1], eot=4)
    (first,) = worst_case([runs], runs / "worst")
    assert [c["label"] for c in first.config["combines"]] == ["eot-pgd-eot4-a", "eot-pgd-eot4-b"]
    before = {p: p.read_bytes() for p in first.folder.iterdir()}
    (again,) = worst_case([runs], runs / "worst")
    assert again.folder == first.folder and {p: p.read_bytes() for p in again.folder.iterdir()} == before


def test_an_unchanged_result_keeps_its_folder_and_a_changed_one_is_rewritten(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    plant(runs / "a", "eot-pgd", [1, .5], [1, 1], eot=4)
    (first,) = worst_case([runs], tmp_path / "out")
    before = {p: p.read_bytes() for p in first.folder.iterdir()}
    monkeypatch.setattr("miarobust.worst.git_revision", lambda: "another-revision")
    (again,) = worst_case([runs], tmp_path / "out")  # another commit, the same sources: nothing is rewritten
    assert {p: p.read_bytes() for p in again.folder.iterdir()} == before
    assert again.config["environment"]["git_revision"] == first.config["environment"]["git_revision"]
    samples = again.folder / "samples.csv"
    samples.write_text(samples.read_text().replace("0.5", "0.25"))  # a result that differs from its sources'
    (mended,) = worst_case([runs], tmp_path / "out")
    assert samples.read_bytes() == before[samples]
    assert mended.config["environment"]["git_revision"] == "another-revision"
    assert json.loads((mended.folder / "config.json").read_text()) == mended.config


def test_runs_that_disagree_on_a_label_are_a_user_error(tmp_path):
    runs = tmp_path / "runs"
    plant(runs / "a", "eot-pgd", [1, .5], [1, 1], eot=4, labels=[3, 4])
    plant(runs / "b", "eot-pgd", [1, .5], [1, 1], eot=8, labels=[3, 5])
    with pytest.raises(UserError, match="image 1 has different labels"):
        worst_case([runs], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def grid():
    """benchmarks/adaptive_grid.py as a module (it is a script, not part of the package), loaded once."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "adaptive_grid.py"
    spec = importlib.util.spec_from_file_location("adaptive_grid", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("aa_images, expected_n", [(1000, 1000), (500, 500), (700, 500), (300, None)])
def test_the_autoattack_table_falls_back_to_the_first_500_images(grid, tmp_path, aa_images, expected_n):
    """The 1,000-image AutoAttack table takes a row on all 1,000 images where AutoAttack covers them, else on the
    first 500 (each image's minimum over the runs that cover them all), else leaves it out."""
    n = grid.WIDE_N
    pgd = [i % 2 for i in range(n)]
    aa = [(i % 3 != 0) if i < aa_images else None for i in range(n)]
    pd.DataFrame({"index": range(n), "clean_correct": 1, "pgd_correct": pgd, "autoattack_correct": aa}).to_csv(
        tmp_path / "samples.csv", index=False)
    write_json(tmp_path / "config.json", {"combines": [{"label": "pgd", "attacks": ["pgd"]},
                                                       {"label": "autoattack", "attacks": ["autoattack"]}]})
    found = grid.autoattack_worst(tmp_path)
    if expected_n is None:
        assert found is None
        return
    frame, attacks = found
    assert attacks == ["autoattack", "pgd"]
    assert frame["index"].tolist() == list(range(expected_n))
    assert frame.robust.tolist() == [min(pgd[i], int(aa[i])) for i in range(expected_n)]


SQUARE_WARNING = ("autoattack, batch 1: Square Attack has decreased the robust accuracy of 2.00%. This might indicate "
                  "that the robustness evaluation using AutoAttack is unreliable.")
RANDOMNESS_WARNING = "autoattack, batch 0: it seems that the model is not deterministic"


@pytest.mark.parametrize("status, warnings, run_n, follows", [
    ("flag", [SQUARE_WARNING], 500, True),
    ("flag", [RANDOMNESS_WARNING], 500, False),  # flagged, but not its Square
    ("pass", [], 500, False),
    ("flag", [SQUARE_WARNING], 1000, False),  # a flagged run on other images
])
@pytest.mark.parametrize("attack", ["autoattack", "autoattack-st"])
def test_a_flagged_autoattack_cell_is_followed_by_square_with_another_seed(grid, tmp_path, monkeypatch, status,
                                                                            warnings, run_n, follows, attack):
    """--autoattack runs Square with SQUARE_SEED on the same images after a cell exactly where AutoAttack's check
    says its Square broke images on those images, and nowhere else."""
    (row,) = [r for r in grid.ROWS if r.name.startswith("b05")]
    ran = []

    def execute(cmd):  # plant the finished run `miarobust run` would write
        ran.append(cmd)
        if cmd[cmd.index("--attack") + 1] == attack:
            plant(tmp_path / f"run{len(ran)}", attack, [1, 0], [1, 1], eot=1, gate_mode="deterministic",
                  checks={"autoattack_flags": {"status": status, "value": warnings}},
                  config={"n": run_n, "model_kwargs": "", "weights_sha256": grid.weights_sha256(row.weights)})

    monkeypatch.setattr(grid, "AUTOATTACK_OUT", str(tmp_path))
    monkeypatch.setattr(grid, "execute", execute)
    grid.autoattack_cell(row, "8/255", 500, attack, 50, [])
    first = grid.cell(row.argv, "8/255", 500, str(tmp_path), 50, attack=attack, checks="auto")
    square = grid.cell([*row.argv, "--seed", str(grid.SQUARE_SEED)], "8/255", 500, str(tmp_path), 50,
                       attack="square", checks="auto")
    assert ran == ([first, square] if follows else [first])
