"""The bubble a pipeline schedule leaves in theory (`bigtrain plan`; bench/schedule_bubble.py measures it): its
action lists run with fixed costs and their dependencies.

A schedule of `torch.distributed.pipelining` says, for each rank, the order of its compute actions on stage s and
micro-batch i: F (forward), B (full backward), I (backward to the input only) and W (backward to the weights
only), and OVERLAP_F_B, a forward and a backward run together (DualPipeV). Their dependencies:

    F(s, i)   after F(s-1, i)
    B(s, i)   after F(s, i) and, when s is not the last stage, the backward (B or I) of (s+1, i)
    I(s, i)   as B(s, i)
    W(s, i)   after I(s, i)

Each rank runs its list in order, an action starting when the rank is free and its dependencies are done. With
the costs F = 1, I = W = 1, B = I + W = 2 (backward twice the forward, as for matmuls) and free communication,
the step takes T = the last finish over all ranks, and a rank's idle fraction is 1 - (its busy time) / T. For
GPipe and 1F1B this gives (p-1)/(m+p-1); for interleaved 1F1B with V stages per rank (p-1)/(V·m+p-1); the
zero-bubble schedules fill the gaps with W and come near 0 once m >= 2p.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

COSTS = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}
BACKWARD = ("B", "I")


class Step(NamedTuple):
    """One compute action, shaped as torch's `_Action` (stage, kind, micro-batch) for the schedules built here."""

    stage_index: int
    computation_type: str
    microbatch_index: int


def one_stage_order(schedule: str, p: int, m: int) -> list[list[Step]]:
    """The per-rank orders of the one-stage-per-rank schedules: GPipe (all forwards, then all backwards) and
    1F1B (p-1-r forwards to fill the pipe, then one forward and one backward in turn, then the backwards left)."""
    if schedule == "gpipe":
        return [[Step(r, "F", i) for i in range(m)] + [Step(r, "B", i) for i in range(m)] for r in range(p)]
    orders = []
    for r in range(p):
        warm = min(p - 1 - r, m)
        order = [Step(r, "F", i) for i in range(warm)]
        for i in range(m - warm):
            order += [Step(r, "F", warm + i), Step(r, "B", i)]
        orders.append(order + [Step(r, "B", i) for i in range(m - warm, m)])
    return orders


def _kind(action) -> str:
    kind = action.computation_type
    return getattr(kind, "value", str(kind))


def _compute(action) -> list:
    """The compute actions inside one action (OVERLAP_F_B holds a forward and a backward); none for others."""
    if getattr(action, "sub_actions", None):
        return [a for sub in action.sub_actions for a in _compute(sub)]
    return [action] if _kind(action) in COSTS else []


def simulate(order: Sequence[Iterable], costs: dict[str, float] | None = None) -> tuple[float, list[float]]:
    """(the step's length, each rank's idle fraction) for per-rank action lists `order` (None entries skipped)."""
    costs = {**COSTS, **(costs or {})}
    queues = [[a for action in actions if action is not None for a in _compute(action)] for actions in order]
    last_stage = max((a.stage_index for q in queues for a in q), default=0)
    done: dict[tuple[int, str, int], float] = {}
    clock, busy, heads = [0.0] * len(queues), [0.0] * len(queues), [0] * len(queues)

    def ready(a) -> float | None:
        s, kind, i = a.stage_index, _kind(a), a.microbatch_index
        if kind == "F":
            needs = [] if s == 0 else [[(s - 1, "F", i)]]
        elif kind == "W":
            needs = [[(s, "I", i)]]
        else:
            needs = [[(s, "F", i)]] + ([] if s == last_stage else [[(s + 1, "B", i), (s + 1, "I", i)]])
        times = []
        for alternatives in needs:
            found = [done[k] for k in alternatives if k in done]
            if not found:
                return None
            times.append(min(found))
        return max(times, default=0.0)

    remaining = sum(len(q) for q in queues)
    while remaining:
        progressed = False
        for r, q in enumerate(queues):
            while heads[r] < len(q):
                a = q[heads[r]]
                at = ready(a)
                if at is None:
                    break
                start = max(clock[r], at)
                clock[r] = start + costs[_kind(a)]
                busy[r] += costs[_kind(a)]
                done[(a.stage_index, _kind(a), a.microbatch_index)] = clock[r]
                heads[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(q[heads[r]]) for r, q in enumerate(queues) if heads[r] < len(q)}
            raise ValueError(f"the schedule cannot proceed: each rank waits on another ({stuck})")
    total = max(clock)
    return total, [1 - b / total for b in busy]


def formula(schedule: str, p: int, m: int, v: int) -> float | None:
    """The closed forms for the schedules that have one (None for the zero-bubble ones, whose bubble depends on
    how W fills the gaps: `simulate` gives it)."""
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1)
    return None


ZERO_BUBBLE_ORDERS = {"zero_bubble": "InterleavedZeroBubble", "zbv": "ZBVZeroBubble", "dualpipev": "DualPipeV"}


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1, orders=None) -> float:
    """The idle fraction of the step on the busiest-idle rank: the closed form for gpipe, 1f1b and
    interleaved_1f1b; for the zero-bubble schedules the simulation of their per-rank action lists `orders`
    (torch's, see `ZERO_BUBBLE_ORDERS`), or, without them, the interleaved form with V = 2 as an upper bound."""
    if p <= 1:
        return 0.0
    closed = formula(schedule, p, m, v)
    if closed is not None:
        return closed
    if orders is None:
        return formula("interleaved_1f1b", p, m, 2)
    return max(simulate(orders)[1])
