"""Every reader of a checkpoint or prepared corpus meets hostile or clumsy input the same way (issue 25): a file
name an index, manifest or pointer lists must lie inside its folder; every command that takes a checkpoint picks
its step with `--step N` (`model.init_from` with the step's folder) and a damaged one lists only intact ones; a
refused pickle is named as such, never with torch's advice to disable the protection; a full disk while the
layout-free form is written is one paragraph; every file bigtrain writes gets the mode the umask gives."""

from __future__ import annotations

import json
import os
import resource
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint.integrity import manifest_for
from bigtrain.cli.report import describe
from bigtrain.errors import CheckpointError, DataError
from bigtrain.train.trainer import Trainer, train
from tests.conftest import GPT2_OPTIONS, run_cli, tiny_config

STEP2 = "checkpoints/step_00000002"


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory) -> Path:
    """A tiny run of 2 steps: one checkpoint (step 2) with its layout-free form."""
    run_dir = tmp_path_factory.mktemp("readers") / "run"
    train(tiny_config(run_dir, "causal", "train.steps=2"))
    return run_dir


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory) -> Path:
    """A tiny run of 6 steps with checkpoints at steps 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("steps") / "run"
    train(tiny_config(run_dir, "causal", "train.steps=6", "checkpoint.every=2", "checkpoint.keep=3"))
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def forge_manifest(checkpoint: Path) -> None:
    """Make the manifest match the files as they are now (a forger can do it): only the readers' checks stand
    between the files and what they lead to."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"] = manifest_for(checkpoint, manifest["step"])["files"]
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def one_paragraph(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("bigtrain: error: "), proc.stderr[-3000:]
    return lines[0]


# --- file names read from an index stay inside its folder ------------------------------------------------------
def lead_outside(checkpoint: Path, outside: Path) -> str:
    """Move the checkpoint's layout-free shard to `outside` and make its index name it there, by a path that leads
    out of the checkpoint (`../../../../x.safetensors`), with a manifest to match; returns the name."""
    folder = checkpoint / "layout_free"
    shutil.move(folder / "rank00000.safetensors", outside)
    name = os.path.relpath(outside, folder)
    index = json.loads((folder / "index.json").read_text())
    index["files"] = {name: index["files"].pop("rank00000.safetensors")}
    for piece in index["pieces"]:
        piece["file"] = name
    (folder / "index.json").write_text(json.dumps(index))
    forge_manifest(checkpoint)
    return name


def _command(*argv: str) -> Callable[[Path, Path], str]:
    def run(run_dir: Path, tmp_path: Path) -> str:
        return one_paragraph(run_cli(*(a.format(run=run_dir, tmp=tmp_path) for a in argv)))
    return run


def _trainer(where: str, *overrides: str) -> Callable[[Path, Path], str]:
    def run(run_dir: Path, tmp_path: Path) -> str:
        with pytest.raises(CheckpointError) as info:
            Trainer(tiny_config(Path(where.format(run=run_dir, tmp=tmp_path)),
                                *(o.format(run=run_dir, tmp=tmp_path) for o in overrides)))
        message, status = describe(info.value)
        assert status == 2
        return message
    return run


READERS = {
    # another precision is another layout: the resume reads the layout-free form
    "resume": _trainer("{run}", "causal", "train.steps=4", "train.precision=bf16"),
    "evaluate": _command("evaluate", "{run}"),
    "export": _command("export", "{run}", "--out", "{tmp}/out"),
    "export-hf": _command("export", "{run}", "--format", "hf", "--out", "{tmp}/out"),
    "consolidate": _command("consolidate", "{run}", "--out", "{tmp}/out"),
    "generate": _command("generate", "{run}", "--prompt", "a", "--max-new-tokens", "2"),
    "attention": _command("attention", "{run}", "--text", "ab", "--out", "{tmp}/a.png"),
    "model.init_from": _trainer("{tmp}/new", "causal", "train.steps=2", "model.init_from={run}"),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_a_layout_free_index_naming_a_file_outside_the_checkpoint_is_refused(one_checkpoint, tmp_path, reader):
    """`layout_free/index.json` names `../../../../outside.safetensors` (a real safetensors file holding the right
    tensors, its checksum in the index and the manifest forged to match): every reader refuses it in one
    paragraph naming the index and the name; none loads it."""
    run_dir = copy_run(one_checkpoint, tmp_path)
    name = lead_outside(run_dir / STEP2, tmp_path / "outside.safetensors")
    message = READERS[reader](run_dir, tmp_path)
    assert f"index.json names the file {name!r}, which is not inside" in message, message
    assert "nothing outside was read" in message


def test_a_prepared_corpus_index_naming_a_file_outside_its_folder_is_refused(tmp_path):
    """A prepared folder (given as data.source) and a token cache whose index.json names shard files in another
    folder: both refused in one paragraph naming the index and the name, before any file is read."""
    from bigtrain.data import build_tokenizer
    from bigtrain.data.corpus import load_corpus, prepare_corpus

    cfg = tiny_config(tmp_path / "run")
    tokenizer = build_tokenizer(cfg.data)
    cache = prepare_corpus(cfg.data, tokenizer).folder
    given = tmp_path / "prepared"
    shutil.copytree(cache, given)
    for folder in (cache, given):
        shutil.copytree(folder, tmp_path / f"elsewhere-{folder.name}")
        index = json.loads((folder / "index.json").read_text())
        name = os.path.relpath(tmp_path / f"elsewhere-{folder.name}" / index["shards"][0]["name"], folder)
        index["shards"][0]["name"] = name
        (folder / "index.json").write_text(json.dumps(index))
    for data in (cfg.data, tiny_config(tmp_path / "run", "causal", f"data.source={given}").data):
        with pytest.raises(DataError, match=r"index.json names the file '(\.\./)+elsewhere-[^']*\.bin', which is not "
                                            r"inside .* nothing outside was read"):
            load_corpus(data, tokenizer)


def test_a_hugging_face_index_naming_a_file_outside_its_folder_is_refused(tmp_path):
    """model.init_from's Hugging Face reader: a model.safetensors.index.json whose weight_map leads out of the
    folder is refused naming it (links inside the folder, as a hub cache has, stay readable)."""
    from safetensors.torch import save_file

    from bigtrain.interop.hf_files import HFTensors

    folder, outside = tmp_path / "hf", tmp_path / "outside.safetensors"
    folder.mkdir()
    save_file({"wte.weight": torch.ones(2, 2)}, str(outside))
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"wte.weight": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"names the file '\.\./outside\.safetensors', which is not inside"):
        HFTensors(folder)
    (folder / "blob.safetensors").symlink_to(outside)  # a hub cache: files are links into its store
    index.write_text(json.dumps({"weight_map": {"wte.weight": "blob.safetensors"}}))
    assert torch.equal(HFTensors(folder).read("wte.weight"), torch.ones(2, 2))


def test_a_manifest_naming_a_file_outside_or_no_file_at_all_makes_the_checkpoint_damaged(one_checkpoint, tmp_path):
    from bigtrain.checkpoint.integrity import verify

    checkpoint = copy_run(one_checkpoint, tmp_path) / STEP2
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name in ("../../../etc/passwd", "/etc/passwd", ""):
        (checkpoint / "manifest.json").write_text(json.dumps({**manifest, "files": {name: {"bytes": 1}}}))
        assert verify(checkpoint) == f"manifest.json names {name!r}, outside the checkpoint"


# --- --step for every command that takes a checkpoint ----------------------------------------------------------
STEP_COMMANDS = {
    "evaluate": ("evaluate", "{run}"),
    "export": ("export", "{run}", "--out", "{tmp}/out"),
    "convert": ("convert", "{run}"),
    "consolidate": ("consolidate", "{run}", "--out", "{tmp}/out"),
    "attention": ("attention", "{run}", "--text", "ab", "--out", "{tmp}/a.png"),
    "generate": ("generate", "{run}", "--prompt", "a", "--max-new-tokens", "2"),
}


def damage(checkpoint: Path) -> None:
    data = bytearray((checkpoint / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (checkpoint / "model.pt").write_bytes(bytes(data))


@pytest.mark.parametrize("name", list(STEP_COMMANDS))
def test_every_command_that_reads_a_checkpoint_picks_its_step(three_checkpoints, tmp_path, name):
    """Checkpoints at steps 2, 4 and 6, of which 6 (the latest) and 2 are damaged: the command names step 6's
    damage and offers only step 4 (`--step 4`); with --step 4 it runs; --step 2 names that one's damage."""
    run_dir = copy_run(three_checkpoints, tmp_path)
    for step in (2, 6):
        damage(run_dir / f"checkpoints/step_{step:08d}")
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in STEP_COMMANDS[name]]
    message = one_paragraph(run_cli(*argv))
    assert "step_00000006 is damaged: model.pt does not match its checksum" in message, message
    assert message.endswith("Pick an intact one: --step 4."), message
    ok = run_cli(*argv, "--step", "4")
    assert ok.returncode == 0, ok.stderr[-3000:]
    message = one_paragraph(run_cli(*argv, "--step", "2"))
    assert "step_00000002 is damaged" in message and message.endswith("Pick an intact one: --step 4."), message
    message = one_paragraph(run_cli(*argv, "--step", "3"))
    assert "No checkpoint for step 3 in" in message and message.endswith("Pick an intact one: --step 4.")


def test_model_init_from_picks_a_step_by_its_folder(three_checkpoints, tmp_path):
    """model.init_from=RUN_DIR whose latest checkpoint is damaged: the message offers the intact one as the
    setting that picks it (model.init_from=RUN_DIR/checkpoints/step_00000004), which then starts the run."""
    run_dir = copy_run(three_checkpoints, tmp_path)
    for step in (2, 6):
        damage(run_dir / f"checkpoints/step_{step:08d}")
    with pytest.raises(CheckpointError) as info:
        Trainer(tiny_config(tmp_path / "new", "causal", f"model.init_from={run_dir}"))
    message = str(info.value)
    assert "step_00000006 is damaged" in message, message
    assert message.endswith(f"Pick an intact one: model.init_from={run_dir / 'checkpoints' / 'step_00000004'}.")
    trainer = Trainer(tiny_config(tmp_path / "new", "causal", f"model.init_from={run_dir}/checkpoints/step_00000004"))
    assert any("weights from model.init_from" in note for note in trainer.notes)


def test_step_that_cannot_apply_is_one_paragraph(three_checkpoints, tmp_path):
    """--step with a checkpoint folder of another step, or with a weights folder (one set of weights): named."""
    run_dir = copy_run(three_checkpoints, tmp_path)
    message = one_paragraph(run_cli("evaluate", str(run_dir / "checkpoints/step_00000004"), "--step", "2"))
    assert "--step 2:" in message and "is one checkpoint folder, not a run.dir" in message
    assert run_cli("evaluate", str(run_dir / "checkpoints/step_00000004"), "--step", "4").returncode == 0
    assert run_cli("export", str(run_dir), "--out", str(tmp_path / "out")).returncode == 0
    message = one_paragraph(run_cli("generate", str(tmp_path / "out"), "--step", "4", "--prompt", "a"))
    assert "--step 4:" in message and "holds one set of weights" in message


# --- a refused pickle is named as such -------------------------------------------------------------------------
class Payload:
    """Unpickling this creates `marker` (by exec: os.system is wrapped by the launch guard of unmarked tests)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"state": Payload(marker)}, path)
    if (path.parent / "manifest.json").exists():
        forge_manifest(path.parent)


def _refused_on_resume(run_dir: Path, tmp_path: Path, marker: Path) -> tuple[str, str]:
    _plant(run_dir / STEP2 / "trainer_rank00000.pt", marker)
    return "trainer_rank00000.pt", READERS["resume"](run_dir, tmp_path)


def _refused_in_a_weights_folder(run_dir: Path, tmp_path: Path, marker: Path) -> tuple[str, str]:
    assert run_cli("consolidate", str(run_dir), "--out", str(tmp_path / "weights")).returncode == 0
    _plant(tmp_path / "weights" / "model.pt", marker)
    return "model.pt", one_paragraph(run_cli("evaluate", str(tmp_path / "weights")))


def _refused_by_consolidate(run_dir: Path, tmp_path: Path, marker: Path) -> tuple[str, str]:
    shutil.rmtree(run_dir / STEP2 / "layout_free")  # then consolidate reads the engine's own files
    _plant(run_dir / STEP2 / "model.pt", marker)
    return "model.pt", one_paragraph(run_cli("consolidate", str(run_dir)))


def _refused_from_hugging_face(run_dir: Path, tmp_path: Path, marker: Path) -> tuple[str, str]:
    from bigtrain.interop.hf_files import HFTensors

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _plant(folder / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError) as info:
        HFTensors(folder)
    return "pytorch_model.bin", str(info.value)


REFUSALS = {"resume": _refused_on_resume, "evaluate": _refused_in_a_weights_folder,
            "consolidate": _refused_by_consolidate, "model.init_from-hf": _refused_from_hugging_face}


@pytest.mark.parametrize("reader", list(REFUSALS))
def test_a_refused_pickle_is_named_and_never_advises_disabling_the_protection(one_checkpoint, tmp_path, reader):
    """A pickle payload planted in a file (manifest forged): the one paragraph names the file and says it holds
    objects that are not plain data, refused, nothing ran; torch's cut advice ("weights_only ... False") is not
    shown, and the payload never runs."""
    run_dir = copy_run(one_checkpoint, tmp_path)
    marker = tmp_path / "pwned"
    name, message = REFUSALS[reader](run_dir, tmp_path, marker)
    assert not marker.exists()
    assert f"{name} " in message and "(it holds objects that are not plain data (exec), which bigtrain refuses to " \
        "load: nothing stored in it ran)" in message, message
    assert "weights_only" not in message and "False" not in message, message


# --- a full disk while the layout-free form is written ---------------------------------------------------------
def test_disk_full_while_writing_the_layout_free_form_is_one_paragraph(one_checkpoint, tmp_path):
    """A file-size limit (RLIMIT_FSIZE, as a full disk: the write fails) between the engine's files (model.pt
    120 kB, optimizer.pt 245 kB) and the layout-free shard (334 kB): the save of step 4 stops in one paragraph
    (exit status 2) naming the shard, the free space and the bytes it needs; `step_00000004.tmp` is removed,
    `latest` still names step 2, and the same run resumes once there is room. (It ended in `SafetensorError ...
    (os error 28)`, exit 1, with the .tmp left.)"""
    run_dir = copy_run(one_checkpoint, tmp_path)
    shutil.copytree(one_checkpoint.parent / "cache", tmp_path / "cache")  # prepared: nothing large is written
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (290_000, hard))
    try:
        with pytest.raises(CheckpointError) as info:
            train(tiny_config(run_dir, "causal", "train.steps=4"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message, status = describe(info.value)
    assert status == 2 and "\n" not in message
    assert "Could not write the checkpoint file" in message and \
        "step_00000004.tmp/layout_free/rank00000.safetensors (File too large)" in message, message
    assert "MiB are free there; this file alone needs about 0.3 MiB" in message, message
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002"]
    assert train(tiny_config(run_dir, "causal", "train.steps=4")).state.step == 4


# --- every file gets the mode the umask gives ------------------------------------------------------------------
def _files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file()]


def test_every_file_written_honours_the_umask(tmp_path):
    """Under umask 022 every file of a checkpoint (the layout-free shards included), an export (safetensors and
    Hugging Face), consolidated weights and the token cache is readable by group and others (the weights were
    0600: teammates could not evaluate or resume); under umask 077 a token cache is private (it was 0644)."""
    from bigtrain.data import build_tokenizer
    from bigtrain.data.corpus import prepare_corpus

    run_dir = tmp_path / "run"
    before = os.umask(0o022)
    try:
        train(tiny_config(run_dir, "causal", "train.steps=2", *GPT2_OPTIONS))
        for argv in (("export", str(run_dir), "--out", str(tmp_path / "safetensors")),
                     ("export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf")),
                     ("consolidate", str(run_dir))):
            proc = run_cli(*argv)
            assert proc.returncode == 0, proc.stderr[-2000:]
        os.umask(0o077)
        private = tiny_config(tmp_path / "private" / "run").data
        prepare_corpus(private, build_tokenizer(private))
    finally:
        os.umask(before)
    shared = _files(run_dir / "checkpoints", tmp_path / "safetensors", tmp_path / "hf", run_dir / "consolidated",
                    tmp_path / "cache")
    assert {"rank00000.safetensors", "model.safetensors", "model.pt", "shard_00000.bin"} <= {p.name for p in shared}
    unreadable = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in shared if p.stat().st_mode & 0o044 != 0o044]
    assert not unreadable, unreadable
    cache = _files(tmp_path / "private" / "cache")
    assert cache and not [p for p in cache if p.stat().st_mode & 0o077], [oct(p.stat().st_mode) for p in cache]
