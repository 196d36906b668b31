"""CI cannot go green by skipping: under CI=true a missing tool fails its tests, and `.ci/run` stops when the
Slurm install fails (shown on a copy of .ci/run whose install step fails)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO, require


def test_require_skips_outside_ci_and_fails_under_it(monkeypatch):
    require(True, "present")  # nothing happens
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no mpiexec"):
        require(False, "no mpiexec")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no mpiexec -- CI=true: a test that CI must run may not skip"):
        require(False, "no mpiexec")


def _ci_copy(tmp_path, install_status: int):
    """.ci/run in a scratch tree whose Slurm install exits with `install_status` and whose `make test` leaves a
    marker file."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "tests" / "helpers").mkdir(parents=True)
    (tmp_path / "tests" / "helpers" / "install_slurm.sh").write_text(f"echo installing >&2\nexit {install_status}\n")
    (tmp_path / "Makefile").write_text("test:\n\ttouch tests-ran\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                          env={**env, "CI": "true"})


def test_ci_run_stops_when_the_slurm_install_fails(tmp_path):
    proc = _ci_copy(tmp_path, install_status=1)
    assert proc.returncode != 0
    assert "installing Slurm failed" in proc.stderr
    assert not (tmp_path / "tests-ran").exists()


def test_ci_run_runs_the_suite_when_the_install_works(tmp_path):
    proc = _ci_copy(tmp_path, install_status=0)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tests-ran").exists()
