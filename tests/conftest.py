"""Shared helpers: tiny configs that train in seconds on a 2-core CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigtrain.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent

TINY_MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.dropout=0.0",
              "model.max_seq_len=64"]


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
            "train.eval_batches=4", "train.sample_tokens=0", "train.threads=1", "optim.lr=3e-3",
            "schedule.warmup_steps=2", "checkpoint.every=0", "log.every=1", "log.tensorboard=false",
            f"run.dir={run_dir}", *extra]


def tiny_config(run_dir: Path, family: str = "causal", *extra: str) -> Config:
    return load_config(None, tiny_overrides(run_dir, family, *extra))


def run_launcher(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`python launch/train.py ARGS` in a subprocess; returns the completed process (text output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO, **kwargs)


def launch_ranks(n: int, overrides: list[str], launcher: str = "torchrun", script: Path | None = None,
                 timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Start `n` CPU ranks of `launch/train.py` (or `script`) under torchrun or DeepSpeed's launcher."""
    script = script or REPO / "launch" / "train.py"
    bin_dir = Path(sys.executable).parent
    port = str(_free_port())
    if launcher == "torchrun":
        cmd = [str(bin_dir / "torchrun"), f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
               f"--master_port={port}", str(script)]
    else:
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", str(n), "--master_port", port, str(script)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*cmd, *overrides], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=REPO)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
