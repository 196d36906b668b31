"""The training loop on one device: build everything from the config, then step, log, evaluate, save.

    for step in steps:
        global batch (same samples whatever the layout) -> micro-batches -> forward/backward -> clip -> update
        log every log.every, evaluate every train.eval_every, checkpoint every checkpoint.every
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bigtrain.config import Config, dump_config
from bigtrain.config.loader import config_from_dict
from bigtrain.data import GlobalBatchSampler, build_datasets, build_tokenizer, collate, eval_batch_indices
from bigtrain.errors import CheckpointError, TrainingError
from bigtrain.models import build_model, count_parameters, resolve_vocab_size
from bigtrain.optim import build_optimizer, build_schedule, set_lr
from bigtrain.parallel import apply_activation_checkpointing
from bigtrain.train import checkpoint as ckpt
from bigtrain.train.evaluate import evaluate
from bigtrain.train.flops import flops_per_token, peak_flops
from bigtrain.train.loss import count_input_tokens
from bigtrain.train.metrics import MetricsLog, Progress
from bigtrain.train.precision import autocast, check_precision, grad_scaler, resolve_device
from bigtrain.train.sample import sample
from bigtrain.train.step import train_step


@dataclass
class TrainState:
    """Everything besides model/optimizer that a resumed run needs (the data position is `step`)."""

    step: int = 0
    tokens: int = 0
    best_eval_loss: float = float("inf")
    evals_without_improvement: int = 0


@dataclass
class TrainResult:
    state: TrainState
    last_eval: dict[str, float] | None
    run_dir: Path
    stopped_early: bool = False


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        t = cfg.train
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t)
        check_precision(t.precision, self.device)
        self.run_dir = Path(cfg.run.dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.run_dir / "checkpoints"

        self.tokenizer = build_tokenizer(cfg.data)
        self.train_set, self.heldout_set = build_datasets(cfg, self.tokenizer)
        bucket = cfg.data.bucket_size if cfg.model.family != "causal" else 1
        self.sampler = GlobalBatchSampler(self.train_set, t.global_batch_size, t.seed, bucket_size=bucket)

        vocab = resolve_vocab_size(cfg.model, self.tokenizer.vocab_size)
        self.model = build_model(cfg.model, vocab, self.device, seed=t.seed)
        apply_activation_checkpointing(self.model, cfg.parallel.activation_checkpointing)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.lr_at = build_schedule(cfg.schedule, cfg.optim.lr, t.steps, cfg.model.d_model)
        self.scaler = grad_scaler(t.precision, self.device)
        self.autocast = lambda: autocast(t.precision, self.device)
        self.flops_per_token = flops_per_token(self.model, cfg.data.seq_len)
        self.peak = peak_flops(self.device, cfg.log.peak_tflops)

        torch.manual_seed(t.seed)  # dropout stream; restored exactly on resume
        self.state = TrainState()
        self.resumed_from: Path | None = None
        if cfg.checkpoint.resume:
            self._resume()

    # ---- data -------------------------------------------------------------------------------------
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The global batch of 0-based step `step`, cut into consecutive micro-batches."""
        indices = self.sampler.indices(step)
        size = self.cfg.train.micro_batch_size
        return [self._to_device(collate([self.train_set[i] for i in indices[s:s + size]],
                                        self.cfg.model.family, self.tokenizer.pad_id))
                for s in range(0, len(indices), size)]

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        groups = eval_batch_indices(len(self.heldout_set), self.cfg.train.micro_batch_size,
                                    self.cfg.train.eval_batches)
        return [self._to_device(collate([self.heldout_set[i] for i in g], self.cfg.model.family,
                                        self.tokenizer.pad_id)) for g in groups]

    # ---- checkpoints ------------------------------------------------------------------------------
    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.ckpt_dir)
        if path is None:
            return
        saved_cfg = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
        if saved_cfg.model != self.cfg.model:
            diff = [f"model.{f.name}: {getattr(saved_cfg.model, f.name)!r} -> {getattr(self.cfg.model, f.name)!r}"
                    for f in dataclasses.fields(self.cfg.model)
                    if getattr(saved_cfg.model, f.name) != getattr(self.cfg.model, f.name)]
            raise CheckpointError(f"run.dir {self.run_dir} holds a checkpoint of a different model "
                                  f"({'; '.join(diff)}). Use a new run.dir, or restore those model settings.")
        self.model.load_state_dict(ckpt.load_part(path, "model", self.device))
        self.optimizer.load_state_dict(ckpt.load_part(path, "optimizer", self.device))
        trainer = ckpt.load_part(path, "trainer")
        self.state = TrainState(**trainer["state"])
        if self.scaler is not None and trainer.get("scaler"):
            self.scaler.load_state_dict(trainer["scaler"])
        ckpt.set_rng_state(trainer["rng"])
        self.resumed_from = path

    def save(self) -> Path:
        parts: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": {"state": dataclasses.asdict(self.state), "rng": ckpt.rng_state(),
                        "scaler": self.scaler.state_dict() if self.scaler is not None else None},
        }
        return ckpt.save_checkpoint(self.ckpt_dir, self.state.step, parts, dump_config(self.cfg),
                                    self.cfg.checkpoint.keep)

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, t, state = self.cfg, self.cfg.train, self.state
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        metrics = MetricsLog(self.run_dir, cfg.log.tensorboard, resume_step=state.step)
        progress = Progress(t.steps, state.step, cfg.log.progress)
        n_params = count_parameters(self.model)
        progress.write(f"bigtrain: {cfg.model.family} model, {n_params / 1e6:.2f}M parameters, "
                       f"{len(self.train_set)} training / {len(self.heldout_set)} held-out samples, "
                       f"device {self.device}, {t.precision}, run.dir {self.run_dir}")
        if self.resumed_from is not None:
            progress.write(f"resumed from {self.resumed_from} (step {state.step})")
        last_eval, stopped_early = None, False
        window_tokens, window_t0 = 0, time.perf_counter()
        run_t0 = window_t0
        try:
            while state.step < t.steps:
                batches = self.micro_batches(state.step)
                lr = self.lr_at(state.step + 1)
                set_lr(self.optimizer, lr)
                log_now = (state.step + 1) % cfg.log.every == 0 or state.step + 1 == t.steps
                result = train_step(self.model, self.optimizer, batches, self.autocast, cfg.optim.grad_clip,
                                    self.scaler, layer_norms=log_now and cfg.log.tensorboard)
                state.step += 1
                if not result.finite and self.scaler is None and t.on_nonfinite == "stop":
                    raise TrainingError(
                        f"Non-finite loss or gradient at step {state.step} (loss {result.loss}, grad_norm "
                        f"{result.grad_norm}); no update was applied. Lower optim.lr, check the data, or set "
                        f"train.on_nonfinite=skip to skip such steps.")
                step_tokens = sum(count_input_tokens(b) for b in batches)
                state.tokens += step_tokens
                window_tokens += step_tokens

                if log_now:
                    elapsed = time.perf_counter() - window_t0
                    tokens_per_s = window_tokens / elapsed
                    record = {"step": state.step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                              "tokens": state.tokens, "tokens_per_s": tokens_per_s,
                              "flops_per_s": tokens_per_s * self.flops_per_token,
                              "mfu": tokens_per_s * self.flops_per_token / self.peak if self.peak else None,
                              "skipped": result.skipped, "elapsed_s": time.perf_counter() - run_t0}
                    metrics.write(record)
                    metrics.scalars("grad_norm", result.layer_grad_norms or {}, state.step)
                    progress.update(state.step, record, print_line=True)
                    window_tokens, window_t0 = 0, time.perf_counter()
                else:
                    progress.update(state.step, {"loss": result.loss, "lr": lr, "tokens_per_s": 0.0},
                                    print_line=False)

                if (t.eval_every and state.step % t.eval_every == 0) or state.step == t.steps:
                    last_eval = self._evaluate(metrics, progress)
                    stopped_early = self._should_stop_early(last_eval)
                if (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or state.step == t.steps \
                        or stopped_early:
                    self.save()
                if stopped_early:
                    progress.write(f"early stop at step {state.step}: eval_loss did not improve for "
                                   f"{t.early_stop_patience} evaluations")
                    break
        finally:
            progress.close()
            metrics.close()
        self._print_sample()
        return TrainResult(state=state, last_eval=last_eval, run_dir=self.run_dir, stopped_early=stopped_early)

    def _evaluate(self, metrics: MetricsLog, progress: Progress) -> dict[str, float]:
        result = evaluate(self.model, self.eval_batches(), self.autocast)
        metrics.write({"step": self.state.step, **result})
        acc = "" if self.cfg.model.family == "causal" else (
            f" | token accuracy {100 * result['eval_accuracy']:.1f}%"
            f" | sequence accuracy {100 * result['eval_sequence_accuracy']:.1f}%")
        progress.write(f"eval step {self.state.step} | eval_loss {result['eval_loss']:.4f} "
                       f"| ppl {result['eval_ppl']:.2f}{acc}")
        return result

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
        prompt = self.tokenizer.encode(t.sample_prompt)
        ids = sample(self.model, prompt, t.sample_tokens, seed=t.seed, vocab_limit=self.tokenizer.vocab_size)
        print(f"--- sample ({t.sample_tokens} tokens after {t.sample_prompt!r}) ---\n"
              f"{self.tokenizer.decode(ids)}\n---", flush=True)


def train(cfg: Config) -> TrainResult:
    return Trainer(cfg).run()
