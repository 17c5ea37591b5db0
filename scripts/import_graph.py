"""Measure tvtool's import graph between its packages (python scripts/import_graph.py).

A *unit* is a sub-package of ``tvtool`` (``tvtool/merge/``) or a top-level module
(``tvtool/grid.py``); ``tvtool/__init__.py`` and ``__main__.py`` are left out. Every
``import`` / ``from ... import`` of another unit is an edge, wherever it stands: at module level,
under ``if TYPE_CHECKING:``, or inside a function. The script prints:

* depth: the number of units on the longest chain of unit-to-unit imports (all edges), and the
  chain itself; ``--layers`` prints every unit with its floor (1 = imports no other unit);
* cycles: strongly connected groups of units that import each other (then depth is measured on
  the graph with each group collapsed to one unit, and the script says so);
* upward imports: edges against the declared layer order of :data:`LAYERS` (``--check`` fails
  on any);
* function-level imports of another unit that dodge a cycle: the same edge at module level
  would close a cycle between units.

Function-level imports that dodge nothing (lazy imports that keep ``tvtool --help`` fast, or
optional dependencies) are counted but not flagged. Exit status with ``--check``: 1 when there
is a cycle, an upward import or a dodging function-level import, or ``--max-depth`` is exceeded.
Only the standard library is used; nothing of tvtool is imported.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "tvtool"

# Declared layers, bottom (0) to top. A unit may import units of its own layer or lower ones.
# Units not named here are reported as "unplaced".
LAYERS: list[set[str]] = [
    {"errors", "types", "cards", "grid", "progress"},
    {"limits", "device", "threads"},
    {"io", "metadata", "metrics"},
    {"models", "linearize", "formats", "vectors", "synthetic_world"},
    {"data"},
    {"finetune", "merge", "atlas", "commands"},
    {"evaluate"},
    {"workflows"},
    {"demo"},
    {"cli"},
]


@dataclass(frozen=True)
class Edge:
    """One import of unit ``target`` by a module of unit ``source``."""

    source: str
    target: str
    module: str
    line: int
    level: str  # "module", "type-checking" or "function"
    target_module: str = ""


def unit_of(module: str) -> str | None:
    """``tvtool.merge.engine`` -> ``merge``; ``tvtool`` itself -> None."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2 or parts[1] in ("__init__", "__main__"):
        return None
    return parts[1]


def _is_unit(name: str) -> bool:
    return (ROOT / PACKAGE / name / "__init__.py").exists() or (
        ROOT / PACKAGE / f"{name}.py").exists()


def _is_module(name: str) -> bool:
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return False
    base = ROOT.joinpath(*parts)
    return (base / "__init__.py").exists() or base.with_suffix(".py").exists()


