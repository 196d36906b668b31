"""Docs that cannot go stale silently (issue 24, item 7), part 1: what README.md and docs/*.md say about the tree.

Each test compares an enumeration in the docs with what it enumerates, so that a renamed, added or removed
package, module, test, preset or mark fails here until the docs say so: README's "Where things live" table
against bigtrain/, every path, dotted name and test name a doc mentions against the repository, the presets
against configs/, the layer table of docs/architecture.md against tests/helpers/layers.py and its drawings of a
run and of a step against the names the code defines, the test tiers against pyproject.toml and the Makefile.
Part 2 (engines, metrics fields, command synopses) is tests/test_docs_code.py. Everything here reads files and
imports modules: no process starts.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

from tests.helpers.layers import LAYERS
from tests.helpers.markdown import DOCS, REPO, code_lines, section, spans, tables

README = REPO / "README.md"
PACKAGE = REPO / "bigtrain"
TOP_DIRS = ("bigtrain", "tests", "bench", "configs", "launch", "slurm", "docs")
FILE = re.compile(r"^[\w.-][\w./-]*(\.(py|md|yaml|sh|sbatch)|/)$")  # a file or folder a doc names in a span
PROSE = {"DeepSpeed", "PyTorch", "TensorBoard", "ZeRO"}  # CamelCase words of prose, not names of the code
GENERATED = ("bench/results/",)  # written by benchmark runs that may not have happened on this machine


def where_table() -> list[tuple[str, str]]:
    """README's "Where things live": (path, job) per row."""
    table = tables(README, section(README.read_text(), "## Where things live"))[0]
    assert table.header == ["path", "job"], table.header
    return [(row[0], row[1]) for row in table.rows]


def row_dirs(path_cell: str) -> list[Path]:
    """The repository paths a row is about (`bigtrain/config/`, `launch/train.py`, ...)."""
    return [REPO / s for s in spans(path_cell)]


def resolve(name: str, base: Path) -> Path:
    """A name a row's job cell gives: from the repository root when it starts with a top-level folder
    (`configs/smoke.yaml`), else relative to the row's folder (`deepspeed/wrap.py` in `bigtrain/engine/`)."""
    return REPO / name if name.split("/")[0] in TOP_DIRS else base / name


