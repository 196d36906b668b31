"""`bigtrain parity` (issue 16, item 3): it passes on correct layouts and fails on a broken one (a fault that
only this test switches on: one rank reads the wrong step's batch), with one-line errors on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.launches

BIGTRAIN = str(Path(sys.executable).parent / "bigtrain")
SMALL = ["train.global_batch_size=8", "train.micro_batch_size=4", "data.max_bytes=300000"]


def _parity(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BIGTRAIN, "parity", "--config", str(REPO / "configs" / "smoke.yaml"), "--steps", "5",
                           "--shrink", "--work-dir", str(tmp_path / "work"), *args, *SMALL],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.parametrize("layout", ["tensor=2", "pipeline=2", "tensor=2,pipeline=2", "data=2,zero_stage=3",
                                    "data=2,zero_stage=3 parallel.engine=torch"])  # the last: FSDP2
def test_parity_passes_on_correct_layouts(tmp_path, layout):
    """With --locate (issue 31): step 1's fingerprints of every module and parameter agree too."""
    layout, *extra = layout.split()
    proc = _parity(tmp_path, "--layout", layout, "--locate", *extra)
    print(proc.stdout[-1500:])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "parity PASSED" in proc.stdout and proc.stdout.count("\n") >= 8  # header, 5 steps, verdict, locate
    assert "locate: no divergence at step 1: " in proc.stdout, proc.stdout[-2000:]
    ranks = 4 if layout == "tensor=2,pipeline=2" else 2
    for progress in (f"parity: run 1 (layout {layout}, {ranks} ranks): step 5 of 5", "parity: run 2 (one device): "
                     "step 5 of 5"):  # issue 25: nothing was printed while the runs trained
        assert progress in proc.stderr.splitlines(), proc.stderr[-2000:]
    assert not (tmp_path / "work" / "floor").exists()  # within the tolerance: no noise-floor run needed


def test_parity_fails_on_a_broken_layout(tmp_path):
    """Outside the tolerance, so the noise floor is measured too; the broken rank leaves it at step 1."""
    proc = _parity(tmp_path, "--layout", "data=2,zero_stage=1", "--locate",
                   "--script", str(REPO / "tests" / "helpers" / "broken_parity.py"))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "parity FAILED: the layout leaves 100x the noise floor" in proc.stdout and " at step 1: " in proc.stdout
    # --locate: the last rank's first micro-batch (the global batch's second) is another step's
    assert "locate: first divergence at step 1 (tolerance 1e-04): embed.tokens: forward (its output) of " \
           "micro-batch 1: differs by" in proc.stdout, proc.stdout[-2000:]
    # then that record's whole tensors, kept in one more run of each side: [4 samples, 32 tokens, 32 features]
    assert "  full tensors [4, 32, 32]: largest |difference| " in proc.stdout, proc.stdout[-2000:]
    assert "parity: run 3 (noise floor: one device, micro-batches of 2): step 5 of 5" in proc.stderr.splitlines()


@pytest.mark.parametrize("args,message", [
    (["--layout", "tensors=2"], "'tensors=2' is not KEY=VALUE with KEY one of tensor, pipeline"),
    (["--layout", "tensor=0"], "tensor=0 must be a positive integer"),
    (["--layout", "tensor=2", "--precision", "fp8"], "--precision fp8: choose fp32 or bf16"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    proc = _parity(tmp_path, *args)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bigtrain:")]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
