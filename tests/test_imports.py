"""No import circle between the files of the installed package, and no core module imports an upper layer.

The graph is built from the source (AST) of every file of every package that setup.cfg installs, found where
the installed package has it: ``import a.b``, ``from . import x`` (an edge to the submodule ``x`` when there is
one, else to the package) and ``from .x import y``, at module level and inside functions. Only the
``if TYPE_CHECKING:`` blocks, which never run, are left out.
"""

from __future__ import annotations

import ast
import configparser
import importlib.util
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
Graph = Dict[str, Set[str]]


def installed_files() -> Dict[str, Path]:
    """Module name -> file, for every ``*.py`` of the packages setup.cfg installs, where Python finds them."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    files: Dict[str, Path] = {}
    for package in config["options"]["packages"].split():
        for folder in importlib.util.find_spec(package).submodule_search_locations:
            for path in Path(folder).glob("*.py"):
                files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return files


def _imports(tree: ast.AST) -> List[ast.stmt]:
    """Every import statement of ``tree``, nested ones included, but not those under ``if TYPE_CHECKING:``."""
    found: List[ast.stmt] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            todo.append(child)
    return found


def import_graph(files: Dict[str, Path]) -> Graph:
    """Module -> the modules of ``files`` it imports."""
    graph: Graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: Set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module = alias.name
                    while module and module not in files:  # import a.b.c: the deepest module of ours
                        module = module.rpartition(".")[0]
                    if module:
                        edges.add(module)
                continue
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{node.module}" if node.module else anchor
            for alias in node.names:
                if f"{base}.{alias.name}" in files:  # from package import submodule
                    edges.add(f"{base}.{alias.name}")
                elif base in files:
                    edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: Graph) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: Graph, start: str) -> Set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


@pytest.fixture(scope="module")
def files() -> Dict[str, Path]:
    return installed_files()


def test_every_package_folder_is_installed(files):
    """A folder with an ``__init__.py`` inside an installed package is itself listed in setup.cfg."""
    folders = {path.parent for path in files.values()}
    nested = {p.parent for folder in folders for p in folder.glob("*/__init__.py")}
    assert nested <= folders, sorted(map(str, nested - folders))
    assert {"backprop_hooks.plotting.maps", "backprop_hooks.eval.explain", "backprop_hooks.rules.lrp"} <= set(files)


def test_no_import_circle(files):
    assert cycles(import_graph(files)) == []


def test_the_core_imports_no_upper_layer(files):
    """Imports go down: the core (attach, targets, Explanation, methods, plotting, ...) never reaches models or
    eval, not even through a function-level import."""
    graph = import_graph(files)
    upper = ("backprop_hooks.eval", "backprop_hooks.models")
    core = [
        m
        for m in files
        if not m.startswith(upper + ("backprop_hooks.rules", "backprop_hooks.cli", "backprop_hooks.__main__"))
    ]
    assert "backprop_hooks.explanation" in core and "backprop_hooks.plotting.explanations" in core
    for module in core:
        reached = sorted(m for m in reachable(graph, module) if m.startswith(upper))
        assert not reached, (module, reached)


def test_the_checker_finds_circles(tmp_path):
    """The checker itself: a circle through a function-level import and a ``from . import`` is found, a
    TYPE_CHECKING import is not an edge, and a chain without a circle passes."""
    (tmp_path / "pkg").mkdir()
    sources = {
        "__init__": "from . import a\n",
        "a": "from .b import thing\n",
        "b": "def thing():\n    from . import a\n    return a\n",
        "c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import x\n",
        "d": "from .c import TYPE_CHECKING\n",
    }
    files = {}
    for stem, text in sources.items():
        (tmp_path / "pkg" / f"{stem}.py").write_text(text)
        files["pkg" if stem == "__init__" else f"pkg.{stem}"] = tmp_path / "pkg" / f"{stem}.py"
    graph = import_graph(files)
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == set() and graph["pkg.d"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
