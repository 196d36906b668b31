"""Hostile and clumsy command lines (issue 25): overrides anywhere, once-printed argument errors, `~` in paths and
path keys, text that is not UTF-8, numbers out of range or not finite, a picture too large to draw, a long
generation streamed, an unwritable --out named as such, list-entry overrides the loader takes. Every command runs
in this process (`run_cli`) except the one test that needs a launcher."""

from __future__ import annotations

import errno
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bigtrain.cli.arguments import looks_like_override, whole
from bigtrain.config import load_config
from bigtrain.config.loader import merged_config
from bigtrain.distributed.rendezvous import free_port
from bigtrain.errors import ConfigError
from bigtrain.inference.generate import decoding_problems
from tests.conftest import REPO, run_cli, tiny_overrides
from tests.test_generate_command import _weights_folder

SMOKE = str(REPO / "configs" / "smoke.yaml")


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one paragraph a refused command prints (exit 2, no usage text, no traceback)."""
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bigtrain: error: "), proc.stderr
    assert "usage:" not in proc.stderr and "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def causal_weights(tmp_path_factory) -> Path:
    """A folder like `bigtrain export` writes: random tiny causal weights and their config."""
    return _weights_folder(tmp_path_factory.mktemp("weights") / "causal", "causal")


# --- overrides anywhere, errors once ------------------------------------------------------------------------------
def test_overrides_before_between_and_after_the_options():
    """`train.steps=2 --config …`, `--allow-changes train.seed train.seed=99`: both were refused."""
    proc = run_cli("train", "train.steps=2", "--config", SMOKE, "model.dropout=0.25", "--allow-changes", "train.seed",
                   "train.seed=99", "--print-config", "log.every=3")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert (printed["train"]["steps"], printed["train"]["seed"], printed["model"]["dropout"],
            printed["log"]["every"]) == (2, 99, 0.25, 3)


def test_every_command_with_overrides_takes_them_anywhere(causal_weights, tmp_path):
    """plan, prepare, evaluate and generate (the path told from the overrides by its shape), parity (its layout is
    checked after the line is read)."""
    plan = run_cli("plan", "train.global_batch_size=64", "--config", "configs/gpt2-small.yaml", "--gpus", "8",
                   "parallel.zero_stage=1", "--top", "1", "train.micro_batch_size=8", "--json")
    assert plan.returncode == 0, plan.stderr
    assert yaml.safe_load(plan.stdout)["given"]["layout"]["zero_stage"] == 1
    generated = run_cli("generate", "train.device=cpu", str(causal_weights), "--prompt", "ab", "model.dropout=0",
                        "--max-new-tokens", "3", "--greedy")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("--- 1/1: 'ab' ---\nab")
    parity = run_cli("parity", "train.steps=2", "--config", SMOKE, "--layout", "tensor=2", "--precision", "fp8")
    assert "--precision fp8: choose fp32 or bf16" in one_error_line(parity)
    evaluate = run_cli("evaluate", "train.device=cpu", str(tmp_path / "nowhere"), "model.dropout=0")
    assert str(tmp_path / "nowhere") in one_error_line(evaluate)
    two_paths = run_cli("generate", str(causal_weights), "elsewhere", "--prompt", "x")
    assert "give one CHECKPOINT (a path)" in one_error_line(two_paths)
    prepare = run_cli("prepare", "data.seq_len=not-a-number", "--config", SMOKE, "--workers", "1")
    assert "'data.seq_len' must be int" in one_error_line(prepare)


@pytest.mark.parametrize("argv, needle", [
    (["train", "--bogus"], "bigtrain train: unrecognized arguments: --bogus"),
    (["generate", "x", "--prompt", "y", "--seed", "1e23"], "--seed 100000000000000000000000: give a whole number "
                                                               "from 0 to 2^64 - 1"),
    (["generate", "x", "--prompt", "y", "--seed", "one"], "argument --seed: 'one' is not a whole number"),
    (["generate", "x", "--prompt", "y", "--beams", "2", "--length-penalty", "nan"],
     "argument --length-penalty: 'nan' is not a finite number"),
    (["generate", "x", "--prompt", "y", "--temperature", "inf"], "argument --temperature: 'inf' is not a finite"),
    (["generate", "x", "--prompt", "\udcff\udcfe"], "argument --prompt: b'\\xff\\xfe' is not UTF-8 text (byte 0xff"),
    (["attention", "x", "--text", "a\udce9", "--out", "x.png"], "argument --text: b'a\\xe9' is not UTF-8 text"),
    (["plan", "--config", SMOKE, "--gpus", "8", "--gpu-memory", "nan"], "--gpu-memory: 'nan' is not a finite"),
    (["consolidate"], "the following arguments are required: run_dir"),
])
def test_bad_arguments_are_one_paragraph(argv, needle):
    """argparse's own errors too: one line, exit 2, no usage text (`bigtrain train` printed usage and error once
    per rank); a seed torch cannot take ended in 'Overflow when unpacking long long', exit 1; a NaN length penalty
    was accepted and ranked hypotheses by NaN; a prompt that is not UTF-8 ended in UnicodeEncodeError, exit 1."""
    assert needle in one_error_line(run_cli(*argv))


def test_decoding_options_must_be_finite_in_the_library_too():
    assert "must be a finite number" in decoding_problems(beams=2, length_penalty=math.nan)[0]
    assert "must be a finite number" in decoding_problems(temperature=math.inf)[0]


def test_whole_numbers_and_overrides_are_told_apart():
    assert whole("1e8") == 100_000_000 and whole("1e23") == 10**23 and whole(" 42 ") == 42
    assert looks_like_override("data.sources[0].weight=2") and looks_like_override("train.steps=3")
    assert not looks_like_override("runs/a.b=c") and not looks_like_override("run") and not looks_like_override("x=1")


@pytest.mark.launches
def test_an_argument_error_under_a_launcher_is_printed_once(tmp_path):
    """Every rank reads the same command line and config: rank 0 reports the error, the other ranks leave it to
    rank 0 (the launcher stops them when it exits). Before: usage and error once per rank."""
    for args in (["--bogus"], ["--config", SMOKE, "train.seed=abc"]):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "bigtrain.cli.train",
                               *args], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("bigtrain: ")]
        assert len(errors) == 1 and "error: " in errors[0], proc.stderr[-3000:]
        assert "usage:" not in proc.stderr


# --- ~ in paths -------------------------------------------------------------------------------------------------
PATH_KEYS = ["data.source", "data.tokenizer", "data.cache_dir", "run.dir", "model.init_from"]


def test_tilde_is_expanded_in_every_path_key(tmp_path, monkeypatch):
    """`run.dir=~/x` made a folder named `~` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    # the keys and types only: the checks would look for the files
    cfg = merged_config(None, [f"{key}=~/{key}" for key in PATH_KEYS] + [
        "data.sources=[{source: ~/a.txt, name: a}]", "data.sources[1].source=~/b.txt"])
    got = [cfg.data.source, cfg.data.tokenizer, cfg.data.cache_dir, cfg.run.dir, cfg.model.init_from]
    assert got == [str(tmp_path / key) for key in PATH_KEYS]
    assert [s.source for s in cfg.data.sources] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    (tmp_path / "c.yaml").write_text("run:\n  dir: ~/from-file\n")
    assert merged_config(tmp_path / "c.yaml").run.dir == str(tmp_path / "from-file")
    assert merged_config(None, ["data.source=embedded", "run.dir=runs/~x"]).run.dir == "runs/~x"  # not leading


