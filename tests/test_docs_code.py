"""Docs that cannot go stale silently (issue 24, item 7), part 2: what the docs say the code does.

The engine tables (docs/architecture.md, docs/engines.md, docs/checkpoints.md) against `ENGINE_CLASSES` and
what `build_engine` constructs; README's metrics.jsonl table against `MetricsProcessor`'s fields and against the
lines a tiny in-process run writes (and its run.dir and checkpoint files against README and docs/checkpoints.md);
every command's `--help` against `USAGE` and against every synopsis or command line the docs show. Part 1 (the
tree, paths, tests, presets, layers, marks) is tests/test_docs.py. The two training runs here are in-process, two
steps of a tiny model each: no process starts.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import json
import random
import re
from pathlib import Path

import pytest

from bigtrain.cli import COMMANDS, USAGE, command
from bigtrain.engine.build import ENGINE_CLASSES
from bigtrain.train.metrics import MetricsProcessor
from bigtrain.train.trainer import train
from tests.conftest import tiny_config
from tests.helpers.markdown import DOCS, REPO, command_lines, options, section, spans, tables, tables_headed

README = REPO / "README.md"
ENGINE_DOCS = [REPO / "docs" / name for name in ("architecture.md", "engines.md", "checkpoints.md")]


# ---- engines --------------------------------------------------------------------------------------------------

def test_engine_tables_name_each_engine_class_build_engine_builds():
    """Each of docs/architecture.md, docs/engines.md and docs/checkpoints.md has a table headed `engine` whose
    rows are (`layout.engine`, `Class`, ...): exactly ENGINE_CLASSES, engine by engine; a module path in a row is
    the class's file."""
    expected = {engine: path.rsplit(".", 1)[1] for engine, path in ENGINE_CLASSES.items()}
    found = {t.path for t in tables_headed("engine", ENGINE_DOCS)}
    assert found == set(ENGINE_DOCS), f"no table headed 'engine' in {sorted(str(p) for p in set(ENGINE_DOCS) - found)}"
    for table in tables_headed("engine", ENGINE_DOCS):
        assert table.header[1] == "class", table.where()
        named = {spans(row[0])[0]: spans(row[1])[0] for row in table.rows}
        assert named == expected, f"{table.where()}: the engine table names {named}; build_engine builds {expected}"
        for row in table.rows:
            module = ENGINE_CLASSES[spans(row[0])[0]].rsplit(".", 1)[0]
            for path in (s for cell in row[2:] for s in spans(cell) if s.startswith("bigtrain/") and s.endswith(".py")):
                assert path == module.replace(".", "/") + ".py", f"{table.where()}: {path} does not hold {module}"


def test_engine_classes_import_and_are_what_build_engine_constructs():
    """Every ENGINE_CLASSES entry imports and is an engine class; bigtrain/engine/build.py constructs exactly
    those classes (its calls of imported names), each imported from the module ENGINE_CLASSES gives."""
    for path in ENGINE_CLASSES.values():
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        assert isinstance(cls, type) and callable(getattr(cls, "train_step", None)), path
    tree = ast.parse((REPO / "bigtrain" / "engine" / "build.py").read_text())
    imported = {alias.asname or alias.name: f"{node.module}.{alias.name}" for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) for alias in node.names}
    build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_engine")
    constructed = {imported[c.func.id] for c in ast.walk(build) if isinstance(c, ast.Call)
                   and isinstance(c.func, ast.Name) and c.func.id in imported and c.func.id[0].isupper()}
    assert constructed == set(ENGINE_CLASSES.values())


def run_dir_table() -> dict[str, str]:
    table = next(t for t in tables(README) if t.header == ["path", "contents"])
    return {name: row[1] for row in table.rows for name in spans(row[0])}


def test_run_dir_table_names_each_engine_config_file():
    """An engine's `config_file` (written into run.dir) has a row in README's run.dir table."""
    files = {getattr(importlib.import_module(p.rsplit(".", 1)[0]), p.rsplit(".", 1)[1]).config_file
             for p in ENGINE_CLASSES.values()} - {None}
    assert files and files <= set(run_dir_table()), files


# ---- metrics.jsonl and run.dir ------------------------------------------------------------------------------------

def metrics_table() -> dict[str, list[str]]:
    """README's metrics.jsonl table: {line kind: the fields its row names, in order}."""
    table = next(t for t in tables(README) if t.header == ["line", "written", "fields"])
    return {row[0]: spans(row[2]) for row in table.rows}


