"""Expert parallelism (`parallel.expert`, issue 29 item 2): the routed experts split over groups of data-parallel
ranks, tokens dispatched and combined by all-to-all with uneven splits, expert gradients summed over the
expert-data group. CPU ranks over gloo, fp32, dropout 0: 20 steps of loss and grad_norm within 1e-5 of one
process on the same global batch (`pytest -s` prints the largest relative differences), with capacity dropping,
a shared expert and both router losses on, with AdamW and (EP2) with LAMB, also over pipeline stages (EP2 × PP2 on
DeepSpeed's pipeline engine) and on FSDP2 at ZeRO-3 (EP2 × DP2: experts sharded over the expert-data groups); and
the invalid combinations fail at load naming their keys."""

from __future__ import annotations

import json
import shutil

import pytest
import torch.multiprocessing as mp

from bigtrain.cli.parity import parity, parse_layout, ranks_of
from bigtrain.cli.plot import moe_load_path, plot_runs
from bigtrain.config import load_config
from bigtrain.config.layout import Layout
from bigtrain.distributed.rendezvous import free_port
from bigtrain.errors import ConfigError
from bigtrain.train.moe_load import read_back
from tests.conftest import (
    DP_LAYOUT,
    REPO,
    assert_same_curve,
    launch_ok,
    launch_ranks,
    read_metrics,
    run_launcher,
    single_process,
    tiny_overrides,
)
from tests.helpers import expert_parity

MOE = ("model.moe.experts=4", "model.moe.top_k=2", "model.moe.shared_experts=1", "model.moe.capacity_factor=1.25",
       "model.moe.aux_loss_coef=0.01", "model.moe.z_loss_coef=0.001", "model.activation=swiglu")
ROUTER = ("moe_aux_loss", "moe_z_loss", "moe_dropped_fraction")
# LAMB at a rate where a trust ratio taken over the expert group instead of each expert's own weights moves the
# curve (measured: grad_norm off by 1.1e-5 at step 4), while the exact one stays within 1e-7
MOE_LAMB = ("optim.name=lamb", "optim.lr=2e-2")


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory):
    """The tiny MoE GPT on one process: global batch 8 in 4 micro-batches of 2 sequences (a checkpoint at step 10,
    which `test_one_device_resumes_under_expert_parallelism` resumes)."""
    run_dir = tmp_path_factory.mktemp("moe-ref") / "run"
    single_process(tiny_overrides(run_dir, "causal", *DP_LAYOUT, *MOE, "checkpoint.every=10"))
    return run_dir


@pytest.fixture(scope="module")
def moe_lamb_reference(tmp_path_factory):
    """The same with LAMB (`MOE_LAMB`)."""
    run_dir = tmp_path_factory.mktemp("moe-lamb-ref") / "run"
    single_process(tiny_overrides(run_dir, "causal", *DP_LAYOUT, *MOE, *MOE_LAMB))
    return run_dir


def _assert_same_router_numbers(ref_dir, run_dir) -> None:
    """The totals and each MoE block's aux, z and dropped fraction within 1e-5 of one device at every step; the
    expert load (`moe_layers` assigned and kept, summed over every rank's tokens) the same integers at step 1,
    where the weights are the same (`pytest -s` prints at how many later steps they still are)."""
    (ref, _), (run, _) = read_metrics(ref_dir), read_metrics(run_dir)
    worst, same_load = 0.0, []
    for step in ref:
        pairs = [(key, ref[step][key], run[step][key]) for key in ROUTER]
        assert list(run[step]["moe_layers"]) == list(ref[step]["moe_layers"]) == ["blocks.0", "blocks.1"]
        for block, want in ref[step]["moe_layers"].items():
            got = run[step]["moe_layers"][block]
            pairs += [(f"{block} {key}", want[key], got[key]) for key in ("aux", "z", "dropped")]
        for key, a, b in pairs:
            assert abs(a - b) <= 1e-5 * max(abs(a), 1e-3), f"step {step} {key}: reference {a} vs {b}"
            worst = max(worst, abs(a - b) / max(abs(a), 1e-3))
        loads = [(layer["assigned"], layer["kept"]) for layer in ref[step]["moe_layers"].values()]
        if loads == [(layer["assigned"], layer["kept"]) for layer in run[step]["moe_layers"].values()]:
            same_load.append(step)
    assert 1 in same_load, (ref[1]["moe_layers"], run[1]["moe_layers"])
    print(f"router numbers: largest relative difference {worst:.2e}; expert load equal at {len(same_load)} of "
          f"{len(ref)} steps")


