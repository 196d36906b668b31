"""One optimizer step over a global batch split into micro-batches: the skeleton every engine runs.

    N      = Σ target tokens of the global batch: each rank's count, taken on the host before its batch moved to
             the device, summed over the data-parallel ranks on a host (gloo) group
    ℓ_m    = Σ_tokens ce(micro-batch m) / N: each micro-batch backpropagates its share, so the accumulated gradient
             is the gradient of the global batch's mean token loss whatever the split (the engine scales it for
             its data-parallel reduction: `backward`)
    L      = Σ_m ℓ_m summed over the data-parallel ranks (the logged loss, the same number under any layout)
    R_m    = Σ_layers (aux_loss_coef · aux + z_loss_coef · z) of micro-batch m's MoE blocks (`model.moe`), each
             over micro-batch m's tokens as one device runs it: each micro-batch backpropagates ℓ_m + R_m / (M·D)
             (M micro-batches on each of D data ranks), so the router losses enter as their mean over the global
             batch's micro-batches; L stays the cross-entropy, and the step reports the means over all micro-batches
             (every data rank's) of Σ_layers aux, Σ_layers z and the dropped-assignment fraction (`moe`), and per
             layer those means and the expert load summed over the global batch (`moe_layers`): one all-reduce
             (float64) of the [layers, 3 + 2E] table over the data group, on the device (the counts are device
             tensors until a log step reads them; a host group would wait for the device every step). Every
             rank routes its own tokens (expert parallelism included: its expert group is part of its data
             group, and tensor peers route the same tokens), so the sum over the data group is the global batch's
             (DeepSpeed's pipeline engine, whose last stage alone forms the loss, has each MoE layer carry its R_m
             into backward instead, and sums the table over its stages as well: `deepspeed/pipeline.py`)

Under context parallelism every rank of a context group reads its data-parallel rank's micro-batches whole and
runs its zig-zag share of each (`local_batch`, `bigtrain.parallel.context.inputs`): N is still counted on the
whole batches and summed over the data group alone (a context group's ranks hold the same samples), while ℓ_m is
Σ ce over this rank's share of the targets / N, so L and the gradients are summed over data × context (the
gradient group).
    g      = ‖∇L‖ before clipping; gradients scaled by min(1, optim.grad_clip / (g + 1e-6)) when clipping is on
    skip   = L or g not finite, or any rank's own loss not finite: the update is skipped on the device
             (`found_inf`, as under a loss scaler), weights and optimizer state untouched; the lowest such rank is
             one all-reduce (MIN) on the device, so every rank decides the same without reading anything

Nothing here waits for the device: the loss, the norm and the decision stay 0-dim device tensors until the
trainer reads them at a log step (`StepResult`). An engine supplies its wrap (`forward`), its backward
(`backward`) and its optimizer (`update`, with `measure_norm`, which measures and clips where bigtrain does it).
An engine whose schedule runs the micro-batches and the update itself (DeepSpeed's pipeline) overrides
`run_schedule` and makes the decision where its optimizer steps (`decide`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bigtrain.config.layout import Layout
from bigtrain.distributed.device import autocast
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.evaluate import EvalSums, evaluate_sums
from bigtrain.engine.result import LAYER_VALUES, NO_RANK, MoELayers, StepResult
from bigtrain.models.loss import Criterion, count_input_tokens, count_targets
from bigtrain.models.moe import MoEFeedForward, RouterStats, moe_layer_names, moe_layers, take_router_stats
from bigtrain.optim import set_lr
from bigtrain.parallel.context.inputs import ContextInputs


def router_rows(steps: list[list[RouterStats]]) -> torch.Tensor:
    """[layers, 3 + 2E] float64 of one rank's step, from its router numbers per micro-batch and layer: each layer's
    aux, z and dropped fraction averaged over the micro-batches, then its `assigned` and `kept` summed over them."""
    means = torch.stack([torch.stack([torch.stack([getattr(s, k) for s in layers]) for k in LAYER_VALUES], 1)
                         for layers in steps]).double().mean(0)  # [L, 3]
    counts = torch.stack([torch.stack([torch.cat([s.assigned, s.kept]) for s in layers]) for layers in steps])
    return torch.cat([means, counts.sum(0).double()], 1)


@dataclass(frozen=True)
class StepCheck:
    """A step's non-finite decision, on the device and the same on every rank (nothing here is read)."""

    first_bad: torch.Tensor | None  # int64, 0-dim: the lowest rank whose own loss was not finite, or NO_RANK
    found_inf: torch.Tensor  # float32, 0-dim: 1 = skip the update (the form torch's fused optimizers take)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours a `found_inf` tensor: fused torch optimizers and bigtrain's LAMB."""
    return bool(getattr(optimizer, "supports_found_inf", False) or
                any(g.get("fused") for g in optimizer.param_groups))


