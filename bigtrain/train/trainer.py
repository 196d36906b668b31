"""The training loop: build everything from the config, then step, log, evaluate, save.

    for step in steps:
        global batch (same samples whatever the layout) -> this rank's slice -> micro-batches
            -> engine.train_step (forward/backward, clip, update; plain PyTorch or DeepSpeed)
        log every log.every, evaluate every train.eval_every, checkpoint every checkpoint.every

Rank 0 writes metrics, TensorBoard and the console; every rank runs the same evaluation and sampling (ZeRO-3
needs all ranks in every forward).
"""

from __future__ import annotations

import dataclasses
import datetime
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigtrain.checkpoint import store as ckpt
from bigtrain.checkpoint.resume import (
    ResumeCheck,
    agreed_choice,
    batch_change_notes,
    check_fits,
    check_tokenizer,
    describe,
    has_layout_free,
    layout_free_header,
    layout_of,
    native_files_present,
    written_layout,
)
from bigtrain.config import Config, dump_config
from bigtrain.config.layout import Layout, resolve_layout
from bigtrain.data import GlobalBatchSampler, build_datasets, build_tokenizer, collate
from bigtrain.data.corpus import data_ready
from bigtrain.data.mixture import Mixture
from bigtrain.data.prefetch import BatchPrefetcher, prepare
from bigtrain.data.sampler import MixtureSampler
from bigtrain.distributed import DistEnv, detect_env, init_process_group
from bigtrain.distributed.agree import on_main
from bigtrain.distributed.device import autocast, check_precision, resolve_device
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine import Engine, build_engine
from bigtrain.engine.result import StepResult, resolve_all
from bigtrain.errors import CheckpointError, TrainingError
from bigtrain.inference.generate import Decoding, generate
from bigtrain.models import build_model, count_parameters, resolve_vocab_size
from bigtrain.optim import build_schedule
from bigtrain.parallel import parallelize
from bigtrain.planning.flops import flops_per_token, peak_flops
from bigtrain.planning.preflight import check_memory
from bigtrain.train.evaluate import evaluate, heldout_batches
from bigtrain.train.metrics import MetricsLog, Progress
from bigtrain.train.preemption import StopRequest
from bigtrain.train.run_dir import RunLock, prepare_run_dir
from bigtrain.train.watchdog import Watchdog

# Launchers whose ranks are their children: a rank whose launcher is gone stops (see watchdog.py).
LAUNCHERS_THAT_SPAWN = ("torchrun", "deepspeed", "accelerate", "mpi", "slurm")


@dataclass
class TrainState:
    """Everything besides model/optimizer that a resumed run needs (the data position is `step`)."""

    step: int = 0
    tokens: int = 0
    best_eval_loss: float = float("inf")
    evals_without_improvement: int = 0
    tokenizer: str = ""  # the tokenizer's name: ids mean the same text only with the same tokenizer
    skipped_in_a_row: int = 0  # train.on_nonfinite=skip: consecutive skipped steps
    source_tokens: dict[str, int] = field(default_factory=dict)  # data.sources: input tokens trained per source


