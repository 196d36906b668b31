"""One step of a ring over the context group: every rank sends a tensor to the next rank and receives the
previous rank's, point to point (`isend` / `irecv`; gloo, NCCL and MPI all have them).

    rank r  --send-->  rank (r + 1) mod C        rank r  <--recv--  rank (r - 1) mod C

After t steps rank r holds what rank (r - t) mod C started with. `start` returns at once so that the
transfer overlaps the computation on the tensor already held; `wait` returns the received tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RingStep:
    """A transfer in flight: `wait()` -> the tensor received from the previous rank."""

    def __init__(self, sent: torch.Tensor, received: torch.Tensor, requests: list) -> None:
        self._sent, self._received, self._requests = sent, received, requests  # `sent` alive until done

    def wait(self) -> torch.Tensor:
        for request in self._requests:
            request.wait()
        return self._received


def ring_neighbours(group) -> tuple[int, int]:
    """The global ranks of the next and the previous rank of this rank in `group` (point-to-point operations
    address global ranks)."""
    size, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    return dist.get_global_rank(group, (rank + 1) % size), dist.get_global_rank(group, (rank - 1) % size)


def start(tensor: torch.Tensor, group, tag: int = 0) -> RingStep:
    """Send `tensor` to the next rank and receive a tensor of the same shape and type from the previous one."""
    send = tensor.contiguous()
    received = torch.empty_like(send)
    after, before = ring_neighbours(group)
    requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, after, group, tag),
                                       dist.P2POp(dist.irecv, received, before, group, tag)])
    return RingStep(send, received, requests)
