"""Where numbers go: `metrics.jsonl` (one JSON object per line), TensorBoard, the experiment trackers (MLflow,
W&B: `bigtrain.train.tracking`) and the console."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bigtrain.train.tracking import NoTracker, Tracker


class MetricsLog:
    """Appends one JSON line per record to run.dir/metrics.jsonl and mirrors scalars to TensorBoard, records and
    images to the `tracker`."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int, enabled: bool = True,
                 tracker: Tracker | None = None) -> None:
        self.path, self.enabled = run_dir / "metrics.jsonl", enabled
        self.tracker = tracker or NoTracker()
        self.file, self.tb = None, None
        if not enabled:  # ranks other than 0 write nothing
            return
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events logged after the checkpoint by a run that was interrupted.
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint: they are recomputed (and a torn last line)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        self.tracker.log_record(clean)
        if self.tb is not None:
            prefix = "eval" if "eval_loss" in record else "train"
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and value is not None:
                    self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def scalars(self, tag: str, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"{tag}/{key}", value, step)

    def image(self, tag: str, image: Any, step: int, trackers: bool = True) -> None:
        """An RGB picture [height, width, 3] uint8 in TensorBoard and (`trackers`) the experiment trackers."""
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")
        if self.file is not None and trackers:
            self.tracker.log_image(tag, image, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"


class Progress:
    """Console progress: a live bar on a terminal, plus a plain line every `log.every` steps."""

    def __init__(self, total_steps: int, start_step: int, live: bool, enabled: bool = True) -> None:
        self.total, self.start, self.enabled = total_steps, start_step, enabled
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, leave=False,
                        disable=not (enabled and live and sys.stdout.isatty()))

    def eta(self, step: int) -> float:
        done = step - self.start
        return (time.perf_counter() - self.t0) / done * (self.total - step) if done else float("nan")

    def advance(self, step: int) -> None:
        """Move the bar to `step` without new values (steps whose values stay on the device)."""
        if self.enabled:
            self.bar.update(step - self.bar.n)

    def update(self, step: int, record: dict[str, Any], print_line: bool) -> None:
        if not self.enabled:
            return
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=_si(record["tokens_per_s"]), refresh=False)
        if print_line:
            parts = [f"step {step}/{self.total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.3e}",
                     f"grad_norm {record['grad_norm']:.3f}", f"{_si(record['tokens_per_s'])} tok/s",
                     f"{_si(record['flops_per_s'])}FLOP/s"]
            if record.get("mfu") is not None:
                parts.append(f"MFU {100 * record['mfu']:.1f}%")
            parts.append(f"ETA {_duration(self.eta(step))}")
            self.write(" | ".join(parts))

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        self.bar.write(line) if not self.bar.disable else print(line, flush=True)

    def close(self) -> None:
        self.bar.close()


class MetricsProcessor:
    """The numbers of a run, from step results to `metrics.jsonl`, TensorBoard and the console (rank 0 writes;
    every rank keeps the same counts).

    tokens_per_s   input tokens of every rank since the last training line / wall time since then
    flops_per_s    tokens_per_s · FLOPs per token (`bigtrain.planning.flops`: 6N + 12·L·d·T)
    mfu            flops_per_s / (peak FLOP/s of one device · ranks), where the peak is known
    """

    TRAINING_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "flops_per_s", "mfu", "skipped",
                       "elapsed_s")
    EVAL_FIELDS = ("step", "eval_loss", "eval_ppl", "eval_accuracy", "eval_sequence_accuracy", "eval_tokens")

    def __init__(self, run_dir: Path, tensorboard: bool, progress: bool, total_steps: int, start_step: int,
                 flops_per_token: float, peak_flops: float | None, enabled: bool, tracker: Tracker | None = None
                 ) -> None:
        self.log = MetricsLog(run_dir, tensorboard, resume_step=start_step, enabled=enabled, tracker=tracker)
        self.progress = Progress(total_steps, start_step, progress, enabled=enabled)
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.window_tokens, self.window_t0 = 0, time.perf_counter()
        self.run_t0 = self.window_t0

    def write(self, line: str) -> None:
        self.progress.write(line)

    def count(self, tokens: int) -> None:
        """A step trained `tokens` input tokens (every rank's)."""
        self.window_tokens += tokens

    def advance(self, step: int) -> None:
        self.progress.advance(step)

    def training_line(self, step: int, lr: float, loss: float, grad_norm: float, tokens: int, skipped: bool,
                      extra: dict[str, Any], layer_grad_norms: dict[str, float] | None) -> None:
        """The training line of `step` (its speed measured since the last one)."""
        elapsed = time.perf_counter() - self.window_t0
        tokens_per_s = self.window_tokens / elapsed
        flops = tokens_per_s * self.flops_per_token
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, **extra, "tokens": tokens,
                  "tokens_per_s": tokens_per_s, "flops_per_s": flops, "mfu": flops / self.peak if self.peak else None,
                  "skipped": skipped, "elapsed_s": time.perf_counter() - self.run_t0}
        self.log.write(record)
        self.log.scalars("grad_norm", layer_grad_norms or {}, step)
        self.moe_layers(step, extra.get("moe_layers"))
        self.progress.update(step, record, print_line=True)
        self.window_tokens, self.window_t0 = 0, time.perf_counter()

    def moe_layers(self, step: int, layers: dict[str, dict[str, Any]] | None) -> None:
        """TensorBoard, for a mixture of experts: each layer's scalars as moe/<layer>/aux, z, dropped and
        load_max_over_mean, and the expert-load heatmap (`bigtrain.train.moe_load`) as the image `moe_load`."""
        if self.log.tb is None or not layers:
            return
        from bigtrain.train import moe_load  # matplotlib: only for a run that draws

        for name, fields in layers.items():
            self.log.scalars(f"moe/{name}", {k: v for k, v in fields.items() if isinstance(v, int | float)}, step)
        self.log.image(moe_load.TAG, moe_load.load_image(moe_load.load_of("training", step, layers)), step,
                       trackers=False)

    def eval_line(self, step: int, record: dict[str, Any]) -> None:
        """An evaluation line (EVAL_FIELDS, and for a mixture `eval_sources`: each source's EVAL_FIELDS but
        `step`, also in TensorBoard as eval/<source>/...)."""
        self.log.write({"step": step, **record})
        for name, fields in record.get("eval_sources", {}).items():
            self.log.scalars(f"eval/{name}", {k: v for k, v in fields.items() if isinstance(v, int | float)}, step)

    def skipped_line(self, step: int, lr: float, loss: float, grad_norm: float) -> None:
        """A skipped step settled after a later one: its own line, without speed."""
        self.log.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": None,
                        "tokens_per_s": None, "flops_per_s": None, "mfu": None, "skipped": True,
                        "elapsed_s": time.perf_counter() - self.run_t0})

    def close(self) -> None:
        self.progress.close()
        self.log.close()
