"""The plain engine: one process, plain PyTorch, no process group.

    wrap        the model itself, under autocast for bf16 / fp16
    backward    loss.backward() (fp16: through the loss scaler)
    optimizer   bigtrain's AdamW or LAMB; `clip_grad_norm` measures (float64 sum) and clips; fp16's loss scaler skips
                overflowed steps itself
    own files   model.pt, optimizer.pt (and scaler.pt under fp16)
"""

from __future__ import annotations

from pathlib import Path

import torch

from bigtrain.config import Config
from bigtrain.config.layout import Layout
from bigtrain.distributed.device import grad_scaler
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.base import ShardedState
from bigtrain.engine.separate_qkv import join_optimizer_state
from bigtrain.engine.step import StepEngine, step_unless_found_inf
from bigtrain.io import load_state, load_torch, save_torch
from bigtrain.models.inspect import per_layer_grad_norms
from bigtrain.models.loss import model_inputs
from bigtrain.models.qkv import separate_prefixes
from bigtrain.optim import build_optimizer
from bigtrain.parallel import ParallelModel
from bigtrain.parallel.grad_norm import clip_grad_norm


class LocalEngine(StepEngine):
    def __init__(self, cfg: Config, layout: Layout, parallel: ParallelModel, groups: ParallelGroups | None,
                 device: torch.device) -> None:
        self.layout, self.device = layout, device
        self.model, self.criterion = parallel.model, parallel.criterion
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scaler = grad_scaler(layout.precision, device)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.grad_clip = cfg.optim.grad_clip
        self.scale_before: float | None = None

    # ---- the step ------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast():
            return self.model(**model_inputs(batch))

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def gradients_done(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def measure_norm(self) -> torch.Tensor:
        return clip_grad_norm(self.params, self.grad_clip, None, self.device)

    def layer_norms(self) -> dict[str, float]:
        return per_layer_grad_norms(self.model)

    def update(self, found_inf: torch.Tensor) -> None:
        if self.scaler is not None:  # fp16: the scaler decides (and synchronizes, as its step must)
            self.scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
        else:
            step_unless_found_inf(self.optimizer, found_inf)
        self.optimizer.zero_grad(set_to_none=True)

    def update_skipped(self) -> bool:
        return self.scaler is not None and self.scaler.get_scale() < self.scale_before

    # ---- state ---------------------------------------------------------------------------------------
    def sharded_state(self) -> ShardedState:
        return ShardedState(self.model, {}, self.optimizer)

    def write_native(self, folder: Path) -> None:
        save_torch(folder / "model.pt", self.model.state_dict())
        save_torch(folder / "optimizer.pt", self.optimizer.state_dict())
        if self.scaler is not None:
            save_torch(folder / "scaler.pt", self.scaler.state_dict())

    def read_native(self, checkpoint: Path) -> None:
        model = load_torch(checkpoint / "model.pt", self.device)
        optimizer = load_torch(checkpoint / "optimizer.pt", self.device)
        if separate_prefixes(model):  # an earlier bigtrain's Q, K, V parameters
            optimizer = join_optimizer_state(optimizer, self.model, self.optimizer)
        load_state(self.model, model, checkpoint / "model.pt")
        self.optimizer.load_state_dict(optimizer)
        if self.scaler is not None and (checkpoint / "scaler.pt").exists():
            self.scaler.load_state_dict(load_torch(checkpoint / "scaler.pt"))
