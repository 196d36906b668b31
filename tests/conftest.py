"""Shared helpers: tiny configs that train in seconds on a 2-core CPU, launching ranks, reading metrics; and the
`launches` mark, enforced by the hooks taken in from tests/helpers/launch_mark.py: a test that starts a training
process or a launcher without it fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from bigtrain.config import Config, load_config
from bigtrain.distributed.rendezvous import free_port
from tests.helpers.launch_mark import (  # noqa: F401  (the hooks guard every test)
    launch_reason,
    pytest_runtest_makereport,
    pytest_runtest_protocol,
)

REPO = Path(__file__).resolve().parent.parent


def require(available: bool, reason: str) -> None:
    """Skip a test whose tool (Slurm, MPI, accelerate, ...) is missing, saying why; under CI=true fail instead:
    CI must run every test, so a missing tool means a broken CI set-up, never a green run."""
    if available:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} -- CI=true: a test that CI must run may not skip; fix .ci/run's set-up",
                    pytrace=False)
    pytest.skip(reason)


def require_module(name: str, reason: str):
    """`pytest.importorskip`, but a failure under CI=true (see `require`)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        require(False, reason)


TINY_MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.dropout=0.0",
              "model.max_seq_len=64"]


# Held-out sequences of the tiny runs: a multiple of no micro-batch size the tests use, so that every layout's last
# held-out micro-batch is a short one (the pipeline fills it up: bigtrain/engine/deepspeed/pipeline.py).
EVAL_SAMPLES = 15


def tiny_overrides(run_dir: Path, family: str = "causal", *extra: str) -> list[str]:
    """A small model and short run in `run_dir`, for the given family."""
    data = {
        "causal": ["data.source=embedded", "data.max_bytes=300000", "data.seq_len=32"],
        "masked": ["data.source=embedded", "data.max_bytes=300000", "data.seq_len=32"],
        "seq2seq": ["data.source=reverse", "data.task_samples=2000", "data.task_min_len=3",
                    "data.task_max_len=8", "data.seq_len=16"],
    }[family]
    return [f"model.family={family}", *TINY_MODEL, *data, f"data.cache_dir={run_dir.parent / 'cache'}",
            "train.steps=20", "train.global_batch_size=8", "train.micro_batch_size=8", "train.eval_every=0",
            f"train.eval_samples={EVAL_SAMPLES}", "train.sample_tokens=0", "train.threads=1", "optim.lr=3e-3",
            "schedule.warmup_steps=2", "checkpoint.every=0", "log.every=1", "log.tensorboard=false",
            f"run.dir={run_dir}", *extra]


# The published architectures as options (issue 14), on the tiny model.
GPT2_OPTIONS = ("model.norm_position=pre", "model.positions=learned", "model.activation=gelu_tanh",
                "model.scale_embeddings=false")
BERT_OPTIONS = ("model.positions=learned", "model.activation=gelu", "model.embedding_norm=true",
                "model.type_vocab_size=2", "model.head_transform=true", "model.head_bias=true",
                "model.scale_embeddings=false")
T5_OPTIONS = ("model.norm_position=pre", "model.norm=rmsnorm", "model.positions=relative",
              "model.relative_buckets=8", "model.relative_max_distance=16", "model.bias=false",
              "model.scale_attention=false", "model.scale_tied_output=true", "model.scale_embeddings=false")

# Global batch 8 = 2 data-parallel ranks × 2 micro-batches × 2 sequences: data parallelism and accumulation at once.
DP_LAYOUT = ("train.global_batch_size=8", "train.micro_batch_size=2")
LAMB = ("optim.name=lamb", "train.steps=10", "optim.lr=2e-2")


@pytest.fixture(scope="session")
def one_device(tmp_path_factory) -> Callable[..., Path]:
    """`one_device(family, *extra)`: the run.dir of the single-process run of `tiny_overrides(run_dir, family,
    *extra)`, trained once per session per config (`single_process`) and shared by every test that compares a
    layout with it. Tests only read it."""
    made: dict[tuple[str, ...], Path] = {}

    def reference(family: str, *extra: str) -> Path:
        key = (family, *extra)
        if key not in made:
            run_dir = tmp_path_factory.mktemp("one_device") / "run"
            single_process(tiny_overrides(run_dir, family, *extra))
            made[key] = run_dir
        return made[key]

    return reference


