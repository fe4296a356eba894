"""The layering holds: the import-linter contracts in pyproject.toml pass, a forbidden import breaks
them, and no import cycle exists outside the engine but the named ones.

Every import counts: those under ``if TYPE_CHECKING:`` (import-linter's
``exclude_type_checking_imports`` is false, grimp's default too) and those made inside functions,
since one of them moved to the top is all an ImportError takes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest

import apigate

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(apigate.__file__).resolve().parent

# The engine's hot modules hold each other's concrete classes, so that mypyc compiles their calls
# to direct calls: the one cycle the layering allows, inside apigate.engine only.
ENGINE_CYCLE = frozenset(
    {
        "apigate.engine.balancers",
        "apigate.engine.builtin",
        "apigate.engine.client",
        "apigate.engine.exchange",
        "apigate.engine.plan",
        "apigate.engine.server",
        "apigate.engine.upstream",
    }
)

# Import cycles outside the engine known today, each with the work that removes it. Empty: a new
# cycle fails test_no_import_cycles_but_the_named_ones; keep it so.
KNOWN_CYCLES: frozenset[frozenset[str]] = frozenset()


def lint_imports(source_root: Path) -> subprocess.CompletedProcess[str]:
    """Run ``lint-imports`` with the repository's contracts on the apigate found under source_root."""
    command = [
        sys.executable,
        "-c",
        "from importlinter.cli import lint_imports_command; lint_imports_command()",
    ]
    return subprocess.run(
        [*command, "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=source_root,
        # A wide console, so that no contract's name is wrapped in the report.
        env={**os.environ, "PYTHONPATH": str(source_root), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def import_cycles(graph: grimp.ImportGraph) -> set[frozenset[str]]:
    """Every strongly connected component of more than one module (Tarjan's, without recursion)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: set[frozenset[str]] = set()
    work: list[tuple[str, Iterator[str]]] = []  # the depth-first path, each with its imports to visit

    def visit(module: str) -> None:
        index[module] = lowlink[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        work.append((module, iter(sorted(graph.find_modules_directly_imported_by(module)))))

    for root in sorted(graph.modules):
        if root in index:
            continue
        visit(root)
        while work:
            module, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    visit(target)
                elif target in on_stack:
                    lowlink[module] = min(lowlink[module], index[target])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[module])
            if lowlink[module] == index[module]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == module:
                        break
                if len(component) > 1:
                    cycles.add(frozenset(component))
    return cycles


def test_the_contracts_hold() -> None:
    result = lint_imports(PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ", 0 broken." in result.stdout


@pytest.mark.parametrize(
    "bad_import",
    [
        "import apigate.config.models\n",
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import apigate.config.models\n",
    ],
    ids=["at-the-top", "under-type-checking"],
)
def test_a_forbidden_import_breaks_the_engine_contract(tmp_path: Path, bad_import: str) -> None:
    shutil.copytree(PACKAGE, tmp_path / "apigate", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    router = tmp_path / "apigate" / "engine" / "router.py"
    router.write_text(router.read_text() + "\n" + bad_import)

    result = lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "The engine imports no layer above it (it may import apigate.httpspec) BROKEN" in result.stdout
    assert "apigate.engine.router -> apigate.config.models" in result.stdout


def test_the_cycle_finder_finds_every_cycle() -> None:
    graph = grimp.ImportGraph()
    for importer, imported in [
        ("a", "b"),
        ("b", "c"),
        ("c", "a"),
        ("c", "d"),
        ("d", "e"),
        ("e", "d"),
        ("f", "a"),
    ]:
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph) == {frozenset("abc"), frozenset("de")}


def test_no_import_cycles_but_the_named_ones() -> None:
    graph = grimp.build_graph("apigate", exclude_type_checking_imports=False, cache_dir=None)
    cycles = import_cycles(graph)
    engine = {cycle for cycle in cycles if all(module.startswith("apigate.engine.") for module in cycle)}
    outside = cycles - engine

    assert not outside - KNOWN_CYCLES, f"new import cycles: {sorted(map(sorted, outside - KNOWN_CYCLES))}"
    assert not KNOWN_CYCLES - outside, (
        f"cycles gone, remove them from KNOWN_CYCLES: {sorted(map(sorted, KNOWN_CYCLES - outside))}"
    )
    assert all(cycle <= ENGINE_CYCLE for cycle in engine), (
        f"an engine cycle beyond ENGINE_CYCLE: {sorted(map(sorted, engine))}"
    )
    assert engine == {ENGINE_CYCLE}, (
        f"the engine's cycle shrank, shrink ENGINE_CYCLE: {sorted(map(sorted, engine))}"
    )
