"""What a non-finite step does to the run: `train.on_nonfinite` stop (one paragraph) or skip (a warning, the update
already skipped on the device), and no more than `train.max_skipped_steps` skipped in a row.

Steps' values stay on the device until a log line, an evaluation or a checkpoint needs them; then every pending
step is read in one transfer (`resolve_all`) and checked in order, so a skipped step is reported even when it
is not a log step (on a line of its own). The step that ends the run (on_nonfinite=stop, or the
max_skipped_steps-th skip in a row) gets its line too, before the error propagates.
"""

from __future__ import annotations

from bigtrain.config import TrainConfig
from bigtrain.engine.result import StepResult, resolve_all
from bigtrain.errors import TrainingError
from bigtrain.train.metrics import MetricsProcessor
from bigtrain.train.state import TrainState


class NonFiniteSteps:
    def __init__(self, cfg: TrainConfig, precision: str, metrics: MetricsProcessor) -> None:
        self.cfg, self.precision, self.metrics = cfg, precision, metrics

    def settle(self, pending: list[tuple[int, float, StepResult]], state: TrainState) -> list[StepResult]:
        """Read the pending steps' values (one wait for the device) and check each in order; a skipped step that
        is not the last one gets its own metrics line, and so does a step that ends the run (its update was not
        applied either)."""
        results = resolve_all([r for _, _, r in pending])
        for index, ((step, lr, _), result) in enumerate(zip(pending, results, strict=True)):
            try:
                skipped = self.check(result, state, step)
            except TrainingError:
                self.metrics.skipped_line(step, lr, result.loss, result.grad_norm)
                raise
            if skipped and index < len(pending) - 1:
                self.metrics.skipped_line(step, lr, result.loss, result.grad_norm)
        return results

    def check(self, result: StepResult, state: TrainState, step: int) -> bool:
        """Stop or skip on a non-finite step (no update was applied either way); True when it was skipped. fp16
        overflows are the loss scaler's business and count as neither."""
        t = self.cfg
        if result.finite or self.precision == "fp16":
            state.skipped_in_a_row = 0
            return False
        seen = f", first seen on rank {result.nonfinite_rank}" if result.nonfinite_rank is not None else ""
        what = (f"non-finite loss or gradient at step {step} (loss {result.loss}, grad_norm "
                f"{result.grad_norm}{seen})")
        if t.on_nonfinite == "stop":
            raise TrainingError(f"N{what[1:]}; no update was applied. Lower optim.lr, check the data, or set "
                                f"train.on_nonfinite=skip to skip such steps.")
        state.skipped_in_a_row += 1
        self.metrics.write(f"warning: {what}: update skipped, weights and optimizer state unchanged "
                           f"({state.skipped_in_a_row} in a row)")
        if state.skipped_in_a_row >= t.max_skipped_steps:
            raise TrainingError(
                f"{state.skipped_in_a_row} steps in a row were non-finite and skipped (steps "
                f"{step - state.skipped_in_a_row + 1}-{step}; train.max_skipped_steps="
                f"{t.max_skipped_steps}): training is not recovering. Lower optim.lr, check the data, or resume "
                f"from an earlier checkpoint.")
        return True
