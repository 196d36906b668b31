"""torch.distributed.pipelining internals bigtrain relies on, in one place.

    forward_only_schedule   a forward-only schedule over any stage placement (evaluation): torch's schedules
                            run `eval()` by dropping their backward actions, which its V-shaped schedules
                            (DualPipeV: overlapped forward-backward actions) cannot; this one is built from a
                            compute-only action list (every rank runs its stages in increasing order, each over
                            all micro-batches; then the backwards torch's validation asks for) lowered to sends
                            and receives by torch's `_PipelineScheduleRuntime`, which takes the placement from the
                            actions; the backwards and their sends and receives are then dropped, and FSDP2-sharded
                            stages (parallel.zero_stage 2/3) are gathered once before the first forward and freed
                            after the last (torch's UNSHARD/RESHARD around the backwards would pair an
                            all-gather with no computation); stages without FSDP2 ignore both

Importing this module imports torch.distributed.pipelining.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.distributed.pipelining.schedules import _Action, _ComputationType, _PipelineScheduleRuntime


class _ForwardOnly(_PipelineScheduleRuntime):
    def __init__(self, stages: list, n_microbatches: int, loss_fn: Callable,
                 placement: dict[int, list[int]]) -> None:
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
        f, b = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
        mbs = range(n_microbatches)
        self.pipeline_order = {rank: [_Action(s, f, mb) for s in sorted(held) for mb in mbs] +
                               [_Action(s, b, mb) for s in sorted(held, reverse=True) for mb in mbs]
                               for rank, held in placement.items()}
        self._prepare_schedule_with_comms(self.pipeline_order)
        unshard, reshard = _ComputationType.UNSHARD, _ComputationType.RESHARD
        dropped = {b, _ComputationType.SEND_B, _ComputationType.RECV_B, _ComputationType.REDUCE_GRAD, unshard, reshard}
        self.pipeline_order_with_comms = {
            rank: [_Action(s, unshard, None) for s in sorted(placement[rank])] +
                  [a for a in actions if a.computation_type not in dropped] +
                  [_Action(s, reshard, None) for s in sorted(placement[rank])]
            for rank, actions in self.pipeline_order_with_comms.items()}


def forward_only_schedule(stages: list, n_microbatches: int, loss_fn: Callable, placement: dict[int, list[int]]):
    """A schedule whose `eval(...)` runs the forward of `n_microbatches` micro-batches through `stages` (this
    rank's `PipelineStage`s), the pipeline's stages held as `placement` says ({pipeline rank: stage indices});
    `loss_fn(output, target)` on the last stage gives each micro-batch's result."""
    return _ForwardOnly(stages, n_microbatches, loss_fn, placement)