@dataclass
class TrainResult:
    state: TrainState
    last_eval: dict[str, float] | None
    run_dir: Path
    stopped_early: bool = False
    stopped_by: int = 0  # the signal (SIGUSR1 / SIGTERM) that stopped the run before train.steps, after a save


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv | None = None, stop: StopRequest | None = None,
                 allow_changes: set[str] | None = None, layout: Layout | None = None) -> None:
        self.cfg = cfg
        self.allow_changes = allow_changes or set()  # config keys a resume may change (--allow-changes)
        self.env = env = env or detect_env()
        self.stop = stop  # None: run() listens for the stop signals itself
        self._stop: StopRequest | None = None
        self.resume_notes: list[str] = []
        self._prefetch: BatchPrefetcher | None = None  # while `run` trains
        self.counts: tuple[int, int] | None = None  # (target, input) tokens of the last micro_batches()
        self.saves = 0
        t = cfg.train
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t, env.local_rank)
        check_precision(t.precision, self.device)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.is_main = env.is_main
        p = cfg.parallel
        self.layout = layout or resolve_layout(cfg, env.world_size)
        distributed = self.layout.distributed
        self.groups: ParallelGroups | None = None
        if distributed:
            init_process_group(env, self.device, timeout_s=p.collective_timeout)
            self.groups = ParallelGroups(self.layout, env.rank, timeout_s=p.collective_timeout)
        # On GPUs, stop requests are agreed over a CPU group, so that asking does not wait for the device.
        self.control_group = None
        if distributed and self.device.type == "cuda":
            self.control_group = torch.distributed.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=p.collective_timeout))
        self.lock = RunLock(self.run_dir)
        on_main(self.is_main, distributed, self._claim_run_dir)
        try:
            self._build(cfg, distributed)
        except BaseException:
            self.lock.release()
            raise

    def _claim_run_dir(self) -> None:
        """Rank 0: run.dir usable, and this run the only one in it."""
        prepare_run_dir(self.run_dir)
        self.lock.acquire()

    def _build(self, cfg: Config, distributed: bool) -> None:
        env, t = self.env, cfg.train
        self.tokenizer = build_tokenizer(cfg.data)
        vocab = resolve_vocab_size(cfg.model, self.tokenizer.vocab_size)
        self.full_model = build_model(cfg.model, vocab, "meta")  # shapes only: parameter count, FLOPs, memory
        check_memory(cfg, self.full_model, self.layout, self.device)  # before any allocation
        # Rank 0 prepares the corpus (token shards, docs/data.md) first; the others wait, then read the shards. A
        # large corpus can take longer than parallel.collective_timeout: the wait has a group of its own.
        data_group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=2)) \
            if distributed else None
        if distributed and not self.is_main:
            if not data_ready(cfg, self.tokenizer):
                print(f"bigtrain: rank {env.rank}: waiting for rank 0 to prepare data ...", flush=True)
            torch.distributed.barrier(group=data_group)
        self.train_set, self.heldout_set = build_datasets(cfg, self.tokenizer)
        if distributed and self.is_main:
            torch.distributed.barrier(group=data_group)
        bucket = cfg.data.bucket_size if cfg.model.family != "causal" else 1
        sampler = MixtureSampler if isinstance(self.train_set, Mixture) else GlobalBatchSampler
        self.sampler = sampler(self.train_set, t.global_batch_size, t.seed, bucket_size=bucket)

        # The one path from the single-device model to this rank's part of the layout, then its engine.
        self.parallel = parallelize(build_model(cfg.model, vocab, "meta"), cfg, self.groups, self.device)
        self.criterion, self.pad_multiple = self.parallel.criterion, self.parallel.pad_multiple
        self.autocast = lambda: autocast(t.precision, self.device)
        self.engine: Engine = build_engine(cfg, self.parallel, env, self.groups, self.device)
        if self.lock.note:
            self.resume_notes.append(self.lock.note)
        if distributed and self.is_main:
            name = "deepspeed_config.json" if self.layout.deepspeed else "engine_config.json"
            (self.run_dir / name).write_text(self.engine.describe() + "\n")
            print(f"bigtrain: {type(self.engine).__name__} config (also in {self.run_dir / name}):\n"
                  f"{self.engine.describe()}", flush=True)
        self.model = self.engine.model
        self.lr_at = build_schedule(cfg.schedule, cfg.optim.lr, t.steps, cfg.model.d_model)
        self.flops_per_token = flops_per_token(self.full_model, cfg.data.seq_len)
        peak = peak_flops(self.device, cfg.log.peak_tflops)
        self.peak = peak * env.world_size if peak else None  # tokens/s counts every rank's tokens

        self.state = TrainState(tokenizer=self.tokenizer.name)
        self.resumed_from: Path | None = None
        self.resume_check = ResumeCheck()
        if cfg.checkpoint.resume:
            self._resume()
        if cfg.model.init_from and self.resumed_from is None:
            self._init_from(vocab)

    # ---- data -------------------------------------------------------------------------------------
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def host_micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the global batch of 0-based step `step`, cut into micro-batches, on the host:
        the global batch is split into contiguous equal slices by data-parallel rank."""
        indices = self.sampler.indices(step)
        share = len(indices) // self.engine.dp_size
        indices = indices[self.engine.dp_rank * share:(self.engine.dp_rank + 1) * share]
        size = self.cfg.train.micro_batch_size
        return [collate([self.train_set[i] for i in indices[s:s + size]], self.cfg.model.family,
                        self.tokenizer.pad_id, self.pad_multiple) for s in range(0, len(indices), size)]

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """Step `step`'s micro-batches on the device: during `run`, prepared ahead by the prefetch thread (this
        is called on the training thread, once per step, in order); their token counts go to `self.counts`."""
        host = self._prefetch.get(step) if self._prefetch is not None else prepare(self.host_micro_batches, step)
        self.counts = (host.targets, host.tokens)
        return [self._to_device(b) for b in host.micro_batches]

    def _count_sources(self, state: TrainState) -> None:
        """A mixture's input tokens by source, for the step just trained (the global batch, every rank alike)."""
        if not isinstance(self.train_set, Mixture):
            return
        positions = np.asarray(self.sampler.indices(state.step - 1))
        sources, _ = self.train_set.locate(positions)
        tokens = np.bincount(sources, weights=self.train_set.lengths_of(positions), minlength=len(self.train_set.names))
        for name, n in zip(self.train_set.names, tokens.tolist(), strict=True):
            state.source_tokens[name] = state.source_tokens.get(name, 0) + int(n)

    def _source_record(self, state: TrainState) -> dict[str, Any]:
        """metrics.jsonl's "sources": per mixture source, input tokens, samples and epochs trained so far."""
        if not isinstance(self.train_set, Mixture):
            return {}
        position = state.step * self.cfg.train.global_batch_size
        draws, epochs = self.train_set.draws_before(position), self.train_set.epochs_before(position)
        return {"sources": {name: {"tokens": state.source_tokens.get(name, 0), "samples": int(draws[k]),
                                   "epochs": float(epochs[k])} for k, name in enumerate(self.train_set.names)}}

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """The held-out batches; every rank evaluates all of them (ZeRO-3 needs every rank in each forward)."""
        return heldout_batches(self.cfg, self.tokenizer, self.heldout_set, self.device, self.pad_multiple)

    # ---- checkpoints ------------------------------------------------------------------------------
    def _resume(self) -> None:
        choice = agreed_choice(self.ckpt_dir, self.is_main, self.groups is not None)
        self.resume_notes += choice.notes
        path = choice.checkpoint
        if path is None:
            return
        check = check_fits(path, self.cfg, self.env.world_size, self.allow_changes)
        check_tokenizer(path, self.tokenizer.name, self.allow_changes)
        written_by = written_layout(path)
        here = layout_of(self.cfg, self.env.world_size)
        if written_by == here and native_files_present(path):
            self.state = TrainState(**self.engine.load(path))  # exact: the engine's own files, RNG included
        else:
            if not has_layout_free(path):
                raise CheckpointError(
                    f"{path} was written by {describe(written_by)} and holds no layout-free form, so it can only "
                    f"be resumed by that layout (this run: {describe(here)}). Resume with that layout, or write "
                    f"checkpoints with checkpoint.layout_free_every >= 1.")
            header = self.engine.load_layout_free(path)
            self.state = TrainState(**header["trainer"])
            # Dropout streams cannot carry across layouts: they go on from (seed, replica, step).
            offset = self.layout.seed_offset(self.env.rank)
            torch.manual_seed(self.cfg.train.seed + offset + 1_000_003 * self.state.step)
            if written_by != here:
                self.resume_notes.append(f"resuming step {self.state.step} written by {describe(written_by)} under "
                                         f"{describe(here)}")
        self.resume_notes += batch_change_notes(path, self.cfg)
        self.state.tokenizer = self.tokenizer.name
        self.resumed_from, self.resume_check = path, check

    def _init_from(self, vocab: int) -> None:
        """Start from `model.init_from`'s weights (each rank reads its shard); the optimizer starts fresh."""
        from bigtrain.interop import init_source

        reader = init_source(self.cfg.model, vocab)
        try:
            self.engine.init_weights(reader)
        finally:
            reader.close()
        self.resume_notes.append(f"weights from model.init_from={self.cfg.model.init_from} (fresh optimizer)")

    def save(self, last: bool = False) -> Path:
        """A checkpoint of the current step; with the layout-free form every checkpoint.layout_free_every-th time
        and always when `last` (the end of the run, or a stop)."""
        every = self.cfg.checkpoint.layout_free_every
        self.saves += 1
        header = None
        if every > 0 and (last or self.saves % every == 0):
            header = layout_free_header(self.cfg, self.full_model, dataclasses.asdict(self.state),
                                        self.env.world_size)
        path = self.engine.save(self.ckpt_dir, self.state.step, dataclasses.asdict(self.state),
                                dump_config(self.cfg), self.cfg.checkpoint.keep, layout_free=header)
        if self._stop is not None:
            self._stop.note_checkpoint(self.state.step, path)
        return path

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, t, state = self.cfg, self.cfg.train, self.state
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        metrics = MetricsLog(self.run_dir, cfg.log.tensorboard, resume_step=state.step, enabled=self.is_main)
        progress = Progress(t.steps, state.step, cfg.log.progress, enabled=self.is_main)
        n_params = count_parameters(self.full_model)
        progress.write(f"bigtrain: {cfg.model.family} model, {n_params / 1e6:.2f}M parameters, "
                       f"{len(self.train_set)} training / {len(self.heldout_set)} held-out samples, "
                       f"{self.env.world_size} rank(s) ({self.env.describe()}; {self.layout.describe()}), "
                       f"{type(self.engine).__name__}, "
                       f"device {self.device}, {t.precision}, run.dir {self.run_dir}")
        if self.env.note:
            progress.write(f"note: {self.env.note}")
        self._report_resume(progress, metrics)
        last_eval, stopped_early, stopped_by, memory_reported = None, False, 0, False
        window_tokens, window_t0 = 0, time.perf_counter()
        run_t0 = window_t0
        stop = self._stop = self.stop or StopRequest().install()
        if self.resumed_from is not None:
            stop.note_checkpoint(state.step, self.resumed_from)
        watchdog = Watchdog(t.hang_timeout, self.run_dir, self.env.rank,
                            watch_parent=self.env.launcher in LAUNCHERS_THAT_SPAWN).start()
        prefetch = self._prefetch = BatchPrefetcher(self.host_micro_batches, state.step, t.steps,
                                                    pin=self.device.type == "cuda")
        pending: list[tuple[int, float, StepResult]] = []  # steps whose values are still on the device
        try:
            while state.step < t.steps:
                watchdog.beat(f"step {state.step + 1}")
                batches = self.micro_batches(state.step)
                lr = self.lr_at(state.step + 1)
                log_now = (state.step + 1) % cfg.log.every == 0 or state.step + 1 == t.steps
                result = self.engine.train_step(batches, lr, layer_norms=log_now and cfg.log.tensorboard,
                                                counts=self.counts)
                state.step += 1
                watchdog.beat(f"what follows step {state.step}")
                if not memory_reported:
                    report = self.engine.memory_report(self.run_dir)
                    memory_reported = True
                    if report is not None:
                        progress.write(report)
                        (self.run_dir / "memory.txt").write_text(report + "\n")
                state.tokens += result.tokens
                self._count_sources(state)
                window_tokens += result.tokens
                pending.append((state.step, lr, result))
                evaluate_now = bool(t.eval_every and state.step % t.eval_every == 0) or state.step == t.steps
                save_now = bool(cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0)
                if not (log_now or evaluate_now or save_now or not result.deferred):
                    progress.advance(state.step)
                    continue  # nothing needs the step's values yet: no wait for the device
                # One transfer for every pending step; each is checked in order (a skipped one is logged).
                settled = self._settle(pending, progress, metrics, run_t0)
                pending = []
                result = settled[-1]
                if log_now or result.skipped:  # a skipped step is logged off-cycle
                    elapsed = time.perf_counter() - window_t0
                    tokens_per_s = window_tokens / elapsed
                    record = {"step": state.step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                              **self._source_record(state),
                              "tokens": state.tokens, "tokens_per_s": tokens_per_s,
                              "flops_per_s": tokens_per_s * self.flops_per_token,
                              "mfu": tokens_per_s * self.flops_per_token / self.peak if self.peak else None,
                              "skipped": result.skipped, "elapsed_s": time.perf_counter() - run_t0}
                    metrics.write(record)
                    metrics.scalars("grad_norm", result.layer_grad_norms or {}, state.step)
                    progress.update(state.step, record, print_line=True)
                    window_tokens, window_t0 = 0, time.perf_counter()
                else:
                    progress.advance(state.step)

                if (t.eval_every and state.step % t.eval_every == 0) or state.step == t.steps:
                    watchdog.beat(f"the evaluation after step {state.step}")
                    last_eval = self._evaluate(metrics, progress)
                    stopped_early = self._should_stop_early(last_eval)
                saved = (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or \
                    state.step == t.steps or stopped_early
                if saved:
                    watchdog.beat(f"the checkpoint of step {state.step}")
                    self.save(last=state.step == t.steps or stopped_early)
                if stopped_early:
                    progress.write(f"early stop at step {state.step}: eval_loss did not improve for "
                                   f"{t.early_stop_patience} evaluations")
                    break
                signum = stop.agreed(self.device if self.groups is not None else None, self.control_group)
                if signum and state.step < t.steps:
                    stopped_by = signum
                    watchdog.beat(f"the checkpoint of step {state.step}")
                    path = self.ckpt_dir / ckpt.step_dir_name(state.step) if saved else self.save(last=True)
                    progress.write(f"stopped by {signal.Signals(stopped_by).name} after step {state.step}: "
                                   f"checkpoint {path}; the same command resumes from it")
                    break
            if not stopped_by:
                watchdog.beat("the final sample")
                self._print_sample()
        finally:
            prefetch.close()
            self._prefetch = None
            watchdog.stop()
            if self.stop is None:
                stop.uninstall()
            progress.close()
            metrics.close()
            self.lock.release()
        return TrainResult(state=state, last_eval=last_eval, run_dir=self.run_dir, stopped_early=stopped_early,
                           stopped_by=stopped_by)

    def _settle(self, pending: list[tuple[int, float, StepResult]], progress: Progress, metrics: MetricsLog,
                run_t0: float) -> list[StepResult]:
        """Read the pending steps' values (one wait for the device) and check each in order; a skipped step
        that is not the current one gets its own metrics line."""
        results = resolve_all([r for _, _, r in pending])
        for index, ((step, lr, _), result) in enumerate(zip(pending, results, strict=True)):
            if self._check_finite(result, progress, step) and index < len(pending) - 1:
                metrics.write({"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                               "tokens": None, "tokens_per_s": None, "flops_per_s": None, "mfu": None,
                               "skipped": True, "elapsed_s": time.perf_counter() - run_t0})
        return results

    def _check_finite(self, result: StepResult, progress: Progress, step: int) -> bool:
        """Stop or skip on a non-finite step (no update was applied either way); True when it was skipped.
        fp16 overflows are the loss scaler's business and count as neither."""
        t, state = self.cfg.train, self.state
        if result.finite or t.precision == "fp16":
            state.skipped_in_a_row = 0
            return False
        seen = f", first seen on rank {result.nonfinite_rank}" if result.nonfinite_rank is not None else ""
        what = (f"non-finite loss or gradient at step {step} (loss {result.loss}, grad_norm "
                f"{result.grad_norm}{seen})")
        if t.on_nonfinite == "stop":
            raise TrainingError(f"N{what[1:]}; no update was applied. Lower optim.lr, check the data, or set "
                                f"train.on_nonfinite=skip to skip such steps.")
        state.skipped_in_a_row += 1
        progress.write(f"warning: {what}: update skipped, weights and optimizer state unchanged "
                       f"({state.skipped_in_a_row} in a row)")
        if state.skipped_in_a_row >= t.max_skipped_steps:
            raise TrainingError(
                f"{state.skipped_in_a_row} steps in a row were non-finite and skipped (steps "
                f"{step - state.skipped_in_a_row + 1}-{step}; train.max_skipped_steps="
                f"{t.max_skipped_steps}): training is not recovering. Lower optim.lr, check the data, or resume "
                f"from an earlier checkpoint.")
        return True

    def _report_resume(self, progress: Progress, metrics: MetricsLog) -> None:
        """Notes on how the checkpoint was chosen and what changed since it was written; changes allowed with
        --allow-changes are also recorded in metrics.jsonl."""
        for note in self.resume_notes:
            progress.write(f"note: {note}")
        if self.resumed_from is None:
            return
        progress.write(f"resumed from {self.resumed_from} (step {self.state.step})")
        check = self.resume_check
        if check.harmless:
            progress.write(f"note: resuming with changed settings: {'; '.join(c.describe() for c in check.harmless)}")
        if check.accepted:
            progress.write(f"warning: resuming with changes allowed by --allow-changes: "
                           f"{'; '.join(c.describe() for c in check.accepted)}")
            metrics.write({"step": self.state.step,
                           "config_changes": {c.key: [c.saved, c.now] for c in check.accepted}})

    def _evaluate(self, metrics: MetricsLog, progress: Progress) -> dict[str, float]:
        if hasattr(self.engine, "evaluate"):  # the pipeline runs the model stage by stage
            result = self.engine.evaluate(self.eval_batches())
        else:
            result = evaluate(self.model, self.eval_batches(), self.autocast, self.criterion)
        metrics.write({"step": self.state.step, **result})
        if self.cfg.log.tensorboard and self.cfg.log.attention_images:
            self._log_attention(metrics)
        acc = "" if self.cfg.model.family == "causal" else (
            f" | token accuracy {100 * result['eval_accuracy']:.1f}%"
            f" | sequence accuracy {100 * result['eval_sequence_accuracy']:.1f}%")
        progress.write(f"eval step {self.state.step} | eval_loss {result['eval_loss']:.4f} "
                       f"| ppl {result['eval_ppl']:.2f}{acc}")
        return result

    def _log_attention(self, metrics: MetricsLog) -> None:
        """log.attention_images: the first held-out sample's attention maps as a TensorBoard image; every rank
        runs the forward (ZeRO-3 needs all of them), rank 0 draws (config checks refuse tensor / pipeline)."""
        from bigtrain.inference.attention_log import TAG, attention_image

        image = attention_image(self.model, self.cfg.model.family, self.tokenizer, self.heldout_set, self.device,
                                self.autocast, self.state.step, draw=self.is_main)
        if image is not None:
            metrics.image(TAG, image, self.state.step)

    def _should_stop_early(self, result: dict[str, float]) -> bool:
        s = self.state
        if result["eval_loss"] < s.best_eval_loss:
            s.best_eval_loss, s.evals_without_improvement = result["eval_loss"], 0
        else:
            s.evals_without_improvement += 1
        patience = self.cfg.train.early_stop_patience
        return bool(patience) and s.evals_without_improvement >= patience and self.state.step < self.cfg.train.steps

    def _print_sample(self) -> None:
        t = self.cfg.train
        if self.cfg.model.family != "causal" or not t.sample_tokens:
            return
        if self.layout.pipeline > 1:
            if self.is_main:
                print("--- no sample: sampling through pipeline stages is not supported yet (consolidate the "
                      "checkpoint and sample on one device) ---", flush=True)
            return
        # An empty prompt samples the start of a document: the context is the end-of-document token.
        prompt = self.tokenizer.encode(t.sample_prompt) or [self.tokenizer.eos_id]
        # Sampled with the KV cache (under sequence parallelism by recomputation: lengths must divide the group).
        new = generate(self.model, [prompt], t.sample_tokens, Decoding(temperature=0.8, top_k=40), seed=t.seed,
                       pad_id=self.tokenizer.pad_id, vocab_limit=self.tokenizer.vocab_size,
                       full_logits=self.criterion.full_logits, pad_multiple=self.pad_multiple)[0]
        ids = prompt + new
        if self.is_main:
            print(f"--- sample ({t.sample_tokens} tokens after {t.sample_prompt!r}) ---\n"
                  f"{self.tokenizer.decode(ids)}\n---", flush=True)


def train(cfg: Config, env: DistEnv | None = None, stop: StopRequest | None = None,
          allow_changes: set[str] | None = None, layout: Layout | None = None) -> TrainResult:
    return Trainer(cfg, env, stop, allow_changes, layout).run()
