"""The DeepSpeed engine: data parallelism and ZeRO 0-3 over the layout's data group (gloo on CPU, nccl on GPU).

    wrap        DeepSpeed's engine around the model (`wrap.py`); the process groups are bigtrain's (its `mpu`):
                data parallelism and ZeRO act over the data group; under tensor parallelism each rank of a tensor
                group holds one shard of the model
    backward    engine.backward(ℓ_m · N_d) with DeepSpeed's division by the gradient-accumulation steps turned
                off: its data-parallel averaging divides by N_d, so every rank's gradient is ∇(Σ_global ce / N),
                the single-device gradient; `engine.step()` after each micro-batch (DeepSpeed counts them) updates
                at the last. Under context parallelism DeepSpeed's data-parallel group is data × context
                (`GradientMpu`) and N_d = D·C
    optimizer   bigtrain's AdamW or LAMB inside DeepSpeed's ZeRO / bf16 wrapper, which measures, clips and
                reports the norm; without a wrapper (ZeRO-0, fp32) bigtrain measures the norm of the all-reduced
                gradients (`parallel/grad_norm.py`) and DeepSpeed clips
    own files   DeepSpeed's model-state and ZeRO optimizer files (`mp_rank_*`, `zero_pp_rank_*`)

Under expert parallelism (ZeRO-0, fp32) bigtrain reduces the gradients itself after the last backward (routed
experts over the expert-data group, the rest over the data group, both divided by D: `parallel/expert.py`), and
measures and clips with the norm summed over the expert group (DeepSpeed's clipping is off there). DeepSpeed's
own files would hold data rank 0's experts only, so a checkpoint keeps the state in its layout-free form alone
(written at every save, experts under their own names; `native_state` False).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bigtrain.config import Config
from bigtrain.config.layout import Layout
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.deepspeed.wrap import DeepSpeedWrap, OnDeepSpeed
from bigtrain.engine.memory import (
    ModelStateBytes,
    gathered_report,
    measure_grads,
    measure_optimizer,
    measure_params,
    tensor_share_note,
)
from bigtrain.models.loss import model_inputs
from bigtrain.parallel import ParallelModel
from bigtrain.parallel.expert import reduce_gradients
from bigtrain.parallel.grad_norm import clip_grad_norm, global_grad_norm, piece_grad_norms
from bigtrain.planning.zero import zero_formula


class DeepSpeedEngine(OnDeepSpeed):
    def __init__(self, cfg: Config, layout: Layout, parallel: ParallelModel, groups: ParallelGroups,
                 device: torch.device) -> None:
        self.layout, self.groups, self.criterion = layout, groups, parallel.criterion
        self.dp_rank, self.dp_size = groups.get_data_parallel_rank(), layout.data
        self.context = parallel.context
        self.reduce_size = layout.data * layout.context  # the ranks DeepSpeed averages gradients over
        self.ds = DeepSpeedWrap(cfg, layout, parallel, groups, found_inf=lambda: self.check.found_inf, mpu=True)
        self.model, self.optimizer, self.device = self.ds.engine.module, self.ds.optimizer, self.ds.engine.device
        self.last_grad_bytes: int | None = None
        self.measure_grads = True  # only for the first step, which the memory report describes
        self.expert = layout.expert > 1  # bigtrain reduces and clips (module docstring)
        self.native_state = not self.expert
        self.grad_clip = cfg.optim.grad_clip

    # ---- the step ------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.ds.engine(**model_inputs(batch))

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.ds.engine.backward(loss * self.reduce_size, scale_wrt_gas=False)
        if self.measure_grads:  # peak gradient bytes over the step (ZeRO-1 frees full gradients at the end)
            self.last_grad_bytes = max(self.last_grad_bytes or 0, measure_grads(self.model, self.optimizer))
        if not last:
            self.ds.engine.step()  # a micro-step: DeepSpeed counts it, the update comes at the last

    def gradients_done(self) -> None:
        if self.expert:
            reduce_gradients(self.ds.params, self.groups, self.reduce_size)

    def measure_norm(self) -> torch.Tensor | None:
        if not self.ds.unwrapped:
            return None  # DeepSpeed's wrapper measures it in `step`
        if self.expert:
            return clip_grad_norm(self.ds.params, self.grad_clip, self.groups, self.device)
        return global_grad_norm(self.model.parameters(), self.groups, self.device)

    def layer_norms(self) -> dict[str, float] | None:
        return piece_grad_norms(self.model, self.groups) if self.ds.unwrapped else None

    def update(self, found_inf: torch.Tensor) -> None:
        self.ds.engine.step()  # the inner optimizer's pre-step hook hands it `found_inf`

    # ---- reports -------------------------------------------------------------------------------------
    def memory_report(self, run_dir: Path | None = None) -> str | None:
        """Gathers every rank's measured bytes (collective); the text on rank 0, None elsewhere. Rank 0 also
        writes the numbers to run_dir/memory.json."""
        mine = ModelStateBytes(params=measure_params(self.model), grads=self.last_grad_bytes or 0,
                               optimizer=measure_optimizer(self.optimizer))
        self.measure_grads = False
        layout, master = self.layout, not self.ds.unwrapped
        formula = zero_formula(self.ds.n_params, layout.zero_stage, self.dp_size, layout.precision,
                               master_copy=master)
        title = (f"model-state memory per rank in step 1 (gradients: peak over its micro-batches)"
                 f"{tensor_share_note(layout.tensor)}\n"
                 f"ZeRO-{layout.zero_stage}, {self.dp_size} data-parallel ranks, {layout.precision}, "
                 f"Ψ = {self.ds.n_params} parameters, K = {12 if master else 8} bytes")
        facts = {"engine": "deepspeed", "zero_stage": layout.zero_stage, "dp_size": self.dp_size,
                 "precision": layout.precision, "n_params": self.ds.n_params}
        return gathered_report(mine, formula, title, self.groups.host_data, self.dp_size, self.groups.rank, run_dir,
                               facts)