@pytest.mark.launches
@pytest.mark.parametrize(("ranks", "layout", "reference"), [
    (2, MOE_LAMB, "moe_lamb_reference"),
    (4, ("parallel.tensor=2", "parallel.activation_checkpointing=full"), "moe_reference"),
], ids=["ep2-lamb", "ep2-tp2-recomputed"])
def test_expert_parallel_training_equals_one_device(request, tmp_path, ranks, layout, reference):
    """EP2 with LAMB on 2 ranks (one expert group; each rank's trust ratios from the whole experts it holds, against
    one device with LAMB); EP2 × TP2 on 4 with AdamW and every block recomputed in backward (every expert and the
    dense layers split over the tensor group, experts over the data ranks; the recomputation routes again and
    repeats the dispatch and combine all-to-alls, in the same order on every rank). EP2 with AdamW is the EP2 × DP2
    test's."""
    ref_dir = request.getfixturevalue(reference)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, "causal", *DP_LAYOUT, *MOE, "parallel.expert=2", *layout)
    out = launch_ok(ranks, overrides)
    assert "(expert 2)" in out, out[-2000:]
    assert_same_curve(ref_dir, run_dir, 1e-5)
    _assert_same_router_numbers(ref_dir, run_dir)
    _assert_load_picture(run_dir, tmp_path / "curves.png")
    _assert_planned_model_state(run_dir, overrides, ranks)


def _assert_planned_model_state(run_dir, overrides, ranks) -> None:
    """`bigtrain plan`'s model state of the layout (its experts / EP) against the bytes every data rank measured
    (run_dir/memory.json): parameters within 1% (measured: 256 bytes more in the run's storages than the 57,024
    fp32 parameters the split model holds, +0.1%), parameters + gradients + optimizer state within 10% (measured:
    −0.14% at EP2, −0.27% at EP2 × TP2)."""
    from bigtrain.planning.memory_model import stage_memory
    from bigtrain.planning.search import given_candidate, setting
    from bigtrain.planning.shape import model_shape

    cfg = load_config(None, overrides, world_size=ranks)
    candidate, problem = given_candidate(cfg, ranks)
    assert candidate is not None and candidate.expert == 2, problem
    planned = stage_memory(model_shape(cfg), candidate, setting(cfg, on_gpu=False, framework_bytes=0))[0]
    for rank in json.loads((run_dir / "memory.json").read_text())["ranks"]:
        measured = rank["params"] + rank["grads"] + rank["optimizer"]
        print(f"model state per rank: measured {measured} B, planned {planned.model_state} B "
              f"({planned.model_state / measured - 1:+.2%}); parameters {rank['params']} / {planned.parameters} B")
        assert planned.parameters == pytest.approx(rank["params"], rel=0.01)
        assert planned.model_state == pytest.approx(measured, rel=0.10)


def _assert_load_picture(run_dir, out) -> None:
    """`bigtrain plot` draws the run's expert load at its last step beside the curves, from its counts."""
    plot_runs([run_dir], out)
    last = read_metrics(run_dir)[0][20]["moe_layers"]
    shares = read_back(moe_load_path(out))["runs"][0]["shares"]
    assert shares == [[last[block]["assigned"][e] / sum(last[block]["assigned"]) for block in last]
                      for e in range(4)]


@pytest.mark.launches
@pytest.mark.parametrize("engine", [(), ("parallel.engine=torch", "parallel.zero_stage=3")],
                         ids=["deepspeed", "fsdp2-zero3"])
def test_expert_data_groups_train_like_one_device_and_resume_on_one_device(moe_reference, tmp_path, engine):
    """EP2 × DP2 on 4 ranks (two expert groups, expert-data groups of 2) equals one device over 20 steps, on
    DeepSpeed's ZeRO-0 and on FSDP2's ZeRO-3 (each block's experts sharded over the expert-data group, the rest
    over the data group); its step-10 checkpoint's layout-free form carries every expert under its own name
    (written by the first rank of its expert-data group; under FSDP2 each rank its rows of its experts), and one
    process resuming it continues the one-device curve (steps 11-20)."""
    run_dir = tmp_path / "run"
    out = launch_ok(4, tiny_overrides(run_dir, "causal", *DP_LAYOUT, *MOE, "parallel.expert=2", "checkpoint.every=10",
                                      *engine))
    assert "(expert 2)" in out, out[-2000:]
    if engine:
        described = json.loads((run_dir / "engine_config.json").read_text())
        assert (described["engine"], described["zero_stage"], described["expert_parallel_size"]) == ("fsdp2", 3, 2)
    assert_same_curve(moe_reference, run_dir, 1e-5)
    _assert_same_router_numbers(moe_reference, run_dir)
    checkpoints = run_dir / "checkpoints"
    index = json.loads((checkpoints / "step_00000010" / "layout_free" / "index.json").read_text())
    pieces = {(p["name"], p["kind"]) for p in index["pieces"]}
    assert {(f"blocks.{b}.ffn.experts.{e}.up.weight", k) for b in (0, 1) for e in range(4)
            for k in ("param", "exp_avg", "exp_avg_sq")} <= pieces
    worst = _resume_at_step_10(moe_reference, run_dir, 1)
    print(f"EP2 x DP2 ({engine or 'deepspeed'}) -> one device at step 10: steps 11-20 largest relative difference "
          f"{worst:.1e}")