def package_entries() -> set[str]:
    """Every package directory and top-level module of bigtrain/, as README writes them."""
    entries = {f"bigtrain/{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    return entries | {f"bigtrain/{p.name}" for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}


def test_where_things_live_has_a_row_for_every_package_and_top_level_module():
    """A package or top-level module added to (or removed from) bigtrain/ must get (or lose) its row; the rows
    come lowest layer first."""
    listed = [s for path, _ in where_table() for s in spans(path) if s.startswith("bigtrain/")]
    rows = set(listed)
    assert rows == package_entries(), (f"without a row in README's 'Where things live': "
                                       f"{sorted(package_entries() - rows)}; rows for what bigtrain/ does not hold: "
                                       f"{sorted(rows - package_entries())}")
    layers = [LAYERS[name.split("/")[1].removesuffix(".py")] for name in listed]
    assert layers == sorted(layers), f"the rows are not lowest layer first (tests/helpers/layers.py): {listed}"


def test_every_file_the_where_things_live_table_names_exists_where_its_row_says():
    """`foo.py` and `dir/` in a row's job are looked up in the row's folder (a top-level folder's path from the
    repository root): a renamed or moved file fails here."""
    missing = []
    for path, job in where_table():
        base = row_dirs(path)[0]
        base = base if base.is_dir() else base.parent
        missing += [f"{path}: {name}" for name in spans(job) if FILE.match(name) and not resolve(name, base).exists()]
    assert not missing, "README's 'Where things live' names files that do not exist:\n" + "\n".join(missing)


def test_every_module_of_a_package_is_named_in_its_row():
    """A module added to a package (or renamed) must be named in the package's row: `foo.py`, or `sub/foo.py`
    in a subpackage (`__init__.py` files need not be)."""
    unnamed = []
    for path, job in where_table():
        folder = row_dirs(path)[0]
        if not (folder.is_dir() and folder.parent == PACKAGE):
            continue
        named = {resolve(name, folder) for name in spans(job) if FILE.match(name)}
        unnamed += [str(m.relative_to(REPO)) for m in sorted(folder.rglob("*.py"))
                    if m.name != "__init__.py" and "__pycache__" not in m.parts and m not in named]
    assert not unnamed, "modules that README's 'Where things live' does not name in their row:\n" + "\n".join(unnamed)


def test_readme_names_every_doc():
    """docs/*.md, each named in the `docs/` row (and no doc that is gone)."""
    (job,) = [job for path, job in where_table() if spans(path) == ["docs/"]]
    named = {name for name in spans(job) if name.endswith(".md") and "/" not in name}
    docs = {p.name for p in (REPO / "docs").glob("*.md")}
    assert named == docs, (f"README's docs/ row lacks {sorted(docs - named)} and names {sorted(named - docs)}, "
                           f"which docs/ does not hold")


def mentioned_paths(path: Path) -> list[tuple[int, str]]:
    """(line, path) for every repository path a doc mentions, in prose or code: `bigtrain/...`, `tests/...`,
    `engine/step.py` (a package of bigtrain), `deepspeed/wrap.py` or `step.py` (somewhere under bigtrain/)."""
    packages = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()]
    prefixes = "|".join(TOP_DIRS + tuple(packages))
    pattern = re.compile(rf"(?<![\w./-])((?:{prefixes})/[\w./-]*|[\w][\w/.-]*\.py\b)")
    found = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        for m in pattern.finditer(line):
            name = m.group(1).rstrip(".,:)")
            checked = (".py", "/", ".md", ".yaml", ".sh", ".sbatch", ".json") if "/" in name else (".py",)
            if name.endswith(checked) and not name.startswith(GENERATED):
                found.append((n, name))
    return found


def exists(name: str) -> bool:
    """`name` from the repository root, from bigtrain/ (a package-relative path), or, for a bare or relative
    module path, as the end of some file's path in the repository."""
    first = name.split("/")[0]
    if first in TOP_DIRS:
        return (REPO / name).exists()
    if (PACKAGE / first).is_dir() and "/" in name:
        return (PACKAGE / name).exists()
    if not name.endswith(".py"):
        return True  # a folder that is not the repository's (run.dir's checkpoints/, an output folder)
    return any(str(p).endswith("/" + name) for top in ("bigtrain", "tests", "bench", "launch")
               for p in (REPO / top).rglob("*.py"))


def test_every_path_a_doc_mentions_exists():
    """Old homes (`components/`, `engine/ds_config.py`, `train/generate.py`, ...) fail here wherever a doc
    still points at them."""
    stale = [f"{path.relative_to(REPO)}:{n}: {name}" for path in DOCS for n, name in mentioned_paths(path)
             if not exists(name)]
    assert not stale, "paths in the docs that do not exist:\n" + "\n".join(stale)


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 1, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_dotted_name_a_doc_mentions_resolves():
    """`bigtrain.planning.zero.zero_formula` and the like import (the module, then its attributes)."""
    stale = [f"{path.relative_to(REPO)}:{n}: {name}" for path in DOCS
             for n, line in enumerate(path.read_text().splitlines(), 1)
             for name in re.findall(r"(?<![\w/.])(bigtrain(?:\.\w+)+)", line) if not resolves(name)]
    assert not stale, "dotted names in the docs that do not resolve:\n" + "\n".join(stale)


def test_every_test_a_doc_names_exists():
    """`test_name` is a test function of tests/; `tests/test_x.py::test_name` one of that file."""
    defined: dict[str, set[str]] = {}
    for p in (REPO / "tests").rglob("*.py"):
        defined[str(p.relative_to(REPO))] = {n.name for n in ast.walk(ast.parse(p.read_text()))
                                             if isinstance(n, ast.FunctionDef)}
    everywhere = set().union(*defined.values())
    missing = []
    for path in DOCS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"(?:(tests/[\w/]+\.py)::)?(?<![\w/.])(test_\w+)\b(?!\.py)", line):
                file, name = m.groups()
                if name not in (defined.get(file, set()) if file else everywhere):
                    missing.append(f"{path.relative_to(REPO)}:{n}: {m.group(0)}")
    assert not missing, "tests named in the docs that do not exist:\n" + "\n".join(missing)


