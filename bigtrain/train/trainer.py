"""The training loop: wire the owners of a run together, then step, log, evaluate, save.

    for step in steps:
        this rank's micro-batches of the global batch (TrainingData)  -> engine.train_step (the step skeleton)
        log every log.every (MetricsProcessor), evaluate every train.eval_every (Validator),
        checkpoint every checkpoint.every (CheckpointManager), stop after a signal any rank received

Each decision lives with its owner: the layout (which engine, how ranks split) comes resolved from the command,
the process groups from `ParallelGroups`, the data from `TrainingData`, what a checkpoint holds and whether one
is due from `CheckpointManager`, which experiment trackers record the run from `build_tracker` (log.mlflow,
log.wandb). Rank 0 writes metrics, TensorBoard, the trackers and the console; every rank runs the same evaluation
and sampling (ZeRO-3 needs all ranks in every forward).
"""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bigtrain.checkpoint.manager import CheckpointManager, Restored
from bigtrain.config import Config, config_to_dict, dump_config
from bigtrain.config.layout import Layout, resolve_layout
from bigtrain.data import build_tokenizer
from bigtrain.data.heldout import eval_size_note
from bigtrain.data.loader import TrainingData
from bigtrain.distributed import DistEnv, detect_env, init_process_group
from bigtrain.distributed.agree import on_main
from bigtrain.distributed.device import check_precision, resolve_device
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine import build_engine
from bigtrain.engine.result import StepResult
from bigtrain.errors import TrainingError
from bigtrain.models import build_model, count_parameters, resolve_vocab_size
from bigtrain.optim import build_schedule
from bigtrain.parallel import parallelize
from bigtrain.planning.flops import flops_per_token, peak_flops
from bigtrain.planning.preflight import check_memory, shapes_model
from bigtrain.train.capture import capture_step, capturing
from bigtrain.train.metrics import MetricsProcessor
from bigtrain.train.nonfinite import NonFiniteSteps
from bigtrain.train.preemption import StopRequest
from bigtrain.train.run_dir import RunLock, prepare_run_dir
from bigtrain.train.sample import print_sample
from bigtrain.train.state import TrainResult, TrainState
from bigtrain.train.tracking import NoTracker, Tracker, build_tracker
from bigtrain.train.validator import Validator
from bigtrain.train.watchdog import LAUNCHERS_THAT_SPAWN, Watchdog

