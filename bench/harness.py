"""Shared pieces of the training benchmarks (step_overhead, throughput, scaling): the machine's description, the
config a benchmark runs, and bigtrain's own training loop timed step by step.

`run_trainer` runs `Trainer(cfg, env).run()` — the loop launch/train.py runs — and times it from outside: it wraps
the engine's `train_step`, notes the clock at the entry of every step (entry to entry = one whole loop iteration:
data, step, logging and bookkeeping) and ends the run by raising at the entry of the first step after the
measured window, so no final evaluation, checkpoint or sample is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bigtrain.config import Config  # noqa: E402

# Settings every timed run gets: no evaluation, checkpoint or sample inside or after the window.
QUIET = ["train.eval_every=0", "checkpoint.every=0", "train.sample_tokens=0", "checkpoint.resume=false"]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where a figure was measured: CPU, cores, load, GPU, library versions."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "load_average": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                            "torch": torch.__version__, "platform": platform.platform()}
    with contextlib.suppress(ImportError):
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO)
        if head.returncode == 0:
            info["git"] = head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpus"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")


def data_substitutes(config: str | None, overrides: list[str], world_size: int = 1) -> list[str]:
    """Overrides that replace placeholder data files (configs/gpt2-small.yaml names data/corpus.jsonl) by the
    embedded corpus and the byte tokenizer: a throughput figure needs shapes, not the text."""
    from bigtrain.config import load_config

    data = load_config(config, overrides, world_size=world_size).data
    out = []
    if data.source != "embedded" and not Path(data.source).exists() and data.source.endswith((".jsonl", ".txt")):
        out += ["data.source=embedded"]
    if data.tokenizer != "byte" and not Path(data.tokenizer).exists():
        out += ["data.tokenizer=byte"]
    return out


def bench_config(config: str | None, overrides: list[str], total_steps: int, run_dir: Path,
                 world_size: int = 1) -> Config:
    """The run's config with `total_steps` steps in `run_dir`, validated as launch/train.py validates it."""
    from bigtrain.parallel.validate import load_run_config

    extra = [*QUIET, f"train.steps={total_steps}", f"run.dir={run_dir}"]
    return load_run_config(config, [*overrides, *extra], world_size=world_size)[0]


class _WindowDone(Exception):
    """Raised at the entry of the first step after the measured window: ends Trainer.run early."""


@dataclass
class StepTimes:
    """One timed run: per-step wall time (entry to entry) and the part inside engine.train_step, seconds."""

    step_s: list[float] = field(default_factory=list)
    engine_s: list[float] = field(default_factory=list)
    tokens_per_step: int = 0  # tokens of one global batch (all data-parallel ranks), padding included
    build_s: float = 0.0  # Trainer construction (not in the steps)

    @property
    def mean_step_s(self) -> float:
        return sum(self.step_s) / len(self.step_s)

    @property
    def mean_engine_s(self) -> float:
        return sum(self.engine_s) / len(self.engine_s)


def batch_tokens(batches: list[dict[str, torch.Tensor]]) -> int:
    """Input tokens of micro-batches from their shapes (no device sync; padding counted)."""
    return sum(b[k].numel() for b in batches for k in ("input_ids", "decoder_input_ids") if k in b)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_trainer(cfg: Config, warmup: int, steps: int, quiet: bool = True,
                on_window_start: Callable[[], None] | None = None) -> tuple[StepTimes, Any]:
    """Run bigtrain's training loop for `warmup` + `steps` steps; time the last `steps` (cfg.train.steps must
    exceed warmup + steps). Returns the times and the Trainer (its process group, if any, still up).
    `on_window_start` is called as the timed window begins."""
    from bigtrain.distributed import detect_env
    from bigtrain.train.trainer import Trainer

    if cfg.train.steps <= warmup + steps:
        raise ValueError(f"train.steps={cfg.train.steps} must exceed warmup + steps = {warmup + steps}")
    out = StepTimes()
    t0 = time.perf_counter()
    with _maybe_silent(quiet):
        trainer = Trainer(cfg, detect_env())
    out.build_s = time.perf_counter() - t0
    engine, device = trainer.engine, trainer.device
    real_step = engine.train_step
    marks: list[float] = []

    def timed_step(batches: list[dict[str, torch.Tensor]], lr: float, **kwargs: Any) -> Any:
        entered = len(marks)
        if entered in (warmup, warmup + steps):
            sync(device)  # the window starts and ends with the device idle
        if entered == warmup and on_window_start is not None:
            on_window_start()
        now = time.perf_counter()
        if entered > warmup:
            out.step_s.append(now - marks[-1])
        marks.append(now)
        if entered == warmup + steps:
            raise _WindowDone
        result = real_step(batches, lr, **kwargs)
        if entered >= warmup:
            out.engine_s.append(time.perf_counter() - now)
            out.tokens_per_step = batch_tokens(batches) * engine.dp_size
        return result

    engine.train_step = timed_step
    try:
        with _maybe_silent(quiet), contextlib.suppress(_WindowDone):
            trainer.run()
    finally:
        with contextlib.suppress(AttributeError):
            del engine.train_step  # the instance attribute; the class's method again
    if len(out.step_s) != steps:
        raise RuntimeError(f"timed {len(out.step_s)} of {steps} steps: did the training loop change?")
    return out, trainer


@contextlib.contextmanager
def _maybe_silent(quiet: bool):
    """Console output of the run to /dev/null (a file write, as a run logging to a file does)."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory of this process: CUDA allocator peaks on a GPU, else the peak resident set (ru_maxrss)."""
    if device.type == "cuda":
        return {"kind": "cuda max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(device),
                "reserved_bytes": torch.cuda.max_memory_reserved(device)}
    return {"kind": "peak RSS (whole process)", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def temp_run_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


class ForeignLoad:
    """The share of the machine's CPU time (all cores) that other processes took while a block ran: /proc/stat's
    busy time less this process's own (and its waited-for children's). None where /proc/stat is missing.

        with ForeignLoad() as load:
            ...
        load.share  # 0.0 = the machine was ours; 0.5 on 2 cores = another process kept one core busy
    """

    def __init__(self) -> None:
        self.share: float | None = None

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))

    def __enter__(self) -> ForeignLoad:
        self._start = (time.perf_counter(), self._busy(), self._own())
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, busy0, own0 = self._start
        busy = self._busy()
        if busy is None or busy0 is None:
            return
        wall = time.perf_counter() - wall0
        foreign = max(0.0, (busy - busy0) - (self._own() - own0))
        self.share = foreign / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0


def wait_for_quiet(max_s: float, threshold: float = 0.05, window_s: float = 2.0) -> bool:
    """Wait (at most `max_s`) until other processes use under `threshold` of the machine's CPU over `window_s`;
    whether it went quiet. True at once where /proc/stat is missing."""
    deadline = time.perf_counter() + max_s
    while True:
        with ForeignLoad() as load:
            time.sleep(window_s)
        if load.share is None or load.share < threshold:
            return True
        if time.perf_counter() > deadline:
            return False
