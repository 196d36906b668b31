"""The command line: --print-config, the console script, and one-paragraph errors for bad input."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bigtrain.cli.train import run_train
from tests.conftest import REPO, require, run_launcher, tiny_overrides


def test_print_config_applies_overrides(capsys):
    assert run_train(["--config", str(REPO / "configs/smoke.yaml"), "--print-config", "train.steps=7",
                      "model.dropout=0.25"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 7 and printed["model"]["dropout"] == 0.25
    assert set(printed) == {"model", "parallel", "optim", "schedule", "data", "train", "checkpoint", "log", "run",
                            "deepspeed"}


def test_no_config_means_smoke(capsys):
    assert run_train(["--print-config"]) == 0
    smoke = yaml.safe_load((REPO / "configs/smoke.yaml").read_text())
    assert yaml.safe_load(capsys.readouterr().out)["model"]["d_model"] == smoke["model"]["d_model"]


def test_help_config_lists_every_key(capsys):
    assert run_train(["--help-config"]) == 0
    out = capsys.readouterr().out
    for key in ("train.global_batch_size", "parallel.zero_stage", "run.dir", "model.n_kv_heads"):
        assert key in out


def test_console_script():
    exe = shutil.which("bigtrain", path=str(Path(__file__).resolve().parent.parent / ".venv" / "bin")) or \
        shutil.which("bigtrain")
    require(exe is not None, "the bigtrain console script is not installed (run `make setup`)")
    out = subprocess.run([exe, "train", "--print-config", "train.steps=3"], capture_output=True, text=True,
                         check=True).stdout
    assert yaml.safe_load(out)["train"]["steps"] == 3


MISTAKES = [
    (["train.step=5"], "Did you mean 'steps'"),
    (["trian.steps=5"], "Did you mean 'train'"),
    (["model.d_model=100", "model.n_heads=3"], "d_model=100 is not divisible by model.n_heads=3"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "global_batch_size=10 is not divisible"),
    (["optim.name=sgd"], "Allowed values: 'adamw', 'lamb'"),
    (["train.precision=fp16"], "fp16' needs a CUDA GPU"),
    (["train.steps=many"], "'train.steps' must be int"),
    (["data.source=/nonexistent/corpus.jsonl"], "data.source"),
    (["data.tokenizer=/nonexistent/tokenizer.json"], "data.tokenizer"),
    (["data.seq_len=512"], "exceeds model.max_seq_len"),
    (["parallel.tensor=2"], "parallel.tensor"),
    (["model.vocab_size=100"], "model.vocab_size=100 is smaller than the tokenizer"),
    (["data.source=reverse"], "model.family='seq2seq'"),
    (["schedule.name=noam", "schedule.warmup_steps=0"], "warmup_steps"),
]


@pytest.mark.parametrize("overrides,expected", MISTAKES, ids=[m[1][:30] for m in MISTAKES])
def test_bad_input_gives_one_paragraph(run_dir, capsys, overrides, expected):
    code = run_train(tiny_overrides(run_dir, "causal") + overrides)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("bigtrain: error: ") and expected in err, err
    assert err.count("\n") == 1, f"not one paragraph: {err!r}"
    assert "Traceback" not in err


def test_empty_corpus_file(tmp_path, capsys):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("")
    assert run_train(tiny_overrides(tmp_path / "run", "causal", f"data.source={corpus}")) == 2
    assert "data.source" in capsys.readouterr().err


@pytest.mark.launches
def test_launcher_error_has_no_traceback(tmp_path):
    proc = run_launcher(["--config", str(tmp_path / "missing.yaml")])
    assert proc.returncode == 2
    assert "missing.yaml' does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_an_installed_wheel_finds_its_smoke_config_and_starts_its_own_bigtrain(tmp_path):
    """Built as a wheel and run outside the checkout: `bigtrain train` with no --config prints the smoke config
    (which the wheel carries), and the processes commands start (`bigtrain parity`'s runs, `bigtrain convert`'s
    ranks) import that installed bigtrain, not a checkout."""
    import sys
    import zipfile

    leftover = not (REPO / "build").exists()  # setuptools builds in the checkout's build/ (git ignores it)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                            "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    if leftover:
        shutil.rmtree(REPO / "build", ignore_errors=True)
    assert built.returncode == 0, built.stderr[-2000:]
    site = tmp_path / "site"
    zipfile.ZipFile(next((tmp_path / "wheel").glob("bigtrain-*.whl"))).extractall(site)
    code = ("import json, sys\nfrom bigtrain.cli.launching import child_env\nimport bigtrain\n"
            "print(json.dumps([bigtrain.__file__, child_env()['PYTHONPATH']]))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr[-2000:]
    package, child_path = yaml.safe_load(where.stdout)
    assert Path(package).is_relative_to(site) and child_path.split(":")[0] == str(site)
    printed = subprocess.run([sys.executable, "-m", "bigtrain.cli", "train", "--print-config"], capture_output=True,
                             text=True, cwd=tmp_path, env=env)
    assert printed.returncode == 0, printed.stderr[-2000:]
    smoke = yaml.safe_load((REPO / "configs/smoke.yaml").read_text())
    assert yaml.safe_load(printed.stdout)["model"] == {**yaml.safe_load(printed.stdout)["model"], **smoke["model"]}


def _base_python() -> str:
    """The interpreter the venv was made from; with -S it sees none of the packages bigtrain needs."""
    import sys

    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}")


def test_the_launch_script_goes_on_in_the_project_venv():
    """`python launch/train.py` with an interpreter that lacks torch (the system Python after `make setup`) runs in
    the checkout's .venv instead of printing an ImportError's traceback."""
    proc = subprocess.run([_base_python(), "-S", str(REPO / "launch" / "train.py"), "--print-config",
                           "train.steps=3"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load(proc.stdout)["train"]["steps"] == 3


def test_without_a_venv_the_launch_script_says_how_to_get_one(tmp_path):
    (tmp_path / "launch").mkdir()
    shutil.copy(REPO / "launch" / "train.py", tmp_path / "launch" / "train.py")
    proc = subprocess.run([_base_python(), "-S", str(tmp_path / "launch" / "train.py"), "--print-config"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "lacks torch" in lines[0] and "make setup" in lines[0], proc.stderr


def test_slurm_scripts_use_the_project_venv_or_stop_in_one_paragraph(tmp_path):
    """slurm/python.sh (sourced by both sbatch scripts): BIGTRAIN_PYTHON, else REPO/.venv/bin/python; an
    interpreter without bigtrain's packages stops the job before any rank starts."""
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("#!/bin/sh\nexit 0\n")
    venv_python.chmod(0o755)
    script = f'REPO={tmp_path}; source {REPO / "slurm" / "python.sh"}; echo "$PYTHON"'
    found = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert found.returncode == 0 and found.stdout.strip() == str(venv_python), found.stderr
    refused = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "BIGTRAIN_PYTHON": "/bin/false"})
    assert refused.returncode == 2 and refused.stdout == "", refused.stdout
    assert "cannot import torch" in refused.stderr and "make setup" in refused.stderr