def test_readme_metrics_fields_are_the_code_constants():
    """README's training and evaluation rows == MetricsProcessor.TRAINING_FIELDS / EVAL_FIELDS; the skipped
    step's own line (written by a dict literal) has the training fields."""
    rows = metrics_table()
    assert set(rows["training"]) == set(MetricsProcessor.TRAINING_FIELDS)
    assert set(rows["evaluation"]) == set(MetricsProcessor.EVAL_FIELDS)
    source = ast.parse((REPO / "bigtrain" / "train" / "metrics.py").read_text())
    skipped = next(n for n in ast.walk(source) if isinstance(n, ast.FunctionDef) and n.name == "skipped_line")
    literal = next(n for n in ast.walk(skipped) if isinstance(n, ast.Dict))
    assert {k.value for k in literal.keys} == set(MetricsProcessor.TRAINING_FIELDS)


def test_every_metrics_record_written_as_a_literal_is_documented():
    """Each dict literal that bigtrain/train writes to metrics.jsonl (`….log.write({...})`) has a row in README
    whose fields include its keys (`{"step": ..., "config_changes": ...}` on a resume with --allow-changes)."""
    rows = metrics_table()
    for path in (REPO / "bigtrain" / "train").glob("*.py"):
        for call in ast.walk(ast.parse(path.read_text())):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "write"
                    and isinstance(call.func.value, ast.Attribute) and call.func.value.attr == "log"
                    and call.args and isinstance(call.args[0], ast.Dict)):
                keys = {k.value for k in call.args[0].keys if isinstance(k, ast.Constant)}
                assert any(keys <= set(fields) for fields in rows.values()), f"{path.name}:{call.lineno}: {keys}"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """Two 2-step in-process runs of the tiny GPT with an evaluation at step 2: one source, and a mixture of two
    (`data.sources`)."""
    root = tmp_path_factory.mktemp("docs")
    extra = root / "extra.jsonl"
    rng = random.Random(0)
    extra.write_text("".join(json.dumps({"text": " ".join(rng.choice("abcdefgh") * 3 for _ in range(60))}) + "\n"
                             for _ in range(200)))
    runs = {"plain": root / "plain" / "run", "mixture": root / "mixture" / "run"}
    mixture = f"data.sources=[{{source: embedded, weight: 3}}, {{source: {extra}, weight: 1, name: extra}}]"
    for kind, extra_overrides in (("plain", ()), ("mixture", (mixture,))):
        train(tiny_config(runs[kind], "causal", "train.steps=2", "train.eval_every=2", "train.sample_tokens=0",
                          *extra_overrides))
    return runs


def records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval_loss" in r]


def key_differences(lines: list[dict], documented: set[str], what: str) -> list[str]:
    """For each line whose keys are not `documented`: which keys it has beyond them and which it lacks."""
    return [f"{what} line of step {r['step']}: written but not in README {sorted(set(r) - documented)}, in README "
            f"but not written {sorted(documented - set(r))}" for r in lines if set(r) != documented]


def test_a_run_writes_exactly_the_documented_metrics_fields(tiny_runs):
    """The lines a run writes have the README's fields, no more, no fewer: training lines TRAINING_FIELDS
    (plus `sources` with its documented keys, and only, under data.sources), evaluation lines EVAL_FIELDS (plus
    `eval_sources`, one documented record per source, and only under data.sources).
    Optional keys are documented as rows of their own (mixture, config changes) and checked where they occur."""
    rows = {kind: set(fields) for kind, fields in metrics_table().items()}
    training, evaluation = records(tiny_runs["plain"])
    assert [r["step"] for r in training] == [1, 2] and [r["step"] for r in evaluation] == [2]
    problems = key_differences(training, rows["training"], "training")
    problems += key_differences(evaluation, rows["evaluation"], "evaluation")
    training, evaluation = records(tiny_runs["mixture"])
    key, *per_source = metrics_table()["mixture (in training lines)"]  # `sources`: per source `tokens`, ...
    assert [r["step"] for r in training] == [1, 2]
    problems += key_differences(training, rows["training"] | {key}, "mixture training")
    problems += key_differences([{"step": r["step"], **source} for r in training for source in r[key].values()],
                                {"step", *per_source}, f"per-source {key!r} of a mixture training")
    key, *per_source = metrics_table()["mixture (in evaluation lines)"]  # `eval_sources`: per source `eval_loss`, ...
    assert [r["step"] for r in evaluation] == [2] and sorted(evaluation[0][key]) == ["embedded", "extra"]
    problems += key_differences(evaluation, rows["evaluation"] | {key}, "mixture evaluation")
    problems += key_differences([{"step": r["step"], **source} for r in evaluation for source in r[key].values()],
                                {"step", *per_source}, f"per-source {key!r} of a mixture evaluation")
    assert not problems, "metrics.jsonl and README's metrics table differ:\n" + "\n".join(problems)


