"""Commands that launch ranks (`bigtrain parity`, `bigtrain convert`; issue 25, major 2): they refuse a rank count
the machine cannot hold before they start any process, and nothing they start outlives them, however they end
(normally, by an error, SIGTERM, SIGKILL; while the ranks start up or while they work); their temporary folders
go too. A rank a launcher started refuses more local ranks than the machine holds before it imports torch.

The kill tests find the command's processes by a marker of their own in the environment (every process below the
command inherits it) and wait on events: a rank writes to a FIFO when it starts or works (tests/helpers/launch_hooks,
a sitecustomize on the command's PYTHONPATH), and exits are awaited through pidfds."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bigtrain.cli import capacity
from tests.conftest import REPO, launch_ok, run_cli, tiny_overrides
from tests.helpers.processes import wait_for_exit

BIGTRAIN = str(Path(sys.executable).parent / "bigtrain")
HOOKS = REPO / "tests" / "helpers" / "launch_hooks"
SMOKE = str(REPO / "configs" / "smoke.yaml")
SMALL = ["train.global_batch_size=8", "train.micro_batch_size=4", "data.max_bytes=300000"]


# --- refusal before anything starts --------------------------------------------------------------------------------


def _one_paragraph(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bigtrain:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_parity_refuses_more_ranks_than_the_cores_hold_before_starting_anything(no_process_may_start):
    """--layout data=1000 on this machine (issue 25: it started ~1000 CPU ranks on 2 cores)."""
    cores = capacity.usable_cores()
    proc = run_cli("parity", "--config", SMOKE, "--layout", "data=1000", "--shrink", "train.global_batch_size=1000",
                   "train.micro_batch_size=1")
    line = _one_paragraph(proc)
    assert "--layout data=1000 needs 1000 ranks on this machine, which can hold" in line, line
    assert f"{cores} CPU core(s) this process may use, at most {capacity.RANKS_PER_CORE} ranks each" in line
    assert "GiB of memory available (MemAvailable)" in line and "Nothing was started" in line
    assert no_process_may_start == []


def test_parity_refuses_ranks_that_memory_or_gpus_cannot_hold(no_process_may_start, monkeypatch):
    monkeypatch.setattr(capacity, "available_memory", lambda: capacity.RANK_BYTES * 3 // 2)
    line = _one_paragraph(run_cli("parity", "--config", SMOKE, "--layout", "tensor=2", "--shrink", *SMALL))
    assert "needs 2 ranks on this machine, which can hold 1" in line and "0.586 GiB of memory available" in line
    monkeypatch.setattr(capacity, "available_memory", lambda: None)  # unknown: not a limit
    monkeypatch.setattr("bigtrain.cli.parity.visible_gpus", lambda device: 1)
    line = _one_paragraph(run_cli("parity", "--config", SMOKE, "--layout", "tensor=2", "--shrink", *SMALL))
    assert "needs 2 ranks on this machine, which can hold 1" in line and "1 visible GPU(s), one rank each" in line
    assert no_process_may_start == []


def unconverted_checkpoint(tmp_path: Path) -> Path:
    """A 2-rank DeepSpeed ZeRO-1 checkpoint (tests/fixtures/layout_free_v1) without its layout-free form."""
    run_dir = tmp_path / "run"
    shutil.copytree(REPO / "tests" / "fixtures" / "layout_free_v1", run_dir)
    step = run_dir / "checkpoints" / "step_00000002"
    shutil.rmtree(step / "layout_free")
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("layout_free/")}
    (step / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return run_dir


@pytest.fixture(scope="module")
def fresh_unconverted(tmp_path_factory) -> Path:
    """A run.dir whose latest checkpoint (step 2) a 2-rank DeepSpeed ZeRO-1 run of this bigtrain wrote without the
    layout-free form (the fixture's files keep Q, K, V apart, which this bigtrain's DeepSpeed cannot load)."""
    run_dir = tmp_path_factory.mktemp("unconverted") / "run"
    launch_ok(2, tiny_overrides(run_dir, "causal", "train.steps=2", "train.micro_batch_size=2", "checkpoint.every=2",
                                "checkpoint.layout_free_every=0", "parallel.zero_stage=1"))
    return run_dir


def test_convert_refuses_a_deepspeed_checkpoint_with_separate_qkv_before_starting_anything(tmp_path,
                                                                                           no_process_may_start):
    """The fixture's ZeRO-1 files hold Q, K, V as three parameters; DeepSpeed's flat partitions of them cannot be
    loaded into one `qkv_proj`: refused, naming the cause and what to do, with nothing started."""
    line = _one_paragraph(run_cli("convert", str(unconverted_checkpoint(tmp_path))))
    assert "whose attention kept Q, K and V as three parameters" in line, line
    assert "Convert it with the bigtrain that wrote it" in line and no_process_may_start == []


def test_convert_refuses_more_ranks_than_the_machine_holds_before_starting_anything(tmp_path, monkeypatch,
                                                                                  no_process_may_start):
    run_dir = unconverted_checkpoint(tmp_path)
    monkeypatch.setattr(capacity, "available_memory", lambda: capacity.RANK_BYTES)
    line = _one_paragraph(run_cli("convert", str(run_dir)))
    assert "was written by 2 ranks; converting it needs as many on this machine, which can hold 1" in line, line
    assert "0.391 GiB of memory available (MemAvailable), at least 0.391 GiB per rank: 1" in line
    assert no_process_may_start == [] and not (run_dir / "checkpoints" / "step_00000002" / ".converting").exists()


def test_a_rank_refuses_more_local_ranks_than_the_machine_holds(monkeypatch, capsys):
    """`launch/train.py` as rank 3 of 64 that torchrun started here: exit 2 before anything, one paragraph from the
    machine's first rank only."""
    from bigtrain.cli.train import run_train

    monkeypatch.setattr(capacity, "usable_cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert run_train(["train.steps=1"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert run_train(["train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigtrain: error: The launcher started 64 ranks (LOCAL_WORLD_SIZE=64) on this machine, "
                          "which can hold 8 (2 CPU core(s) this process may use, at most 4 ranks each: 8"), err


