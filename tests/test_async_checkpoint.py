"""Asynchronous checkpoints (`checkpoint.async: true`): the same losses and the same files as synchronous saves,
a crash in the middle of a background write resumes from the previous checkpoint, a writer's error reaches the
training process, and a stop waits for the writer."""

from __future__ import annotations

import json
import signal
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint import background
from bigtrain.checkpoint.integrity import read_latest, verify
from bigtrain.checkpoint.snapshot import HostCopies
from bigtrain.config import dump_config, load_config
from bigtrain.errors import CheckpointError, ConfigError
from bigtrain.io import WriteFailed, save_torch, sha256_of
from bigtrain.train.preemption import StopRequest
from bigtrain.train.trainer import train
from tests.conftest import REPO, launch_ok, run_launcher, tiny_config, tiny_overrides

INJECT = REPO / "tests" / "helpers" / "inject.py"
SEEDED = {"BIGTRAIN_TEST_SEED_HOST_RNG": "1"}  # byte-identical trainer records across processes


def _losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records if "loss" in r}


def _manifests(run_dir: Path) -> dict[str, dict]:
    """Every checkpoint's files with their size and SHA-256, config.yaml aside (it holds checkpoint.async and
    run.dir, which differ by design)."""
    return {m.parent.name: {k: v for k, v in json.loads(m.read_text())["files"].items() if k != "config.yaml"}
            for m in sorted((run_dir / "checkpoints").glob("step_*/manifest.json"))}


def _same_checkpoints(sync_dir: Path, async_dir: Path, steps: list[int]) -> None:
    a, b = _manifests(sync_dir), _manifests(async_dir)
    assert sorted(a) == [f"step_{s:08d}" for s in steps]
    assert a == b
    assert not list((async_dir / "checkpoints").glob("*.tmp")) and not list((async_dir / "checkpoints").rglob(
        "written_rank*"))
    for name in a:
        assert verify(async_dir / "checkpoints" / name) is None


# ---- host copies --------------------------------------------------------------------------------------------
def test_host_copies_write_the_bytes_of_the_live_objects_as_they_were(tmp_path):
    """torch.save of the copy == torch.save of the objects at capture time (views of shared storages, a view
    autograd tracks, OrderedDict metadata, repeated containers), and later in-place changes do not reach it."""
    model = torch.nn.Linear(4, 3)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optim.step()
    flat = torch.randn(40, requires_grad=True)
    shared = {"lr": 0.1}
    obj = {"model": model.state_dict(), "optim": optim.state_dict(),
           "views": [flat.narrow(0, 0, 10), flat.narrow(0, 5, 30), flat], "again": [shared, shared],
           "meta": OrderedDict(a=torch.arange(3))}
    save_torch(tmp_path / "live.pt", obj)
    copies = HostCopies()
    copies.save(tmp_path / "copy.pt", obj)
    with torch.no_grad():  # training goes on
        model.weight.add_(1.0)
        flat.mul_(2.0)
    (path, copy, by_name), = copies.files
    save_torch(path, copy, by_name)
    assert sha256_of(tmp_path / "copy.pt") == sha256_of(tmp_path / "live.pt")
    assert copies.bytes == sum(t.untyped_storage().nbytes() for t in (
        *model.state_dict().values(), *(v for s in optim.state.values() for v in s.values()), flat,
        obj["meta"]["a"]))


# ---- config -------------------------------------------------------------------------------------------------
def test_async_key_loads_dumps_and_is_checked():
    cfg = load_config(None, ["checkpoint.async=true"])
    assert cfg.checkpoint.async_ is True and "\n  async: true\n" in dump_config(cfg)
    with pytest.raises(ConfigError, match=r"'checkpoint.async' must be bool, got 'sometimes'"):
        load_config(None, ["checkpoint.async=sometimes"])
    with pytest.raises(ConfigError, match=r"Unknown config key 'checkpoint.asynch'.*Did you mean 'async'"):
        load_config(None, ["checkpoint.asynch=true"])
    with pytest.raises(ConfigError, match=r"checkpoint.async.*checkpoint_serialization"):
        load_config(None, ["checkpoint.async=true", "deepspeed.checkpoint.checkpoint_serialization=false"])


# ---- in one process -----------------------------------------------------------------------------------------
def test_one_rank_async_gives_the_same_losses_and_files_as_sync(tmp_path, capsys):
    """The plain engine, a save every 3 steps of 10 (the layout-free form with each): losses bitwise equal and
    every checkpoint file the same by checksum; the next save waits for the one in flight and says so."""
    for mode in ("false", "true"):
        train(tiny_config(tmp_path / mode, "causal", "train.steps=10", "checkpoint.every=3", "checkpoint.keep=10",
                          f"checkpoint.async={mode}", "checkpoint.layout_free_every=1"))
    assert _losses(tmp_path / "false") == _losses(tmp_path / "true")
    assert len(_losses(tmp_path / "true")) == 10
    _same_checkpoints(tmp_path / "false", tmp_path / "true", [3, 6, 9, 10])
    assert read_latest(tmp_path / "true" / "checkpoints")[0].name == "step_00000010"


