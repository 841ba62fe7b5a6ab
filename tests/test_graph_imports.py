"""The modules of ``prunekit.graph``, and of the whole package, import each other without cycles
(function-level imports included): read from the source with ``ast``, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import prunekit

SRC = Path(prunekit.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str) -> dict[str, set[str]]:
    """``module -> modules it imports`` for every module of ``package`` (packages themselves
    left out: ``from prunekit.graph import latency`` is an import of the submodule)."""
    sub = package.split(".", 1)[1].replace(".", "/") if "." in package else ""
    files = {module_name(p): p for p in (SRC / sub).rglob("*.py")}
    modules = {name for name, p in files.items() if p.name != "__init__.py"}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name in modules:
        for node in ast.walk(ast.parse(files[name].read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for t in targets:
                if t in modules and t != name:
                    edges[name].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_modules_import_without_cycles() -> None:
    edges = import_graph("prunekit.graph")
    assert "prunekit.graph.tracer" in edges["prunekit.graph.ops"]  # the reader sees imports
    assert "prunekit.graph.latency" in edges["prunekit.graph.pruner"]
    assert cycles(edges) == []


def test_no_module_of_prunekit_imports_itself_back() -> None:
    """The whole package, across its folders (recipes, analysis, calibrate, compress, ...)."""
    edges = import_graph("prunekit")
    assert "prunekit.analysis.sensitivity" in edges  # modules of every folder are read
    assert "prunekit.prune" in edges["prunekit.analysis.sensitivity"]
    assert cycles(edges) == []
