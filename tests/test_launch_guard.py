"""The `launches` mark is enforced (tests/conftest.py): which commands count as starting a training process or a
launcher, and a test run in which an unmarked test that starts one fails while a marked one passes."""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import REPO, launch_reason

pytest_plugins = ["pytester"]

PY = sys.executable


@pytest.mark.parametrize("command", [
    [PY, str(REPO / "launch" / "train.py"), "train.steps=2"],
    [PY, "-u", "launch/train.py", "--config", "configs/smoke.yaml"],
    ["/venv/bin/torchrun", "--nproc_per_node=2", "launch/train.py"],
    [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "x.py"],
    ["deepspeed", "--num_gpus", "2", "launch/train.py"],
    ["accelerate", "launch", "--multi_gpu", "x.py"],
    ["mpiexec", "-n", "2", PY, "x.py"], ["mpirun", "-n", "2", "x"], ["srun", "x"], ["sbatch", "job.sbatch"],
    ["salloc", "-N1"],
    ["/venv/bin/bigtrain", "train", "--config", "c.yaml"], ["bigtrain", "parity", "--steps", "5"],
    ["bigtrain", "convert", "runs/x"], [PY, "-m", "bigtrain.cli", "train", "train.steps=2"],
    [PY, str(REPO / "tests" / "helpers" / "inject.py"), "train.steps=2"],
    [PY, "tests/helpers/fsdp_on_cpu.py"],
    [PY, str(REPO / "bench" / "scaling.py")], [PY, "-m", "bench.tokenization", "--child", "{}"],
    [PY, "-c", "import sys\nfrom bigtrain.cli.train import run_train\nsys.exit(run_train(sys.argv[1:]))"],
    ["bash", "-c", f"set -o pipefail; {PY} launch/train.py a=1 | head -n 2"],
    f"OMP_NUM_THREADS=1 {PY} launch/train.py x=1",
    ["env", "OMP_NUM_THREADS=1", "torchrun", "x.py"], ["timeout", "60", PY, "-u", "launch/train.py"],
    ["bash", "-ec", "cd /tmp && deepspeed --num_gpus 2 x.py"],
])
def test_launches_are_recognised(command):
    assert launch_reason(command)


@pytest.mark.parametrize("command", [
    [PY, "-c", "import bigtrain.config; print(1)"],
    [PY, "-c", "from bigtrain.train.run_dir import RunLock\nmodel.train()"],
    ["bigtrain", "consolidate", "runs/x"], ["bigtrain", "evaluate", "w", "model.d_model=64"],
    ["bigtrain", "export", "runs/x", "--format", "hf"], [PY, "-m", "bigtrain.cli", "plan", "--gpus", "8"],
    ["bigtrain", "train", "--print-config", "train.steps=3"],
    [PY, str(REPO / "tests" / "helpers" / "prepare_inject.py"), "--workers", "2"],
    [PY, "-m", "pytest", "-q"], ["git", "rev-parse", "HEAD"], ["pgrep", "-P", "1"], ["bash", "install_slurm.sh"],
    "echo deepspeed torchrun", ["bash", "--norc", "-c", "echo train"], [PY, "-m", "deepspeed.env_report"],
    ["env", "A=1", PY, "-c", "pass"],
    [PY, "-m", "bigtrain.cli.guardian", "123-abc", "/tmp/bigtrain-parity-x"],  # ends a command's processes
])
def test_other_commands_are_not_launches(command):
    assert launch_reason(command) is None


def test_process_targets():
    from bigtrain.cli.train import run_train
    from bigtrain.data.shard_workers import _worker_main

    assert launch_reason(run_train)
    assert launch_reason(_worker_main) is None  # `bigtrain prepare`'s tokenizing workers


def test_an_unmarked_launch_fails_and_a_marked_one_passes(pytester, tmp_path, monkeypatch):
    """In a pytest run of its own: a fake `torchrun` (it only touches a file) started by an unmarked test, directly
    or through a shell, fails it before it starts, naming the command and the mark, even when the test catches the
    exception; the marked test runs it; a multiprocessing process that would train is refused as well; other
    commands run."""
    torchrun = tmp_path / "bin" / "torchrun"
    torchrun.parent.mkdir()
    torchrun.write_text("#!/bin/sh\ntouch \"$1\"\n")
    torchrun.chmod(0o755)
    ran = tmp_path / "ran"
    pytester.makeconftest("from tests.conftest import pytest_runtest_makereport, pytest_runtest_protocol  # noqa\n"
                          "def pytest_configure(config):\n"
                          "    config.addinivalue_line('markers', 'launches: starts a training process')\n")
    pytester.makepyfile(f"""
        import multiprocessing, subprocess, sys
        import pytest

        def test_unmarked():
            subprocess.run([{str(torchrun)!r}, {str(ran / 'unmarked')!r}])

        def test_unmarked_caught():
            try:
                subprocess.check_call([{str(torchrun)!r}, {str(ran / 'caught')!r}])
            except BaseException:
                pass

        def test_unmarked_shell():
            subprocess.run("cd / && " + {str(torchrun)!r} + " " + {str(ran / 'shell')!r}, shell=True)

        def test_unmarked_process():
            from bigtrain.cli.train import run_train
            multiprocessing.get_context("spawn").Process(target=run_train, args=(["train.steps=1"],)).start()

        @pytest.mark.launches
        def test_marked():
            subprocess.run([{str(torchrun)!r}, {str(ran / 'marked')!r}], check=True)

        def test_other_command():
            subprocess.run([sys.executable, "-c", "pass"], check=True)
    """)
    ran.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))  # tests.conftest
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2, failed=4)
    result.stdout.fnmatch_lines([
        "*test_unmarked starts the launcher torchrun but has no `launches` mark: add @pytest.mark.launches*",
        "*test_unmarked_caught starts the launcher torchrun but has no `launches` mark*",
        "*test_unmarked_shell starts the launcher torchrun but has no `launches` mark*Command: cd / && *torchrun*",
        "*test_unmarked_process starts a process running bigtrain.cli*run_train but has no `launches` mark*",
    ])
    assert sorted(p.name for p in ran.iterdir()) == ["marked"]  # refused launches never started
