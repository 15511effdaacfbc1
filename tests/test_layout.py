"""The package's shape (DESIGN.md section 5): imports run one way, and the pure maths imports no framework.

Read from the source with ``ast``, so imports inside functions (where a circle usually hides) count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "swift_gradpruner"
PURE_MATHS = ("importance", "selection", "merge", "measures", "criteria", "payoff", "flops", "devices", "weight_files")
"""Modules the floors say are plain torch: no swift, deepspeed or vllm, at top level or inside a function."""
FRAMEWORKS = ("swift", "deepspeed", "vllm")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, by absolute name (relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import x`: x may be a module
    return found


def package_modules() -> dict[str, Path]:
    """Each module of the package by name (a package by its ``__init__.py``)."""
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def package_graph() -> dict[str, set[str]]:
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        # a package's __init__ is imported on the way to each of its modules; it is not an edge of its own
        graph[name] = {m for m in imports_of(path) if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that is on one (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve():
    assert "swift_gradpruner.config" in imports_of(PACKAGE / "swift" / "args.py")
    assert "swift_gradpruner.evaluation.cells" in imports_of(PACKAGE / "evaluation" / "summary.py")


def test_no_import_cycles():
    found = cycles(package_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("name", PURE_MATHS)
def test_pure_maths_imports_no_framework(name):
    """Nor does anything in the package it reaches."""
    start = f"swift_gradpruner.{name}"
    graph, modules = package_graph(), package_modules()
    assert start in graph, f"{start} is gone: update PURE_MATHS"
    reached, todo = {start}, [start]
    while todo:
        for nxt in graph[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    bad = sorted(
        f"{module} imports {target}"
        for module in reached
        for target in imports_of(modules[module])
        if target.split(".")[0] in FRAMEWORKS or target.startswith("swift_gradpruner.swift")
    )
    assert not bad, "; ".join(bad)
