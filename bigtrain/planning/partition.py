"""Pipeline stage boundaries as DeepSpeed's `PipelineModule` draws them, without importing DeepSpeed.

uniform: layer counts as equal as possible, the first `n mod p` stages one layer longer.
parameters: the linear-partition dynamic programme over parameter counts w_0..w_{n-1}: among the cuts into p
contiguous parts it picks the one whose largest minus smallest part is least, scanning cut points in order
and keeping the last of equal costs (DeepSpeed's `partition_balanced`; tests compare both on many inputs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def partition_uniform(n: int, parts: int) -> list[int]:
    if n <= parts:
        return [min(p, n) for p in range(parts + 1)]
    size, extra = divmod(n, parts)
    return [p * size + min(p, extra) for p in range(parts + 1)]


def partition_balanced(weights: Sequence[float], parts: int) -> list[int]:
    n = len(weights)
    if n <= parts:
        return partition_uniform(n, parts)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = math.inf
    best_max = [[inf] * (parts + 1) for _ in range(n + 1)]
    best_min = [[inf] * (parts + 1) for _ in range(n + 1)]
    best_cost = [[inf] * (parts + 1) for _ in range(n + 1)]
    cut = [[0] * (parts + 1) for _ in range(n + 1)]
    best_max[0][0] = best_cost[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, parts) + 1):
            prev_max, prev_min = [row[j - 1] for row in best_max], [row[j - 1] for row in best_min]
            cost_ij, max_ij, min_ij, cut_ij = best_cost[i][j], best_max[i][j], best_min[i][j], cut[i][j]
            for k in range(i):
                part = prefix[i] - prefix[k]
                hi = prev_max[k] if prev_max[k] > part else part
                lo = prev_min[k] if prev_min[k] < part else part
                if cost_ij >= hi - lo:
                    cost_ij, max_ij, min_ij, cut_ij = hi - lo, hi, lo, k
            best_cost[i][j], best_max[i][j], best_min[i][j], cut[i][j] = cost_ij, max_ij, min_ij, cut_ij
    bounds = [n]
    for j in range(parts, 0, -1):
        bounds.append(cut[bounds[-1]][j])
    return bounds[::-1]


def stage_boundaries(weights: Sequence[int], kinds: Sequence[str], parts: int, method: str) -> list[int]:
    """[b_0 = 0, ..., b_parts = n] for `parallel.partition_method`; `kinds` are the layers' class names (for
    `type:<regex>`)."""
    if method == "uniform":
        return partition_uniform(len(weights), parts)
    if method == "parameters":
        return partition_balanced(weights, parts)
    if method.startswith("type:"):
        pattern = re.compile(method[len("type:"):], re.IGNORECASE)
        return partition_balanced([1 if pattern.search(kind) else 0 for kind in kinds], parts)
    raise ValueError(f"unknown partition method {method!r}")
