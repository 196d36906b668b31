"""The `launches` mark, enforced: a test that starts a training process or a launcher without it fails
(`launch_reason` tells such a start from any other; the hooks, which tests/conftest.py takes in, guard every
test, its fixtures included)."""

from __future__ import annotations

import multiprocessing.process
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# --- the `launches` mark ---------------------------------------------------------------------------------------
LAUNCHERS = {"torchrun", "deepspeed", "accelerate", "mpirun", "mpiexec", "srun", "sbatch", "salloc"}
LAUNCHER_MODULES = {"torch.distributed.run", "torch.distributed.launch", "deepspeed", "deepspeed.launcher.runner",
                    "deepspeed.launcher.launch", "accelerate.commands.launch", "accelerate.commands.accelerate_cli"}
TRAINING_SUBCOMMANDS = {"train", "parity", "convert"}  # parity and convert start training runs themselves
# tests/helpers scripts that are launch/train.py with a hook (or train a step themselves); the others are run
# under torchrun (caught as such) or are not scripts.
TRAINING_HELPERS = {"broken_parity.py", "count_syncs.py", "failing_rank.py", "fsdp_on_cpu.py", "inject.py",
                    "plan_measure.py", "record_samples.py"}
TRAINING_CODE = re.compile(r"run_train|launch/train\.py|\bTrainer\(|(?<![.\w])train\(")
PYTHON_OPTIONS_WITH_VALUE = {"-W", "-X", "--check-hash-based-pycs"}
SHELLS = {"sh", "bash", "dash", "zsh"}
WRAPPERS = {"env", "nohup", "setsid", "nice", "timeout", "stdbuf", "taskset", "numactl", "time", "exec", "xargs"}


def launch_reason(what: Sequence[str] | str | Callable[..., Any]) -> str | None:
    """Why starting `what` counts as starting a training process or a launcher (the `launches` mark's business),
    or None when it does not.

    `what` is a command (argv list, or a shell string) or the target of a multiprocessing process. Counted:
    a launcher (torchrun, deepspeed, accelerate, mpirun, mpiexec, srun, sbatch, salloc; also as `python -m`), also
    behind env, timeout, nice and the like;
    `launch/train.py`; the `bigtrain` command (console script, `-m bigtrain.cli` or `-m bigtrain.cli.train`) with
    `train`, `parity` or
    `convert` (but `train --print-config`, which only prints); a tests/helpers script that trains
    (TRAINING_HELPERS); any bench/ script (`bench/X.py` or `-m bench.X`: they train); `python -c` code that
    trains (calls run_train, Trainer or train); `sh -c` scripts are read command by command. A process target
    counts when its function (or the function torch's spawn wraps) comes from bigtrain's cli or train packages,
    launch/train.py, or torch's elastic launcher. Everything else (`python -c "import ..."`, `bigtrain plan`,
    consolidate, evaluate, export, prepare, git, pgrep, ...) is not a launch.
    """
    if callable(what):
        return _target_reason(what)
    if isinstance(what, (str, bytes, os.PathLike)):
        return _shell_reason(os.fsdecode(what))
    argv = [os.fsdecode(a) for a in what]
    if not argv:
        return None
    program = Path(argv[0]).name
    if program in LAUNCHERS:
        return f"the launcher {program}"
    if program in WRAPPERS:  # `env VAR=1 torchrun ...`, `timeout 60 python ...`: the command they start
        return next((r for i in range(1, len(argv)) if (r := launch_reason(argv[i:]))), None)
    if program in SHELLS:
        script = next((argv[i + 1] for i, a in enumerate(argv[1:-1], 1)
                       if re.fullmatch(r"-[a-zA-Z]*c[a-zA-Z]*", a)), None)  # -c, -ec, -xc
        return _shell_reason(script) if script is not None else _script_reason(argv[1:])
    if program == "bigtrain":
        return _subcommand_reason(argv[1:])
    if program.startswith("python"):
        rest = argv[1:]
        while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c", "-"):
            rest = rest[2:] if rest[0] in PYTHON_OPTIONS_WITH_VALUE else rest[1:]
        if len(rest) >= 2 and rest[0] == "-m":
            module = rest[1]
            if module in LAUNCHER_MODULES:
                return f"the launcher module {module}"
            if module in ("bigtrain", "bigtrain.cli"):
                return _subcommand_reason(rest[2:])
            if module == "bigtrain.cli.train":  # the train command's own module
                return _subcommand_reason(["train", *rest[2:]])
            if module == "bigtrain.cli.convert_worker":
                return "a rank of bigtrain convert"
            if module.startswith("bench."):
                return f"the benchmark {module}"
            return None
        if len(rest) >= 2 and rest[0] == "-c":
            return "python -c code that trains" if TRAINING_CODE.search(rest[1]) else None
        return _script_reason(rest)
    return None


def _script_reason(args: Sequence[str]) -> str | None:
    """A script path (args[0]) that trains: launch/train.py, a training helper, a bench script."""
    if not args:
        return None
    path = Path(args[0])
    if path.name == "train.py" and path.parent.name == "launch":
        return None if "--print-config" in args else "launch/train.py"  # --print-config only prints
    if path.parent.name == "helpers" and path.parent.parent.name == "tests" and path.name in TRAINING_HELPERS:
        return f"the training helper tests/helpers/{path.name}"
    if path.parent.name == "bench" and path.suffix in (".py", ".sh"):
        return f"the benchmark bench/{path.name}"
    return None


