"""Every command of README.md and docs/*.md runs as written (issue 25, "a newcomer's first hour").

The commands are read from the docs (`block_commands`: every line of a shell code block, every line of another
code block that starts with a program), so a new doc command is covered without editing this file. Each runs in
a fresh working folder (`tests/helpers/doc_workspace.py`: a copy of the clone, the configs' placeholder data,
`runs/smoke` as `make smoke` leaves it — finished at step 140 — and the runs the command names), right after
`make smoke` as a reader would type it. A command that would take minutes, needs a GPU, a cluster or the network
is translated by the first row of TRANSLATIONS that matches it, each row saying why; a training command becomes
the dry run of the same config and overrides on the ranks it would start (`--world-size N`), which must start
from step 0 (a command that would resume the finished smoke run, or is refused, fails). A command that matches no
row fails: nothing is skipped silently.

The dry runs and config prints of `launch/train.py` and `bigtrain train` (most of the commands), and the `bigtrain`
commands that start no process (plan, consolidate, evaluate, export, convert, plot, attention, generate, any
`--help`) run in this process, in the working folder: the script's own code after its interpreter check
(`run_train`, `bigtrain.cli.main`), without a fresh interpreter's start-up and torch's imports (about 3-5 CPU-s
each on 2 cores); everything else runs as a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.doc_workspace import Finished, command_env
from tests.helpers.markdown import DOCS, DocCommand, block_commands

pytestmark = pytest.mark.launches  # the finished runs train; parity, convert and a launcher start ranks

COMMANDS = [c for path in DOCS for c in block_commands(path)]
FRESH = "starts from step 0"  # the dry run's line for a run.dir without a checkpoint


@dataclass(frozen=True)
class Run:
    """One process a doc command becomes, and a line its output must hold."""

    argv: tuple[str, ...]
    expect: str | None = None


# ---- how a doc command becomes the processes that check it ------------------------------------------------------

def launched(words: list[str], workspace: Path) -> tuple[int, list[str]]:
    """(ranks, the command each rank runs) of a launcher line: deepspeed --num_gpus N | --hostfile H (its slots),
    torchrun --nproc_per_node N, accelerate launch --num_processes N, mpiexec/mpirun -n N, srun (one task)."""
    program = words[0]
    rest = words[2:] if program == "accelerate" else words[1:]
    ranks, i = 1, 0
    while i < len(rest) and rest[i].startswith("-") and rest[i] != "-m":
        key, _, value = rest[i].partition("=")
        takes_value = key in {"--num_gpus", "--hostfile", "--nproc_per_node", "--num_processes", "-n", "-np",
                              "--master_port", "--node_rank"}
        if takes_value and not value:
            value, i = rest[i + 1], i + 1
        if key in {"--num_gpus", "--nproc_per_node", "--num_processes", "-n", "-np"}:
            ranks = int(value)
        elif key == "--hostfile":
            ranks = sum(int(m) for m in re.findall(r"slots=(\d+)", (workspace / value).read_text()))
        i += 1
    inner = rest[i:]
    if inner and inner[0].endswith(".py"):
        inner = ["python", *inner]
    return ranks, inner


DRY = {"--world-size", "--print-config", "--help-config"}  # launch/train.py options that never train


# `bigtrain` commands that start no process and train nothing: run in this process (`bigtrain.cli.main`, the console
# script's code); `prepare` (worker processes) and anything a launcher starts run as subprocesses.
IN_PROCESS = {"plan", "consolidate", "evaluate", "export", "convert", "plot", "attention", "generate"}


def run_in_process(argv: tuple[str, ...], workspace: Path) -> tuple[int, str] | None:
    """(exit status, output) of a `python launch/train.py` / `bigtrain train` dry run or config print, a `bigtrain`
    command of IN_PROCESS or any `bigtrain COMMAND --help`, run in this process in `workspace`; None for any
    other command."""
    if argv[:2] == ("python", "launch/train.py") and DRY.intersection(argv):
        from bigtrain.cli.train import run_train

        def command() -> int:
            return run_train(list(argv[2:]), prog="launch/train.py")
    elif argv[:1] == ("bigtrain",) and len(argv) > 1 and (
            argv[1] in IN_PROCESS or "--help" in argv or (argv[1] == "train" and DRY.intersection(argv))):
        from bigtrain.cli import main

        def command() -> int:
            return main(list(argv[1:]))
    else:
        return None
    out = io.StringIO()
    with contextlib.chdir(workspace), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            status = command()
        except SystemExit as stop:  # argparse's errors
            status = stop.code if isinstance(stop.code, int) else 2
    return status, out.getvalue()


def dry_run(train_words: list[str], ranks: int) -> list[Run]:
    """`python launch/train.py ... --world-size N` from a `python launch/train.py ...` or `bigtrain train ...`."""
    args = train_words[2:]
    return [Run(("python", "launch/train.py", *args, "--world-size", str(ranks)), FRESH)]


def as_written(words: list[str], workspace: Path) -> list[Run]:
    expect = FRESH if "--world-size" in words else None
    return [Run(tuple(words), expect)]


def help_of(words: list[str], workspace: Path) -> list[Run]:
    return [Run(("bigtrain", words[1], "--help"))]


def make_smoke(words: list[str], workspace: Path) -> list[Run]:
    fresh = workspace / "runs" / "smoke"
    shutil.rmtree(fresh)  # the first command: nothing trained yet
    return [Run(("make", "-n", "smoke")), Run(("python", "launch/train.py", "--config", "configs/smoke.yaml",
                                               "--world-size", "1"), FRESH)]


def make_dry(words: list[str], workspace: Path) -> list[Run]:
    return [Run(("make", "-n", *words[1:]))]


def sbatch(words: list[str], workspace: Path) -> list[Run]:
    """bash -n of the script; the dry run of its config and overrides on nodes × gpus-per-node ranks."""
    i = next(i for i, w in enumerate(words) if w.endswith(".sbatch"))
    script = (workspace / words[i]).read_text()
    header = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script, re.M))
    header.update(w[2:].split("=", 1) for w in words[1:i] if w.startswith("--") and "=" in w)
    ranks = int(header["nodes"]) * int(header["gpus-per-node"])
    return [Run(("bash", "-n", words[i])), *dry_run(["python", "launch/train.py", "--config", *words[i + 1:]], ranks)]


def launched_training(words: list[str], workspace: Path) -> list[Run]:
    ranks, inner = launched(words, workspace)
    return dry_run(inner, ranks)


def train_dry(words: list[str], workspace: Path) -> list[Run]:
    return dry_run(words if words[0] == "python" else ["python", "launch/train.py", *words[2:]], 1)


def parity_dry(words: list[str], workspace: Path) -> list[Run]:
    """The dry run of the layout run `bigtrain parity` would launch, on its ranks: the config with the layout's
    keys, parity's shrinking overrides (--shrink) and the line's own overrides, in a run.dir of its own (parity's
    runs go to a fresh folder)."""
    from bigtrain.cli.parity import parse_layout, ranks_of, shrunk

    words = words[words.index("bigtrain"):]
    layout = parse_layout(words[words.index("--layout") + 1])
    config = words[words.index("--config") + 1]
    overrides = [w for w in words if re.match(r"^\w+\.[\w.]+=", w)]
    args = [*(shrunk(layout) if "--shrink" in words else []), *overrides, *(f"{k}={v}" for k, v in layout.items()),
            "run.dir=runs/parity-layout"]
    return dry_run(["python", "launch/train.py", "--config", config, *args], ranks_of(layout))


def hub_prepare(words: list[str], workspace: Path) -> list[Run]:
    return [Run(("bigtrain", "train", *words[2:], "--print-config"))]


def bash_n(words: list[str], workspace: Path) -> list[Run]:
    return [Run(("bash", "-n", words[1]))]


def bench_parse(words: list[str], workspace: Path) -> list[Run]:
    """The script's parser on the line's arguments (they are read before --help stops it); each --option of the line
    must be in the help (checked by the test)."""
    if words[0] != "python":
        _, words = launched(words, workspace)
    return [Run(("python", *words[1:], "--help"), "usage:")]


Translate = Callable[[list[str], Path], list[Run]]
# (name, the doc command it matches, how it is checked, why not as written). The first matching row is used.
TRANSLATIONS: list[tuple[str, str, Translate, str]] = [
    ("synopsis", r"^bigtrain \w+ .*(\[--|[A-Z_]+\|[A-Z_]+)", help_of,
     "a synopsis, not a command: `bigtrain COMMAND --help` (tests/test_docs_code.py compares their options)"),
    ("make smoke", r"^make smoke$", make_smoke,
     "140 steps (1-2 minutes): `make -n smoke`, and the dry run of configs/smoke.yaml in a folder with no runs/"),
    ("make TARGET", r"^make [\w-]+( \w+=.*)?$", make_dry,
     "installs .venv or runs the whole suite: `make -n TARGET` (the target exists; make reads its recipe)"),
    ("sbatch", r"^sbatch ", sbatch,
     "needs a Slurm cluster with GPUs: `bash -n` of the script, and the dry run of its config and overrides on "
     "nodes × gpus-per-node ranks (#SBATCH lines, or the line's --nodes)"),
    ("launcher: training", r"^(deepspeed|torchrun|accelerate launch|mpiexec|mpirun|srun) .*launch/train\.py",
     launched_training, "trains for minutes to weeks on N ranks: the dry run with --world-size N"),
    ("launcher: generate", r"^torchrun --nproc_per_node \d -m bigtrain\.cli generate ", as_written,
     "as written: 2 CPU ranks generate with the tiny GPT-2 run in runs/big"),
    ("srun: parity", r"^srun .*bigtrain parity ", parity_dry,
     "8 GPUs of a node: the dry run of the config under the layout, on its ranks"),
    ("launcher: bench", r"^torchrun .*bench/\w+\.py", bench_parse, "8 GPUs: the script's options parsed (--help)"),
    ("parity on 4 ranks", r"^bigtrain parity .*--layout tensor=2,pipeline=2", parity_dry,
     "4 CPU ranks of a pipeline run for over 10 minutes on 2 cores: the dry run of the layout; "
     "tests/test_parity_command.py runs parity under TP=2 × PP=2 at test size"),
    ("parity", r"^bigtrain parity ", parity_dry,
     "2 CPU ranks and a reference for up to a minute each: the dry run of the layout; tests/test_parity_command.py "
     "(data=2,zero_stage=3, tensor=2 with --locate), tests/test_parity_locate.py and tests/test_context_training.py "
     "(context=2,context_attention=ulysses) run these parity commands at test size"),
    ("train: print or check", r"^(bigtrain train|python launch/train\.py) .*(--print-config|--help-config|"
     r"--world-size)", as_written, "as written (prints, or is the dry run itself: it must start from step 0)"),
    ("train", r"^(bigtrain train|python launch/train\.py)( |$)", train_dry,
     "trains for minutes to weeks: the one-process dry run (--world-size 1), which must start from step 0"),
    ("prepare from the Hub", r"^bigtrain prepare .*data\.source=hf:", hub_prepare,
     "needs the Hugging Face Hub: its config and overrides checked (`bigtrain train --print-config`)"),
    ("bigtrain COMMAND", r"^bigtrain (prepare|plan|consolidate|evaluate|export|convert|generate|attention|plot) ",
     as_written, "as written (tiny data, the finished runs of the substitution table)"),
    ("GPU checks", r"^bash bench/gpu_checks\.sh$", bash_n, "needs a GPU: `bash -n` of the script"),
    ("bench report", r"^python bench/report\.py$", as_written, "as written (writes the copy's docs/performance.md)"),
    ("bench", r"^python bench/\w+\.py", bench_parse,
     "a measurement (minutes; some need GPUs): its options parsed (`--help` after them); tests/test_bench.py runs "
     "each script at test size"),
]


def translation(command: DocCommand) -> tuple[str, Translate, str] | None:
    text = " ".join(shlex.split(command.text, comments=True))
    return next(((name, fn, why) for name, pattern, fn, why in TRANSLATIONS if re.search(pattern, text)), None)


def test_the_docs_have_commands_and_each_matches_a_translation():
    """At least the commands this test was written against; none matches no row."""
    assert len(COMMANDS) >= 70
    unmatched = [f"{c.where()}: {c.text}" for c in COMMANDS if translation(c) is None]
    assert not unmatched, f"doc commands no row of TRANSLATIONS covers (add one, with why): {unmatched}"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Finished:
    return Finished.make(tmp_path_factory.mktemp("doc_runs"))


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where() for c in COMMANDS])
def test_doc_command_runs_as_written(command: DocCommand, finished: Finished, tmp_path: Path):
    found = translation(command)
    assert found is not None, f"{command.where()}: no row of TRANSLATIONS covers `{command.text}`"
    name, translate, why = found
    workspace = finished.workspace(tmp_path / "clone", command.text)
    words = shlex.split(command.text, comments=True)
    env = command_env()
    for run in translate(words, workspace):
        done = run_in_process(run.argv, workspace)
        if done is None:
            argv = [shutil.which(run.argv[0], path=env["PATH"]) or run.argv[0], *run.argv[1:]]
            proc = subprocess.run(argv, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
            done = proc.returncode, proc.stdout + proc.stderr
        status, output = done
        said = (f"{command.where()}: `{command.text}` checked as `{shlex.join(run.argv)}` ({name}: {why}) "
                f"exited {status}:\n{output[-3000:]}")
        assert status == 0, said
        assert run.expect is None or run.expect in output, f"{said}\n(expected a line with {run.expect!r})"
        if translate is bench_parse:  # the options after the script
            script = next(i for i, w in enumerate(words) if w.startswith("bench/"))
            missing = [w for w in words[script + 1:] if w.startswith("--") and w.split("=")[0] not in output]
            assert not missing, f"{said}\n(options not in the script's help: {missing})"
