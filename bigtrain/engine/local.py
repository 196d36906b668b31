"""The single-process engine: plain PyTorch, no process group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bigtrain.checkpoint import store as ckpt
from bigtrain.checkpoint.sequence import restore_layout_free, write_layout_free
from bigtrain.checkpoint.state import StateAdapter
from bigtrain.config import Config
from bigtrain.distributed.device import autocast, grad_scaler
from bigtrain.engine.result import StepResult
from bigtrain.engine.step import train_step
from bigtrain.errors import CheckpointError
from bigtrain.optim import build_optimizer, set_lr
from bigtrain.parallel import ParallelModel


class LocalEngine:
    rank = dp_rank = 0
    dp_size = 1

    def __init__(self, cfg: Config, parallel: ParallelModel, device: torch.device) -> None:
        self.model, self.device = parallel.model, device
        self.autocast = lambda: autocast(cfg.train.precision, device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scaler = grad_scaler(cfg.train.precision, device)
        self.grad_clip = cfg.optim.grad_clip

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float, layer_norms: bool,
                   counts: tuple[int, int] | None = None) -> StepResult:
        set_lr(self.optimizer, lr)
        return train_step(self.model, self.optimizer, micro_batches, self.autocast, self.grad_clip, self.scaler,
                          layer_norms=layer_norms, counts=counts)

    def state(self) -> StateAdapter:
        return StateAdapter(self.model, {}, self.optimizer, None, tensor_rank=0, data_rank=0)

    def save(self, directory: Path, step: int, trainer_state: dict[str, Any], config_yaml: str,
             keep: int, layout_free: dict[str, Any] | None = None) -> Path:
        def layout_free_form(tmp: Path) -> None:
            if layout_free is not None:
                write_layout_free(tmp, self.state(), 0, 1, layout_free, barrier=lambda: None)

        parts = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": {"state": trainer_state, "rng": ckpt.rng_state(),
                        "scaler": self.scaler.state_dict() if self.scaler is not None else None},
        }
        return ckpt.save_checkpoint(directory, step, parts, config_yaml, keep, before_commit=layout_free_form)

    def load(self, checkpoint: Path) -> dict[str, Any]:
        if not (checkpoint / "model.pt").exists() and list(checkpoint.glob("trainer_rank*.pt")):
            raise CheckpointError(
                f"{checkpoint} was written by the DeepSpeed engine, and this run uses the plain PyTorch engine "
                f"(one process, parallel.zero_stage=0). Resume it with parallel.engine=deepspeed (and the same "
                f"ZeRO stage), or use a new run.dir.")
        ckpt.load_into(self.model, ckpt.load_part(checkpoint, "model", self.device), checkpoint / "model.pt")
        self.optimizer.load_state_dict(ckpt.load_part(checkpoint, "optimizer", self.device))
        trainer = ckpt.load_part(checkpoint, "trainer")
        if self.scaler is not None and trainer.get("scaler"):
            self.scaler.load_state_dict(trainer["scaler"])
        ckpt.set_rng_state(trainer["rng"])
        return trainer["state"]

    def load_layout_free(self, checkpoint: Path) -> dict[str, Any]:
        return restore_layout_free(self.state(), checkpoint)

    def init_weights(self, reader: Any) -> None:
        self.state().restore(reader, 0.0)  # step 0: weights only, the optimizer state stays fresh

    def memory_report(self, run_dir: Path | None = None) -> str | None:
        return None
