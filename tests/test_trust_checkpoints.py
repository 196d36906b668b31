"""Checkpoints off the happy path (issue: trust): nothing bigtrain loads runs code, corruption is found by the
manifest and the run falls back to the newest intact checkpoint (moving the damaged one aside, never deleting
it), a lost or garbage `latest` is rebuilt, and a resume must match the saved config where it matters."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint.integrity import manifest_for
from bigtrain.errors import CheckpointError
from bigtrain.train.trainer import Trainer, train
from tests.conftest import (
    launch_ok,
    launch_ranks,
    read_metrics,
    run_cli,
    run_launcher,
    tiny_config,
    tiny_overrides,
)


class Payload:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    """Replace `path` by a pickle payload, and rewrite its checkpoint's manifest to match (a forger can do both):
    only the loader stands between the file and the code."""
    torch.save({"state": Payload(marker)}, path)
    checkpoint = path.parent
    step = int(checkpoint.name.removeprefix("step_"))
    (checkpoint / "manifest.json").write_text(json.dumps(manifest_for(checkpoint, step)))


def _losses(run_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in read_metrics(run_dir)[0].items()}


# --- nothing loaded runs code ------------------------------------------------------------------------------
@pytest.mark.launches
@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "trainer_rank00000.pt"])
def test_plain_engine_files_run_no_code(run_dir, tmp_path, name):
    train(tiny_config(run_dir, "causal", "train.steps=2"))
    marker = tmp_path / "pwned"
    plant(run_dir / "checkpoints" / "step_00000002" / name, marker)
    with pytest.raises(CheckpointError, match=name):
        Trainer(tiny_config(run_dir, "causal", "train.steps=4"))
    assert not marker.exists()


# --- corruption: found, moved aside, older intact checkpoint resumed ---------------------------------------------
def _three_checkpoints(run_dir: Path) -> list[str]:
    return tiny_overrides(run_dir, "causal", "train.steps=8", "checkpoint.every=2", "checkpoint.keep=3")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_latest_falls_back_to_the_newest_intact(tmp_path, damage, capsys):
    """64 flipped bytes in model.pt (which once resumed with loss 2392), a truncated optimizer.pt, a deleted
    trainer_rank00000.pt in the latest checkpoint (step 8 of 8, rolled back to be redone): the run names the file, moves
    step 8 aside, resumes from step 6, and steps 7-8 equal the uninterrupted run's; rotation (keep=3) deletes
    nothing damaged."""
    from bigtrain.config import load_config

    straight, run = tmp_path / "straight", tmp_path / "run"
    train(load_config(None, _three_checkpoints(straight)))
    shutil.copytree(straight, run)
    step8 = run / "checkpoints" / "step_00000008"
    if damage == "flip":
        data = bytearray((step8 / "model.pt").read_bytes())
        half = len(data) // 2  # inside the tensor data: torch reads it without complaint
        data[half:half + 64] = bytes(b ^ 0xFF for b in data[half:half + 64])
        (step8 / "model.pt").write_bytes(bytes(data))
        expected = "model.pt does not match its checksum"
    elif damage == "truncate":
        (step8 / "optimizer.pt").write_bytes((step8 / "optimizer.pt").read_bytes()[:1000])
        expected = "optimizer.pt has 1000 bytes"
    else:
        (step8 / "trainer_rank00000.pt").unlink()
        expected = "trainer_rank00000.pt is missing"
    capsys.readouterr()
    result = train(load_config(None, _three_checkpoints(run)))
    out = capsys.readouterr().out
    assert f"checkpoint step_00000008 is damaged: {expected}" in out
    assert "moved aside to step_00000008.damaged" in out and "resumed from" in out and "(step 6)" in out
    assert result.state.step == 8
    assert _losses(run) == _losses(straight)
    assert (run / "checkpoints" / "step_00000008.damaged").is_dir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest", "step_00000004", "step_00000006", "step_00000008", "step_00000008.damaged"]


@pytest.mark.parametrize("pointer", [None, "", "garbage\x00\xff", "../../../etc", "step_00000099"])
def test_lost_or_invalid_latest_is_rebuilt(run_dir, pointer, capsys):
    """`latest` deleted, empty, garbage, pointing outside the folder or at a missing step: rebuilt from the
    newest intact step_* folder (it once restarted silently at step 1 and rotated the checkpoints away)."""
    train(tiny_config(run_dir, "causal", "train.steps=4", "checkpoint.every=2"))
    latest = run_dir / "checkpoints" / "latest"
    if pointer is None:
        latest.unlink()
    else:
        latest.write_bytes(pointer.encode("utf-8", "surrogateescape"))
    capsys.readouterr()
    trainer = Trainer(tiny_config(run_dir, "causal", "train.steps=6", "checkpoint.every=2"))
    assert trainer.state.step == 4
    assert "rebuilding it from the newest intact checkpoint" in " ".join(trainer.notes)
    assert latest.read_text().strip() == "step_00000004"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]


def test_legacy_checkpoint_with_corrupt_config_is_one_clear_error(run_dir):
    """A checkpoint without a manifest (an earlier bigtrain) whose config.yaml is garbage: one paragraph naming
    the file, not a YAML traceback."""
    train(tiny_config(run_dir, "causal", "train.steps=2"))
    step = run_dir / "checkpoints" / "step_00000002"
    (step / "manifest.json").unlink()
    (step / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(CheckpointError, match=r"config.yaml cannot be read as the config of that checkpoint") as info:
        Trainer(tiny_config(run_dir, "causal", "train.steps=4"))
    assert "\n" not in str(info.value)


# --- what a resume must match ------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,key", [
    ("data.max_bytes=200000", "data.max_bytes"),
    ("train.seed=7", "train.seed"),
    ("model.n_layers=3", "model.n_layers"),
    ("optim.name=lamb", "optim.name"),
])
def test_resume_refuses_changes_to_what_the_state_means(run_dir, change, key):
    train(tiny_config(run_dir, "causal", "train.steps=2"))
    with pytest.raises(CheckpointError, match=rf"{key}: .* --allow-changes {key}"):
        Trainer(tiny_config(run_dir, "causal", "train.steps=4", change))


def test_changed_global_batch_is_allowed_with_a_warning_saying_what_it_does(run_dir, capsys):
    train(tiny_config(run_dir, "causal", "train.steps=2"))
    capsys.readouterr()
    train(tiny_config(run_dir, "causal", "train.steps=4", "train.global_batch_size=16"))
    out = capsys.readouterr().out
    assert "warning: train.global_batch_size changed from 8 to 16. The run goes on at step 3, whose global batch " \
           "starts at sample 32 of the data order instead of 16" in out


def test_allowed_change_is_recorded_and_harmless_ones_are_noted(run_dir, capsys):
    train(tiny_config(run_dir, "causal", "train.steps=2"))
    capsys.readouterr()
    train(tiny_config(run_dir, "causal", "train.steps=4", "train.seed=7", "log.every=2"), allow_changes={"train.seed"})
    out = capsys.readouterr().out
    assert "warning: resuming with changes allowed by --allow-changes: train.seed: 1234 -> 7" in out
    assert "note: resuming with changed settings:" in out and "train.steps: 2 -> 4" in out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "config_changes": {"train.seed": [1234, 7]}} in records


def test_resume_refuses_another_tokenizer_with_the_same_vocabulary(tmp_path):
    """Two BPE tokenizers of the same size (padded vocabulary equal) but different merges: ids would mean other
    text, so the resume is refused naming data.tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    def bpe(text: str, path: Path) -> None:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel()
        tok.train_from_iterator([text] * 50, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
        tok.save(str(path))

    run_dir, a, b = tmp_path / "run", tmp_path / "a.json", tmp_path / "b.json"
    bpe("the quick brown fox jumps over the lazy dog " * 20, a)
    bpe("lorem ipsum dolor sit amet consectetur adipiscing " * 20, b)
    base = ["model.vocab_size=384", "train.steps=2"]
    shutil.copy(a, tmp_path / "tok.json")
    train(tiny_config(run_dir, "causal", *base, f"data.tokenizer={tmp_path / 'tok.json'}"))
    shutil.copy(b, tmp_path / "tok.json")
    with pytest.raises(CheckpointError, match=r"written with the tokenizer .*--allow-changes data.tokenizer"):
        Trainer(tiny_config(run_dir, "causal", "model.vocab_size=384", "train.steps=4",
                            f"data.tokenizer={tmp_path / 'tok.json'}"))


@pytest.mark.launches
def test_a_checkpoint_without_a_layout_free_form_names_the_layout_it_needs(run_dir):
    """A DeepSpeed (ZeRO-1, one process) checkpoint written without its layout-free form, resumed by the plain
    engine: one paragraph naming both layouts and the setting that would have made it portable (it once said
    "has no model.pt … Remove it")."""
    proc = run_launcher(tiny_overrides(run_dir, "causal", "train.steps=2", "parallel.zero_stage=1",
                                       "checkpoint.layout_free_every=0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_launcher(tiny_overrides(run_dir, "causal", "train.steps=4"))
    assert proc.returncode == 2
    assert "was written by tensor 1 × pipeline 1 × data 1, ZeRO-1, DeepSpeed, fp32 and holds no layout-free form" \
        in proc.stderr and "(this run: tensor 1 × pipeline 1 × data 1, the plain PyTorch engine, fp32)" in proc.stderr


# --- DeepSpeed's own files (slow: DeepSpeed engine runs) ------------------------------------------------------
DS_CASES = {
    "zero1": (1, ("parallel.zero_stage=1",), ["mp_rank_00_model_states.pt",
                                               "zero_pp_rank_0_mp_rank_00_optim_states.pt", "trainer_rank00000.pt"]),
    "zero3": (1, ("parallel.zero_stage=3",), ["zero_pp_rank_0_mp_rank_00_model_states.pt",
                                               "zero_pp_rank_0_mp_rank_00_optim_states.pt"]),
    "pipeline": (2, ("parallel.pipeline=2", "train.micro_batch_size=4"), ["layer_01-model_00-model_states.pt"]),
}


@pytest.mark.launches
@pytest.mark.parametrize("case", list(DS_CASES))
def test_deepspeed_files_run_no_code(tmp_path, case):
    """A pickle payload in each kind of file DeepSpeed reads on resume (model states, ZeRO optimizer partitions,
    ZeRO-3 parameter partitions, pipeline layer files) and in bigtrain's per-rank files: the resume fails in one
    paragraph and `bigtrain consolidate` refuses the file; the payload never runs. (DeepSpeed's loader passes
    weights_only=False; bigtrain forces torch's restricted unpickler around it.)"""
    ranks, layout, files = DS_CASES[case]
    written = tmp_path / "written"
    args = tiny_overrides(written, "causal", "train.steps=2", *layout)
    assert (launch_ok(2, args) if ranks == 2 else run_launcher(args).returncode == 0)
    marker = tmp_path / "pwned"
    for name in files:
        run_dir = tmp_path / name
        shutil.copytree(written, run_dir)
        plant(run_dir / "checkpoints" / "step_00000002" / name, marker)
        resume = [*tiny_overrides(run_dir, "causal", "train.steps=4", *layout)]
        proc = launch_ranks(2, resume) if ranks == 2 else run_launcher(resume)
        assert proc.returncode != 0 and "bigtrain: " in proc.stderr, proc.stderr[-2000:]
        if ranks == 1:  # (under torchrun, torchrun itself prints a traceback of the failed child)
            assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
            _assert_refusal_named(proc.stderr, name)
        assert not marker.exists(), f"{name}: the payload ran"
    # consolidate reads a checkpoint's layout-free form when it has one: without it, it reads the planted file
    shutil.rmtree(tmp_path / files[0] / "checkpoints" / "step_00000002" / "layout_free")
    plant(tmp_path / files[0] / "checkpoints" / "step_00000002" / files[0], marker)
    consolidate = run_cli("consolidate", str(tmp_path / files[0]))  # in this process
    assert consolidate.returncode == 2 and "Cannot read the checkpoint" in consolidate.stderr, consolidate.stderr
    _assert_refusal_named(consolidate.stderr, files[0])
    assert not marker.exists()


def _assert_refusal_named(stderr: str, name: str) -> None:
    """The error names the refused file and says why, without torch's advice to load with weights_only=False (the
    one paragraph once quoted it, cut mid-sentence)."""
    error = next(line for line in stderr.splitlines() if line.startswith("bigtrain: error: "))
    assert name in error and "holds objects that are not plain data" in error, error
    assert "weights_only" not in error, error


@pytest.mark.launches
def test_deepspeed_checkpoint_with_a_flipped_byte_falls_back(tmp_path):
    """ZeRO-2, 2 ranks: a flipped byte in a ZeRO optimizer partition of the latest checkpoint (which once gave
    a silently different curve) is found by its checksum; the run resumes from the previous checkpoint and every
    loss equals the uninterrupted run's."""
    extra = ("parallel.zero_stage=2", "train.steps=6", "checkpoint.every=2", "checkpoint.keep=3",
             "train.global_batch_size=8", "train.micro_batch_size=2")
    straight = tmp_path / "straight"
    launch_ok(2, tiny_overrides(straight, "causal", *extra))
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    part = run_dir / "checkpoints" / "step_00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    out = launch_ok(2, tiny_overrides(run_dir, "causal", *extra))
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its checksum" in out and "(step 4)" in out
    assert _losses(run_dir) == _losses(straight)
