"""torch.distributed.pipelining schedules for bigtrain's models (issue 27, item 2): stage placement and schedule
names (fast), and parity with the unsplit model on one process (launches: gloo ranks spawned here, several
schedules per spawn)."""

from __future__ import annotations

import json

import pytest

from bigtrain.parallel.schedules import SCHEDULE_CLASSES
from bigtrain.parallel.stages import stage_indices, stage_rank

TOLERANCE = 1e-5
# k_proj biases have an exactly zero true gradient (softmax ignores a shift shared by all keys): their gradients
# are rounding noise, which AdamW's normalized update turns into steps of ±lr; the weights are compared without them.
NOISE_ONLY = ("k_proj.bias",)


def test_schedule_names_are_torchs_classes():
    import torch.distributed.pipelining as pipelining

    assert set(SCHEDULE_CLASSES) == {"1f1b", "gpipe", "interleaved_1f1b", "zero_bubble", "dualpipev"}
    for cls in SCHEDULE_CLASSES.values():
        assert hasattr(pipelining, cls), cls


@pytest.mark.parametrize("p,v,schedule", [(2, 1, "1f1b"), (4, 1, "gpipe"), (2, 2, "interleaved_1f1b"),
                                          (4, 3, "zero_bubble"), (2, 2, "dualpipev"), (4, 2, "dualpipev")])
def test_every_stage_is_placed_once(p, v, schedule):
    placed = sorted(s for r in range(p) for s in stage_indices(r, p, v, schedule))
    assert placed == list(range(p * v))
    for r in range(p):
        assert all(stage_rank(s, p, v, schedule) == r for s in stage_indices(r, p, v, schedule))


def test_placements():
    assert stage_indices(1, 4, 2, "interleaved_1f1b") == [1, 5]  # loop: r, r + p
    assert stage_indices(1, 4, 2, "dualpipev") == [1, 6]  # V: r, 2p - 1 - r
    assert stage_indices(0, 2, 2, "dualpipev") == [0, 3]  # first and last stage on rank 0


def spawn(tmp_path, world: int, cases: list[dict]) -> list[dict]:
    import torch.multiprocessing as mp

    from bigtrain.distributed.rendezvous import free_port
    from tests.helpers.pipeline_schedules import rank_main

    out = tmp_path / "rows"
    mp.spawn(rank_main, args=(world, free_port(), str(out), cases), nprocs=world, join=True)
    return [json.loads(line) for r in range(world) for line in (tmp_path / f"rows.{r}").read_text().splitlines()]


def case(family: str, schedule: str, v: int, m: int = 4, **rest) -> dict:
    return {"family": family, "schedule": schedule, "virtual_stages": v, "micro_batches": m, **rest}


def check_step(rows: list[dict], world: int) -> None:
    """Per case: init equals the unsplit model's, the loss on every rank equals its loss, every parameter is held
    by some rank and each held gradient equals the unsplit gradient."""
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        assert "error" not in row, row
        by_case.setdefault(f"{row['family']}/{row['schedule']}", []).append(row)
    for name, ranks in by_case.items():
        assert len(ranks) == world, name
        assert sorted(s for r in ranks for s in r["stages"]) == list(range(world * ranks[0]["virtual_stages"]))
        assert sorted({n for r in ranks for n in r["names"]}) == ranks[0]["all_names"], name
        for r in ranks:
            assert r["init_exact"], name
            assert r["loss_rel"] < TOLERANCE, (name, r["loss"], r["loss_ref"])
            worst = max(r["grads"], key=r["grads"].get)
            assert r["grads"][worst] < TOLERANCE, (name, r["rank"], worst, r["grads"][worst])


@pytest.mark.launches
def test_every_schedule_matches_one_device_on_two_ranks(tmp_path):
    """PP2, one step, fp32, dropout 0: the loss (mean over all target tokens of the global batch) and every
    gradient equal the unsplit model's within 1e-5 relative, for each schedule and family: the causal model's
    tied embedding sits on both ranks (1f1b, gpipe, interleaved, zero_bubble) or twice on rank 0 (dualpipev);
    the padded families have micro-batches with different target counts; T5 has a relative position bias table
    per stack (a middle stage's, under the zero-bubble split backward)."""
    cases = [case("causal", s, v) for s, v in (("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 2),
                                                ("zero_bubble", 2), ("dualpipev", 2))]
    cases += [case("causal-untied", "dualpipev", 2), case("masked", "interleaved_1f1b", 2),
              case("masked", "1f1b", 1), case("seq2seq", "interleaved_1f1b", 2), case("seq2seq", "dualpipev", 2),
              case("t5", "zero_bubble", 2), case("t5", "gpipe", 1)]
    check_step(spawn(tmp_path, 2, cases), 2)


@pytest.mark.launches
def test_four_ranks_interleaved_and_dualpipev(tmp_path):
    """PP4: 8 stages of a 6-block model (interleaved V=2 with 4 micro-batches, DualPipeV with 8)."""
    deep = ["model.n_layers=6"]
    cases = [case("causal", "interleaved_1f1b", 2, extra=deep, partition="uniform"),
             case("causal", "dualpipev", 2, m=8, extra=deep, partition="uniform")]
    check_step(spawn(tmp_path, 4, cases), 4)


@pytest.mark.launches
def test_adamw_steps_match_one_device(tmp_path):
    """Five AdamW steps on each rank's parameters vs five on the unsplit model, batches of changing length (a new
    schedule per shape): the losses within 1e-5, the weights within 1e-4 (AdamW divides by √v, which lets the
    rounding of small gradients through)."""
    rows = spawn(tmp_path, 2, [case("masked", "interleaved_1f1b", 2, adamw_steps=5),
                               case("seq2seq", "dualpipev", 2, adamw_steps=5),
                               case("causal", "zero_bubble", 2, adamw_steps=5)])
    for row in rows:
        assert "error" not in row, row
        assert row["loss_rel"] < TOLERANCE, (row["family"], row["losses"], row["losses_ref"])
        weights = {n: v for n, v in row["weights"].items() if not n.endswith(NOISE_ONLY)}
        worst = max(weights, key=weights.get)
        assert weights[worst] < 1e-4, (row["family"], row["schedule"], worst, weights[worst])
