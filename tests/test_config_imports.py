"""The config layer depends one way: its leaves import nothing of apigate, and no config module
but ``config.compile`` is on an import cycle. Every import counts: ``TYPE_CHECKING`` ones and
those made inside functions, since one of them moved to the top is all an ImportError takes."""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
LEAVES = ("config.issues", "config.validators", "config.units", "config.headernames")
ACYCLIC = (*LEAVES, "config.models", "config.check", "config.loader", "webhooks.config")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in (SRC / "apigate").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _import_graph() -> dict[str, set[str]]:
    """Each apigate module and the apigate modules it imports anywhere in its text."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        named: list[str] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                named.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                named.extend(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = {
            target for name in named if name.startswith("apigate.") and (target := resolve(name)) != module
        } - {None}
    return graph


GRAPH = _import_graph()


@pytest.mark.parametrize("leaf", LEAVES)
def test_config_leaves_import_nothing_of_apigate(leaf: str) -> None:
    assert GRAPH[f"apigate.{leaf}"] == set()


def _cycle_through(start: str) -> list[str] | None:
    """The shortest chain of imports from ``start`` back to itself, or None."""
    parents: dict[str, str] = {}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        for target in sorted(GRAPH[current]):
            if target == start:
                chain = [current]
                while chain[-1] != start:
                    chain.append(parents[chain[-1]])
                return [*reversed(chain), start]
            if target not in parents:
                parents[target] = current
                queue.append(target)
    return None


@pytest.mark.parametrize("module", ACYCLIC)
def test_config_module_is_on_no_import_cycle(module: str) -> None:
    cycle = _cycle_through(f"apigate.{module}")
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())
