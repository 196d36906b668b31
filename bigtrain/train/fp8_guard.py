"""The bf16 guard of FP8 training (`train.precision=fp8`): FP8 measured against bf16 while the run trains.

Every `train.fp8_check_every` steps, before the step trains, its first micro-batch runs twice more on the same
weights, without gradients and without dropout (evaluation mode): once as trained (FP8 blocks) and once with
every FP8 layer in bf16. Logged to metrics.jsonl (and TensorBoard):

    fp8_loss_rel_diff        |L_fp8 - L_bf16| / |L_bf16|, L the micro-batch's mean token loss
    fp8_block_rel_diff[b]    ||D_fp8(b) - D_bf16(b)|| / ||D_bf16(b)||, D(b) = block b's output minus its input (what
                             the block adds to the residual stream), both from the same input (the bf16 run's):
                             each block's own error, not the sum of its predecessors'

Under `train.compile` the checks run the blocks eagerly (`torch.compiler.set_stance("force_eager")`): the probes'
hooks and the bf16 switch stay out of the compiled graphs, which therefore never recompile for a check; eager
and compiled FP8 agree to ~1e-5, three orders below FP8's own error.

Each number is the maximum over the ranks (every rank takes the same decision); under pipeline parallelism each
block's number comes from the stage that holds it. A block whose difference exceeds
`train.fp8_tolerance` at 3 checks in a row falls back to bf16 for the rest of the run: the record says so
(`fp8_fallback`), and the trainer state keeps the fallen blocks and the running counts, so that a resumed run
keeps the decision (`TrainState.fp8_fallback`, `TrainState.fp8_strikes`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bigtrain.engine.evaluate import EvalSums
from bigtrain.parallel.fp8 import Fp8Conversion, bf16_only, fall_back, fp8_again

STRIKES = 3  # checks in a row over the tolerance before a block falls back


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| in fp32 (0 when both are 0)."""
    value, reference = value.float(), reference.float()
    scale = reference.norm()
    difference = (value - reference).norm()
    return float(difference / scale) if scale > 0 else float(difference > 0)


class Fp8Guard:
    """The checks of one run over `model` (the engine's module, whose blocks `conversion` lists); `loss_sums` is
    the engine's `evaluate_sums` (the forward it runs, with its precision and loss)."""

    def __init__(self, conversion: Fp8Conversion, model: nn.Module,
                 loss_sums: Callable[[list[dict[str, torch.Tensor]]], EvalSums], every: int, tolerance: float,
                 fallen: list[str], strikes: dict[str, int],
                 max_over_ranks: Callable[[list[float]], list[float]] = lambda values: values) -> None:
        self.blocks, self.model, self.loss_sums = conversion.blocks, model, loss_sums
        self.max_over_ranks = max_over_ranks  # host numbers, reduced on a host group (`ParallelGroups.max_on_host`)
        self.every, self.tolerance = every, tolerance
        self.fallen, self.strikes = fallen, strikes  # the trainer state's own list and dict, updated in place
        fall_back(model, fallen)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def check(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
        """Compare FP8 with bf16 on `batch` (collective); fall back blocks that failed 3 times in a row. Returns
        the metrics record of the check."""
        block_diffs: dict[str, float] = {}
        with torch.compiler.set_stance("force_eager"):  # compiled blocks (train.compile) run eagerly here
            fp8 = self.loss_sums([batch])
            with bf16_only(self.model), self._probing(block_diffs):
                bf16 = self.loss_sums([batch])
        loss_fp8, loss_bf16 = fp8.loss_sum / max(fp8.targets, 1), bf16.loss_sum / max(bf16.targets, 1)
        # every block still in FP8, whichever rank ran it: a pipeline stage probes its own blocks only (0 elsewhere)
        names = sorted(name for name in self.blocks if name not in self.fallen)
        numbers = self.max_over_ranks([abs(loss_fp8 - loss_bf16) / max(abs(loss_bf16), 1e-12)] +
                                      [block_diffs.get(n, 0.0) for n in names])
        loss_diff, block_diffs = numbers[0], dict(zip(names, numbers[1:], strict=True))
        newly = []
        for name, diff in block_diffs.items():
            self.strikes[name] = self.strikes.get(name, 0) + 1 if diff > self.tolerance else 0
            if self.strikes[name] >= STRIKES:
                newly.append(name)
        if newly:
            self.fallen.extend(newly)
            fall_back(self.model, newly)
        record: dict[str, Any] = {"step": step, "fp8_loss_rel_diff": loss_diff, "fp8_block_rel_diff": block_diffs}
        if newly:
            record["fp8_fallback"] = newly
        return record

    @contextlib.contextmanager
    def _probing(self, diffs: dict[str, float]):
        """During the bf16 run: each block still in FP8 also runs in FP8 on its bf16 input; its difference into
        `diffs`."""
        rerunning = False

        def probe(name: str) -> Callable[..., None]:
            def hook(block: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
                nonlocal rerunning
                if rerunning:
                    return
                x = args[0] if args else kwargs["x"]
                rerunning = True
                try:
                    with fp8_again(block):
                        fp8_output = block(*args, **kwargs)
                finally:
                    rerunning = False
                diffs[name] = relative_difference(fp8_output - x, output - x)
            return hook

        handles = [block.register_forward_hook(probe(name), with_kwargs=True)
                   for name, block in self.blocks.items() if name not in self.fallen]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

