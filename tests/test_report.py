"""miarobust.report: tables and plots from run folders, checked against the runs' own summary.json.

The runs are real but tiny (vit_fmnist and a stochastic mia_vit_fmnist, 20 images, 1 PGD step).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from miarobust.report import PLOTS
from miarobust.report.export import robustbench_entries
from miarobust.report.plots import _frontier
from miarobust.report.tables import markdown_table
from miarobust.results.read import check_integrity, load_runs, tidy

TINY = dict(n=20, batch_size=20, steps=1, checks="off")


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three finished runs: static at 8/255 (pgd+fgsm) and 2/255 (pgd), stochastic MIA with EOT 2."""
    from miarobust.evaluator import RunConfig, run

    root = tmp_path_factory.mktemp("runs")
    run(RunConfig(model="vit_fmnist", attacks=("pgd", "fgsm"), out=str(root), **TINY), progress=False)
    run(RunConfig(model="vit_fmnist", attacks=("pgd",), eps=2 / 255, eps_text="2/255", out=str(root), **TINY), progress=False)
    run(RunConfig(model="mia_vit_fmnist", gate_mode="stochastic", eval_samples=2, eot=2, attacks=("pgd",),
                  out=str(root / "mia"), **TINY), progress=False)
    return root


def copy_runs(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("report*", "*.png", "*.pdf", "robustbench"))
    return dst


