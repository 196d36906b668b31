"""torch.distributed.pipelining schedules for bigtrain's models (issue 27, item 2): stage placement and schedule
names (fast), and parity with the unsplit model on one process (launches: gloo ranks spawned here, several
schedules per spawn)."""

from __future__ import annotations

import json

import pytest

from bigtrain.parallel.schedules import SCHEDULE_CLASSES
from bigtrain.parallel.stages import stage_indices, stage_rank

TOLERANCE = 1e-5
# The K rows of a qkv_proj bias have an exactly zero true gradient (softmax ignores a shift shared by all keys):
# their gradients are rounding noise, which AdamW's normalized update turns into steps of ±lr; the weights are
# compared without them (the helper reports a qkv_proj bias by its Q, K and V rows).
NOISE_ONLY = ("qkv_proj.bias:k_proj",)


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
        by_case.setdefault(f"{row['family']}/{row['schedule']}/documents={row.get('documents', False)}", []).append(row)
    for name, ranks in by_case.items():
        assert len(ranks) == world, name
        tensor = ranks[0].get("tensor", 1)  # each stage is held by its tensor group
        stages = range(world // tensor * ranks[0]["virtual_stages"])
        assert sorted(s for r in ranks for s in r["stages"]) == sorted(list(stages) * tensor), name
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
    per stack (a middle stage's, under the zero-bubble split backward); document ids (`data.document_masking`)
    cross the boundaries of causal stages."""
    cases = [case("causal", s, v) for s, v in (("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 2),
                                                ("zero_bubble", 2), ("dualpipev", 2))]
    cases += [case("causal-untied", "dualpipev", 2), case("masked", "interleaved_1f1b", 2),
              case("masked", "1f1b", 1), case("seq2seq", "interleaved_1f1b", 2), case("seq2seq", "dualpipev", 2),
              case("t5", "zero_bubble", 2), case("t5", "gpipe", 1),
              case("causal", "zero_bubble", 2, documents=True), case("causal-untied", "interleaved_1f1b", 2,
                                                                     documents=True)]
    check_step(spawn(tmp_path, 2, cases), 2)


@pytest.mark.launches
def test_four_ranks_interleaved_and_dualpipev(tmp_path):
    """PP4: 8 stages of a 6-block model (interleaved V=2 with 4 micro-batches, DualPipeV with 8); 1F1B with the
    tied embedding's gradients summed over a group of its two ranks only (the middle ranks stay out)."""
    deep = ["model.n_layers=6"]
    cases = [case("causal", "interleaved_1f1b", 2, extra=deep, partition="uniform"),
             case("causal", "dualpipev", 2, m=8, extra=deep, partition="uniform"),
             case("causal", "1f1b", 1, extra=deep, partition="uniform", tied_group=True)]
    check_step(spawn(tmp_path, 4, cases), 4)


@pytest.mark.launches
def test_tensor_parallel_inside_the_stages(tmp_path):
    """TP2 x PP2 (4 ranks): each stage split over its tensor group (the model rewritten on the meta device, the
    vocabulary-parallel loss); sharded gradients gathered and compared with the unsplit ones. Interleaved 1F1B,
    DualPipeV with the encoder-decoder, and the zero-bubble split backward through tensor-parallel layers."""
    cases = [case("causal", "interleaved_1f1b", 2, tensor=2), case("seq2seq", "dualpipev", 2, tensor=2),
             case("t5", "zero_bubble", 2, tensor=2)]
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


# ---- config: what each schedule can express, refused at load naming the key --------------------------------------
def refusal(overrides: list[str], world: int = 2) -> str:
    from bigtrain.config import load_config
    from bigtrain.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.global_batch_size=8", "train.micro_batch_size=2", *overrides], world_size=world)
    return str(error.value)


def test_schedule_names_and_virtual_stages_are_checked_at_load():
    assert "Allowed values: '1f1b', 'gpipe', 'interleaved_1f1b', 'zero_bubble', 'dualpipev'" in refusal(
        ["parallel.pipeline=2", "parallel.pipeline_schedule=looped"])
    assert "parallel.virtual_stages' must be positive" in refusal(["parallel.virtual_stages=0"])
    assert "parallel.virtual_stages must be 1, got 2" in refusal(["parallel.pipeline=2", "parallel.virtual_stages=2"])
    assert "parallel.virtual_stages must be >= 2, got 1" in refusal(
        ["parallel.pipeline=2", "parallel.pipeline_schedule=zero_bubble"])
    assert "parallel.virtual_stages must be 2, got 3" in refusal(
        ["parallel.pipeline=2", "parallel.pipeline_schedule=dualpipev", "parallel.virtual_stages=3"])
    assert "but parallel.pipeline=1" in refusal(["parallel.pipeline_schedule=gpipe"], world=1)


def test_deepspeeds_pipeline_engine_refuses_other_schedules_naming_the_engine():
    from bigtrain.config import load_config

    message = refusal(["parallel.pipeline=2", "parallel.pipeline_schedule=interleaved_1f1b",
                       "parallel.virtual_stages=2"])
    assert "parallel.engine='auto'" in message and "runs 1f1b only" in message
    assert "parallel.engine='deepspeed'" in refusal(["parallel.pipeline=2", "parallel.engine=deepspeed",
                                                     "parallel.pipeline_schedule=gpipe"])
    cfg = load_config(None, ["parallel.pipeline=2", "train.global_batch_size=8", "train.micro_batch_size=2"],
                      world_size=2)
    assert (cfg.parallel.pipeline_schedule, cfg.parallel.virtual_stages) == ("1f1b", 1)


@pytest.mark.parametrize("schedule,p,v,m,ok", [
    ("1f1b", 4, 1, 3, False), ("1f1b", 4, 1, 4, True), ("gpipe", 4, 1, 1, True),
    ("interleaved_1f1b", 2, 2, 5, False), ("interleaved_1f1b", 2, 2, 6, True), ("interleaved_1f1b", 4, 2, 3, True),
    ("zero_bubble", 2, 3, 7, False), ("zero_bubble", 4, 2, 8, True),
    ("dualpipev", 2, 2, 3, False), ("dualpipev", 2, 2, 4, True), ("dualpipev", 4, 2, 7, False)])
def test_micro_batch_conditions_are_torchs(schedule, p, v, m, ok):
    """Under torch's pipelining (parallel.engine=torch, once wired) the micro-batch count m obeys torch's own
    conditions, stated at load; each verdict agrees with torch's schedule builder."""
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    from bigtrain.config import Config
    from bigtrain.config.layout import Layout
    from bigtrain.config.schedule_checks import check_pipeline_schedule
    from bigtrain.errors import ConfigError

    cfg = Config()
    cfg.parallel.pipeline, cfg.parallel.pipeline_schedule, cfg.parallel.virtual_stages = p, schedule, v
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 2 * m, 2
    layout = Layout(pipeline=p, engine="torch")
    names = {"1f1b": "1F1B", "gpipe": "GPipe", "interleaved_1f1b": "Interleaved1F1B",
             "zero_bubble": "InterleavedZeroBubble", "dualpipev": "DualPipeV"}
    try:
        get_schedule_ops(names[schedule], p, m, num_stages_per_rank=v)
        torch_ok = True
    except ValueError:
        torch_ok = False
    assert torch_ok == ok
    if ok:
        check_pipeline_schedule(cfg, layout)
    else:
        with pytest.raises(ConfigError, match="micro-batches"):
            check_pipeline_schedule(cfg, layout)


def test_a_stage_count_beyond_the_layers_is_refused_naming_virtual_stages():
    """p x V stages each need a layer (bigtrain's partitioner): a 2-block causal model has 5 pipeline layers."""
    from bigtrain.config import Config
    from bigtrain.errors import ConfigError
    from bigtrain.parallel.validate import check_pipeline_stages

    cfg = Config()
    cfg.model.n_layers, cfg.model.vocab_size = 2, 64
    cfg.parallel.pipeline, cfg.parallel.pipeline_schedule, cfg.parallel.virtual_stages = 4, "interleaved_1f1b", 2
    cfg.parallel.partition_method = "uniform"
    with pytest.raises(ConfigError, match=r"parallel\.pipeline=4 x parallel\.virtual_stages=2 = 8 stages"):
        check_pipeline_stages(cfg)
    cfg.parallel.pipeline = 2
    check_pipeline_stages(cfg)  # 4 stages of 5 layers