if TYPE_CHECKING:  # torchao, imported only with train.precision=fp8
    from bigtrain.train.fp8_guard import Fp8Guard


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv | None = None, stop: StopRequest | None = None,
                 allow_changes: set[str] | None = None, layout: Layout | None = None) -> None:
        """`cfg` as loaded (and checked) by the command, with its resolved `layout` (resolved here when not
        given); `stop`: the command's stop-signal listener (None: `run` installs one)."""
        self.cfg, self.stop, self._stop = cfg, stop, stop
        self.env = env = env or detect_env()
        self.layout = layout = layout or resolve_layout(cfg, env.world_size)
        p, t = cfg.parallel, cfg.train
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t, env.local_rank)
        check_precision(t.precision, self.device)
        self.run_dir, self.is_main = Path(cfg.run.dir), env.is_main
        self.capture_at = capture_step()  # a diagnostic: fingerprints of this step (`bigtrain parity --locate`)
        self.groups: ParallelGroups | None = None
        self.tracker: Tracker = NoTracker()  # chosen at the start of `run`
        if layout.distributed:
            init_process_group(env, self.device, timeout_s=p.collective_timeout, quiet=not cfg.log.verbose)
            self.groups = ParallelGroups(layout, env.rank, p.collective_timeout, on_gpu=self.device.type == "cuda")
        self.lock = RunLock(self.run_dir)
        on_main(self.is_main, self.groups, self._claim_run_dir)
        try:
            self._build(allow_changes or set())
        except BaseException:
            self.lock.release()
            raise

    def _claim_run_dir(self) -> None:
        """Rank 0: run.dir usable, and this run the only one in it."""
        prepare_run_dir(self.run_dir)
        self.lock.acquire()

    def _build(self, allow_changes: set[str]) -> None:
        cfg, layout = self.cfg, self.layout
        self.tokenizer = build_tokenizer(cfg.data)
        vocab = resolve_vocab_size(cfg.model, self.tokenizer.vocab_size)
        self.full_model = shapes_model(cfg, vocab, self.device)  # shapes only: parameter count, FLOPs, memory
        check_memory(cfg, self.full_model, layout, self.device)  # before any allocation
        self.data = TrainingData(cfg, self.tokenizer, self.groups, self.device)
        # The one path from the single-device model to this rank's part of the layout, then its engine.
        self.parallel = parallelize(build_model(cfg.model, vocab, "meta"), cfg, self.groups, self.device)
        self.data.pad_multiple = self.parallel.pad_multiple
        self.engine = build_engine(cfg, layout, self.parallel, self.groups, self.device)
        if self.engine.config_file is not None and self.is_main:
            (self.run_dir / self.engine.config_file).write_text(self.engine.describe() + "\n")
            shown = f":\n{self.engine.describe()}" if cfg.log.verbose else " (--verbose prints it)"
            print(f"bigtrain: {type(self.engine).__name__} config in {self.run_dir / self.engine.config_file}{shown}",
                  flush=True)
        self.lr_at = build_schedule(cfg.schedule, cfg.optim.lr, cfg.train.steps, cfg.model.d_model)
        self.checkpoints = CheckpointManager(cfg, layout, self.engine, self.groups, self.env.rank, self.run_dir,
                                             self.full_model)
        self.state = TrainState(tokenizer=self.tokenizer.name)
        self.restored = (self.checkpoints.restore(self.tokenizer.name, allow_changes) if cfg.checkpoint.resume
                         else Restored())
        self.notes = [n for n in (self.lock.note, eval_size_note(cfg.train)) if n] + self.restored.notes
        if self.restored.trainer_state is not None:
            self.state = TrainState(**{**self.restored.trainer_state, "tokenizer": self.tokenizer.name})
        elif cfg.model.init_from:
            self._init_from(vocab)
        self.fp8_guard = self._fp8_guard()

    def _fp8_guard(self) -> Fp8Guard | None:
        """train.precision=fp8: the start notes of the conversion, and the bf16 guard (with the fallen blocks
        and counts of a resumed run)."""
        conversion, t = self.parallel.fp8, self.cfg.train
        if conversion is None:
            return None
        from bigtrain.train.fp8_guard import Fp8Guard

        self.notes += conversion.notes() + [f"fp8: blocks fallen back to bf16 before this run: "
                                            f"{', '.join(self.state.fp8_fallback)}"] * bool(self.state.fp8_fallback)
        return Fp8Guard(conversion, self.parallel.model, self.engine.evaluate_sums, t.fp8_check_every,
                        t.fp8_tolerance, self.state.fp8_fallback, self.state.fp8_strikes,
                        **({"max_over_ranks": self.groups.max_on_host} if self.groups is not None else {}))

    def _init_from(self, vocab: int) -> None:
        """Start from `model.init_from`'s weights (each rank reads its shard); the optimizer starts fresh."""
        from bigtrain.interop import init_source

        reader = init_source(self.cfg.model, vocab)
        try:
            self.checkpoints.load_weights(reader)
        finally:
            reader.close()
        self.notes.append(f"weights from model.init_from={self.cfg.model.init_from} (fresh optimizer)")

    def save(self, last: bool = False) -> Path:
        """A checkpoint of the current step (collective); `last`: the end of the run, or a stop."""
        path = self.checkpoints.save(dataclasses.asdict(self.state), last)
        if last:
            self.tracker.log_checkpoint(path, self.state.step)
        self._note_checkpoints()
        return path

    def _note_checkpoints(self) -> None:
        """Tell the stop listener the newest committed checkpoint (an asynchronous save commits later), and the
        console the checkpoint manager's notes (a save that waited for the one in flight)."""
        for note in self.checkpoints.take_notes():
            self.metrics.write(note)
        if self._stop is not None and self.checkpoints.committed is not None:
            self._stop.note_checkpoint(*self.checkpoints.committed)

    def _start_tracker(self) -> None:
        """Rank 0: the trackers of log.mlflow / log.wandb, started (a resume continues their runs), with the
        effective config; a tracker that cannot start is a TrainingError naming it."""
        try:
            self.tracker = build_tracker(self.cfg, self.run_dir, self.is_main,
                                         resuming=self.restored.path is not None)
        except Exception as exc:
            raise TrainingError(f"the experiment tracker of log.mlflow / log.wandb could not start: "
                                f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}. Fix it, or set "
                                f"log.mlflow.experiment='' / log.wandb.project='' to train without it.") from exc
        self.tracker.log_config(config_to_dict(self.cfg))

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, t, state = self.cfg, self.cfg.train, self.state
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        try:  # every rank stops if rank 0 cannot start its trackers
            on_main(self.is_main, self.groups, self._start_tracker)
        except BaseException:
            self.lock.release()
            raise
        tracker = self.tracker
        peak = peak_flops(self.device, cfg.log.peak_tflops)
        metrics = self.metrics = MetricsProcessor(
            self.run_dir, cfg.log.tensorboard, cfg.log.progress, t.steps, state.step,
            flops_per_token(self.full_model, cfg.data.seq_len), peak * self.env.world_size if peak else None,
            enabled=self.is_main, tracker=tracker)
        self._report_start(metrics)
        nonfinite = NonFiniteSteps(t, self.layout.precision, metrics)
        validator = Validator(cfg, self.engine, self.data, metrics, self.is_main)
        last_eval, stopped_early, stopped_by, memory_reported, first_step = None, False, 0, False, state.step
        stop = self._stop = self.stop or StopRequest().install()
        if self.restored.path is not None:
            stop.note_checkpoint(state.step, self.restored.path)
        watchdog = Watchdog(t.hang_timeout, self.run_dir, self.env.rank,
                            watch_parent=self.env.launcher in LAUNCHERS_THAT_SPAWN).start()
        pending: list[tuple[int, float, StepResult]] = []  # steps whose values are still on the device
        finished = False  # the loop ended without an exception (the trackers' run status)
        try:
            with self.data.prefetching(state.step, t.steps):
                while state.step < t.steps:
                    watchdog.beat(f"step {state.step + 1}")
                    batches, counts = self.data.micro_batches(state.step)
                    lr = self.lr_at(state.step + 1)
                    log_now = (state.step + 1) % cfg.log.every == 0 or state.step + 1 == t.steps
                    if self.fp8_guard is not None and self.fp8_guard.due(state.step + 1):
                        self._check_fp8(batches[0], state.step + 1)
                    with capturing(self, state.step + 1, len(batches)) as capture:
                        result = capture.result = self.engine.train_step(
                            batches, lr, layer_norms=log_now and cfg.log.tensorboard, counts=counts)
                    state.step += 1
                    watchdog.beat(f"what follows step {state.step}")
                    if not memory_reported:
                        memory_reported = True
                        self._report_memory(metrics)
                    if self.checkpoints.poll() is not None:  # checkpoint.async: the save in flight, committed
                        self._note_checkpoints()
                    state.tokens += result.tokens
                    state.add_source_tokens(self.data.source_tokens(state.step - 1))
                    metrics.count(result.tokens)
                    pending.append((state.step, lr, result))
                    final = state.step == t.steps
                    evaluate_now, save_now = validator.due(state.step), self.checkpoints.due(state.step, final)
                    if not (log_now or evaluate_now or save_now or not result.deferred):
                        metrics.advance(state.step)
                        continue  # nothing needs the step's values yet: no wait for the device
                    result = nonfinite.settle(pending, state)[-1]  # one transfer for every pending step
                    pending = []
                    if log_now or result.skipped:  # a skipped step is logged off-cycle
                        metrics.training_line(state.step, lr, result.loss, result.grad_norm, state.tokens,
                                              result.skipped, {**self.data.source_record(state.step,
                                                                                         state.source_tokens),
                                                               **result.moe_record()},
                                              result.layer_grad_norms)
                    else:
                        metrics.advance(state.step)
                    if evaluate_now:
                        watchdog.beat(f"the evaluation after step {state.step}")
                        last_eval = validator.run(state)
                        stopped_early = validator.stop_early(state, last_eval)
                    saved = save_now or stopped_early
                    if saved:
                        watchdog.beat(f"the checkpoint of step {state.step}")
                        self.save(last=final or stopped_early)
                    if stopped_early:
                        metrics.write(f"early stop at step {state.step}: eval_loss did not improve for "
                                      f"{t.early_stop_patience} evaluations")
                        break
                    signum = stop.agreed(self.groups)
                    if signum and state.step < t.steps:
                        stopped_by = signum
                        watchdog.beat(f"the checkpoint of step {state.step}")
                        path = self.checkpoints.path_of(state.step) if saved else self.save(last=True)
                        if self.checkpoints.finish() is not None:  # a save in flight (checkpoint.async)
                            self._note_checkpoints()
                        if saved:
                            tracker.log_checkpoint(path, state.step)
                        metrics.write(f"stopped by {signal.Signals(stopped_by).name} after step {state.step}: "
                                      f"checkpoint {path}; the same command resumes from it")
                        break
            self.checkpoints.finish()  # the end of the run waits for a save in flight (none after a last save)
            if not stopped_by and state.step > first_step:  # a finished run, resumed, trains and samples nothing
                watchdog.beat("the final sample")
                print_sample(cfg, self.layout, self.engine.model, self.tokenizer, self.parallel.criterion.full_logits,
                             self.parallel.pad_multiple, self.is_main)
            finished = True
        finally:
            watchdog.stop()
            if self.stop is None:
                stop.uninstall()
            metrics.close()
            self.lock.release()
            tracker.close(finished)
        return TrainResult(state=state, last_eval=last_eval, run_dir=self.run_dir, stopped_early=stopped_early,
                           stopped_by=stopped_by)

    def _check_fp8(self, batch: dict[str, torch.Tensor], step: int) -> None:
        """The bf16 guard on this step's first micro-batch (collective), into metrics.jsonl and TensorBoard."""
        record = self.fp8_guard.check(batch, step)
        self.metrics.log.write(record)
        self.metrics.log.scalars("fp8_block_rel_diff", record["fp8_block_rel_diff"], step)
        if record.get("fp8_fallback"):
            self.metrics.write(f"fp8: blocks {', '.join(record['fp8_fallback'])} differed from bf16 by more than "
                               f"train.fp8_tolerance={self.cfg.train.fp8_tolerance} in 3 checks in a row: bf16 "
                               f"for the rest of the run")

    # ---- what the console says -------------------------------------------------------------------
    def _report_start(self, metrics: MetricsProcessor) -> None:
        """The run's first lines; notes on how the checkpoint was chosen and what changed since it was written
        (changes allowed with --allow-changes are also recorded in metrics.jsonl)."""
        cfg, env = self.cfg, self.env
        metrics.write(f"bigtrain: {cfg.model.family} model, {count_parameters(self.full_model) / 1e6:.2f}M "
                      f"parameters, {len(self.data.train_set)} training / {len(self.data.heldout_set)} held-out "
                      f"samples, {env.world_size} rank(s) ({env.describe()}; {self.layout.describe()}), "
                      f"{type(self.engine).__name__}, device {self.device}, {self.layout.precision}, run.dir "
                      f"{self.run_dir}")
        metrics.write(f"note: {self.checkpoints.describe_cost()}")
        if env.note:
            metrics.write(f"note: {env.note}")
        for note in self.notes:
            metrics.write(f"note: {note}")
        restored = self.restored
        if restored.path is None:
            return
        metrics.write(f"resumed from {restored.path} (step {self.state.step})")
        if restored.check.harmless:
            metrics.write(f"note: resuming with changed settings: "
                          f"{'; '.join(c.describe() for c in restored.check.harmless)}")
        if restored.check.accepted:
            metrics.write(f"warning: resuming with changes allowed by --allow-changes: "
                          f"{'; '.join(c.describe() for c in restored.check.accepted)}")
            metrics.log.write({"step": self.state.step,
                               "config_changes": {c.key: [c.saved, c.now] for c in restored.check.accepted}})

    def _report_memory(self, metrics: MetricsProcessor) -> None:
        """After the first step: the engine's measured model-state bytes (collective; run.dir/memory.txt too)."""
        report = self.engine.memory_report(self.run_dir)
        if report is not None:
            metrics.write(report if self.cfg.log.verbose else f"model-state memory per rank next to the ZeRO formula: "
                          f"{self.run_dir / 'memory.txt'}")


def train(cfg: Config, env: DistEnv | None = None, stop: StopRequest | None = None,
          allow_changes: set[str] | None = None, layout: Layout | None = None) -> TrainResult:
    return Trainer(cfg, env, stop, allow_changes, layout).run()