@pytest.mark.launches
def test_a_rank_refuses_before_importing_torch():
    """The same in a fresh interpreter: torch is never imported."""
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules))\n"
            "sys.argv = ['launch/train.py', 'train.steps=1']\n"
            "runpy.run_path('launch/train.py', run_name='__main__')\n")
    env = {**os.environ, "LOCAL_WORLD_SIZE": str(10**6), "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "The launcher started 1000000 ranks" in proc.stderr, proc.stderr
    assert "torch imported: False" in proc.stdout


# --- nothing outlives the command ----------------------------------------------------------------------------------
def _marked(mark: str) -> list[int]:
    """The live processes whose environment carries BIGTRAIN_TEST_MARK=mark."""
    needle, found = f"BIGTRAIN_TEST_MARK={mark}".encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class Command:
    """A command started with a marker, the launch hooks and a temporary folder of its own (TMPDIR)."""

    def __init__(self, tmp_path: Path, argv: list[str], hold: str) -> None:
        self.mark, self.tmp = uuid.uuid4().hex, tmp_path / "tmp"
        self.tmp.mkdir()
        fifo = tmp_path / "notify"
        os.mkfifo(fifo)
        self.reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.writer = os.open(fifo, os.O_WRONLY)  # ours, held open: the reader never sees end of file
        env = {**os.environ, "BIGTRAIN_TEST_MARK": self.mark, "BIGTRAIN_TEST_NOTIFY": str(fifo),
               "BIGTRAIN_TEST_HOLD": hold, "TMPDIR": str(self.tmp),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOKS), str(REPO), os.environ.get("PYTHONPATH")]))}
        self.out, self.err = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=self.out, stderr=self.err)

    def output(self) -> str:
        self.out.seek(0), self.err.seek(0)
        return self.out.read()[-2000:] + self.err.read()[-4000:]

    def wait_for_rank(self, what: str, timeout: float = 300) -> int:
        """Block until a rank reports `what` (start, work); its pid."""
        ready = select.select([self.reader], [], [], timeout)[0]
        assert ready, f"no rank reported '{what}' within {timeout} s:\n{self.output()}"
        line = os.read(self.reader, 4096).decode().splitlines()[0].split()
        assert line[0] == what, line
        return int(line[1])

    def close(self) -> None:
        os.close(self.reader), os.close(self.writer)
        self.out.close(), self.err.close()
        for pid in _marked(self.mark):  # hygiene after a failure
            os.kill(pid, signal.SIGKILL)


def kill_and_check(tmp_path: Path, argv: list[str], moment: str, signum: int) -> Command:
    """Start the command, wait until a rank is at `moment`, send `signum` to the command alone: the command ends
    (SIGTERM: status 143, saying so), every process of it ends, its temporary folders are gone."""
    command = Command(tmp_path, argv, moment)
    try:
        rank = command.wait_for_rank(moment)
        assert rank in _marked(command.mark)
        os.kill(command.proc.pid, signum)
        status = command.proc.wait(timeout=120)
        assert status == (143 if signum == signal.SIGTERM else -signal.SIGKILL), command.output()
        if signum == signal.SIGTERM:
            assert "bigtrain: interrupted by SIGTERM (the processes it started were ended)." in command.output()
        left = wait_for_exit(_marked(command.mark), timeout=120)  # the guardian's cleaning included
        assert left == [] and _marked(command.mark) == [], f"still running: {left}"
        # the work folder and torchrun's files are gone; torch's compile cache (torchinductor_USER) is meant to stay
        assert [p.name for p in command.tmp.iterdir() if not p.name.startswith("torchinductor_")] == []
    finally:
        command.close()
    return command


def _parity(layout: str) -> list[str]:
    return [BIGTRAIN, "parity", "--config", SMOKE, "--layout", layout, "--shrink", "--steps", "100000", *SMALL]


@pytest.mark.launches
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest.mark.parametrize("moment", ["start", "work"])
def test_parity_leaves_no_process_and_no_folder_behind(tmp_path, moment, signum):
    """`bigtrain parity --layout data=2,zero_stage=1` killed while its ranks start up (before any bigtrain code:
    no death signal asked for yet) or while they train."""
    kill_and_check(tmp_path, _parity("data=2,zero_stage=1"), moment, signum)


@pytest.mark.launches
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest.mark.parametrize("moment", ["start", "work"])
def test_convert_leaves_no_process_and_no_folder_behind(tmp_path, fresh_unconverted, moment, signum):
    """`bigtrain convert` of a 2-rank checkpoint killed while its ranks start up or while they write the form:
    the staging folder inside the checkpoint is removed too."""
    run_dir = tmp_path / "run"
    shutil.copytree(fresh_unconverted, run_dir)
    kill_and_check(tmp_path, [BIGTRAIN, "convert", str(run_dir)], moment, signum)
    step = run_dir / "checkpoints" / "step_00000002"
    assert not (step / ".converting").exists() and not (step / "layout_free").exists()