@pytest.mark.launches
def test_one_device_resumes_under_expert_parallelism(moe_reference, tmp_path):
    """EP1 -> EP2: the one-device run's step-10 checkpoint (every expert whole, by name) resumed on 2 ranks with
    parallel.expert=2 (each rank takes its 2 of the 4 experts and their AdamW moments from the layout-free form)
    continues the one-device curve over steps 11-20 within 1e-5."""
    run_dir = tmp_path / "run"
    shutil.copytree(moe_reference, run_dir)
    worst = _resume_at_step_10(moe_reference, run_dir, 2, "parallel.expert=2")
    print(f"one device -> EP2 at step 10: steps 11-20 largest relative difference {worst:.1e}")


@pytest.mark.launches
def test_expert_parallel_pipeline_stages_train_like_one_device_and_resume_without_expert_parallelism(
        moe_reference, tmp_path):
    """EP2 × PP2 on 4 ranks (DeepSpeed's pipeline engine; one MoE block per stage, an expert group of 2 on each
    stage; each block's router losses carried into backward, the router table summed over the stages) equals one
    device over 20 steps, router numbers and expert load included; its step-10 checkpoint resumed at PP2 without
    expert parallelism on 2 ranks (every expert on its stage, 4 micro-batches on one data rank) continues the
    one-device curve (steps 11-20)."""
    run_dir = tmp_path / "run"
    out = launch_ok(4, tiny_overrides(run_dir, "causal", *DP_LAYOUT, *MOE, "parallel.expert=2", "parallel.pipeline=2",
                                      "checkpoint.every=10"))
    assert "pipeline 2 × data 2 (expert 2)" in out, out[-2000:]
    assert_same_curve(moe_reference, run_dir, 1e-5)
    _assert_same_router_numbers(moe_reference, run_dir)
    worst = _resume_at_step_10(moe_reference, run_dir, 2, "parallel.pipeline=2")
    print(f"EP2 x PP2 -> EP1 x PP2 at step 10: steps 11-20 largest relative difference {worst:.1e}")


def _resume_at_step_10(ref_dir, run_dir, ranks: int, *layout: str) -> float:
    """Roll `run_dir` back to its step-10 checkpoint and resume it on `ranks` ranks (1: one process) under `layout`:
    steps 11-20 of loss and grad_norm within 1e-5 of one device; returns the largest relative difference."""
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000020")
    (checkpoints / "latest").write_text("step_00000010\n")
    overrides = tiny_overrides(run_dir, "causal", *DP_LAYOUT, *MOE, *layout)
    proc = run_launcher(overrides) if ranks == 1 else launch_ranks(ranks, overrides)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resuming step 10 written by" in proc.stdout, proc.stdout[-2000:]
    (ref, _), (run, _) = read_metrics(ref_dir), read_metrics(run_dir)
    assert sorted(run) == list(range(1, 21))
    worst = 0.0
    for step in range(11, 21):
        for key in ("loss", "grad_norm"):
            a, b = ref[step][key], run[step][key]
            assert abs(a - b) <= 1e-5 * abs(a), f"step {step} {key}: one device {a} vs resumed {b}"
            worst = max(worst, abs(a - b) / abs(a))
    return worst


@pytest.mark.launches
def test_expert_parallel_block_equals_the_one_device_block(tmp_path):
    """One spawn of 2 gloo ranks (tests/helpers/expert_parity.py), float64: output, input gradient, router losses
    and every parameter gradient within 1e-12 of the one-device block and the expert load equal to its counts,
    dropless, with capacity dropping, top-1, and with the last rank's experts never chosen (it receives no rows;
    both exchanges still run)."""
    out = tmp_path / "expert.jsonl"
    mp.spawn(expert_parity.main, args=(2, free_port(), str(out)), nprocs=2)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["case"] for r in records] == list(expert_parity.CASES)
    for record in records:
        print(f"{record['case']}: largest relative difference {record['max_rel']:.1e}")
        assert record["max_rel"] <= 1e-12, record
        assert record["local_experts"] == ["0", "1"]
        assert (record["assignments_to_last_rank"] == 0) == (record["case"] == "last-rank-starved"), record
        assert record["same_load"], record  # assigned and kept per expert: the one-device block's counts