def module_name(path: Path) -> str:
    """``tvtool/merge/engine.py`` -> ``tvtool.merge.engine``."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def edges_of(path: Path) -> list[Edge]:
    """Imports of other tvtool units made by one file."""
    module = module_name(path)
    source = unit_of(module)
    if source is None:
        return []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Edge] = []

    def visit(node: ast.AST, level: str) -> None:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path.name == "__init__.py", node)
            # from a package import a sub-module: the edge goes to the sub-module
            targets = [f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base
                       for alias in node.names]
        for target in dict.fromkeys(targets):
            unit = unit_of(target)
            if unit is not None and _is_unit(unit) and target != module:
                found.append(Edge(source, unit, module, node.lineno, level, target))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            level = "function"
        if isinstance(node, ast.If) and level == "module" and _is_type_checking(node):
            for child in node.body:
                visit(child, "type-checking")
            for child in node.orelse:
                visit(child, level)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, level)

    visit(tree, "module")
    return found


def all_edges() -> list[Edge]:
    """Every import of a tvtool unit in the package."""
    edges: list[Edge] = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        edges += edges_of(path)
    return edges


def units() -> list[str]:
    """Sub-packages and top-level modules of tvtool."""
    names = set()
    for path in (ROOT / PACKAGE).iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            names.add(path.name)
        elif path.suffix == ".py" and path.stem not in ("__init__", "__main__"):
            names.add(path.stem)
    return sorted(names)


def strongly_connected(nodes: list[str], graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; groups of more than one unit are cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            groups.append(sorted(group))

    for v in nodes:
        if v not in index:
            connect(v)
    return groups


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    """Whether ``goal`` can be reached from ``start``."""
    seen, todo = {start}, [start]
    while todo:
        v = todo.pop()
        if v == goal:
            return True
        for w in graph.get(v, set()) - seen:
            seen.add(w)
            todo.append(w)
    return False


def measure() -> dict[str, object]:
    """Everything the script reports, as one JSON-able document."""
    nodes = units()
    edges = all_edges()
    graph: dict[str, set[str]] = defaultdict(set)
    static: dict[str, set[str]] = defaultdict(set)
    modules: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        if e.level != "function":
            modules[e.module].add(e.target_module)
        if e.source == e.target:
            continue
        graph[e.source].add(e.target)
        if e.level != "function":
            static[e.source].add(e.target)
    for n in nodes:
        graph[n], static[n] = graph[n], static[n]

    groups = strongly_connected(nodes, graph)
    cycles = [g for g in groups if len(g) > 1]
    group_of = {v: "+".join(g) for g in groups for v in g}
    collapsed: dict[str, set[str]] = defaultdict(set)
    for v, ws in graph.items():
        for w in ws:
            if group_of[v] != group_of[w]:
                collapsed[group_of[v]].add(group_of[w])

    floor: dict[str, int] = {}
    below: dict[str, str | None] = {}

    def height(v: str) -> int:
        if v not in floor:
            best, via = 0, None
            for w in sorted(collapsed[v]):
                if height(w) > best:
                    best, via = height(w), w
            floor[v], below[v] = best + 1, via
        return floor[v]

    for g in set(group_of.values()):
        height(g)
    top = max(floor, key=lambda g: (floor[g], g))
    chain: list[str] = []
    at: str | None = top
    while at is not None:
        chain.append(at)
        at = below[at]

    layer_of = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    upward = [e for e in edges if e.source in layer_of and e.target in layer_of
              and layer_of[e.target] > layer_of[e.source]]
    unplaced = [u for u in nodes if u not in layer_of]
    function_level = [e for e in edges if e.level == "function"]
    edges = [e for e in edges if e.source != e.target]
    dodging = [e for e in function_level
               if (e.source != e.target and reaches(static, e.target, e.source))
               or reaches(modules, e.target_module, e.module)]
    return {
        "units": len(nodes),
        "edges": len({(e.source, e.target) for e in edges}),
        "depth": floor[top],
        "longest_chain": chain,
        "floors": {g: floor[g] for g in sorted(floor, key=lambda g: (-floor[g], g))},
        "cycles": cycles,
        "upward_imports": [f"{e.module}:{e.line} -> {e.target}" for e in upward],
        "unplaced_units": unplaced,
        "function_level_imports": len([e for e in function_level if e.source != e.target]),
        "function_level_imports_dodging_a_cycle": [
            f"{e.module}:{e.line} -> {e.target}" for e in dodging],
    }


def main(argv: list[str] | None = None) -> int:
    """Print the report; with ``--check``, the exit status says whether it passes."""
    global ROOT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    parser.add_argument("--layers", action="store_true", help="print every unit's floor")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a cycle, an upward or dodging import, or too deep a graph")
    parser.add_argument("--max-depth", type=int, default=10)
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="checkout to measure (default: the one this script is in)")
    args = parser.parse_args(argv)
    ROOT = args.root.resolve()
    report = measure()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"depth {report['depth']} ({report['units']} units, {report['edges']} edges): "
              + " -> ".join(report["longest_chain"]))  # type: ignore[arg-type]
        print(f"cycles: {report['cycles'] or 'none'}")
        print(f"upward imports: {len(report['upward_imports'])}")  # type: ignore[arg-type]
        for line in report["upward_imports"]:  # type: ignore[attr-defined]
            print(f"  {line}")
        dodging = report["function_level_imports_dodging_a_cycle"]
        print(f"function-level imports: {report['function_level_imports']}, "
              f"dodging a cycle: {len(dodging)}")  # type: ignore[arg-type]
        for line in dodging:  # type: ignore[attr-defined]
            print(f"  {line}")
        if report["unplaced_units"]:
            print(f"units in no declared layer: {report['unplaced_units']}")
        if args.layers:
            for unit, floor in report["floors"].items():  # type: ignore[attr-defined]
                print(f"  floor {floor:2d}  {unit}")
    if args.check and (report["cycles"] or report["upward_imports"]
                       or report["function_level_imports_dodging_a_cycle"]
                       or int(report["depth"]) > args.max_depth):  # type: ignore[call-overload]
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