def _subcommand_reason(args: Sequence[str]) -> str | None:
    """`bigtrain ARGS`: train, parity, convert (except `train --print-config`)."""
    sub = next((a for a in args if not a.startswith("-")), None)
    if sub not in TRAINING_SUBCOMMANDS or (sub == "train" and "--print-config" in args):
        return None
    return f"bigtrain {sub}"


def _shell_reason(script: str) -> str | None:
    """A shell command line: each of its commands (split at ; | & && || and newlines) on its own."""
    try:
        lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: the words as they come
        tokens = script.split()
    command: list[str] = []
    for token in [*tokens, ";"]:
        if token and set(token) <= set(";|&()\n"):
            while command and "=" in command[0] and not command[0].startswith("="):  # VAR=value cmd
                command = command[1:]
            reason = launch_reason(command) if command else None
            if reason:
                return reason
            command = []
        else:
            command.append(token)
    return None


def _target_reason(target: Callable[..., Any], args: Sequence[Any] = ()) -> str | None:
    """A multiprocessing target: its function, or the function torch's spawn wrapper runs (its first argument)."""
    module, name = getattr(target, "__module__", "") or "", getattr(target, "__qualname__", repr(target))
    if module.startswith("torch.distributed.elastic"):
        return f"torch's elastic launcher ({module}.{name})"
    if module == "torch.multiprocessing.spawn" and args and callable(args[0]):
        return _target_reason(args[0])
    if module.startswith(("bigtrain.cli", "bigtrain.train")) or module == "launch.train":
        return f"a process running {module}.{name}"
    return None


class LaunchNotMarked(pytest.fail.Exception):
    """Raised where a test without the `launches` mark starts a training process or a launcher."""


def _unmarked_launch(item: pytest.Item, reason: str, command: str) -> LaunchNotMarked:
    message = (f"{item.nodeid} starts {reason} but has no `launches` mark: add @pytest.mark.launches (tests that "
               f"start a training process or a launcher are kept out of `make test-fast`). Command: {command[:300]}")
    item.stash.setdefault(_LAUNCHES_SEEN, []).append(message)
    return LaunchNotMarked(message, pytrace=False)


_LAUNCHES_SEEN = pytest.StashKey[list]()


@contextmanager
def _launch_guard(item: pytest.Item) -> Iterator[None]:
    """While `item` runs (setup, call, teardown), refuse every start of a training process or a launcher unless
    it is marked `launches`: subprocess.Popen (so run, call, check_output), os.posix_spawn[p], os.spawnv*,
    os.system and multiprocessing process starts (torch.multiprocessing's included)."""
    if item.get_closest_marker("launches"):
        yield
        return
    saved: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, describe: Callable[..., tuple[str | None, str]]) -> None:
        """Replace owner.name by a check of what it would start (`describe`: its reason and command line)."""
        original = getattr(owner, name, None)
        if original is None:
            return

        def guarded(*args: Any, **kwargs: Any) -> Any:
            reason, command = describe(*args, **kwargs)
            if reason:
                raise _unmarked_launch(item, reason, command)
            return original(*args, **kwargs)

        saved.append((owner, name, original))
        setattr(owner, name, guarded)

    def command(args: Any, shell: bool = False) -> tuple[str | None, str]:
        """A command's reason and its line; with shell=True a list's first item is the shell's command line."""
        if isinstance(args, (str, bytes, os.PathLike)):
            line = os.fsdecode(args)
        else:
            args = [os.fsdecode(a) for a in args]
            line = args[0] if shell and args else shlex.join(args)
        return launch_reason(line if shell else args), line

    def process(self: Any) -> tuple[str | None, str]:
        target = getattr(self, "_target", None)
        reason = _target_reason(target, getattr(self, "_args", ())) if callable(target) else None
        return reason, f"multiprocessing process {self.name} running {target!r}"

    wrap(subprocess.Popen, "__init__", lambda self, args, *rest, **kwargs: command(args, kwargs.get("shell", False)))
    for name in ("posix_spawn", "posix_spawnp"):
        wrap(os, name, lambda path, argv, *rest, **kwargs: command(list(argv)))
    for name in ("spawnv", "spawnve", "spawnvp", "spawnvpe"):
        wrap(os, name, lambda mode, path, argv, *rest: command(list(argv)))
    wrap(os, "system", command)
    wrap(multiprocessing.process.BaseProcess, "start", process)
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """The guard around the whole test, fixtures included (a session fixture that launches is set up by the
    first test that asks for it, before any function-scoped autouse fixture could act)."""
    with _launch_guard(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A refused launch fails the test even when the test caught the exception."""
    outcome = yield
    report = outcome.get_result()
    seen = item.stash.get(_LAUNCHES_SEEN, [])
    if seen and report.passed and call.when == "call":
        report.outcome, report.longrepr = "failed", "\n".join(seen)
