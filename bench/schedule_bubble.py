"""Each pipeline schedule's measured idle fraction per rank, next to its theory (`bench/schedule_theory.py`).

p CPU ranks (gloo) run a stack of p·V equal stages under each schedule of `torch.distributed.pipelining`. Each
stage is `--blocks` residual MLP blocks of width `--width` (x + W2·gelu(W1·x)), each micro-batch `--rows` rows,
the loss a mean squared error. Every rank times its own compute — the stage's forward, backward, and
weight-backward calls — over `--steps` steps after one warm-up step, and the step's wall time between barriers:

    idle fraction of rank r = 1 - (compute time of rank r) / (step time)

which counts the schedule's bubble plus communication and imbalance. Theory: the schedule's own action lists run
with costs F = 1, I = W = 1, B = 2 (`schedule_theory.simulate`), and the closed form where one exists.

With more ranks than cores the ranks share cores, so a waiting rank lends its core to a working one and the
measured fraction mixes the bubble with the sharing; the output names the cores.

    python bench/pipeline_bubble.py --schedules                      # p = 2 and 4, m = 4, 8, 16 (the table)
    python bench/schedule_bubble.py --ranks 2 --micro-batches 4 --steps 2 --width 64   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from bench.schedule_theory import formula, one_stage_order, simulate  # noqa: E402
from bigtrain.distributed.rendezvous import free_port  # noqa: E402

# name -> (torch class name, stages per rank, V-shaped placement: rank r holds stages r and 2p-1-r)
SCHEDULES = {
    "gpipe": ("ScheduleGPipe", 1, False),
    "1f1b": ("Schedule1F1B", 1, False),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", 2, False),
    "zero_bubble": ("ScheduleInterleavedZeroBubble", 2, False),
    "zbv": ("ScheduleZBVZeroBubble", 2, True),
    "dualpipev": ("ScheduleDualPipeV", 2, True),
}


class Block(nn.Module):
    """x + W2 · gelu(W1 · x): a transformer MLP's shape and cost, without attention."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def timed_stage_class():
    """A PipelineStage that adds the time of its compute calls to `self.busy` (made here: torch is imported in
    the ranks only)."""
    from torch.distributed.pipelining import PipelineStage

    class TimedStage(PipelineStage):
        busy = 0.0

        def _timed(self, call, *args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.busy += time.perf_counter() - start

        def forward_one_chunk(self, *args, **kwargs):
            return self._timed(super().forward_one_chunk, *args, **kwargs)

        def backward_one_chunk(self, *args, **kwargs):
            return self._timed(super().backward_one_chunk, *args, **kwargs)

        def backward_weight_one_chunk(self, *args, **kwargs):
            return self._timed(super().backward_weight_one_chunk, *args, **kwargs)

    return TimedStage


def stage_indices(rank: int, p: int, v: int, v_shape: bool) -> list[int]:
    """Which of the p·v stages rank `rank` holds: a loop (r, r+p, …) or, V-shaped, r and 2p-1-r."""
    return [rank, 2 * p - 1 - rank] if v_shape else [rank + k * p for k in range(v)]


def measure(name: str, m: int, args: argparse.Namespace, rank: int, p: int) -> dict | None:
    """One schedule at m micro-batches on this rank; rank 0 returns the row."""
    from torch.distributed.pipelining import schedules as torch_schedules

    cls_name, v, v_shape = SCHEDULES[name]
    n_stages = p * v
    torch.manual_seed(0)
    blocks = [nn.Sequential(*(Block(args.width) for _ in range(args.blocks))) for _ in range(n_stages)]
    mine = stage_indices(rank, p, v, v_shape)
    stage_cls = timed_stage_class()
    stages = [stage_cls(blocks[s], s, n_stages, torch.device("cpu")) for s in mine]
    loss = nn.MSELoss()
    cls = getattr(torch_schedules, cls_name)
    try:
        schedule = cls(stages[0] if v == 1 else stages, m, loss_fn=loss)
    except (ValueError, AssertionError, RuntimeError) as error:
        return {"schedule": name, "p": p, "m": m, "v": v, "refused": str(error)} if rank == 0 else None
    x = torch.randn(m * args.rows, args.width)
    y = torch.randn(m * args.rows, args.width)
    first, last = 0 in mine, n_stages - 1 in mine

    def step() -> None:
        kwargs = {"target": y} if last else {}
        schedule.step(x, **kwargs) if first else schedule.step(**kwargs)
        for s in blocks:
            s.zero_grad(set_to_none=True)

    step()
    dist.barrier()
    for s in stages:
        s.busy = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    wall = (time.perf_counter() - start) / args.steps
    busy = sum(s.busy for s in stages) / args.steps
    idle = [0.0] * p
    dist.all_gather_object(idle, 1 - busy / wall)
    if rank != 0:
        return None
    order = one_stage_order(name, p, m) if v == 1 else [schedule.pipeline_order[r] for r in range(p)]
    _, theory = simulate(order)
    return {"schedule": name, "p": p, "m": m, "v": v, "step_s": wall, "idle_measured": idle,
            "idle_theory": theory, "idle_formula": formula(name, p, m, v)}


def rank_main(rank: int, p: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=p)
    try:
        rows = [measure(name, m, args, rank, p) for name in args.only for m in args.micro_batches]
        if rank == 0:
            Path(out).write_text(json.dumps([r for r in rows if r is not None]))
    finally:
        dist.destroy_process_group()


def run(p: int, args: argparse.Namespace, out: Path) -> list[dict]:
    """All schedules × micro-batch counts on p ranks (spawned here); the rows."""
    mp.spawn(rank_main, args=(p, free_port(), args, str(out)), nprocs=p, join=True)
    return json.loads(out.read_text())


def table(rows: list[dict]) -> str:
    lines = [f"{'schedule':>17} {'p':>2} {'V':>2} {'m':>3} {'step s':>8} {'idle measured per rank':>26} "
             f"{'theory (simulated)':>19} {'formula':>8}"]
    for r in rows:
        head = f"{r['schedule']:>17} {r['p']:>2} {r['v']:>2} {r['m']:>3}"
        if "refused" in r:
            lines.append(f"{head}  refused by torch: {r['refused'][:80]}")
            continue
        measured = " ".join(f"{x:.3f}" for x in r["idle_measured"])
        theory = sum(r["idle_theory"]) / len(r["idle_theory"])
        form = "—" if r["idle_formula"] is None else f"{r['idle_formula']:.3f}"
        lines.append(f"{head} {r['step_s']:>8.4f} {measured:>26} {theory:>19.3f} {form:>8}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parse.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="pipeline ranks p")
    parse.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    parse.add_argument("--only", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES),
                       help="the schedules to measure (default: all)")
    parse.add_argument("--steps", type=int, default=3)
    parse.add_argument("--width", type=int, default=256)
    parse.add_argument("--blocks", type=int, default=2, help="MLP blocks per stage")
    parse.add_argument("--rows", type=int, default=32, help="rows per micro-batch")
    parse.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "schedule_bubble.json")
    return parse


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1, got {args.steps}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in args.ranks:
        rows += run(p, args, args.out.with_suffix(f".p{p}.tmp"))
        args.out.with_suffix(f".p{p}.tmp").unlink()
    print(f"{os.cpu_count()} CPU cores, one thread per rank; idle = 1 - compute / step (bench/schedule_bubble.py)")
    print(table(rows))
    args.out.write_text(json.dumps({"cores": os.cpu_count(), "args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
