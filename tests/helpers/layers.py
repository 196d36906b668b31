"""The package layers of bigtrain and the checks on its import graph (used by tests/test_layering.py).

The edges are those of tests/helpers/imports.py: every import statement wherever it stands (eager, lazy,
TYPE_CHECKING), `from bigtrain import x` and relative imports resolved to modules, constant
`import_module("bigtrain...")` strings, `"-m", "bigtrain..."` subprocess arguments, lazy-export tables.

* Packages: the *package* of `bigtrain.a.b.c` is `a`; a top-level module (`bigtrain/errors.py`) is its own
  package `errors`; the root `bigtrain/__init__.py` has none. A package may import from its own layer or below,
  never from above (`upward_imports`), and the packages' graph has no cycle (`package_cycles`: siblings on one
  layer use each other in one direction only).
* Modules: the graph of modules has no cycle at all (`module_cycles`), eager or lazy, also inside one package. A
  lazy import hides a cycle from the interpreter but not from the design: the two modules are one unit. This
  includes a package's `__init__`: `bigtrain/x/__init__.py` importing `bigtrain.x.a` while `a.py` does
  `from bigtrain.x import b` (b a name defined by the `__init__`, not a module) is the cycle {bigtrain.x,
  bigtrain.x.a} — `a` runs while the `__init__` is half done, before b exists. (`from bigtrain.x import b` with b
  a *module* is an edge to `bigtrain.x.b` only, and no cycle: Python imports the submodule whatever state the
  `__init__` is in.)
* Names: no package or module anywhere under bigtrain/ is called components, common, utils, misc or helpers
  (`forbidden_packages`): a name has to say what is in it.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.imports import Edge, edges_of, modules_of

# Lowest first. The package root (bigtrain/__init__.py) is unranked. io: a top-level leaf module (atomic writes,
# fsync, hashing).
LAYERS: dict[str, int] = {
    "errors": 0, "io": 0,
    "config": 1,
    "compat": 2, "distributed": 2,
    "data": 3, "models": 3, "optim": 3,
    "parallel": 4,
    "planning": 5,
    "engine": 6,
    "checkpoint": 7,
    "inference": 8, "interop": 8,
    "train": 9,
    "cli": 10,
}

FORBIDDEN_NAMES = ("components", "common", "utils", "misc", "helpers")


def package_of(module: str) -> str | None:
    """'bigtrain.parallel.tensor' -> 'parallel'; None outside bigtrain or for the package root."""
    parts = module.split(".")
    if parts[0] != "bigtrain" or len(parts) < 2:
        return None
    return parts[1]


def packages_of(root: Path) -> set[str]:
    """Every package of the tree at `root` (the bigtrain directory), top-level modules included."""
    return {p for p in map(package_of, modules_of(root)) if p}


def package_edges(root: Path) -> dict[tuple[str, str], list[Edge]]:
    """{(importing package, imported package): [edges]} between different packages."""
    found: dict[tuple[str, str], list[Edge]] = {}
    for edge in edges_of(root):
        a, b = package_of(edge.source), package_of(edge.target)
        if a and b and a != b:
            found.setdefault((a, b), []).append(edge)
    return found


def upward_imports(root: Path) -> list[str]:
    """Packages missing from LAYERS, then every edge from a lower layer into a higher one, as
    'module:line imports target [how] (layer a=N < b=M)'."""
    problems = []
    edges = package_edges(root)
    for name in sorted(packages_of(root) | {p for pair in edges for p in pair}):
        if name not in LAYERS:
            users = sorted(a for a, b in edges if b == name)
            uses = sorted(b for a, b in edges if a == name)
            problems.append(f"package '{name}' has no layer in tests/helpers/layers.py "
                            f"(imported by {', '.join(users) or 'none'}; imports {', '.join(uses) or 'none'})")
    for (a, b), where in sorted(edges.items()):
        if a in LAYERS and b in LAYERS and LAYERS[b] > LAYERS[a]:
            problems += [f"{edge} (layer {a}={LAYERS[a]} < {b}={LAYERS[b]})" for edge in where]
    return problems


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: every strongly connected component of more than one node, each sorted, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def package_cycles(root: Path) -> list[list[str]]:
    """The cycles between packages: each strongly connected set of packages, sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in package_edges(root):
        graph.setdefault(a, set()).add(b)
    return strongly_connected(graph)


def module_cycles(root: Path) -> list[list[str]]:
    """The cycles between modules, eager or lazy edges alike: each strongly connected set of modules, sorted."""
    graph: dict[str, set[str]] = {}
    for edge in edges_of(root):
        graph.setdefault(edge.source, set()).add(edge.target)
    return strongly_connected(graph)


def cycle_edges(root: Path, cycle: list[str]) -> list[Edge]:
    """The edges that stay inside one cycle (to show where it is)."""
    members = set(cycle)
    return [edge for edge in edges_of(root) if edge.source in members and edge.target in members]


def forbidden_packages(root: Path) -> list[str]:
    """Packages and modules under `root` named after no content (FORBIDDEN_NAMES), as paths."""
    found = [path for path in root.rglob("*.py") if path.stem in FORBIDDEN_NAMES]
    found += [path for path in root.rglob("*") if path.is_dir() and path.name in FORBIDDEN_NAMES
              and any(path.glob("*.py"))]  # with or without __init__.py (a namespace package imports too)
    return sorted(str(path.relative_to(root.parent)) for path in found)
