"""`bigtrain generate` end to end (from a run, its export and a seq2seq model; contradictory flags and wrong
inputs refused in one paragraph), and generation under parallel layouts: tensor parallelism (TP=2, with and
without the cache, and under sequence parallelism) generates the one-device model's tokens; the trainer's final
sample under parallel layouts. The generation algorithms themselves: tests/test_generation.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bigtrain.cli import main as cli_main
from bigtrain.config import config_to_dict, load_config
from bigtrain.data import ByteTokenizer
from bigtrain.distributed.rendezvous import free_port
from bigtrain.models import build_model, resolve_vocab_size
from tests.conftest import (
    REPO,
    launch_ok,
    run_launcher,
    tiny_overrides,
)
from tests.helpers.tensor_generation import lively


# --- the command ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def causal_run(tmp_path_factory) -> Path:
    """A tiny causal run, trained 10 steps; its final sample printed (the trainer uses `generate`)."""
    run_dir = tmp_path_factory.mktemp("generate") / "run"
    proc = run_launcher(tiny_overrides(run_dir, "causal", "train.steps=10", "train.sample_tokens=16"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--- sample (16 tokens after 'def ') ---\ndef " in proc.stdout
    return run_dir


def _weights_folder(path: Path, family: str) -> Path:
    """A folder like `bigtrain export` writes (model.safetensors + config.yaml), of random tiny weights."""
    from safetensors.torch import save_file

    cfg = load_config(None, tiny_overrides(path / "run", family))
    model = build_model(cfg.model, resolve_vocab_size(cfg.model, ByteTokenizer.vocab_size), "cpu", seed=0)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"},
              str(path / "model.safetensors"))
    (path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def _completions(out: str) -> list[str]:
    return out.split("--- ")[1:]


@pytest.mark.launches
def test_command_generates_from_a_run_and_its_export(causal_run, tmp_path, capsys):
    """`bigtrain generate RUN --prompt ... --prompt ...`: one completion per prompt; the same with --no-cache and
    from the `bigtrain export` folder; sampling repeats with its seed; beam search runs."""
    base = [str(causal_run), "--prompt", "def ", "--prompt", "", "--max-new-tokens", "12"]
    assert cli_main(["generate", *base]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("--- 1/2: 'def ' (") and "--- 2/2: '' (" in greedy
    assert len(_completions(greedy)) == 2 and "\ndef " in greedy
    assert cli_main(["generate", *base, "--no-cache"]) == 0
    assert capsys.readouterr().out == greedy
    assert cli_main(["export", str(causal_run), "--out", str(tmp_path / "export")]) == 0
    capsys.readouterr()
    assert cli_main(["generate", str(tmp_path / "export"), *base[1:], "train.device=cpu"]) == 0
    assert capsys.readouterr().out == greedy
    sampled = [*base, "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "5"]
    assert cli_main(["generate", *sampled]) == 0
    first = capsys.readouterr().out
    assert cli_main(["generate", *sampled]) == 0
    assert capsys.readouterr().out == first
    assert cli_main(["generate", *base, "--beams", "3", "--length-penalty", "0.8"]) == 0
    assert len(_completions(capsys.readouterr().out)) == 2


def test_command_generates_from_a_seq2seq_model(tmp_path, capsys):
    folder = _weights_folder(tmp_path / "weights", "seq2seq")
    assert cli_main(["generate", str(folder), "--prompt", "abc", "--prompt", "hello", "--max-new-tokens", "5",
                     "--beams", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- 1/2: 'abc' (") and "--- 2/2: 'hello' (" in out


@pytest.mark.parametrize("flags, expected", [
    (["--beams", "4", "--temperature", "0.7"], "--beams 4 cannot be combined with --temperature 0.7"),
    (["--greedy", "--top-k", "5"], "--greedy cannot be combined with --top-k 5"),
    (["--length-penalty", "2"], "--length-penalty 2.0 applies to beam search only"),
    (["--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
    (["--temperature", "0"], "--temperature 0.0 must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: give at least 1"),
    (["--beams", "0"], "--beams 0: the number of beams must be >= 1"),
])
def test_command_refuses_contradictory_flags(tmp_path, capsys, flags, expected):
    """Checked before any weights are read (the path does not even exist)."""
    assert cli_main(["generate", str(tmp_path / "nothing"), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err


def test_command_refuses_a_masked_model_and_a_wrong_path(tmp_path, capsys):
    folder = _weights_folder(tmp_path / "masked", "masked")
    assert cli_main(["generate", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "model.family=masked has no generation" in err and "use" in err and err.count("\n") == 1
    assert cli_main(["generate", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "holds no weights bigtrain knows" in capsys.readouterr().err


# --- parallel layouts -------------------------------------------------------------------------------------------
@pytest.mark.launches
def test_tensor_parallel_generation_matches_one_device(tmp_path):
    """TP=2 (gloo, tests/helpers/tensor_generation.py): greedy with the cache, without it, and under sequence
    parallelism (recomputed, padded to the tensor size), and beam search: the one-device model's tokens, for
    causal (learned, GPT-2, rotary + GQA) and seq2seq (guide, T5) models."""
    out = tmp_path / "generation.jsonl"
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                           f"--master_port={free_port()}", str(REPO / "tests" / "helpers" / "tensor_generation.py"),
                           str(out)], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={"PATH": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["case"] for r in records] == ["causal", "causal-modern-gqa", "gpt2", "seq2seq", "t5"]
    for r in records:
        assert r["cached"] == r["uncached"] == r["sequence_parallel"] == r["reference"], r["case"]
        assert r["beam"] == r["reference_beam"], r["case"]


@pytest.mark.launches
@pytest.mark.parametrize("layout", [("parallel.tensor=2",), ("parallel.tensor=2", "parallel.sequence_parallel=true"),
                                    ("parallel.zero_stage=3", "train.micro_batch_size=4")],
                         ids=["tp", "tp+sp", "zero3"])
def test_trainer_sample_under_parallel_layouts(tmp_path, layout):
    """The final sample is printed (once) under tensor parallelism (vocabulary shards gathered), sequence
    parallelism (recomputed, padded to the tensor size) and ZeRO-3 (every rank in every forward)."""
    out = launch_ok(2, tiny_overrides(tmp_path / "run", "causal", "train.steps=2", "train.sample_tokens=12",
                                      *layout))
    assert out.count("--- sample (12 tokens after 'def ') ---\ndef ") == 1


@pytest.mark.launches
@pytest.mark.parametrize("extra", [(), ("parallel.sequence_parallel=true",)], ids=["tp2", "tp2-sp"])
def test_command_under_tensor_parallelism_prints_the_one_device_text(tmp_path, capsys, extra):
    """`torchrun --nproc_per_node 2 -m bigtrain.cli generate WEIGHTS ...`: the model split over two
    tensor-parallel ranks, each reading its shards; printed once, the one-device text (greedy and 4 beams).
    The weights are random with a wide spread (`lively`), so that no two next tokens are near a tie: summation
    order differs between one device and two shards, and must not decide a token."""
    folder = _weights_folder(tmp_path / "weights", "causal")
    from safetensors.torch import load_file, save_file

    cfg = load_config(None, tiny_overrides(tmp_path / "run", "causal"))
    model = build_model(cfg.model, resolve_vocab_size(cfg.model, ByteTokenizer.vocab_size), "cpu", seed=0)
    model.load_state_dict({**load_file(str(folder / "model.safetensors"))}, strict=False)
    lively(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"},
              str(folder / "model.safetensors"))
    torchrun = Path(sys.executable).parent / "torchrun"
    for flags in (["--greedy"], ["--beams", "4", "--length-penalty", "0.8"]):
        args = [str(folder), "--prompt", "def ", "--prompt", "import os", "--max-new-tokens", "10", *flags]
        assert cli_main(["generate", *args]) == 0
        one_device = capsys.readouterr().out
        proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                               f"--master_port={free_port()}", "-m", "bigtrain.cli", "generate", *args, *extra],
                              capture_output=True, text=True, timeout=300, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert proc.stdout[proc.stdout.find("--- 1/2"):] == one_device  # after DeepSpeed's start-up lines
