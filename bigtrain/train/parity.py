"""`bigtrain parity`: does this layout compute what one device computes, for this config?

Runs the config twice on this machine, on the same global batches with dropout off: once in one process (the
reference) and once under the given layout, launching its ranks with torchrun (CPU gloo, or the local GPUs);
then compares `loss` and `grad_norm` step by step:

    rel(step) = |layout - reference| / |reference|,  verdict: max over steps ≤ tolerance (fp32 1e-5, bf16 2e-2)

`shrink` scales the model down (layers 2 per stage, 2 heads per tensor rank, width 16 per head, a small
vocabulary and context) keeping the layout valid, so the layout of a 175B config can be checked on one machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bigtrain.errors import ConfigError

TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}
LAYOUT_KEYS = {"tensor": "parallel.tensor", "pipeline": "parallel.pipeline", "data": "parallel.data",
               "zero_stage": "parallel.zero_stage", "sequence_parallel": "parallel.sequence_parallel"}
REPO_LAUNCH = Path(__file__).resolve().parents[2] / "launch" / "train.py"


@dataclass
class StepDiff:
    step: int
    loss: tuple[float, float]
    grad_norm: tuple[float, float]

    def rel(self, key: str) -> float:
        ref, got = getattr(self, key)
        return abs(got - ref) / abs(ref) if ref else abs(got - ref)


def parse_layout(text: str) -> dict[str, str]:
    """'tensor=2,pipeline=2,zero_stage=1' -> {'parallel.tensor': '2', ...}; unknown keys are refused."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in LAYOUT_KEYS or not value:
            raise ConfigError(f"--layout {text!r}: '{part}' is not KEY=VALUE with KEY one of "
                              f"{', '.join(LAYOUT_KEYS)} (e.g. --layout tensor=2,pipeline=2,zero_stage=1).")
        out[LAYOUT_KEYS[key]] = value
    if not out:
        raise ConfigError("--layout is empty: give e.g. --layout tensor=2 or --layout data=2,zero_stage=3.")
    return out


def ranks_of(layout: dict[str, str]) -> int:
    size = 1
    for key in ("parallel.tensor", "parallel.pipeline", "parallel.data"):
        value = layout.get(key, "1")
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--layout: {key.split('.')[1]}={value} must be a positive integer.")
        size *= int(value)
    return size


def shrunk(layout: dict[str, str]) -> list[str]:
    """Overrides that make the model small while every split of `layout` stays valid."""
    tensor, pipeline = int(layout.get("parallel.tensor", "1")), int(layout.get("parallel.pipeline", "1"))
    heads = 2 * tensor
    return [f"model.n_layers={2 * pipeline}", f"model.n_heads={heads}", "model.n_kv_heads=null",
            f"model.d_model={16 * heads}", f"model.d_ff={64 * heads}", "model.max_seq_len=64", "data.seq_len=32",
            "model.vocab_size=null", f"model.vocab_multiple={64 * tensor}", "model.n_decoder_layers=null",
            "data.source=embedded", "data.tokenizer=byte"]


def compare(ref_dir: Path, run_dir: Path) -> list[StepDiff]:
    def lines(run: Path) -> dict[int, dict]:
        out = {}
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                out[record["step"]] = record
        return out

    ref, got = lines(ref_dir), lines(run_dir)
    if sorted(ref) != sorted(got):
        raise ConfigError(f"the runs logged different steps ({sorted(ref)} vs {sorted(got)}).")
    return [StepDiff(s, (ref[s]["loss"], got[s]["loss"]), (ref[s]["grad_norm"], got[s]["grad_norm"]))
            for s in sorted(ref)]


def _run(cmd: list[str], what: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.startswith("bigtrain:")][-3:]
        raise ConfigError(f"the {what} run failed (status {proc.returncode}): " + (" ".join(tail) or
                          proc.stderr[-800:]))


def parity(config: Path, layout_text: str, steps: int = 20, shrink: bool = False, precision: str = "fp32",
           overrides: list[str] | None = None, work_dir: Path | None = None,
           script: Path = REPO_LAUNCH) -> tuple[list[StepDiff], float]:
    """Train `steps` steps of `config` on one process and under the layout; the per-step differences and the
    tolerance they are held to."""
    from bigtrain.distributed.env import free_port

    if precision not in TOLERANCE:
        raise ConfigError(f"--precision {precision}: choose fp32 or bf16.")
    if steps < 1:
        raise ConfigError(f"--steps {steps}: give at least 1.")
    layout = parse_layout(layout_text)
    ranks = ranks_of(layout)
    work = Path(work_dir or tempfile.mkdtemp(prefix="bigtrain-parity-"))
    common = [*(shrunk(layout) if shrink else []), *(overrides or []), "model.dropout=0.0",
              "model.attention_dropout=0.0", f"train.steps={steps}", "train.eval_every=0", "train.sample_tokens=0",
              "checkpoint.every=0", "checkpoint.layout_free_every=0", "log.every=1", "log.tensorboard=false",
              "log.progress=false", f"train.precision={precision}", "train.threads=1"]
    layout_args = [f"{k}={v}" for k, v in layout.items()]
    _run([sys.executable, str(script), "--config", str(config), *common, "parallel.tensor=1", "parallel.pipeline=1",
          "parallel.zero_stage=0", f"run.dir={work / 'reference'}"], "one-device reference")
    _run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
          f"--master_port={free_port()}", str(script), "--config", str(config), *common, *layout_args,
          f"run.dir={work / 'layout'}"], f"layout ({layout_text})")
    return compare(work / "reference", work / "layout"), TOLERANCE[precision]