@pytest.fixture(scope="session")
def causal_reference(one_device) -> Path:
    """The single-process tiny GPT (DP_LAYOUT, tied embeddings) that the ZeRO and tensor-parallel layouts are
    compared with (tests/test_deepspeed.py, tests/test_tensor_parallel.py)."""
    return one_device("causal", *DP_LAYOUT)


@pytest.fixture(scope="session")
def lamb_reference(one_device) -> Path:
    """The same with LAMB for 10 steps."""
    return one_device("causal", *DP_LAYOUT, *LAMB)


ZERO_LAUNCHERS = {0: "torchrun", 1: "deepspeed-hostfile", 2: "torchrun", 3: "torchrun"}
# launch/train.py that also writes run.dir/samples.jsonl: the global sample indices of every step (rank 0)
RECORD_SAMPLES = REPO / "tests" / "helpers" / "record_samples.py"
SHM = Path("/dev/shm")


class ZeroRuns(dict):
    """{stage: (run.dir, stdout)}; `shm_left`: the DeepSpeed all-reduce segments /dev/shm gained while they ran."""

    shm_left: set[Path]


@pytest.fixture(scope="session")
def deepspeed_zero_runs(tmp_path_factory) -> ZeroRuns:
    """2-rank DeepSpeed runs of the tiny GPT (DP_LAYOUT) at ZeRO-1 (DeepSpeed's launcher with a hostfile,
    log.verbose=true), ZeRO-2 and ZeRO-3 (torchrun): {stage: (run.dir, stdout)}, shared by tests/test_deepspeed.py,
    tests/test_fairscale.py and, as the straight runs of their layouts, tests/test_layout_change.py (so with a
    checkpoint at step 10 and samples.jsonl: `RECORD_SAMPLES`)."""
    runs, before = ZeroRuns(), set(SHM.glob("deepspeed_allreduce_buffer_*"))
    for stage in (1, 2, 3):
        run_dir = tmp_path_factory.mktemp(f"zero{stage}") / "run"
        verbose = ("log.verbose=true",) if stage == 1 else ()
        out = launch_ok(2, tiny_overrides(run_dir, "causal", *DP_LAYOUT, f"parallel.zero_stage={stage}",
                                          "checkpoint.every=10", *verbose),
                        launcher=ZERO_LAUNCHERS[stage], script=RECORD_SAMPLES)
        runs[stage] = (run_dir, out)
    runs.shm_left = set(SHM.glob("deepspeed_allreduce_buffer_*")) - before
    return runs


@pytest.fixture(scope="session")
def session_run(request) -> Callable[[int, tuple[str, ...]], Path | None]:
    """`session_run(ranks, layout)`: the run.dir of a run the session makes for other tests anyway that is
    `tiny_overrides(run_dir, "causal", *DP_LAYOUT, "checkpoint.every=10", *layout)` on `ranks` ranks under
    `RECORD_SAMPLES` (20 steps, checkpoints at 10 and 20, samples.jsonl), or None. Tests copy it before they
    change it."""

    def find(ranks: int, layout: tuple[str, ...]) -> Path | None:
        stages = {("parallel.zero_stage=1",): 1, ("parallel.zero_stage=3",): 3}
        if ranks != 2 or tuple(layout) not in stages:
            return None
        return request.getfixturevalue("deepspeed_zero_runs")[stages[tuple(layout)]][0]

    return find


LAUNCH_STEPS = 16


def launcher_args(run_dir: Path) -> list[str]:
    """`--config configs/smoke.yaml` at test size, for the launcher tests (Slurm, MPI, accelerate, hostfile):
    2 ranks through DeepSpeed, an evaluation every 8 steps, steps slow enough (the smoke model's width) that a
    signal lands mid-run."""
    return ["--config", str(REPO / "configs" / "smoke.yaml"),
            *tiny_overrides(run_dir, "causal", "model.d_model=128", "model.d_ff=512", "data.seq_len=64",
                            "train.global_batch_size=16", "train.micro_batch_size=8",
                            f"train.steps={LAUNCH_STEPS}", "train.eval_every=8")]


