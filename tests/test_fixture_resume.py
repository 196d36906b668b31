"""Checkpoints written by earlier bigtrains still resume (see each fixture's README):

- tests/fixtures/main_d0e41f9: the plain engine's files and a tensor-parallel DeepSpeed run's, with parameter
  names and module structure as they were before the `parallelize` refactor;
- tests/fixtures/main_89abca6: the plain engine's files (`trainer.pt`) and a 2-rank fairscale run's, written by
  the two save sequences that existed before one `CheckpointManager` wrote every checkpoint (issue 24).

Steps 3-4 after the resume equal the uninterrupted run that wrote them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, launch_ok, launch_ranks, read_metrics, run_launcher

pytestmark = pytest.mark.launches

FIXTURES = REPO / "tests" / "fixtures" / "main_d0e41f9"
BEFORE_ONE_MANAGER = REPO / "tests" / "fixtures" / "main_89abca6"


def _copy(name: str, tmp_path: Path, fixtures: Path = FIXTURES) -> tuple[Path, list[str]]:
    run_dir = tmp_path / name
    shutil.copytree(fixtures / name, run_dir)
    saved = run_dir / "checkpoints" / "step_00000002" / "config.yaml"
    overrides = [f"run.dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"]
    return run_dir, ["--config", str(saved), *overrides]


def _assert_continues(run_dir: Path, output: str) -> None:
    assert "resumed from" in output and "(step 2)" in output, output[-2000:]
    straight = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.straight.jsonl").read_text().splitlines())
                if "loss" in r}
    resumed, _ = read_metrics(run_dir)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm"):
            a, b = straight[step][key], resumed[step][key]
            assert b == pytest.approx(a, rel=1e-5), (step, key, a, b)
    print(f"\nresumed at step 2; steps 3-4 loss {resumed[3]['loss']:.6f}, {resumed[4]['loss']:.6f} "
          f"(written: {straight[3]['loss']:.6f}, {straight[4]['loss']:.6f})")


def test_single_process_checkpoint_from_main_resumes(tmp_path):
    run_dir, args = _copy("single", tmp_path)
    proc = run_launcher(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_continues(run_dir, proc.stdout)


def test_tensor_parallel_deepspeed_checkpoint_from_main_resumes(tmp_path):
    run_dir, args = _copy("tp2", tmp_path)
    _assert_continues(run_dir, launch_ok(2, args))


def test_single_process_checkpoint_from_before_one_manager_resumes(tmp_path):
    """`trainer.pt` (the plain engine's own save sequence), a manifest without the layout that wrote it."""
    run_dir, args = _copy("single", tmp_path, BEFORE_ONE_MANAGER)
    proc = run_launcher(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_continues(run_dir, proc.stdout)


def test_fairscale_checkpoint_from_before_one_manager_resumes(tmp_path):
    run_dir, args = _copy("fairscale", tmp_path, BEFORE_ONE_MANAGER)
    _assert_continues(run_dir, launch_ok(2, args))


def test_fairscale_checkpoint_from_before_one_manager_resumes_on_one_process(tmp_path):
    """The same 2-rank checkpoint, resumed by one process through its layout-free form."""
    run_dir, args = _copy("fairscale", tmp_path, BEFORE_ONE_MANAGER)
    proc = run_launcher([*args, "parallel.engine=auto", "parallel.zero_stage=0", "train.micro_batch_size=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written by tensor 1 × pipeline 1 × data 2, ZeRO-2, fairscale" in proc.stdout, proc.stdout[-2000:]
    _assert_continues(run_dir, proc.stdout)


def test_deepspeed_checkpoint_with_three_qkv_parameters_needs_its_layout_free_form(tmp_path):
    """The same checkpoint without the layout-free form `bigtrain convert` gave it: DeepSpeed's flat optimizer
    partitions of three Q, K, V parameters cannot be read into one, and the resume says what to do."""
    run_dir, args = _copy("tp2", tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000002" / "layout_free")
    proc = launch_ranks(2, args)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "bigtrain: rank 0: error: " in err and "kept Q, K and V as three parameters" in err, err[-2000:]
    assert "bigtrain convert" in err