def test_report_writes_every_file_and_the_csv_equals_summary_json(cli, runs_root, tmp_path):
    r = cli("report", str(runs_root), "--out", str(tmp_path), "--pdf", "--robustbench")
    assert r.code == 0, r.err
    for name in ("report.md", "report.csv", "report.tex", *(f"{p}.png" for p in PLOTS), *(f"{p}.pdf" for p in PLOTS)):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "3 runs reported, 0 skipped" in r.out

    table = pd.read_csv(tmp_path / "report.csv")
    summaries = {p.parent.name: json.loads(p.read_text()) for p in runs_root.rglob("summary.json")}
    assert set(table["folder"]) == set(summaries)
    for folder, s in summaries.items():
        rows = table[table["folder"] == folder].set_index("attack")
        expected = {**{a: v for a, v in s["attacks"].items()}, **({"worst-case": s["robust"]} if len(s["attacks"]) > 1 else {})}
        assert set(rows.index) == set(expected)
        for attack, entry in expected.items():
            row = rows.loc[attack]
            assert row["robust_acc"] == entry["acc"] and [row["ci_lo"], row["ci_hi"]] == entry["ci95"]
            assert row["clean_acc"] == s["clean"]["acc"] and [row["clean_ci_lo"], row["clean_ci_hi"]] == s["clean"]["ci95"]
            assert row["n"] == s["n"] == 20 and row["gmacs_clean"] == s["gmacs"]["clean_mean"]
            assert row["model"] == s["model"] and row["gate_mode"] == (s["gate_mode"] or "static")
            assert row["eps_text"] == s["eps_text"] and row["integrity"] == "ok"
            if attack != "worst-case":
                assert row["gmacs_adv"] == entry["gmacs_mean"] and row["eot"] == entry["eot"] and row["label"] == entry["label"]
    assert (table["params"] > 1e5).all()  # counted on the meta device

    md = (tmp_path / "report.md").read_text()
    assert "## embedded" in md and "| Model | Weights | Gate mode | Params (M)" in md and "adaptive" in md
    assert "mia_vit_fmnist_lat076" in md and set(table["weights"]) >= {"vit_fmnist", "mia_vit_fmnist_lat076"}
    assert all(f"![{p}]({p}.png)" in md for p in PLOTS)
    tex = (tmp_path / "report.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "mia\\_vit\\_fmnist" in tex


def test_robustbench_json_has_the_model_info_layout(cli, runs_root, tmp_path):
    assert cli("report", str(runs_root), "--out", str(tmp_path), "--robustbench").code == 0
    files = sorted((tmp_path / "robustbench").rglob("*.json"))
    names = {f.relative_to(tmp_path / "robustbench").as_posix() for f in files}
    assert names == {"embedded/Linf/vit_fmnist_eps2_255.json", "embedded/Linf/vit_fmnist_eps8_255.json",
                     "embedded/Linf/mia_vit_fmnist_stochastic.json"}
    keys = {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue", "architecture",
            "eps", "clean_acc", "reported", "autoattack_acc"}
    summary = json.loads(next((runs_root / "mia").rglob("summary.json")).read_text())
    info = json.loads((tmp_path / "robustbench/embedded/Linf/mia_vit_fmnist_stochastic.json").read_text())
    assert keys <= set(info) and {"gmacs", "gate_mode", "eot"} <= set(info)
    assert info["eps"] == "8/255" and info["gate_mode"] == "stochastic" and info["eot"] == 2
    assert info["clean_acc"] == f"{100 * summary['clean']['acc']:.2f}"
    assert info["autoattack_acc"] == f"{100 * summary['robust']['acc']:.2f}"
    assert info["number_forward_passes"] == 2  # eval_samples gate draws per prediction
    static = json.loads((tmp_path / "robustbench/embedded/Linf/vit_fmnist_eps8_255.json").read_text())
    assert static["gate_mode"] is None and static["attacks"] == ["fgsm", "pgd"]
    float(static["autoattack_acc"]), float(static["clean_acc"])  # percentages as strings


def test_mixed_folder_skips_corrupt_and_unfinished_runs(cli, runs_root, tmp_path):
    root = copy_runs(runs_root, tmp_path / "mixed")
    corrupt = next((root / "mia").iterdir())
    (corrupt / "summary.json").write_text('{"model": ')
    unfinished = root / "vit_fmnist-unfinished"
    unfinished.mkdir()
    shutil.copy(next(root.glob("vit_fmnist-*/config.json")), unfinished / "config.json")
    (unfinished / "partial").mkdir()
    r = cli("report", str(root))
    assert r.code == 0, r.err
    assert "2 runs reported, 2 skipped" in r.out
    assert f"skipped {corrupt}" in r.out and f"skipped {unfinished}" in r.out
    md = (root / "report.md").read_text()
    assert f"Skipped: mia/{corrupt.name} (corrupt: summary.json is not valid JSON" in md
    assert "Skipped: vit_fmnist-unfinished (in progress: partial/ present" in md
    assert corrupt.name not in pd.read_csv(root / "report.csv")["folder"].tolist()
    # no stochastic run left: the EOT plot is still written, and report.md says why it is empty
    assert (root / "robust_vs_eot.png").is_file() and "robust_vs_eot has no data" in md


def test_summary_that_disagrees_with_samples_is_flagged_not_fatal(cli, runs_root, tmp_path):
    root = copy_runs(runs_root, tmp_path / "tampered")
    folder = next(root.glob("vit_fmnist-*-pgd+fgsm-*"))
    samples = pd.read_csv(folder / "samples.csv")
    samples.loc[samples["clean_correct"] == 0, "clean_correct"] = 1  # every image now clean-correct
    samples.to_csv(folder / "samples.csv", index=False)
    r = cli("report", str(root))
    assert r.code == 0, r.err
    table = pd.read_csv(root / "report.csv")
    rows = table[table["folder"] == folder.name]
    assert rows["integrity"].str.contains("clean accuracy is .* in summary.json but 1 from samples.csv").all()
    assert rows["flags"].str.contains("integrity").all()
    assert (table.loc[table["folder"] != folder.name, "integrity"] == "ok").all()
    assert "## Integrity" in (root / "report.md").read_text()


def test_check_integrity_on_the_runs(runs_root):
    runs, skipped = load_runs(runs_root)
    assert len(runs) == 3 and not skipped and all(r.integrity == [] for r in runs)
    r = runs[0]
    assert check_integrity({**r.summary, "n": 19}, r.samples) == [f"n is 19 in summary.json but samples.csv has {len(r.samples)} rows"]


@pytest.mark.parametrize("make", ["missing", "empty", "only-junk"])
def test_report_on_nothing_is_a_user_error(cli, tmp_path, make):
    path = tmp_path / "results"
    if make != "missing":
        path.mkdir()
    if make == "only-junk":
        (path / "run").mkdir()
        (path / "run" / "config.json").write_text("{}")
    r = cli("report", str(path))
    assert r.code == 2 and r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1
    assert not (path / "report.md").exists()


def test_markdown_table_without_tabulate(monkeypatch):
    def no_tabulate(*a, **k):
        raise ImportError("Missing optional dependency 'tabulate'")

    monkeypatch.setattr(pd.DataFrame, "to_markdown", no_tabulate)
    text = markdown_table(pd.DataFrame({"a": [1, None], "b|c": ["x", "y|z"]}))
    assert text.splitlines() == ["| a | b\\|c |", "|---|---|", "| 1.0 | x |", "|  | y\\|z |"]


def test_frontier_keeps_only_undominated_points():
    assert _frontier([(2, 50), (1, 40), (3, 45), (4, 60), (1, 30)]) == [(1, 40), (2, 50), (4, 60)]


def test_tidy_without_params_and_robustbench_picks_the_lowest(runs_root):
    runs, _ = load_runs(runs_root)
    table = tidy(runs)
    assert table["params"].isna().all() and len(table) == 5  # pgd, fgsm, worst-case; pgd at 2/255; mia pgd
    entries = robustbench_entries(table)
    for entry in entries.values():
        assert math.isfinite(float(entry["autoattack_acc"])) and entry["dataset"] == "embedded"


def test_eps_plot_draws_each_eot_k_as_its_own_line() -> None:
    from miarobust.report.plots import plot_robust_vs_eps

    rows = []
    for k in (1, 4):
        for eps in (2 / 255, 8 / 255):
            acc = 0.5 - 0.1 * k * eps * 255 / 8
            rows.append(dict(data="embedded", model="mia_vit_fmnist", gate_mode="stochastic", norm="Linf", eps=eps,
                             attack="eot-pgd", eot=k, n=100, robust_acc=acc, ci_lo=acc - 0.05, ci_hi=acc + 0.05,
                             clean_acc=0.9, clean_ci_lo=0.85, clean_ci_hi=0.95))
    rows.append({**rows[0], "attack": "pgd", "eot": 1})
    rows.append({**rows[0], "model": "vit_fmnist", "gate_mode": "static", "attack": "pgd", "eot": 1})
    fig = plot_robust_vs_eps(pd.DataFrame(rows))
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["mia_vit_fmnist (stochastic): embedded, Linf",
                                                "vit_fmnist (static): embedded, Linf"]  # a panel per model x gates
    assert sorted(shown[0].get_legend_handles_labels()[1]) == ["eot-pgd K=1", "eot-pgd K=4", "pgd"]
    assert shown[1].get_legend_handles_labels()[1] == ["pgd"]


@pytest.mark.parametrize("tamper", ["acc-as-text", "eps-as-text", "n-as-bool"])
def test_summary_with_values_of_the_wrong_type_is_skipped_as_corrupt(cli, runs_root, tmp_path, tamper):
    """Valid JSON of the right layout but a string or a bool where a number belongs: the run is skipped as
    corrupt, the report is written from the others (it used to end in a traceback with half the files written)."""
    root = copy_runs(runs_root, tmp_path / "typed")
    folder = next(root.glob("vit_fmnist-*-pgd+fgsm-*"))
    summary = json.loads((folder / "summary.json").read_text())
    if tamper == "acc-as-text":
        summary["attacks"]["fgsm"]["acc"] = "abc"
    elif tamper == "eps-as-text":
        summary["eps"] = "big"
    else:
        summary["n"] = True
    (folder / "summary.json").write_text(json.dumps(summary))
    r = cli("report", str(root))
    assert r.code == 0, r.err
    assert f"skipped {folder}" in r.out
    assert folder.name not in pd.read_csv(root / "report.csv")["folder"].tolist()
    assert "not a number" in (root / "report.md").read_text()


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_report_into_a_folder_that_cannot_be_made_is_a_user_error(cli, runs_root, tmp_path, where):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker if where == "a-file" else blocker / "report"
    r = cli("report", str(runs_root), "--out", str(out))
    assert r.code == 2 and r.err.startswith("error: cannot write the report into") and len(r.err.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder" and not (runs_root / "report.csv").exists()


def test_variants_of_a_model_are_told_apart_and_runs_without_attack_have_no_robust_point() -> None:
    """The committed peers runs: ToMe at r = 6 and r = 8 on the static weights are two series (their --model-kwargs
    in the weights label), apart from the fine-tuned checkpoints; a run without attack gives one clean point, no
    robust one."""
    from pathlib import Path

    root = Path(__file__).parents[1] / "results" / "peers"
    runs, _ = load_runs(root)
    table = tidy(runs)
    tome = sorted(table.loc[table["model"] == "tome_vit_fmnist", "weights"])
    assert tome == ["tome_vit_fmnist_b05", "tome_vit_fmnist_b065", "vit_fmnist, r=6", "vit_fmnist, r=8"]
    assert set(table["attack"]) == {"none"}
    from miarobust.report.plots import plot_accuracy_vs_gmacs

    fig = plot_accuracy_vs_gmacs(table)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert not any(label.startswith("robust") or "frontier, robust" in label for label in labels)


def test_series_colors_group_by_family():
    """Each family has its hue, its members shades of it, the legend family by family; a series of no known family
    (a user's module) falls back to the categorical palette for the whole plot."""
    from matplotlib import colormaps

    from miarobust.report.plots import FAMILY_MAPS, _series_colors, family_of

    keys = ["tome_vit_fmnist, r=6 (deterministic)", "mia_vit_fmnist, mia_vit_fmnist_b07 (deterministic)",
            "vit_fmnist (None)", "mia_vit_fmnist (stochastic)", "avit_vit_fmnist (deterministic)",
            "adavit_vit_fmnist (deterministic)", "dynamicvit_vit_fmnist (deterministic)"]
    colors = _series_colors(keys)
    assert [family_of(k) for k in colors] == ["static ViT", "MIA-Former", "MIA-Former", "DynamicViT", "A-ViT", "AdaViT",
                                              "ToMe"]
    mia = [c for k, c in colors.items() if family_of(k) == "MIA-Former"]
    assert len(set(mia)) == 2  # two shades
    blues = colormaps[FAMILY_MAPS["MIA-Former"]]
    assert all(any(abs(c[2] - blues(t)[2]) < 1e-9 for t in (0.45, 0.95)) for c in mia)
    mixed = _series_colors([*keys, "Mine-0123456789 (None)"])
    assert len(set(mixed.values())) == len(mixed)  # tab20: every series its own color