def pattern(name: str) -> re.Pattern:
    """A run.dir or checkpoint name as the docs write it (`step_NNNNNNNN/`, `hang-rank<R>.txt`) as a pattern."""
    text = re.escape(name.rstrip("/"))
    return re.compile(re.sub(r"N{2,}|<R>|\\\*", lambda m: r"\d+" if m.group(0) != r"\*" else ".*", text) + r"\Z")


def test_run_dir_and_checkpoint_files_are_documented(tiny_runs):
    """Every entry a run writes into run.dir has a row in README's run.dir table; every file of its checkpoint is
    named in docs/checkpoints.md: the common files of the save sequence, or the plain engine's own files (its
    engine table's `torch` row). `trainer.pt` (the old name) is not written."""
    run_dir = tiny_runs["plain"]
    documented = [pattern(name) for name in run_dir_table()]
    undocumented = [p.name for p in run_dir.iterdir() if not any(d.match(p.name) for d in documented)]
    assert not undocumented, f"run.dir entries without a row in README's run.dir table: {undocumented}"
    checkpoints = (REPO / "docs" / "checkpoints.md").read_text()
    start = checkpoints.index("Every engine's checkpoint is written by the one save sequence")
    common = [pattern(s) for s in spans(checkpoints[start:checkpoints.index("\n\n", start)])
              if re.fullmatch(r"[\w.]+/?", s)]
    engine_table = next(t for t in tables(REPO / "docs" / "checkpoints.md") if t.header[0] == "engine")
    own = [pattern(s) for row in engine_table.rows if spans(row[0]) == ["torch"] for s in spans(row[2])]
    (step,) = (run_dir / "checkpoints").glob("step_*")
    names = sorted(p.name for p in step.iterdir())
    assert "trainer.pt" not in names and "trainer_rank00000.pt" in names
    unnamed = [n for n in names if not any(d.match(n) for d in common + own)]
    assert not unnamed, (f"files of a plain engine's checkpoint that docs/checkpoints.md names neither among "
                         f"every checkpoint's files nor in its engine table's `torch` row: {unnamed} (of {names})")


# ---- commands ----------------------------------------------------------------------------------------------------

def help_options(name: str) -> set[str]:
    """The long options of `bigtrain NAME --help` (argparse, in this process): those of its usage line, which
    leaves out suppressed ones, plus --help."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        command(name)(["--help"])
    assert exit_.value.code == 0, name
    return options(out.getvalue().split("\n\n")[0]) | {"--help"}


@pytest.fixture(scope="module")
def help_of() -> dict[str, set[str]]:
    return {name: help_options(name) for name in COMMANDS}


def usage_lines() -> dict[str, str]:
    """USAGE's synopsis line of each command."""
    return {line.split()[0]: line for line in USAGE.splitlines()[1:]}


def test_usage_names_every_command_and_every_option(help_of):
    """`bigtrain --help` (USAGE) has one line per command of COMMANDS, which names every option of the command's
    --help (but -h/--help and --debug) and no option the command lacks."""
    lines = usage_lines()
    assert list(lines) == list(COMMANDS)
    assert USAGE.splitlines()[0] == f"usage: bigtrain {{{','.join(COMMANDS)}}} ..."
    for name, line in lines.items():
        assert options(line) <= help_of[name], f"USAGE names options `bigtrain {name}` lacks: " \
                                                f"{sorted(options(line) - help_of[name])}"
        missing = help_of[name] - options(line) - {"--help", "--debug"}
        assert not missing, f"`bigtrain {name} --help` has options USAGE leaves out: {sorted(missing)}"


def test_every_command_line_in_the_docs_names_a_command_and_its_options(help_of):
    """Every `bigtrain COMMAND ...` (or `launch/train.py ...`, or `-m bigtrain.cli COMMAND ...`) that README and
    docs/*.md show names a command of COMMANDS and only options its --help has."""
    problems = []
    for path in DOCS:
        for n, name, rest in command_lines(path):
            where = f"{path.relative_to(REPO)}:{n}"
            if name not in COMMANDS:
                problems.append(f"{where}: `bigtrain {name}` is no command ({', '.join(COMMANDS)})")
            elif options(rest) - help_of[name]:
                problems.append(f"{where}: `bigtrain {name}` has no {sorted(options(rest) - help_of[name])}")
    assert not problems, "\n".join(problems)


def test_readme_commands_table_is_commands():
    """README's "Commands" table has one row per command, in COMMANDS' order."""
    table = tables(README, section(README.read_text(), "## Commands"))[0]
    listed = [spans(row[0])[0] for row in table.rows]
    assert listed == list(COMMANDS), f"README's Commands table lists {listed}; COMMANDS has {list(COMMANDS)}"