def test_readme_lists_the_shipped_presets():
    """The sentence "Shipped presets in `configs/`: ..." names configs/*.yaml, each once."""
    text = README.read_text()
    start = text.index("Shipped presets in `configs/`:")
    paragraph = text[start:text.index("\n\n", start)]
    named = [s for s in spans(paragraph) if "/" not in s]
    shipped = {p.stem for p in (REPO / "configs").glob("*.yaml")}
    assert len(named) == len(set(named)) and set(named) == shipped, (
        f"README's presets lack {sorted(shipped - set(named))} and name {sorted(set(named) - shipped)}, which "
        f"configs/ does not hold")


def test_readme_config_walk_through_loads_and_its_comments_name_every_choice():
    """README's "A config, walked through" loads as a config (every key exists, every value is allowed), and a
    comment on a key whose type is a choice names every choice (with the value the line sets): a new
    `model.positions` or `parallel.engine` makes the comment stale and fails here."""
    import tempfile
    import typing

    from bigtrain.config import Config, load_config

    text = section(README.read_text(), "## A config, walked through")
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(block)
        f.flush()
        load_config(f.name)
    incomplete, section_name = [], None
    for line in block.splitlines():
        top = re.match(r"(\w+):\s*(\{[^}]*\})?\s*(?:#\s*(.*))?$", line)
        if top:
            section_name = top.group(1)
            inline = re.match(r"\{name: (\w+)", top.group(2) or "")
            entries = [("name", inline.group(1), top.group(3))] if inline else []
        else:
            m = re.match(r"\s+(\w+):\s*([^#]*?)\s*(?:#\s*(.*))?$", line)
            entries = [m.groups()] if m else []
        for key, value, comment in entries:
            hint = typing.get_type_hints(type(getattr(Config(), section_name))).get(key)
            if comment and typing.get_origin(hint) is typing.Literal:
                choices = set(typing.get_args(hint))
                named = {c for c in choices if re.search(rf"(?<![\w-]){re.escape(c)}(?![\w-])", f"{value} {comment}")}
                if named != choices:
                    incomplete.append(f"{section_name}.{key}: the comment leaves out {sorted(choices - named)}")
    assert not incomplete, "README's config walk-through:\n" + "\n".join(incomplete)


def test_architecture_layer_table_is_the_one_the_layering_test_enforces():
    """docs/architecture.md's layer table == LAYERS (tests/helpers/layers.py): the same packages on the same
    layers."""
    table = next(t for t in tables(REPO / "docs" / "architecture.md") if t.header[:2] == ["layer", "package"])
    drawn = {name.rstrip("/").removesuffix(".py"): int(row[0]) for row in table.rows for name in spans(row[1])}
    differ = {p: (drawn.get(p), LAYERS.get(p)) for p in set(drawn) | set(LAYERS) if drawn.get(p) != LAYERS.get(p)}
    assert not differ, f"layers in docs/architecture.md and (in) tests/helpers/layers.py differ: {differ}"


def code_names() -> tuple[set[str], dict[str, tuple[set[str], list[str]]], dict[str, set[str]]]:
    """Every identifier bigtrain's code defines or uses (names, attributes, arguments, keywords); each class's
    methods and attributes with its base classes' names; each function name's parameters (over every def of it)."""
    names: set[str] = set()
    classes: dict[str, tuple[set[str], list[str]]] = {}
    parameters: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                a = node.args
                parameters.setdefault(node.name, set()).update(x.arg for x in a.posonlyargs + a.args + a.kwonlyargs)
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, (ast.arg, ast.keyword)) and node.arg:
                names.add(node.arg)
            if isinstance(node, ast.ClassDef):
                members = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                members |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)
                            and isinstance(n.target, ast.Name)}
                classes[node.name] = (members, [b.id for b in node.bases if isinstance(b, ast.Name)])
    return names, classes, parameters


