"""`bigtrain plan`'s memory prediction next to measurement, on this machine's CPU (gloo ranks).

For each layout a tiny causal model trains one step on 1-4 ranks (tests/helpers/plan_measure.py): every rank
counts the bytes autograd saves for backward (peak over the step, every micro-batch in flight) and the bytes
of its parameters, gradients and optimizer state; the planner predicts the same quantities for that rank's
stage from the config alone. tests/test_plan.py asserts agreement within 10%; docs/planning.md quotes the
table this prints.

Run: python bench/plan_accuracy.py [NAME ...]   (writes bench/results/plan_accuracy.json)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bigtrain.config import load_config  # noqa: E402
from bigtrain.distributed.rendezvous import free_port  # noqa: E402
from bigtrain.planning.memory_model import stage_memory  # noqa: E402
from bigtrain.planning.search import given_candidate, setting  # noqa: E402
from bigtrain.planning.shape import model_shape  # noqa: E402

TINY = ["model.family=causal", "model.d_model=64", "model.n_heads=4", "model.d_ff=256", "model.n_layers=4",
        "model.max_seq_len=64", "model.norm_position=pre", "model.activation=gelu", "model.positions=learned",
        "model.dropout=0.0", "data.source=embedded", "data.max_bytes=100000", "data.seq_len=32",
        "train.steps=1", "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_every=0",
        "train.sample_tokens=0", "train.threads=1", "checkpoint.every=0", "checkpoint.layout_free_every=0",
        "log.tensorboard=false"]
LLAMA = ["model.norm=rmsnorm", "model.activation=swiglu", "model.positions=rotary", "model.n_kv_heads=2",
         "model.bias=false", "model.tie_embeddings=false"]

# name -> (ranks, overrides): tensor, sequence, pipeline and data parallelism, ZeRO 1-3, checkpointing, bf16
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "one device": (1, []),
    "one device, bf16 autocast, llama": (1, ["train.precision=bf16", *LLAMA]),
    "one device, dropout, post-norm, full ckpt": (
        1, ["model.dropout=0.1", "model.attention_dropout=0.0", "model.activation=relu", "model.norm_position=post",
            "parallel.activation_checkpointing=full"]),
    "TP2": (2, ["parallel.tensor=2"]),
    "TP2 + SP, selective ckpt": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true",
                                     "parallel.activation_checkpointing=selective"]),
    "PP2 (4 micro-batches, 1F1B)": (2, ["parallel.pipeline=2", "parallel.zero_stage=1"]),
    "DP2 ZeRO-2, full ckpt": (2, ["parallel.zero_stage=2", "parallel.activation_checkpointing=full"]),
    "DP2 ZeRO-3": (2, ["parallel.zero_stage=3"]),
    "DP2 ZeRO-1 bf16, llama": (2, ["parallel.zero_stage=1", "train.precision=bf16", *LLAMA]),
    "TP2 x DP2 ZeRO-1 + SP": (4, ["parallel.tensor=2", "parallel.zero_stage=1", "parallel.sequence_parallel=true"]),
}


@dataclass
class Row:
    layout: str
    rank: int
    stage: int
    activations: tuple[int, int]  # (measured, predicted)
    model_state: tuple[int, int]

    def error(self, which: str) -> float:
        measured, predicted = getattr(self, which)
        return predicted / measured - 1


def launch(n: int, overrides: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    script = str(REPO / "tests" / "helpers" / "plan_measure.py")
    if n == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", script]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*cmd, *overrides], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def measure(name: str, work: Path) -> list[Row]:
    """Run layout `name` in `work` and pair each rank's measurement with the plan's prediction."""
    n, extra = LAYOUTS[name]
    run = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    overrides = [*TINY, f"run.dir={run}", f"data.cache_dir={work / 'cache'}", *extra]
    proc = launch(n, overrides)
    if proc.returncode:
        raise RuntimeError(f"{name}: the measuring run failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    cfg = load_config(None, overrides, world_size=n)
    candidate, problem = given_candidate(cfg, n)
    assert candidate is not None, problem
    predicted = stage_memory(model_shape(cfg), candidate, setting(cfg, on_gpu=False, framework_bytes=0))
    rows = []
    for rank in range(n):
        m = json.loads((run / f"plan_measure_rank{rank}.json").read_text())
        p = predicted[m["stage"]]
        rows.append(Row(name, rank, m["stage"], (m["activations"], p.activations),
                        (m["parameters"] + m["gradients"] + m["optimizer"], p.model_state)))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| layout | rank (stage) | saved activations measured / predicted (KiB) | error | model state "
             "measured / predicted (KiB) | error |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.layout} | {r.rank} ({r.stage}) | {r.activations[0] / 1024:.1f} / "
                     f"{r.activations[1] / 1024:.1f} | {100 * r.error('activations'):+.1f}% | "
                     f"{r.model_state[0] / 1024:.1f} / {r.model_state[1] / 1024:.1f} | "
                     f"{100 * r.error('model_state'):+.1f}% |")
    return "\n".join(lines)


def main(names: list[str]) -> None:
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bigtrain-plan-accuracy-") as tmp:
        for name in names or list(LAYOUTS):
            rows += measure(name, Path(tmp))
    print(table(rows))
    worst = max(max(abs(r.error("activations")), abs(r.error("model_state"))) for r in rows)
    print(f"largest error {100 * worst:.1f}% over {len(rows)} ranks of {len({r.layout for r in rows})} layouts "
          f"({time.perf_counter() - t0:.0f} s)")
    out = REPO / "bench" / "results" / "plan_accuracy.json"
    out.write_text(json.dumps({"figure": "plan_accuracy", "command": "python bench/plan_accuracy.py",
                               "rows": [r.__dict__ for r in rows], "largest_error": worst}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
