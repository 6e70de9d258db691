"""The package's layers, read from its source (ast; nothing is imported): the search core
imports nothing of the application or of the libraries that only the application uses,
workers/evaluators/storage never reach up into the search, evaluators and storage never into
the workers, and no modules of the package import each other in a cycle. Every import counts,
at module level or inside a function: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = "evomerge.search.app"
# Libraries of the application layer only: the core reports to observers instead.
APP_LIBRARIES = ("rich", "plotly", "optuna_dashboard", "mlflow")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (or package), or a top-level name outside the package
    line: int
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.where}: {self.source} imports {self.target}"


def _package_dirs() -> dict[str, Path]:
    """Package name -> folder, as pyproject.toml installs them."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in setuptools["package-dir"].items()
            if name in setuptools["packages"]}


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package's is its __init__.py)."""
    out: dict[str, Path] = {}
    for package, folder in _package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The innermost module of the package that ``name`` names (``a.b.c`` -> ``a.b`` when c
    is a function of module ``a.b``), or ``name`` itself outside the package."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return name


def _imports(module: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    where = path.relative_to(ROOT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` imports the module; ``from mod import name`` the module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in dict.fromkeys(names):
            yield Import(module, _resolve(name), node.lineno, f"{where}:{node.lineno}")


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(sources: tuple[str, ...], targets: tuple[str, ...], exempt: tuple[str, ...] = ()) -> list[str]:
    return [str(i) for i in IMPORTS
            if any(_within(i.source, s) for s in sources) and not any(_within(i.source, e) for e in exempt)
            and any(_within(i.target, t) for t in targets)]


def test_the_walk_sees_the_package() -> None:
    """A guard for the guards: the walk finds the layers and the imports it judges."""
    for module in ("evomerge.search.controller", "evomerge.search.app.cli", "evomerge.workers.pool",
                   "evomerge.workers.kernels.fused",
                   "evomerge.workers.mergekit", "evomerge.evaluators.harness", "evomerge.storage.repository"):
        assert module in MODULES
    edges = {(i.source, i.target) for i in IMPORTS}
    assert ("evomerge.search.app.commands", "evomerge.search.controller") in edges
    assert ("evomerge.search.app.cli", "evomerge.search.app.reading") in edges  # a function-local import
    assert ("evomerge.search.controller", "evomerge.workers.pool") in edges


def test_search_core_imports_no_application() -> None:
    assert _violations(("evomerge.search",), (APP, *APP_LIBRARIES), exempt=(APP,)) == []


def test_workers_evaluators_storage_never_import_the_search() -> None:
    assert _violations(("evomerge.workers", "evomerge.evaluators", "evomerge.storage"), ("evomerge.search",)) == []


def test_evaluators_and_storage_never_import_the_workers() -> None:
    assert _violations(("evomerge.evaluators", "evomerge.storage"), ("evomerge.workers",)) == []


def test_the_kernels_import_nothing_above_them() -> None:
    """workers/kernels/ holds pure numerics: no recipe, registry, Ray or other layer."""
    kernels = "evomerge.workers.kernels"
    assert any(_within(m, kernels) for m in MODULES)
    above = [str(i) for i in IMPORTS if _within(i.source, kernels) and i.target.startswith("evomerge")
             and not _within(i.target, kernels)]
    assert above == []


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        if i.target in MODULES and i.target != i.source:
            graph[i.source].add(i.target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of modules (Tarjan), as one shortest cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(sorted(g)[0], graph, g) for g in groups]


def _cycle_through(start: str, graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``group`` (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def test_the_cycle_finder_finds_and_shows_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each: a -> b -> ... -> a):\n" + "\n".join(" -> ".join(c) for c in cycles)
