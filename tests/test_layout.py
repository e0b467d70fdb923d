"""The layout's rules, read from the source: which wing may import which, and no import circle between folders.

Folders: ``lvpruning`` (the method library, as a whole), ``pipelines`` (the modules every wing shares: config,
tracking, storage, ...), and the wings ``pipelines/{train,eval,sweep,frontier}`` and ``pipelines/toy``. Imports
inside functions count; those under ``if TYPE_CHECKING:`` (annotations only) do not.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINGS = ("train", "eval", "sweep", "frontier", "toy")


def folder(module: str) -> str | None:
    """The layout folder of a dotted module name of this project, None for a third party's."""
    parts = module.split(".")
    if parts[0] == "lvpruning":
        return "lvpruning"
    if parts[0] != "pipelines":
        return None
    return f"pipelines/{parts[1]}" if len(parts) > 1 and parts[1] in WINGS else "pipelines"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, package: str) -> set[str]:
    """The modules a file imports at run time (relative imports resolved against ``package``)."""
    skipped = {
        id(node)
        for guard in ast.walk(tree)
        if isinstance(guard, ast.If) and "TYPE_CHECKING" in ast.unparse(guard.test)
        for node in ast.walk(guard)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}  # `from pipelines import storage`
    return out


def edges() -> dict[tuple[str, str], list[str]]:
    """(importing folder, imported folder) -> the files that make that edge."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted([*ROOT.glob("lvpruning/**/*.py"), *ROOT.glob("pipelines/**/*.py")]):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        source = folder(name)
        for target in {folder(m) for m in imported(ast.parse(path.read_text()), package)} - {None, source}:
            found[(source, target)].append(str(path.relative_to(ROOT)))
    return found


def test_the_method_library_never_imports_the_pipelines():
    assert not [(e, files) for e, files in edges().items() if e[0] == "lvpruning"]


def test_each_wing_imports_only_what_it_may():
    allowed = {
        "pipelines": {"lvpruning", "pipelines/toy"},  # the shared modules: no wing
        "pipelines/toy": {"lvpruning"},
        "pipelines/train": {"lvpruning", "pipelines", "pipelines/toy"},
        "pipelines/eval": {"lvpruning", "pipelines", "pipelines/toy"},  # never the training wing
        "pipelines/frontier": {"pipelines", "pipelines/eval"},  # reads MLflow: of eval, only its metric names
        "pipelines/sweep": {"lvpruning", "pipelines", "pipelines/toy", "pipelines/train", "pipelines/eval"}
        | {"pipelines/frontier"},
    }
    wrong = {e: files for e, files in edges().items() if e[0] != "lvpruning" and e[1] not in allowed[e[0]]}
    assert not wrong, f"imports across wings that the layout forbids: {wrong}"


def test_the_frontier_takes_only_the_metric_names_from_the_evaluation():
    """``jobs/frontier.py`` reads MLflow alone: it must not load the evaluation's torch and Ray stack."""
    for path in ROOT.glob("pipelines/frontier/*.py"):
        for module in imported(ast.parse(path.read_text()), "pipelines.frontier"):
            if folder(module) == "pipelines/eval":
                assert module.startswith("pipelines.eval.metrics"), f"{path}: {module}"


def test_no_import_circle_between_folders():
    graph = defaultdict(set)
    for source, target in edges():
        graph[source].add(target)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    circles = sorted(f for f in list(graph) if reaches(f, f, {f}))
    assert not circles, f"folders on an import circle: {circles} ({dict(graph)})"


def test_the_rules_see_a_forbidden_import(tmp_path, monkeypatch):
    """The check is not vacuous: an evaluation module importing the training wing is caught."""
    tree = ast.parse("def f():\n    from pipelines.train.data import read_records\n")
    assert folder(sorted(imported(tree, "pipelines.eval"))[0]) == "pipelines/train"
    assert folder("pipelines.eval.scoring.vqa") == "pipelines/eval" and folder("pipelines.job") == "pipelines"
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipelines.config import X\n")
    assert "pipelines.config" not in imported(guarded, "pipelines")
