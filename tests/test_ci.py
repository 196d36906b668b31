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


def test_install_script_fails_when_apt_get_cannot_install(tmp_path):
    """The real tests/helpers/install_slurm.sh with no Slurm on PATH and an apt-get that fails: it exits non-zero
    naming what is missing, instead of reporting an install (a failing `apt-get update && ...` inside `||` used
    to slip past `set -e`)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("bash", "id"):
        (fake / tool).symlink_to(shutil.which(tool))
    (fake / "apt-get").write_text("#!/bin/bash\necho 'apt-get: no mirror' >&2\nexit 100\n")
    (fake / "apt-get").chmod(0o755)
    proc = subprocess.run([str(fake / "bash"), str(REPO / "tests" / "helpers" / "install_slurm.sh")],
                          capture_output=True, text=True, timeout=60, env={"PATH": str(fake)})
    assert proc.returncode != 0
    assert "installed" not in proc.stdout
    if os.geteuid() == 0:
        assert "could not install slurmctld slurmd slurm-client munge (sbatch is missing afterwards" in proc.stderr