def test_a_writer_error_reaches_the_training_process(tmp_path, monkeypatch):
    """A background write that fails (a full disk, here injected at step 4) is raised in training, naming the
    step, the rank and the file; the previous checkpoint stays `latest` and the temporary folder is gone."""
    real = background.save_torch

    def failing(path, obj, by_name=None):
        if "step_00000004" in str(path):
            raise WriteFailed(path, "No space left on device", 1234, 28)
        real(path, obj, by_name)

    monkeypatch.setattr(background, "save_torch", failing)
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"background write of the checkpoint of step 4 failed \(rank 0: "
                                              r"Could not write the checkpoint file .*step_00000004.tmp/model.pt"):
        train(tiny_config(run_dir, "causal", "train.steps=8", "checkpoint.every=2", "checkpoint.async=true"))
    directory = run_dir / "checkpoints"
    assert read_latest(directory)[0].name == "step_00000002"
    assert not (directory / "step_00000004.tmp").exists() and not (directory / "step_00000004").exists()


class StopAt(StopRequest):
    """A SIGUSR1 that every rank agrees on after step `at` (as if Slurm had sent it)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.asked = at, 0

    def agreed(self, groups) -> int:
        self.asked += 1
        return signal.SIGUSR1 if self.asked == self.at else 0


def test_a_stop_signal_waits_for_the_writer(tmp_path):
    """A stop after step 4, whose checkpoint is in flight: the run commits it before it ends."""
    run_dir = tmp_path / "run"
    result = train(tiny_config(run_dir, "causal", "train.steps=8", "checkpoint.every=2", "checkpoint.async=true"),
                   stop=StopAt(4))
    assert result.stopped_by == signal.SIGUSR1 and result.state.step == 4
    directory = run_dir / "checkpoints"
    assert read_latest(directory)[0].name == "step_00000004" and verify(directory / "step_00000004") is None
    assert not list(directory.glob("*.tmp"))


# ---- launched ----------------------------------------------------------------------------------------------
@pytest.mark.launches
def test_two_ranks_zero1_async_gives_the_same_losses_and_files_as_sync(tmp_path):
    """DeepSpeed ZeRO-1, data parallel 2: DeepSpeed's own files go through host copies too (its checkpoint
    engine's saves are deferred), the layout-free pieces of both ranks and the index rank 0 writes at commit."""
    for mode in ("false", "true"):
        launch_ok(2, tiny_overrides(tmp_path / mode, "causal", "train.steps=8", "checkpoint.every=3",
                                    "checkpoint.keep=10", "train.micro_batch_size=2", "parallel.zero_stage=1",
                                    f"checkpoint.async={mode}"), script=INJECT, env=SEEDED)
    assert _losses(tmp_path / "false") == _losses(tmp_path / "true") and len(_losses(tmp_path / "true")) == 8
    _same_checkpoints(tmp_path / "false", tmp_path / "true", [3, 6, 8])
    files = _manifests(tmp_path / "true")["step_00000003"]
    assert {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "layout_free/rank00001.safetensors"} <= files.keys()


KILL_RUN = ("train.steps=10", "checkpoint.every=2", "model.dropout=0.1", "train.global_batch_size=16")


@pytest.mark.launches
def test_sigkill_during_a_background_write_resumes_from_the_previous_checkpoint(tmp_path):
    """The writer of step 4's checkpoint SIGKILLs its process after its first file (a test hook, not a timer):
    `latest` still names step 2, the restarted run resumes there, and every loss equals a straight run's."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_launcher(tiny_overrides(straight, "causal", *KILL_RUN, "checkpoint.async=true"))
    assert done.returncode == 0, done.stderr[-3000:]
    crash = run_launcher(tiny_overrides(killed, "causal", *KILL_RUN, "checkpoint.async=true"),
                         env={background.KILL_ENV: "4"})
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-3000:]
    directory = killed / "checkpoints"
    assert read_latest(directory)[0].name == "step_00000002"
    assert (directory / "step_00000004.tmp" / "model.pt").is_file()  # killed in the middle of the write
    assert not (directory / "step_00000004.tmp" / "trainer_rank00000.pt").exists()

    resumed = run_launcher(tiny_overrides(killed, "causal", *KILL_RUN, "checkpoint.async=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 2)" in resumed.stdout
    assert _losses(straight) == _losses(killed) and sorted(_losses(killed)) == list(range(1, 11))
    assert not list(directory.glob("*.tmp"))


def test_a_host_copy_is_saved_under_its_device_location():
    """On GPUs the copies live in pinned host memory; torch.save records them under the device's location, as
    it records the device tensors in a synchronous save (checked here with the meta device's tag)."""
    import io
    import zipfile

    from bigtrain.compat.torch import forget_saved_as_device, saved_as_device

    def saved(t: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        buffer = io.BytesIO()
        torch.save(t, buffer)
        pickled = next(zipfile.ZipFile(io.BytesIO(buffer.getvalue())).read(n) for n in
                       zipfile.ZipFile(io.BytesIO(buffer.getvalue())).namelist() if n.endswith("data.pkl"))
        return pickled, torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)

    host = torch.arange(6.0)
    saved_as_device(host.untyped_storage(), torch.empty(6, device="meta").untyped_storage())
    pickled, back = saved(host)
    assert b"meta" in pickled and torch.equal(back, host)
    forget_saved_as_device([host.untyped_storage()])
    pickled, _ = saved(host)
    assert b"meta" not in pickled and b"cpu" in pickled