def test_expert_and_expert_data_groups_are_carved_out_of_the_data_ranks():
    layout = Layout.for_world(tensor=1, pipeline=1, world_size=8, expert=2)
    assert layout.expert_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.expert_data_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    layout = Layout.for_world(tensor=2, pipeline=1, world_size=8, expert=2)  # tensor innermost
    assert layout.expert_groups() == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert layout.expert_data_groups() == [[0, 4], [2, 6], [1, 5], [3, 7]]


@pytest.mark.parametrize(("world", "overrides", "names"), [
    (4, ["model.moe.experts=6", "parallel.expert=4"], ["parallel.expert=4", "model.moe.experts=6"]),
    (3, ["model.moe.experts=4", "parallel.expert=2"], ["parallel.expert=2", "data-parallel size 3"]),
    (2, ["parallel.expert=2"], ["parallel.expert=2", "model.moe.experts=0"]),
    (2, ["model.moe.experts=2", "model.moe.top_k=3", "parallel.expert=2"], ["model.moe.top_k", "model.moe.experts"]),
    (8, ["model.moe.experts=4", "parallel.expert=2", "parallel.pipeline=2", "parallel.tensor=2"],
     ["parallel.tensor > 1 and parallel.pipeline > 1", "not built yet"]),
    (4, ["model.moe.experts=4", "parallel.expert=2", "parallel.pipeline=2", "parallel.zero_stage=1"],
     ["ZeRO-1", "not built yet"]),
    (4, ["model.moe.experts=4", "parallel.expert=2", "parallel.tensor=2", "parallel.sequence_parallel=true"],
     ["parallel.sequence_parallel", "not built yet"]),
    (4, ["model.moe.experts=4", "model.moe.d_ff=33", "parallel.tensor=2"], ["model.moe.d_ff=33"]),
    (2, ["model.moe.experts=4", "parallel.expert=2", "parallel.zero_stage=1"], ["ZeRO-1", "not built yet"]),
    (2, ["model.moe.experts=4", "parallel.expert=2", "train.precision=bf16"], ["bf16", "not built yet"]),
    (2, ["model.moe.experts=4", "parallel.expert=0"], ["parallel.expert"]),
    (2, ["model.moe.experts=4", "parallel.expert=2", "parallel.engine=torch", "parallel.zero_stage=3", *MOE_LAMB],
     ["parallel.expert=2", "optim.name=lamb", "not built yet"]),
    (4, ["model.moe.experts=4", "parallel.expert=2", "parallel.engine=torch", "parallel.zero_stage=2",
         "parallel.tensor=2"], ["parallel.tensor > 1 on FSDP2", "not built yet"]),
])
def test_invalid_expert_parallel_configs_fail_at_load_naming_the_keys(tmp_path, world, overrides, names):
    with pytest.raises(ConfigError) as info:
        load_config(None, tiny_overrides(tmp_path / "run", "causal", *overrides), world_size=world)
    for name in names:
        assert name in str(info.value), str(info.value)


@pytest.mark.parametrize("optimizer", [(), MOE_LAMB, ("parallel.pipeline=2",),
                                       ("parallel.engine=torch", "parallel.zero_stage=2")],
                         ids=["adamw", "lamb", "pp2", "fsdp2"])
def test_an_expert_parallel_config_loads(tmp_path, optimizer):
    cfg = load_config(None, tiny_overrides(tmp_path / "run", "causal", *DP_LAYOUT, *MOE, "parallel.expert=2",
                                           *optimizer), world_size=4)
    assert (cfg.parallel.expert, cfg.optim.name) == (2, "lamb" if optimizer == MOE_LAMB else "adamw")


def test_parity_takes_the_expert_key_and_refuses_to_locate_it():
    """`bigtrain parity --layout expert=2` launches 2 ranks (data defaults to the expert size; measured: 5 steps
    within 8.4e-8 of one device on the shrunk smoke config with 4 experts); `--locate` is refused there."""
    assert ranks_of(parse_layout("expert=2")) == 2
    assert ranks_of(parse_layout("data=4,expert=2,tensor=2")) == 8
    with pytest.raises(ConfigError, match="--locate with --layout expert=2 is refused"):
        parity(REPO / "configs" / "smoke.yaml", "expert=2", steps=1, locate=True)