@pytest.fixture(scope="session")
def torchrun_reference(tmp_path_factory) -> Path:
    """The run.dir of `launcher_args` under torchrun with 2 ranks: what every other launcher must reproduce."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    launch_ok(2, launcher_args(run_dir))
    return run_dir


def assert_same_losses(ref: Path, run: Path, steps: int = LAUNCH_STEPS) -> None:
    """Every step's `loss` and `grad_norm`, and every `eval_loss`, bitwise equal to the reference run's."""
    (a, a_eval), (b, b_eval) = read_metrics(ref), read_metrics(run)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert (a[step]["loss"], a[step]["grad_norm"]) == (b[step]["loss"], b[step]["grad_norm"]), step
    assert {s: r["eval_loss"] for s, r in a_eval.items()} == {s: r["eval_loss"] for s, r in b_eval.items()}


def tiny_config(run_dir: Path, family: str = "causal", *extra: str) -> Config:
    return load_config(None, tiny_overrides(run_dir, family, *extra))


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """`bigtrain ARGV` run in this process (from the repository root), as a completed process: its exit status
    and what it printed on stdout and stderr. For commands that start no training (plan, consolidate, evaluate,
    export, ...): the same code as the console script without an interpreter's start-up."""
    import contextlib
    import io

    from bigtrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return subprocess.CompletedProcess(["bigtrain", *argv], status, out.getvalue(), err.getvalue())


