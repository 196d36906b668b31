"""The package layers of bigtrain and a checker of the imports between them (used by tests/test_layering.py).

A package may import from its own layer or below, never from above; and the graph of imports between packages
has no cycle (siblings on one layer may use each other in one direction only).
"""

from __future__ import annotations

import ast
from pathlib import Path

# Lowest first. The package root (bigtrain/__init__.py) is unranked.
LAYERS: dict[str, int] = {
    "errors": 0,
    "config": 1,
    "compat": 2, "components": 2, "distributed": 2,
    "data": 3, "models": 3, "optim": 3,
    "parallel": 4,
    "engine": 5, "interop": 5, "planning": 5,
    "train": 6,
    "cli": 7,
}


def package_of(module: str) -> str | None:
    """'bigtrain.parallel.tensor' -> 'parallel'; None outside bigtrain or for the package root."""
    parts = module.split(".")
    if parts[0] != "bigtrain" or len(parts) < 2:
        return None
    return parts[1]


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(root: Path) -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import in the package at `root` (the bigtrain
    directory), wherever it stands: module level, inside functions (lazy imports), under TYPE_CHECKING."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(root, path)
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(module, alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = module.split(".")
                    if path.name != "__init__.py":
                        base = base[:-1]
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found.append((module, target, node.lineno))
    return found


def package_edges(root: Path) -> dict[tuple[str, str], list[str]]:
    """{(importing package, imported package): ['module:line', ...]} between different packages."""
    edges: dict[tuple[str, str], list[str]] = {}
    for source, target, line in imports_of(root):
        a, b = package_of(source), package_of(target)
        if a and b and a != b:
            edges.setdefault((a, b), []).append(f"{source}:{line} imports {target}")
    return edges


def upward_imports(root: Path) -> list[str]:
    """Imports from a lower layer into a higher one, and packages missing from LAYERS."""
    problems = []
    for (a, b), where in sorted(package_edges(root).items()):
        for name in (a, b):
            if name not in LAYERS:
                problems.append(f"package '{name}' has no layer in tests/helpers/layers.py ({where[0]})")
        if a in LAYERS and b in LAYERS and LAYERS[b] > LAYERS[a]:
            problems += [f"{w} (layer {a}={LAYERS[a]} < {b}={LAYERS[b]})" for w in where]
    return sorted(set(problems))


def package_cycles(root: Path) -> list[list[str]]:
    """Cycles in the package import graph (each as the list of packages around it)."""
    graph: dict[str, set[str]] = {}
    for a, b in package_edges(root):
        graph.setdefault(a, set()).add(b)
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles
