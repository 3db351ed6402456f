"""The package's shape: no import cycle between its modules (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "orchestrator"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Package modules imported by ``path`` anywhere (functions too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imports_of(path, set(files)) - {name} for name, path in files.items()}
    for name in graph:  # a package's __init__ is not an edge worth a cycle
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


TORCH = ("torch", "mlflow.pytorch")
"""Imports that load torch (``mlflow.pytorch`` imports it)."""


def runtime_imports(path: Path) -> set[str]:
    """Every module name ``path`` imports at run time (functions too; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update([node.module, *(f"{node.module}.{a.name}" for a in node.names)])
    return found


def loads_torch(path: Path) -> list[str]:
    return sorted(n for n in runtime_imports(path) if any(n == t or n.startswith(t + ".") for t in TORCH))


def test_torch_is_imported_only_under_training() -> None:
    """The coordinator never imports torch: only orchestrator/training/ (and the models/ package) do."""
    outside = {str(p.relative_to(PACKAGE.parent)): loads_torch(p) for p in PACKAGE.rglob("*.py")
               if "training" not in p.relative_to(PACKAGE).parts}
    assert {k: v for k, v in outside.items() if v} == {}
    assert loads_torch(PACKAGE / "training" / "serving.py"), "the finder sees torch where it is imported"


def test_the_torch_finder_sees_a_lazy_import(tmp_path: Path) -> None:
    lazy = tmp_path / "lazy.py"
    lazy.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n\n"
                    "def f():\n    import mlflow.pytorch\n    from torch import nn\n")
    assert loads_torch(lazy) == ["mlflow.pytorch", "torch", "torch.nn"]


ROOMS = {"campaign", "simrunner", "services", "tracksink", "pictures", "twin", "continual", "walltime", "diskfull"}
"""The loop's rooms: orchestrator/loop/."""
PARTS_OF_THEIR_OWN = {"orchestrator.policy"}
"""Top-level modules only the loop imports that are parts of their own (DESIGN.md: the pure policy)."""


def loop_strays(graph: dict[str, set[str]]) -> list[str]:
    """Top-level modules that only the loop's modules import: loop helpers outside orchestrator/loop/."""
    importers: dict[str, set[str]] = {}
    for importer, imported in graph.items():
        for name in imported:
            importers.setdefault(name, set()).add(importer)
    return sorted(m for m, who in importers.items()
                  if m.count(".") == 1 and m not in PARTS_OF_THEIR_OWN
                  and all(i.startswith("orchestrator.loop.") for i in who))


def test_the_loops_rooms_live_in_its_package() -> None:
    assert {p.stem for p in (PACKAGE / "loop").glob("*.py")} >= ROOMS
    assert sorted(m for m in ROOMS if (PACKAGE / f"{m}.py").exists()) == []
    assert loop_strays(import_graph()) == []


def test_the_finder_sees_a_loop_helper_at_the_top() -> None:
    graph = {"orchestrator.loop.campaign": {"orchestrator.retries", "orchestrator.config"},
             "orchestrator.runner": {"orchestrator.config", "orchestrator.loop.campaign"}}
    assert loop_strays(graph) == ["orchestrator.retries"]