def test_tilde_is_expanded_in_path_arguments(tmp_path, monkeypatch, causal_weights):
    """--config, checkpoints, --out: `--out=~/x` reaches the program unexpanded (no shell expands it)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("train:\n  steps: 7\n")
    proc = run_cli("train", "--config=~/c.yaml", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["train"]["steps"] == 7
    (tmp_path / "w").symlink_to(causal_weights)
    out = run_cli("export", "~/w", "--out=~/exported")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "exported" / "model.safetensors").is_file() and not Path("~").exists()
    missing = run_cli("consolidate", "~/missing")
    assert str(tmp_path / "missing") in one_error_line(missing)


# --- generate and attention -------------------------------------------------------------------------------------
def test_one_prompt_is_printed_as_it_is_generated(causal_weights, monkeypatch):
    """`--max-new-tokens 1e8` printed nothing until the end: with one prompt the text comes as each token is chosen
    (the same text as the batched completion); several prompts still print when done."""
    from bigtrain.cli.generate import generate_text
    from bigtrain.inference.decoder_rows import CausalRows
    from bigtrain.inference.generate import Decoding

    printed_at_step = []
    logits = CausalRows.logits

    def watched(self):
        printed_at_step.append(len(sys.stdout.getvalue()) if isinstance(sys.stdout, io.StringIO) else -1)
        return logits(self)

    monkeypatch.setattr(CausalRows, "logits", watched)
    proc = run_cli("generate", str(causal_weights), "--prompt", "def ", "--max-new-tokens", "2e1")
    assert proc.returncode == 0, proc.stderr
    header, rest = proc.stdout.split("\n", 1)
    text, footer = rest.rsplit("\n", 2)[0], rest.rsplit("\n", 2)[1]
    assert header == "--- 1/1: 'def ' ---" and footer.startswith("--- 1/1: 20 new tokens")
    assert len(printed_at_step) == 20 and printed_at_step[0] > 0  # the header and prompt before the first token
    assert printed_at_step[-1] > printed_at_step[0]  # text came out while generating
    monkeypatch.setattr(CausalRows, "logits", logits)
    assert text == generate_text(causal_weights, ["def "], 20, Decoding())[0].text


def test_stream_holds_back_an_incomplete_character():
    from bigtrain.cli.generate import TextStream
    from bigtrain.data import ByteTokenizer

    tok, pieces = ByteTokenizer(), []
    stream = TextStream(tok.decode, tok.encode("naïve "), pieces.append)
    for byte in "café ☃!".encode():
        stream.add(byte)
    stream.close()
    assert "".join(pieces) == "café ☃!" and "\ufffd" not in "".join(pieces)


def test_a_huge_dpi_is_refused_before_drawing(causal_weights, tmp_path):
    """`--dpi 100000` ended in std::bad_alloc (exit 1)."""
    out = tmp_path / "maps.png"
    line = one_error_line(run_cli("attention", str(causal_weights), "--text", "abc", "--out", str(out), "--dpi",
                                  "100000"))
    assert "--dpi 100000 would draw a" in line and "at --dpi 1,957" in line and not out.exists()
    assert "give at least 10 pixels per inch" in one_error_line(
        run_cli("attention", str(causal_weights), "--text", "abc", "--out", str(out), "--dpi", "0.001"))


def test_an_unwritable_out_is_named_as_the_out(causal_weights, tmp_path, monkeypatch):
    """The advice named run.dir / data.cache_dir, which export does not have."""
    import bigtrain.checkpoint.weights as weights

    out = tmp_path / "read-only"

    def refuse(checkpoint, folder, step=None):
        raise OSError(errno.EROFS, "Read-only file system", str(folder / "model.safetensors"))

    monkeypatch.setattr(weights, "export_safetensors", refuse)
    line = one_error_line(run_cli("export", str(causal_weights), "--out", str(out)))
    assert f"({out / 'model.safetensors'})" in line and "choose another --out on a writable one" in line
    assert "run.dir" not in line


# --- config keys ------------------------------------------------------------------------------------------------
def test_the_override_a_list_entry_message_suggests_is_one_the_loader_takes(tmp_path):
    """'override it as data.sources[0].weight=VALUE' was refused as an unknown key 'sources[0]'."""
    base = tiny_overrides(tmp_path / "run", "causal", "data.sources=[{source: embedded, name: a}, "
                                                      "{source: embedded, name: b}]")
    with pytest.raises(ConfigError) as error:
        load_config(None, [*base, "data.sources[1].weight=heavy"])
    assert "override it as data.sources[1].weight=VALUE" in str(error.value)
    cfg = load_config(None, [*base, "data.sources[1].weight=3", "data.sources[2].source=embedded",
                             "data.sources[2].name=c"])
    assert [(s.name, s.weight) for s in cfg.data.sources] == [("a", 1.0), ("b", 3.0), ("c", 1.0)]
    with pytest.raises(ConfigError, match=r"the 'sources' given before has 2 entries; an override changes one of them "
                                          r"or adds entry 2"):
        load_config(None, [*base, "data.sources[5].weight=1"])
    config = tmp_path / "mixture.yaml"  # entries of a list the file gives
    config.write_text("data:\n  sources:\n    - {source: embedded, name: a}\n    - {source: embedded, name: b}\n")
    cfg = load_config(config, [*base[:-1], "data.sources[0].weight=0.5"])
    assert [(s.name, s.weight) for s in cfg.data.sources] == [("a", 0.5), ("b", 1.0)]
    with pytest.raises(ConfigError, match=r"'data.sources' has entries 0 to 1; an override changes one of them or "
                                          r"adds data.sources\[2\]"):
        load_config(config, [*base[:-1], "data.sources[5].weight=1"])
    with pytest.raises(ConfigError, match="'model.d_model' is not a list"):
        load_config(None, ["model.d_model[0]=1"])
    with pytest.raises(ConfigError, match="sets an entry of 'd_model', which is a value"):
        load_config(None, [*base, "model.d_model[0]=1"])  # model.d_model=32 is among them


def test_a_deepspeed_section_under_fairscale_names_the_engine(tmp_path):
    """It blamed 'one process, zero_stage 0' for a 4-rank fairscale run (89abca6)."""
    with pytest.raises(ConfigError) as error:
        load_config(None, tiny_overrides(tmp_path / "run", "causal", "parallel.engine=fairscale",
                                         "parallel.zero_stage=1", "train.micro_batch_size=2",
                                         "deepspeed.steps_per_print=5"), world_size=4)
    message = str(error.value)
    assert "its engine is fairscale, on tensor 1 × pipeline 1 × data 4 = 4 ranks" in message
    assert "one process" not in message and "zero_stage 0" not in message


def test_the_rank_an_argument_error_is_printed_by():
    """Read from the launcher's variables without a rendezvous (and without torch): only rank 0 prints."""
    from bigtrain.distributed.rendezvous import stated_rank

    assert stated_rank({}) == (0, 1) and stated_rank({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert stated_rank({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}) == (3, 4)
    assert stated_rank({"SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_NTASKS": "4"}) == (2, 4)
    assert stated_rank({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}) == (0, 1)  # a batch shell, not an srun step
    assert stated_rank({"RANK": "garbage"}) == (0, 1)
