"""Resume under another layout (the layout-free form): 10 steps under layout A, then 10 more under layout B,
equal 20 straight steps under A (`loss` and `grad_norm` within 1e-5 relative at every step; fp32, dropout 0),
and every step reads the same global samples as the straight run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import DP_LAYOUT, RECORD_SAMPLES, REPO, launch_ranks, read_metrics, run_launcher, tiny_overrides

pytestmark = pytest.mark.launches

TOL = 1e-5
LAMB = ("optim.name=lamb", "optim.lr=2e-2")
FSDP = ("parallel.engine=fairscale", "parallel.zero_stage=3")
FSDP2 = ("parallel.engine=torch", "parallel.zero_stage=3")
TORCH_INTERLEAVED = ("parallel.engine=torch", "parallel.pipeline=2", "parallel.pipeline_schedule=interleaved_1f1b",
                     "parallel.virtual_stages=2")
FSDP_ON_CPU = REPO / "tests" / "helpers" / "fsdp_on_cpu.py"  # record_samples.py with FSDP made to run on CPU

PAIRS = {
    "1-device->tp2xpp2": ((1, ()), (4, ("parallel.tensor=2", "parallel.pipeline=2"))),
    "tp2xdp2-zero1->pp2xdp2-zero1": ((4, ("parallel.tensor=2", "parallel.zero_stage=1")),
                                     (4, ("parallel.pipeline=2", "parallel.zero_stage=1"))),
    "dp2-zero3->1-device": ((2, ("parallel.zero_stage=3",)), (1, ())),
    "pp2->dp2-zero2": ((2, ("parallel.pipeline=2",)), (2, ("parallel.zero_stage=2",))),
    "1-device-lamb->dp2-zero2-lamb": ((1, LAMB), (2, ("parallel.zero_stage=2", *LAMB))),
    "dp4-zero1->dp2-zero1": ((4, ("parallel.zero_stage=1",)), (2, ("parallel.zero_stage=1",))),
    # beyond the required pairs: into ZeRO-3 partitions, and out of tensor + sequence parallelism
    "tp2-sp->dp2-zero3": ((2, ("parallel.tensor=2", "parallel.sequence_parallel=true")),
                          (2, ("parallel.zero_stage=3",))),
    # between the DeepSpeed and fairscale engines (issue 18), both ways
    "dp2-zero1-deepspeed->dp2-zero2-fairscale": ((2, ("parallel.zero_stage=1",)),
                                                 (2, ("parallel.engine=fairscale", "parallel.zero_stage=2"))),
    "tp2xdp2-fairscale-lamb->dp2-zero2-lamb": (
        (4, ("parallel.engine=fairscale", "parallel.zero_stage=1", "parallel.tensor=2", *LAMB)),
        (2, ("parallel.zero_stage=2", *LAMB))),
    # into and out of fairscale's FullyShardedDataParallel (run on CPU ranks by tests/helpers/fsdp_on_cpu.py)
    "dp2-zero3-deepspeed->tp2xdp2-fsdp": ((2, ("parallel.zero_stage=3",)), (4, (*FSDP, "parallel.tensor=2"))),
    "dp2-fsdp->dp2-zero1": ((2, FSDP), (2, ("parallel.zero_stage=1",))),
    # out of and into PyTorch's FSDP2 (parallel.engine=torch on several ranks; issue 27)
    "dp2-fsdp2->dp2-zero3": ((2, FSDP2), (2, ("parallel.zero_stage=3",))),
    "tp2xdp2-zero1-lamb->dp2-fsdp2-zero2-lamb": ((4, ("parallel.tensor=2", "parallel.zero_stage=1", *LAMB)),
                                                 (2, ("parallel.engine=torch", "parallel.zero_stage=2", *LAMB))),
    # between DeepSpeed's pipeline engine (1F1B, 2 stages) and torch's interleaved schedule (4 stages on 2 ranks)
    "pp2-zero1-deepspeed->pp2-interleaved-torch": ((2, ("parallel.pipeline=2", "parallel.zero_stage=1")),
                                                   (2, TORCH_INTERLEAVED)),
    "pp2-interleaved-torch->pp2-zero1-deepspeed": ((2, TORCH_INTERLEAVED),
                                                   (2, ("parallel.pipeline=2", "parallel.zero_stage=1"))),
}


def _train(ranks: int, run_dir: Path, layout: tuple[str, ...]) -> str:
    args = tiny_overrides(run_dir, "causal", *DP_LAYOUT, "checkpoint.every=10", *layout)
    fsdp = "parallel.zero_stage=3" in layout and "parallel.engine=fairscale" in layout
    script = FSDP_ON_CPU if fsdp else RECORD_SAMPLES
    proc = launch_ranks(ranks, args, script=script) if ranks > 1 else run_launcher([*args], script=script)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _samples(run_dir: Path) -> dict[int, list[int]]:
    lines = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return {r["step"]: r["indices"] for r in lines}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_resume_under_another_layout_continues_the_curve(session_run, tmp_path, pair):
    (ranks_a, layout_a), (ranks_b, layout_b) = PAIRS[pair]
    run_dir = tmp_path / "run"
    made = session_run(ranks_a, layout_a)  # the session's run of that layout and config, if it makes one
    if made is not None:
        shutil.copytree(made, run_dir)
    else:
        _train(ranks_a, run_dir, layout_a)  # 20 straight steps under A, checkpoints at 10 and 20
    resume_at_ten_under(run_dir, ranks_b, layout_b, pair)


def resume_at_ten_under(run_dir: Path, ranks_b: int, layout_b: tuple[str, ...], name: str) -> None:
    """Given 20 straight steps in `run_dir` (`_train`): resume its step-10 checkpoint under layout B; steps 11-20
    within TOL of the straight run's, the same global samples step by step."""
    straight, straight_samples = read_metrics(run_dir)[0], _samples(run_dir)
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000020")
    (checkpoints / "latest").write_text("step_00000010\n")
    (run_dir / "samples.jsonl").unlink()
    out = _train(ranks_b, run_dir, layout_b)
    assert "resuming step 10 written by" in out, out[-3000:]
    resumed = read_metrics(run_dir)[0]
    assert sorted(resumed) == list(range(1, 21))
    worst = {"loss": 0.0, "grad_norm": 0.0}
    for step in range(11, 21):
        for key in worst:
            a, b = straight[step][key], resumed[step][key]
            assert abs(a - b) <= TOL * abs(a), f"step {step} {key}: straight {a} vs resumed {b}"
            worst[key] = max(worst[key], abs(a - b) / abs(a))
    samples = _samples(run_dir)
    assert sorted(samples) == list(range(11, 21))
    assert all(samples[s] == straight_samples[s] for s in samples)  # the same global samples, step by step
    print(f"\n{name}: steps 11-20 max relative difference loss {worst['loss']:.1e}, grad_norm "
          f"{worst['grad_norm']:.1e}; sample indices of steps 11-20 equal the straight run's")
