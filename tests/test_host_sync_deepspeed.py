"""No host synchronization in bigtrain's code inside a DeepSpeed or pipeline step except at log steps (issue 15),
on 2 CPU ranks: tests/helpers/count_syncs.py counts, per step and rank, the training thread's calls that read a
tensor on the host (each a wait for the device on a GPU) and attributes each to bigtrain or to DeepSpeed (see
there). bigtrain's own: none between log steps, some at log steps (the values are read there), and in step 1
only the memory report's gather. DeepSpeed's internal reads (its gradient-norm check) are printed (`pytest -s`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import DP_LAYOUT, REPO, launch_ok, read_metrics, tiny_overrides

pytestmark = pytest.mark.launches

COUNT_SYNCS = REPO / "tests" / "helpers" / "count_syncs.py"
STEPS, LOG_EVERY = 6, 3
# step 1: every rank's measured memory, gathered (the engine's report, through the shared gather in memory.py)
ONCE_PER_RUN = {"engine/deepspeed/engine.py:memory_report", "engine/memory.py:gathered_report"}


def _counts(run_dir: Path, rank: int) -> dict[int, list[tuple[str, str, int]]]:
    raw = json.loads((run_dir / f"syncs-rank{rank}.json").read_text())
    return {int(step): [tuple(c) for c in calls] for step, calls in raw.items()}


def _by_kind(calls: list[tuple[str, str, int]]) -> Counter:
    kinds: Counter = Counter()
    for kind, _, n in calls:
        kinds[kind] += n
    return kinds


@pytest.mark.parametrize("layout", [("parallel.zero_stage=1",), ("parallel.pipeline=2", "parallel.zero_stage=0")],
                         ids=["zero1", "pipeline"])
def test_no_host_sync_in_bigtrain_between_log_steps(tmp_path, layout):
    run_dir = tmp_path / "run"
    launch_ok(2, tiny_overrides(run_dir, "causal", *DP_LAYOUT, *layout, f"train.steps={STEPS}",
                                f"log.every={LOG_EVERY}"), script=COUNT_SYNCS)
    assert sorted(read_metrics(run_dir)[0]) == [3, 6]
    log_steps = set(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for rank in (0, 1):
        counts = _counts(run_dir, rank)
        kinds = {step: _by_kind(counts.get(step, [])) for step in range(1, STEPS + 1)}
        print(f"\n{layout} rank {rank}: syncing calls per step (bigtrain / DeepSpeed internal / host-only): "
              + ", ".join(f"{s}: {k['bigtrain']}/{k['deepspeed']}/{k['host']}" for s, k in kinds.items()))
        bigtrain = {step: [c for c in counts.get(step, []) if c[0] == "bigtrain"] for step in kinds}
        first = [c for c in bigtrain[1] if c[1].rsplit(":", 1)[0] not in ONCE_PER_RUN]
        assert not first, first
        between = {step: calls for step, calls in bigtrain.items() if step > 1 and step not in log_steps and calls}
        assert not between, between
        assert all(bigtrain[step] for step in log_steps), bigtrain
        assert not any(k["other"] for k in kinds.values()), counts