def test_world_size_checks_a_cluster_job_without_launching(tmp_path):
    """A dry run from a login node: the config and layout on N ranks, the data paths and each stage's memory plan;
    nothing is created or started; a layout that does not fit --gpu-memory, a source that cannot be read and a
    layout that does not divide N are one paragraph each."""
    from tests.conftest import run_cli

    run_dir = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs/smoke.yaml"), "--world-size", "8", "parallel.tensor=2",
            "parallel.pipeline=2", "train.micro_batch_size=8", f"run.dir={run_dir}", f"data.cache_dir={tmp_path}/c"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "dry run for 8 rank(s): tensor 2 × pipeline 2 × data 2, ZeRO-0, DeepSpeed's pipeline engine" in proc.stdout
    assert "memory per rank of stage 0" in proc.stdout and "memory per rank of stage 1" in proc.stdout
    assert "data.source 'embedded' readable" in proc.stdout and not run_dir.exists()
    printed = run_cli(*args, "--print-config")
    assert yaml.safe_load(printed.stdout.split("dry run")[0])["parallel"]["pipeline"] == 2
    too_small = run_cli(*args, "--gpu-memory", "0.5")
    assert too_small.returncode == 2 and "but --gpu-memory is 0.5 GiB" in too_small.stderr
    unreadable = run_cli(*args, f"data.source={tmp_path / 'missing.jsonl'}")
    assert unreadable.returncode == 2 and "missing.jsonl" in unreadable.stderr
    indivisible = run_cli(*args[:4], "6", *args[5:])
    assert indivisible.returncode == 2 and "does not divide the world size 6" in indivisible.stderr


def test_a_dry_run_checks_what_a_run_dir_would_resume(tmp_path):
    """With a checkpoint in run.dir, the dry run says what a job would resume and refuses what a resume refuses
    (a changed model section), before any cluster time is spent."""
    from tests.conftest import run_cli, tiny_overrides

    run_dir = tmp_path / "run"
    assert run_cli("train", *tiny_overrides(run_dir, "causal", "train.steps=2")).returncode == 0
    overrides = tiny_overrides(run_dir, "causal", "train.steps=4", "train.micro_batch_size=4")
    args = ["train", "--world-size", "2", *overrides]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "resumes step 2 from step_00000002 through its layout-free form" in proc.stdout
    assert "trains steps 3-4" in proc.stdout
    refused = run_cli(*args, "model.dropout=0.3")
    assert refused.returncode == 2 and "model.dropout: 0.0 -> 0.3" in refused.stderr, refused.stderr