def run_launcher(args: list[str], timeout: float = 300, script: Path | None = None,
                 env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python launch/train.py ARGS` (or `script`) in a subprocess, with `env` added to this process's environment;
    returns the completed process (text output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(script or REPO / "launch" / "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO, **kwargs)


def launch_ranks(n: int, overrides: list[str], launcher: str = "torchrun", script: Path | None = None,
                 timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Start `n` CPU ranks of `launch/train.py` (or `script`) under torchrun, DeepSpeed's launcher
    (`deepspeed --num_gpus n`), or DeepSpeed's launcher with a hostfile naming `localhost slots=n`
    ("deepspeed-hostfile": no ssh to localhost, so --no_ssh_check and the rendezvous given)."""
    script = script or REPO / "launch" / "train.py"
    bin_dir = Path(sys.executable).parent
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [str(bin_dir / "torchrun"), f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
               f"--master_port={port}", str(script)]
    elif launcher == "deepspeed-hostfile":
        import tempfile

        hostfile = Path(tempfile.mkdtemp(prefix="bigtrain-hostfile-")) / "hostfile"
        hostfile.write_text(f"localhost slots={n}\n")
        cmd = [str(bin_dir / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr",
               "127.0.0.1", "--master_port", port, str(script)]
    else:
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", str(n), "--master_port", port, str(script)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*cmd, *overrides], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=REPO)


def launch_ok(n: int, overrides: list[str], **kwargs) -> str:
    """`launch_ranks` that must succeed; returns its stdout."""
    proc = launch_ranks(n, overrides, **kwargs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def single_process(overrides: list[str]) -> None:
    """`python launch/train.py …` without a launcher: the plain PyTorch engine, same CLI path as the ranks
    (`run_train`), run in this process: the same metrics bit for bit as a fresh interpreter's, without its start-up
    and torch's imports (about 5 CPU-seconds a run). A compiled run (train.compile=true) gets a process of its
    own, so that dynamo's caches of the block code never carry over from one test's model to another's."""
    import contextlib
    import io

    if "train.compile=true" in overrides:
        proc = run_launcher(overrides)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return
    from bigtrain.cli.train import run_train

    out = io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = run_train(list(overrides), prog="launch/train.py")
    assert status == 0, out.getvalue()[-4000:]


def assert_same_curve(ref_dir: Path, run_dir: Path, rel: float, steps: int = 20,
                      eval_rel: float | None = None) -> None:
    """Steps 1..steps of `loss` and `grad_norm` within `rel` of the reference run (fp32: step 1's grad_norm within
    1e-6), same token counts; with
    `eval_rel`, the same evaluation steps and `eval_loss` within it. Prints the largest relative differences
    measured (`pytest -s` shows them)."""
    (ref, ref_evals), (run, run_evals) = read_metrics(ref_dir), read_metrics(run_dir)
    assert sorted(run) == sorted(ref) == list(range(1, steps + 1))
    if rel <= 1e-5:  # fp32: before any update the layout measures the one device's gradient norm (within 1e-6)
        a, b = ref[1]["grad_norm"], run[1]["grad_norm"]
        assert abs(a - b) <= 1e-6 * abs(a), f"step 1 grad_norm: reference {a} vs {b}"
    worst = {"loss": 0.0, "grad_norm": 0.0, "eval_loss": 0.0}
    for step in ref:
        for key in ("loss", "grad_norm"):
            a, b = ref[step][key], run[step][key]
            assert abs(a - b) <= rel * abs(a), f"step {step} {key}: reference {a} vs {b}"
            worst[key] = max(worst[key], abs(a - b) / abs(a))
        assert run[step]["tokens"] == ref[step]["tokens"]
    if eval_rel is not None:
        assert sorted(run_evals) == sorted(ref_evals) and ref_evals
        for step in ref_evals:
            a, b = ref_evals[step]["eval_loss"], run_evals[step]["eval_loss"]
            assert abs(a - b) <= eval_rel * a, f"eval at step {step}: reference {a} vs {b}"
            assert run_evals[step]["eval_tokens"] == ref_evals[step]["eval_tokens"]
            worst["eval_loss"] = max(worst["eval_loss"], abs(a - b) / a)
    print(f"\nmeasured max relative difference over {steps} steps: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items() if k != "eval_loss" or eval_rel is not None))


def assert_resume_is_exact(n: int, args: list[str], run_dir: Path, **launch: Any) -> dict[int, dict]:
    """Train 20 steps (checkpoint at 10), roll the run back to its step-10 checkpoint, train steps 11-20 again:
    every `loss` line and the final eval must be bitwise equal. Returns the eval lines by step. `launch`:
    `launch_ranks`' options (the script)."""
    launch_ok(n, args, **launch)
    straight, straight_evals = read_metrics(run_dir)
    ckpt = run_dir / "checkpoints"
    shutil.rmtree(ckpt / "step_00000020")
    (ckpt / "latest").write_text("step_00000010\n")
    out = launch_ok(n, args, **launch)
    assert "resumed from" in out and "(step 10)" in out
    resumed, resumed_evals = read_metrics(run_dir)
    assert {s: r["loss"] for s, r in resumed.items()} == {s: r["loss"] for s, r in straight.items()}
    assert resumed_evals[20]["eval_loss"] == straight_evals[20]["eval_loss"]
    return resumed_evals


def consolidated_eval_loss(run_dir: Path) -> float:
    """`bigtrain consolidate RUN_DIR` (run in this process), then the held-out loss of the one-device weights. The
    weights come from the checkpoint's layout-free form; they must equal, bitwise, what the engine's own files
    reassemble to."""
    import torch

    from bigtrain.checkpoint.consolidate import consolidated_state_dict
    from bigtrain.checkpoint.saved import SavedCheckpoint
    from bigtrain.cli.tools import evaluate_weights

    proc = run_cli("consolidate", str(run_dir))  # in this process: the console script's code, no start-up
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_dir / "consolidated" / "step_00000020"
    layout_free = torch.load(out / "model.pt", weights_only=True)
    native = consolidated_state_dict(SavedCheckpoint.read(run_dir / "checkpoints" / "step_00000020"))
    assert layout_free and all(torch.equal(value, native[name]) for name, value in layout_free.items())
    return evaluate_weights(out)["eval_loss"]


def read_metrics(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(training lines by step, evaluation lines by step) of run_dir/metrics.jsonl."""
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r for r in records if "loss" in r}, {r["step"]: r for r in records if "eval_loss" in r})


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models: one intra-op thread is much faster than several competing for a 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def no_process_may_start(monkeypatch):
    """Every process start (subprocess.Popen) in this test is recorded and refused."""
    started = []

    def refuse(self, args, *rest, **kwargs):
        started.append(args)
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    return started
