"""The pipeline-schedule bubble bench (issue 27, item 4): its theory against the closed forms, and a measured run of
every schedule on 2 CPU ranks."""

from __future__ import annotations

import pytest

from bench.schedule_theory import formula, one_stage_order, simulate


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 4), (4, 8), (4, 16), (8, 3)])
def test_one_stage_schedules_simulate_to_their_closed_form(schedule, p, m):
    """(p-1)/(m+p-1) on every rank."""
    _, idle = simulate(one_stage_order(schedule, p, m))
    assert idle == pytest.approx([(p - 1) / (m + p - 1)] * p, abs=1e-12)


@pytest.mark.parametrize("p,m", [(2, 4), (2, 8), (4, 8), (4, 16)])
def test_torchs_schedules_simulate_to_their_theory(p, m):
    """torch's own action lists (its schedule visualizer builds them without process groups): interleaved 1F1B
    gives (p-1)/(V·m+p-1), and the zero-bubble ones leave less idle than it."""
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    _, interleaved = simulate(get_schedule_ops("Interleaved1F1B", p, m, num_stages_per_rank=2))
    assert interleaved == pytest.approx([formula("interleaved_1f1b", p, m, 2)] * p, abs=1e-12)
    for name in ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"):
        _, idle = simulate(get_schedule_ops(name, p, m, num_stages_per_rank=2))
        assert max(idle) < min(interleaved) / 2, name


def test_a_schedule_that_waits_on_itself_is_named():
    from bench.schedule_theory import Step

    with pytest.raises(ValueError, match="cannot proceed"):
        simulate([[Step(0, "B", 0), Step(0, "F", 0)], [Step(1, "F", 0), Step(1, "B", 0)]])


@pytest.mark.launches
def test_every_schedule_runs_on_two_ranks_and_reports_per_rank_idle(tmp_path, capsys):
    from bench import schedule_bubble

    rows = schedule_bubble.main(["--ranks", "2", "--micro-batches", "4", "--steps", "1", "--width", "32",
                                 "--rows", "4", "--out", str(tmp_path / "bubble.json")])
    assert [r["schedule"] for r in rows] == list(schedule_bubble.SCHEDULES)
    for r in rows:
        assert "refused" not in r, r
        assert len(r["idle_measured"]) == 2 and all(0 <= x < 1 for x in r["idle_measured"]), r
        if r["idle_formula"] is not None:
            assert r["idle_theory"] == pytest.approx([r["idle_formula"]] * 2), r
    assert (tmp_path / "bubble.json").exists() and "idle measured per rank" in capsys.readouterr().out


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16)])
def test_plan_bubble_per_schedule(p, m):
    """bigtrain plan's bubble: the closed forms, and the simulated zero-bubble schedules below interleaved."""
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    from bigtrain.planning.bubble import ZERO_BUBBLE_ORDERS, bubble_fraction

    assert bubble_fraction("1f1b", p, m) == pytest.approx((p - 1) / (m + p - 1))
    assert bubble_fraction("interleaved_1f1b", p, m, 2) == pytest.approx((p - 1) / (2 * m + p - 1))
    assert bubble_fraction("1f1b", 1, m) == 0.0
    for schedule, name in ZERO_BUBBLE_ORDERS.items():
        ops = get_schedule_ops(name, p, m, num_stages_per_rank=2)
        assert bubble_fraction(schedule, p, m, 2, ops) < bubble_fraction("interleaved_1f1b", p, m, 2) / 2
