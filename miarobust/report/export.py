"""RobustBench model-info JSON from the tidy table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from miarobust.report.tables import _run_level
from miarobust.results.read import WORST

AUTOATTACKS = ("autoattack", "autoattack-rand")


def robustbench_entries(table: pd.DataFrame) -> dict[Path, dict[str, Any]]:
    """RobustBench model-info JSON per model x gate mode (and eps, when there are several), by relative path.

    autoattack_acc is AutoAttack's accuracy when a run used it (`autoattack`, `autoattack-rand`), else the
    lowest worst-case robust accuracy of the model's runs at that eps, and `attacks` says which was used.
    """
    out: dict[Path, dict[str, Any]] = {}
    runs = _run_level(table)
    for (data, norm, model, gate), g in table.groupby(["data", "norm", "model", "gate_mode"]):
        eps_values = sorted(g["eps"].unique())
        for eps in eps_values:
            rows = g[g["eps"] == eps]
            aa = rows[rows["attack"].isin(AUTOATTACKS)]
            pick = aa if len(aa) else runs[(runs["data"] == data) & (runs["norm"] == norm) & (runs["model"] == model)
                                           & (runs["gate_mode"] == gate) & (runs["eps"] == eps)]
            best = pick.loc[pick["robust_acc"].idxmin()]
            attacks = sorted(set(table.loc[table["folder"] == best["folder"], "attack"]) - {WORST})
            name = model if gate == "static" else f"{model}_{gate}"
            if len(eps_values) > 1:
                name += "_eps" + str(best["eps_text"]).replace("/", "_")
            out[Path(str(data)) / str(norm) / f"{name}.json"] = {
                "link": "", "name": f"{model} ({gate})", "authors": "", "additional_data": False,
                "number_forward_passes": int(best["eval_samples"]), "dataset": str(data), "venue": "",
                "architecture": str(model), "eps": str(best["eps_text"]), "clean_acc": f"{100 * best['clean_acc']:.2f}",
                "reported": "", "autoattack_acc": f"{100 * best['robust_acc']:.2f}",
                # ours
                "gmacs": float(best["gmacs_clean"]), "gate_mode": None if gate == "static" else str(gate),
                "eot": int(best["eot"]) if not pd.isna(best["eot"]) else 1, "n": int(best["n"]),
                "attacks": attacks if not len(aa) else [str(best["attack"])], "source": str(best["folder"]),
            }
    return out
