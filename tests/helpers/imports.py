"""The import edges between the modules of bigtrain, read from source with `ast` (used by tests/helpers/layers.py).

A *module* is one file: `bigtrain/engine/local.py` is `bigtrain.engine.local`, `bigtrain/data/__init__.py` is
`bigtrain.data`, `bigtrain/cli/__main__.py` is `bigtrain.cli.__main__`. An edge `Edge(source, line, target, how)`
says that running `source` may import `target`. Every construct below counts, wherever it stands in the file —
module level ("eager"), inside a function or lambda ("lazy"), under `if TYPE_CHECKING:` ("TYPE_CHECKING"):

* `import bigtrain.x.y` -> `bigtrain.x.y`.
* `from bigtrain.x import y` -> `bigtrain.x.y` if that is a module of the tree (a file, or a package's
  `__init__.py`), else `bigtrain.x` (y is an attribute of `bigtrain.x`, so its `__init__` has to run and define
  y). So `from bigtrain import engine` -> `bigtrain.engine`, and `from bigtrain import __version__` -> `bigtrain`.
  `from bigtrain.x import *` -> `bigtrain.x`.
* Relative imports are resolved against the importing module's package (a package's `__init__.py` is its own
  package: `from . import a` in `bigtrain/x/__init__.py` is `bigtrain.x.a`), then the rule above:
  `from .. import models` in `bigtrain/config/checks.py` -> `bigtrain.models`.
* `importlib.import_module("bigtrain.x")`, `import_module(...)`, `__import__("bigtrain.x")` with a constant
  string -> `bigtrain.x`; a relative name (`import_module(".y", "bigtrain.x")`, or with `__package__`) is resolved.
* A subprocess launch: in a list or tuple literal, a constant string `"bigtrain..."` right after a `"-m"` element
  (`[sys.executable, "-m", "bigtrain.cli.convert_worker", ...]`) -> that module, or its `__main__` when it is a
  package with one (what `python -m package` runs).
* A lazy-export table (PEP 562, as `_EXPORTS` in bigtrain/data/__init__.py): a constant string value of a dict
  literal that is the name of a module of the tree -> that module. (Only existing modules: a dict value is not an
  import by construction, as the forms above are, so the checker does not guess at other strings.)

Names that are not modules of the tree are kept as written (a planted `import bigtrain.engine.local` is an edge to
`bigtrain.engine.local` even where that file is absent). Importing `bigtrain.x.y` also runs `bigtrain.x`'s
`__init__`; that implicit step is *not* an edge (within a package it is already under way; from outside, the
package layering covers it). Edges of a module to itself are dropped. Not seen: a module name built at run time
(`import_module(variable)`, an f-string after `-m`), `runpy`, shell command strings, the `bigtrain` console script.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, order=True)
class Edge:
    source: str  # the importing module
    line: int
    target: str  # the imported module
    how: str  # "eager", "lazy", "TYPE_CHECKING", each prefixed by "import_module, ", "-m, ", "export table, "

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target} [{self.how}]"


def module_name(root: Path, path: Path) -> str:
    """bigtrain/engine/local.py -> 'bigtrain.engine.local'; bigtrain/data/__init__.py -> 'bigtrain.data'."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_of(root: Path) -> dict[str, Path]:
    """{module name: file} for every .py file under `root` (the bigtrain directory)."""
    return {module_name(root, path): path for path in sorted(root.rglob("*.py"))}


def _is_bigtrain(name: str) -> bool:
    return name == "bigtrain" or name.startswith("bigtrain.")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, context: str = "eager"):
    """Every node below `node` with its context: 'eager', 'lazy' (in a function body) or 'TYPE_CHECKING'."""
    for child in ast.iter_child_nodes(node):
        inner = context
        if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
            inner = "TYPE_CHECKING"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and context == "eager":
            inner = "lazy"
        yield child, inner
        yield from _walk(child, inner)


def _constant_str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _resolve_relative(name: str, level: int, package: str) -> str:
    """`from ..x import` (level 2, name 'x') in package 'bigtrain.config' -> 'bigtrain.x'."""
    base = package.split(".")
    base = base[:len(base) - level + 1]
    return ".".join(base + ([name] if name else []))


def _import_module_target(call: ast.Call, package: str) -> str | None:
    """The module a constant `import_module(...)` / `__import__(...)` call names, if any."""
    func = call.func
    called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if called not in ("import_module", "__import__") or not call.args:
        return None
    name = _constant_str(call.args[0])
    if name is None or not name.startswith(".") or called == "__import__":
        return name
    anchor = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "package"),
                                                           None)
    base = package if isinstance(anchor, ast.Name) and anchor.id == "__package__" else _constant_str(anchor)
    if base is None:
        return None
    level = len(name) - len(name.lstrip("."))
    return _resolve_relative(name[level:], level, base)


def edges_of(root: Path) -> list[Edge]:
    """Every import edge (see the module docstring) between the modules of the package at `root`, sorted."""
    modules = modules_of(root)
    found: set[Edge] = set()
    for source, path in modules.items():
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]

        def add(target: str, line: int, how: str, source: str = source) -> None:
            if _is_bigtrain(target) and target != source:
                found.add(Edge(source, line, target, how))

        def module_or_attribute(base: str, name: str) -> str:
            return f"{base}.{name}" if f"{base}.{name}" in modules else base

        for node, context in _walk(ast.parse(path.read_text(), filename=str(path))):
            line = getattr(node, "lineno", 0)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, line, context)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_relative(node.module or "", node.level, package) if node.level else node.module
                for alias in node.names:
                    add(base if alias.name == "*" else module_or_attribute(base, alias.name), line, context)
            elif isinstance(node, ast.Call) and (target := _import_module_target(node, package)):
                add(target, line, f"import_module, {context}")
            elif isinstance(node, (ast.List, ast.Tuple)):
                for flag, value in zip(node.elts, node.elts[1:], strict=False):
                    target = _constant_str(value) if _constant_str(flag) == "-m" else None
                    if target:
                        main = f"{target}.__main__"
                        add(main if main in modules else target, value.lineno, f"-m, {context}")
            elif isinstance(node, ast.Dict):
                for value in node.values:
                    if (target := _constant_str(value)) in modules:
                        add(target, value.lineno, f"export table, {context}")
    return sorted(found)