def step_unless_found_inf(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor,
                          step: Callable[[], object] | None = None) -> None:
    """`step()` (default `optimizer.step`), skipped when `found_inf` is 1: on the device for an optimizer that
    honours `found_inf`, else decided on the host (which waits for the device)."""
    step = step or optimizer.step
    if skips_on_device(optimizer):
        optimizer.found_inf = found_inf
        try:
            step()
        finally:
            optimizer.found_inf = None
    elif not bool(found_inf):
        step()


class StepEngine:
    """The step skeleton (module docstring) and what every engine shares: evaluation through its model. An
    engine sets the attributes below in its constructor and supplies the methods that raise here."""

    layout: Layout
    model: torch.nn.Module  # what evaluation and sampling run
    criterion: Criterion
    device: torch.device
    optimizer: object  # what the learning rate is set on
    groups: ParallelGroups | None = None
    dp_rank: int = 0
    dp_size: int = 1
    config_file: str | None = None
    native_state: bool = True
    check: StepCheck | None = None  # the current step's decision, once made
    router_layers: list[MoEFeedForward] | None = None  # the model's MoE blocks, found at the first step
    router_names: tuple[str, ...] = ()  # their blocks (`moe_layer_names`)
    router_steps: list[list[RouterStats]] | None = None  # this step's router numbers: per micro-batch, per layer
    # under pipeline stages: this stage's rows among `router_names` (every MoE block of the model; the other
    # stages' rows stay 0 here) and the experts per block, so that the table is summed over the pipeline group too
    router_stage_rows: list[int] | None = None
    router_experts: int = 0
    context: ContextInputs | None = None  # the split of micro-batches under context parallelism

    # ---- what an engine supplies ---------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits of one micro-batch through the wrapped model."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backpropagate `loss` (this micro-batch's Σ ce / N), scaled for the engine's data-parallel reduction."""
        raise NotImplementedError

    @property
    def backward_scale(self) -> float:
        """The factor by which `backward` multiplies ℓ: D · C, for a reduction that averages over the D · C ranks of
        the gradient group (data × context; the gradients of activations are D · C times one device's: `bigtrain
        parity --locate` divides)."""
        return float(self.dp_size * (self.context.size if self.context is not None else 1))

    def update(self, found_inf: torch.Tensor) -> None:
        """One optimizer update, skipped on the device when `found_inf` is 1; gradients cleared after."""
        raise NotImplementedError

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's forward and backward (e.g. no gradient sync until the last)."""
        return contextlib.nullcontext()

    def gradients_done(self) -> None:
        """After the last backward: anything that completes the gradients (a reduction the engine owns)."""

    def measure_norm(self) -> torch.Tensor | None:
        """‖g‖ before clipping, clipping the gradients where bigtrain clips (0-dim, on the device); None where
        the optimizer measures and clips during `update` (`reported_norm`)."""
        return None

    def layer_norms(self) -> dict[str, float] | None:
        """Per-piece gradient norms for TensorBoard (log steps only; may read the device)."""
        return None

    def reported_norm(self) -> torch.Tensor:
        """The norm the optimizer measured during `update`, when `measure_norm` gave None."""
        raise NotImplementedError

    def update_skipped(self) -> bool:
        """Whether the optimizer skipped the update by its own decision (e.g. a loss scaler's overflow)."""
        return False

    # ---- the skeleton --------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float, layer_norms: bool = False,
                   counts: tuple[int, int] | None = None) -> StepResult:
        set_lr(self.optimizer, lr)
        self.check, self.norm, self.piece_norms = None, None, None
        self.wants_layer_norms = layer_norms
        self.router_steps = []
        n_targets, n_tokens = self.global_counts(micro_batches, counts)
        loss = self.run_schedule(micro_batches, n_targets)
        check = self.check
        assert check is not None, "the step ended without its non-finite decision"
        norm = self.norm if self.norm is not None else self.reported_norm()
        skipped = check.found_inf > 0
        if self.update_skipped():  # the optimizer's own host decision (DeepSpeed's overflow check, a loss scaler)
            skipped = torch.ones_like(skipped)
        moe, moe_layers = self.router_report() or (None, None)
        return StepResult(loss=loss, grad_norm=norm, skipped=skipped,
                          finite=torch.isfinite(loss) & torch.isfinite(norm), layer_grad_norms=self.piece_norms,
                          tokens=n_tokens, nonfinite_rank=check.first_bad, moe=moe, moe_layers=moe_layers)

    def run_schedule(self, micro_batches: list[dict[str, torch.Tensor]], n_targets: int) -> torch.Tensor:
        """Forward and backward every micro-batch in order, decide, update; returns L (on the device)."""
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            batch = self.local_batch(batch)
            with self.micro_batch(last=i == last):
                loss = self.criterion.loss_sum(self.forward(batch), batch["labels"]) / n_targets
                router = self.router_loss(len(micro_batches))
                self.backward(loss if router is None else loss + router, last=i == last)
            total += loss.detach()
        if self.context is not None:
            self.context.clear()
        self.gradients_done()
        loss = self.sum_over_data(total)
        self.update(self.decide(torch.isfinite(total), loss))
        return loss

    def decide(self, locally_finite: torch.Tensor, loss: torch.Tensor | None, measure: bool = True) -> torch.Tensor:
        """The step's decision from this rank's loss finiteness, the global loss and the norm (measured and
        clipped here where bigtrain does it); returns `found_inf` for the update."""
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        if loss is not None:
            bad |= ~torch.isfinite(loss)
        if measure:
            self.norm = self.measure_norm()
            if self.norm is not None:
                bad |= ~torch.isfinite(self.norm)
            if self.wants_layer_norms:
                self.piece_norms = self.layer_norms()
        self.check = self.world_check(locally_finite, bad)
        return self.check.found_inf

    def world_check(self, locally_finite: torch.Tensor, bad: torch.Tensor) -> StepCheck:
        """`bad` (the same on every rank) or any rank's own loss not finite; the lowest such rank by one
        all-reduce (MIN) of a rank number over the world, on the device."""
        if self.groups is None:
            return StepCheck(first_bad=None, found_inf=(bad | ~locally_finite).float())
        world, rank = self.layout.world_size, self.groups.rank
        flag = torch.where(locally_finite, world, rank).to(device=self.device, dtype=torch.int64).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        flag = flag.reshape(())
        seen = flag < world
        return StepCheck(first_bad=torch.where(seen, flag, NO_RANK), found_inf=(seen | bad).float())

    # ---- shared pieces -------------------------------------------------------------------------------
    def router_loss(self, micro_batches: int) -> torch.Tensor | None:
        """R_m / (M·D) of the micro-batch just forwarded (module docstring); None for a model without MoE
        blocks."""
        if self.router_layers is None:
            self.router_layers = moe_layers(self.model)
            self.router_names = tuple(moe_layer_names(self.model))
        stats = take_router_stats(self.router_layers)
        if not stats:
            return None
        if self.router_steps is not None:
            self.router_steps.append(stats)
        return torch.stack([s.loss for s in stats]).sum() / (micro_batches * self.dp_size)

    def router_report(self) -> tuple[dict[str, torch.Tensor], MoELayers] | None:
        """The step's `moe_aux_loss`, `moe_z_loss` (Σ over layers) and `moe_dropped_fraction` (mean over layers),
        each the mean over the micro-batches, and the same per layer with the expert load (`MoELayers`), over the
        global batch (module docstring), on the device; None without MoE blocks."""
        table = self.router_table()
        if table is None:
            return None
        table = self.sum_router_table(table)
        aux, z, dropped = table[:, :len(LAYER_VALUES)].unbind(1)
        totals = {"moe_aux_loss": aux.sum(), "moe_z_loss": z.sum(), "moe_dropped_fraction": dropped.mean()}
        return totals, MoELayers(self.router_names, table)

    def router_table(self) -> torch.Tensor | None:
        """This rank's [layers, 3 + 2E] table of the step (`router_rows`); None without MoE blocks. Under pipeline
        stages a row for every MoE block of the model: this stage's from its micro-batches, zeros for the others'."""
        if self.router_stage_rows is None:
            return router_rows(self.router_steps) if self.router_steps else None
        if not self.router_names:
            return None
        width = len(LAYER_VALUES) + 2 * self.router_experts
        table = torch.zeros(len(self.router_names), width, dtype=torch.float64, device=self.device)
        if self.router_steps:
            table[self.router_stage_rows] = router_rows(self.router_steps)
        return table

    def sum_router_table(self, table: torch.Tensor) -> torch.Tensor:
        """The table's sums and means over every data rank's micro-batches: one all-reduce over the data group;
        under pipeline stages then one over the pipeline group (each block lives on one stage)."""
        if self.groups is not None and self.dp_size > 1:
            dist.all_reduce(table, group=self.groups.data_group)
            table[:, :len(LAYER_VALUES)] /= self.dp_size
        if self.router_stage_rows is not None:
            dist.all_reduce(table, group=self.groups.group("pipeline"))
        return table

    def global_counts(self, micro_batches: list[dict[str, torch.Tensor]],
                      counts: tuple[int, int] | None) -> tuple[int, int]:
        """(target tokens, input tokens) of the whole global batch: this rank's `counts` (counted on the host
        before the batch moved to the device; else counted here, which waits for the device) summed over the
        data-parallel ranks on the host data group."""
        local = counts if counts is not None else (sum(count_targets(b) for b in micro_batches),
                                                   sum(count_input_tokens(b) for b in micro_batches))
        if self.groups is None:
            return local
        n_targets, n_tokens = self.groups.sum_on_host(local)
        return n_targets, n_tokens

    def local_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What this rank runs of a micro-batch: all of it, or under context parallelism its share of every
        sequence (with global positions; the attention cores get every rank's tokens)."""
        return batch if self.context is None else self.context.split(batch)

    def sum_over_data(self, total: torch.Tensor) -> torch.Tensor:
        """Σ over the data-parallel ranks (× context ranks: the gradient group) of this rank's loss, in float64,
        on the device."""
        if self.groups is None:
            return total
        t = total.detach().double().reshape(1)
        dist.all_reduce(t, group=self.groups.gradient_group)
        return t.reshape(())

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.layout.precision, self.device)

    def evaluate_sums(self, batches: list[dict[str, torch.Tensor]]) -> EvalSums:
        """Summed held-out loss and counts over `batches` through the engine's model (every rank runs all of them
        and gets the same sums)."""
        return evaluate_sums(self.model, batches, self.autocast, self.criterion, self.context)

    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        return self.evaluate_sums(batches).record()

    def describe(self) -> str:
        return "{}"

    def memory_report(self, run_dir=None) -> str | None:
        return None
