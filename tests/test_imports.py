"""No import circles in mosld: the import graph built from the AST of every module, counting imports at module
level and inside functions alike (a lazy import that breaks a circle at run time still counts)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` under ``root`` (a package is its __init__)."""
    files = {}
    for path in (root / package).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (``from a import b`` counts as ``a.b`` when that is a
    module, else ``a``; parent packages that Python imports on the way are not counted)."""
    files = module_files(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        for target in targets:
            while target not in files and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in files and target != name:
                graph.setdefault(name, set()).add(target)
        graph.setdefault(name, set())
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each holds at least one circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_mosld_has_no_import_circles():
    graph = import_graph(REPO, "mosld")
    assert len(graph) > 50 and graph["mosld.training.module"] >= {"mosld.evaluation", "mosld.adapters.layer"}
    assert cycles(graph) == []


def test_a_circle_broken_by_a_lazy_import_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .a import f\n")
    (package / "sub" / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (package / "sub" / "b.py").write_text("def g():\n    from pkg.sub import a\n    return a\n")
    (package / "c.py").write_text("from .sub import f\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.c"] == {"pkg.sub"} and graph["pkg.sub"] == {"pkg.sub.a"}
    assert cycles(graph) == [["pkg.sub.a", "pkg.sub.b"]]


def test_the_library_does_not_import_the_command_line_tools():
    # mosld.tools holds the command-line tools (memory planner, lm-eval bridge); a library module that imported
    # one would pull in that tool's optional dependency (lm-eval) and make the tools a floor below the library.
    graph = import_graph(REPO, "mosld")
    tools = {name for name in graph if name == "mosld.tools" or name.startswith("mosld.tools.")}
    assert {"mosld.tools.memory", "mosld.tools.harness", "mosld.tools.harness_tasks"} <= tools
    assert {name: sorted(graph[name] & tools) for name in graph if name not in tools and graph[name] & tools} == {}