def has_member(classes: dict[str, tuple[set[str], list[str]]], cls: str, member: str) -> bool:
    members, bases = classes[cls]
    return member in members or any(has_member(classes, b, member) for b in bases if b in classes)


def test_architecture_drawings_name_what_the_code_defines():
    """The engine table, the flow of one run and the path of one step in docs/architecture.md: every
    snake_case or CamelCase name is one bigtrain's code has, every `Class.member` is a member of that class (or
    of a base), and every `keyword=` of a call `f(...)` in the two flows is a parameter of f (the engine table
    quotes DeepSpeed's calls too): a renamed function, class, method or parameter fails here until the drawing
    says so."""
    names, classes, parameters = code_names()
    text = (REPO / "docs" / "architecture.md").read_text()
    drawn = "\n".join(section(text, heading) for heading in
                      ("## Engines", "## Flow of one run", "## The path of one training step"))
    words = re.findall(r"(?<![\w./-])([a-z]+(?:_[a-z0-9]+)+|[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+)\b(?!\.py)", drawn)
    unknown = sorted(set(words) - names - PROSE)
    assert not unknown, f"names in docs/architecture.md's drawings that bigtrain's code does not have: {unknown}"
    members = re.findall(r"(?<![\w.])([A-Z]\w+)\.(\w+)", drawn)
    wrong = sorted({f"{c}.{m}" for c, m in members if c in classes and not has_member(classes, c, m)})
    assert not wrong, f"members docs/architecture.md's drawings give classes that do not have them: {wrong}"
    assert {c for c, _ in members} <= set(classes), {c for c, _ in members} - set(classes)
    flows = "\n".join(section(text, heading) for heading in ("## Flow of one run", "## The path of one training step"))
    calls = re.findall(r"(\w+)\(([^()\n]*(?:\([^()\n]*\))?[^()\n]*)\)", flows)
    bad = sorted({f"{f}({k}=)" for f, args in calls if f in parameters
                  for k in re.findall(r"(?:^|,)\s*(\w+)=", args) if k not in parameters[f]})
    assert not bad, f"keywords docs/architecture.md's drawings pass that the function does not take: {bad}"


def test_test_tiers_in_the_docs_are_the_registered_marks():
    """Every `-m` expression a doc shows names registered marks only (pyproject.toml), the fast tier is the
    Makefile's, and the number of slowest tests printed is the Makefile's."""
    registered = set(re.findall(r'^\s*"(\w+):', (REPO / "pyproject.toml").read_text(), re.M))
    makefile = (REPO / "Makefile").read_text()
    fast = re.search(r"^test-fast:.*?\n(?:\t.*\n)*", makefile, re.M).group(0)
    marks = re.search(r'-m "([^"]+)"', fast).group(1)
    assert set(re.findall(r"\w+", marks)) - {"not", "and", "or"} <= registered
    for path in DOCS:
        for n, code in code_lines(path):
            for expression in re.findall(r'(?:^|\s)-m (?:"([^"]+)"|(\w+)\b)', code):
                words = set(re.findall(r"\w+", " ".join(expression))) - {"not", "and", "or"}
                if "pytest" in code or expression[0]:
                    assert words <= registered, f"{path.relative_to(REPO)}:{n}: unregistered mark in {code!r}"
    readme = README.read_text()
    assert f'`make test-fast` (`pytest -m "{marks}"`)' in readme
    durations = re.search(r"--durations=(\d+)", makefile).group(1)
    assert f"print the {durations} slowest" in " ".join(readme.split())


def test_no_citation_of_a_text_the_repository_does_not_contain():
    """Docs, docstrings and configs once cited "the guide" (a text outside the repository): cite the paper."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    cited = [f"{name}:{n}" for name in files if name.endswith((".py", ".md", ".yaml", ".sh", ".sbatch"))
             and name != "tests/test_docs.py"
             for n, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1)
             if "the guide" in line.lower()]
    assert not cited, cited
