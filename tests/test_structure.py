"""The package's structure: no module over 450 lines, no import cycle, and `regress` reading runs without `report`.

Imports are read from the source (ast), lazy ones inside functions included, so a cycle that only bites at call
time is found too. Left out: imports under `if TYPE_CHECKING:` (never executed) and imports of a module's own
ancestor packages (Python has imported those before the module itself runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import miarobust

ROOT = Path(miarobust.__file__).parent
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The miarobust modules `path` imports anywhere in its code, ancestors of its own module left out."""
    me = module_name(path)
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            found.update(n for n in names if n in known)
            if node.module in known and not all(n in known for n in names):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
    return {m for m in found if m != me and not me.startswith(m + ".")}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def reachable(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in g[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_no_module_is_over_450_lines() -> None:
    long = {name: n for name, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_no_import_cycle() -> None:
    g = graph()
    cycles = sorted(m for m in g if m in reachable(g, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_detector_sees_lazy_imports_and_cycles() -> None:
    """The checks above would pass on anything if `imports` missed the imports inside functions."""
    known = modules()
    assert "miarobust.checks" in imports(ROOT / "evaluator.py", known)  # lazy: inside `finish`
    g = graph()
    g["miarobust.results.store"] = g["miarobust.results.store"] | {"miarobust.evaluator"}
    assert "miarobust.evaluator" in reachable(g, "miarobust.evaluator")


def test_regress_does_not_import_report() -> None:
    g = graph()
    assert "miarobust.regress" in g
    assert not {m for m in reachable(g, "miarobust.regress") if m.startswith("miarobust.report")}


def test_every_committed_report_is_made_from_committed_runs() -> None:
    """A report under benchmarks/ names only run folders that results/ holds, so `miarobust report` rebuilds it."""
    import pandas as pd

    repo = ROOT.parent
    reports = sorted((repo / "benchmarks").rglob("report.csv"))
    committed = {p.parent.name for p in (repo / "results").rglob("config.json")}
    for report in reports:
        missing = set(pd.read_csv(report)["folder"]) - committed
        assert not missing, f"{report} reports runs that results/ lacks: {sorted(missing)[:3]}"
