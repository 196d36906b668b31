"""The layout-free checkpoint form: pieces read back exactly whatever boxes and ranges cut them, damage is named
by file, a checkpoint of this format version resumes (fixture), and one set of weights serves `evaluate`,
`export` and `consolidate`; `convert` adds the form to checkpoints written without it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint.layout_free import LayoutFreeReader, Piece, write_index, write_pieces
from bigtrain.cli.tools import evaluate_weights
from bigtrain.errors import CheckpointError
from bigtrain.train.trainer import train
from tests.conftest import REPO, launch_ok, read_metrics, run_cli, run_launcher, tiny_config, tiny_overrides

FIXTURE = REPO / "tests" / "fixtures" / "layout_free_v1"
BIGTRAIN = Path(sys.executable).parent / "bigtrain"


# --- the format ------------------------------------------------------------------------------------------------
def _write_cut(folder: Path, full: torch.Tensor, shards: int, gen: torch.Generator) -> None:
    """`full` cut as tensor parallelism (along the last dimension) and ZeRO (random flat ranges) would."""
    entries = []
    cols = full.shape[-1] // shards
    for t in range(shards):
        box = tuple((0, n) for n in full.shape[:-1]) + ((t * cols, (t + 1) * cols),)
        shard = full[..., t * cols:(t + 1) * cols].reshape(-1)
        cuts = sorted({0, shard.numel(), *torch.randint(0, shard.numel() + 1, (2,), generator=gen).tolist()})
        entries.append(write_pieces(folder, t, [Piece("w", "param", box, a, b, shard[a:b])
                                                 for a, b in zip(cuts[:-1], cuts[1:], strict=False) if a < b]))
    write_index(folder, entries, {"step": 1, "parameters": {"w": {"shape": list(full.shape)}}})


def test_pieces_read_back_any_box_exactly(tmp_path):
    """100 random 1-D and 2-D tensors cut into tensor-parallel boxes and ZeRO flat ranges: every tensor, and a
    random box of it (another layout's shard), read back bitwise."""
    gen = torch.Generator().manual_seed(0)
    for case in range(100):
        shards = int(torch.randint(1, 4, (1,), generator=gen))
        shape = [int(torch.randint(1, 7, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen)) * shards]
        full = torch.randn(shape[-1:] if case % 3 == 0 else shape, generator=gen)
        folder = tmp_path / str(case)
        _write_cut(folder, full, shards, gen)
        reader = LayoutFreeReader(folder)
        assert torch.equal(reader.read("w", "param"), full)
        box = tuple((lo, int(torch.randint(lo + 1, n + 1, (1,), generator=gen)))
                    for n in full.shape for lo in [int(torch.randint(0, n, (1,), generator=gen))])
        assert torch.equal(reader.read("w", "param", box), full[tuple(slice(a, b) for a, b in box)])
        values = full[tuple(slice(a, b) for a, b in box)].reshape(-1)
        start = int(torch.randint(0, values.numel(), (1,), generator=gen))
        stop = int(torch.randint(start + 1, values.numel() + 1, (1,), generator=gen))
        # a flat range of a box: what a ZeRO partition of another layout reads
        assert torch.equal(reader.read_flat("w", "param", box, start, stop), values[start:stop])


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_shard_is_named(tmp_path, damage):
    _write_cut(tmp_path, torch.arange(24.0).reshape(4, 6), 2, torch.Generator().manual_seed(1))
    shard = tmp_path / "rank00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(bytes(data[:-8]))
    else:
        data[-3] ^= 0x10
        shard.write_bytes(bytes(data))
    reader = LayoutFreeReader(tmp_path)
    with pytest.raises(CheckpointError, match=r"rank00001.safetensors (has \d+ bytes|does not match its checksum)"):
        reader.read("w", "param")
    assert "rank00001.safetensors" in reader.verify_all()


def test_damaged_layout_free_shard_falls_back_to_the_previous_checkpoint(run_dir, capsys):
    """A flipped byte in a layout-free shard of the latest checkpoint: the resume names the file and goes on
    from the previous complete checkpoint."""
    train(tiny_config(run_dir, "causal", "train.steps=4", "checkpoint.every=2"))
    shard = run_dir / "checkpoints" / "step_00000004" / "layout_free" / "rank00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    result = train(tiny_config(run_dir, "causal", "train.steps=6", "checkpoint.every=2"))
    out = capsys.readouterr().out
    assert "layout_free/rank00000.safetensors does not match its checksum" in out and "(step 2)" in out
    assert result.state.step == 6


# --- a checkpoint of this format version keeps resuming -------------------------------------------------------
@pytest.mark.launches
def test_layout_free_fixture_resumes_under_another_layout(tmp_path):
    """tests/fixtures/layout_free_v1: step 2 of a 2-rank ZeRO-1 run (format version 1). One process resumes it
    from the layout-free form; steps 3-4 equal the run that wrote it (1e-5)."""
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE, run_dir)
    saved = run_dir / "checkpoints" / "step_00000002" / "config.yaml"
    proc = run_launcher(["--config", str(saved), f"run.dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}",
                         "parallel.zero_stage=0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming step 2 written by tensor 1 × pipeline 1 × data 2, ZeRO-1, DeepSpeed, fp32 under" in proc.stdout
    written = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.straight.jsonl").read_text().splitlines())
               if "loss" in r}
    resumed = read_metrics(run_dir)[0]
    for step in (3, 4):
        for key in ("loss", "grad_norm"):
            assert resumed[step][key] == pytest.approx(written[step][key], rel=1e-5), (step, key)


# --- one set of weights --------------------------------------------------------------------------------------------
def test_evaluate_export_and_consolidate_read_the_same_weights(run_dir, tmp_path):
    """`bigtrain evaluate` on the run.dir (its layout-free form, read directly), on `bigtrain export`'s
    model.safetensors and on `bigtrain consolidate`'s model.pt: the held-out loss of the run's final evaluation."""
    result = train(tiny_config(run_dir, "causal", "train.steps=4"))
    expected = result.last_eval["eval_loss"]
    out = tmp_path / "export"
    proc = run_cli("export", str(run_dir), "--format", "safetensors", "--out", str(out))  # in this process
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    consolidated = run_cli("consolidate", str(run_dir))
    assert consolidated.returncode == 0, consolidated.stderr
    for where in (run_dir, run_dir / "checkpoints" / "step_00000004", out, run_dir / "consolidated" / "step_00000004"):
        assert evaluate_weights(where)["eval_loss"] == pytest.approx(expected, rel=1e-6), where


@pytest.mark.launches
def test_convert_adds_the_layout_free_form(run_dir):
    """A plain-engine checkpoint written without the form (checkpoint.layout_free_every=0): `bigtrain convert`
    adds it (weights and optimizer moments equal the checkpoint's own files) and the manifest covers it."""
    from bigtrain.checkpoint.integrity import verify

    train(tiny_config(run_dir, "causal", "train.steps=2", "checkpoint.layout_free_every=0"))
    step = run_dir / "checkpoints" / "step_00000002"
    assert not (step / "layout_free").exists()
    proc = run_cli("convert", str(run_dir))  # a plain-engine checkpoint: no ranks to start, so in this process
    assert proc.returncode == 0, proc.stderr
    assert verify(step) is None and (step / "layout_free" / "index.json").exists()
    reader = LayoutFreeReader(step / "layout_free")
    model = torch.load(step / "model.pt", weights_only=True)
    optimizer = torch.load(step / "optimizer.pt", weights_only=True)
    names = [n for n in model if n != "head.weight"]
    for name in names:
        assert torch.equal(reader.read(name, "param"), model[name].float())
    first = optimizer["state"][0]
    assert torch.equal(reader.read(names[0], "exp_avg"), first["exp_avg"])


@pytest.mark.launches
def test_converted_deepspeed_checkpoint_resumes_under_another_layout(tmp_path):
    """2-rank ZeRO-2 without the form, 10 steps; `bigtrain convert` loads it with 2 local ranks and writes the
    form; one process then resumes steps 11-20 equal to the 2-rank run's (1e-5)."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, "causal", "train.global_batch_size=8", "train.micro_batch_size=2",
                          "checkpoint.every=10", "checkpoint.layout_free_every=0", "parallel.zero_stage=2")
    launch_ok(2, args)
    straight = read_metrics(run_dir)[0]
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000020")
    (checkpoints / "latest").write_text("step_00000010\n")
    proc = subprocess.run([str(BIGTRAIN), "convert", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    resumed = run_launcher([*args, "parallel.zero_stage=0"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = read_metrics(run_dir)[0]
    for step in range(11, 21):
        assert again[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5), step


@pytest.mark.parametrize(("every", "parameters", "expected"), [
    (None, 10**6, [True, True, True]), (None, 2 * 10**9, [False, False, True]), (2, 10**6, [False, True, True]),
    (0, 10**6, [False, False, False])])
def test_the_layout_free_form_by_default_costs_what_a_large_run_can_live_with(tmp_path, monkeypatch, every,
                                                                              parameters, expected):
    """checkpoint.layout_free_every=null: every save while the form (12 bytes per parameter) is at most 16 GiB,
    else only the last one; k: one save in k and the last; 0: never. The cost is stated at the start."""
    from torch import nn

    import bigtrain.checkpoint.manager as manager_module
    from bigtrain.config.layout import Layout

    cfg = tiny_config(tmp_path / "run", "causal", f"checkpoint.layout_free_every={'null' if every is None else every}")
    written = []
    monkeypatch.setattr(manager_module, "save_checkpoint", lambda *args: written.append(args[-1] is not None))
    manager = manager_module.CheckpointManager(cfg, Layout(), engine=None, groups=None, rank=0, run_dir=tmp_path,
                                               full_model=nn.Linear(parameters, 1, bias=False, device="meta"))
    for step, last in ((1, False), (2, False), (3, True)):
        manager.save({"step": step}, last)
    assert written == expected
    assert f"adds {12 * parameters / 2**30:.3g} GiB" in manager.describe_cost()
