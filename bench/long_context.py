"""Long sequences over C context ranks: activation bytes per rank and tokens/s, measured and planned.

At a fixed small causal model (rotary positions, pre-norm, fp32, dropout 0), for each sequence length S and
context size C, C CPU ranks (torch.multiprocessing, gloo) form one context group and run one forward and backward
of Σ ce over a micro-batch of b sequences; each rank keeps its zig-zag share, S·b/C tokens (docs/context_parallel.md).
Per rank:

    peak      the bytes autograd keeps for backward, at their peak over the step (`SavedActivationMeter`:
              distinct live storages of saved tensors, parameters excluded; attention's saved tensors included)
    seconds   wall-clock of that forward + backward (the fastest of --repeats steps; the first warms up)

and per point (the largest over the group's ranks):

    tokens/s      S·b / seconds  (the group's throughput on one sequence)
    predicted     `bigtrain plan`'s saved activations of one rank for the same config
                  (`bigtrain.planning.memory_model.stage_memory`: every per-token term over S·b/C tokens)
    × C / C=1     peak(C) · C / peak(1) at the same S and attention: 1 when a rank holds exactly 1/C of one
                  device's activations

The C ranks share this machine's cores: on 2 cores C = 4 runs 4 processes on 2 cores, so tokens/s says how the
work per rank shrinks, not what C devices would reach. Results go to bench/results/long_context.json.

Run: python bench/long_context.py [--seqs 2048 4096 8192 16384] [--contexts 1 2 4] [--attention ring ulysses]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench.harness import RESULTS, machine, write_json  # noqa: E402
from bigtrain.config import load_config  # noqa: E402
from bigtrain.config.layout import resolve_layout  # noqa: E402
from bigtrain.distributed.groups import ParallelGroups  # noqa: E402
from bigtrain.distributed.rendezvous import free_port  # noqa: E402
from bigtrain.models import build_model  # noqa: E402
from bigtrain.models.loss import cross_entropy_sum, model_inputs  # noqa: E402
from bigtrain.parallel import parallelize  # noqa: E402
from bigtrain.planning.memory_model import stage_memory  # noqa: E402
from bigtrain.planning.saved_activations import SavedActivationMeter  # noqa: E402
from bigtrain.planning.search import given_candidate, setting  # noqa: E402
from bigtrain.planning.shape import model_shape  # noqa: E402

VOCAB = 256


@dataclass(frozen=True)
class Model:
    """The fixed model of every point: d_ff = 4·d_model."""

    d_model: int = 64
    layers: int = 2
    heads: int = 4

    def overrides(self, seq: int, batch: int, context: int, attention: str) -> list[str]:
        return [f"model.d_model={self.d_model}", f"model.n_layers={self.layers}", f"model.n_heads={self.heads}",
                f"model.d_ff={4 * self.d_model}", "model.dropout=0.0", "model.positions=rotary",
                "model.norm_position=pre", f"model.max_seq_len={seq}", f"data.seq_len={seq}",
                f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}",
                f"parallel.context={context}", f"parallel.context_attention={attention}"]


@dataclass
class RankStep:
    peak: int  # bytes saved for backward, at their peak
    seconds: float  # forward + backward


def measure_rank(overrides: list[str], world: int, rank: int, repeats: int = 1) -> RankStep:
    """Forward + backward of Σ ce on this rank's share of a seeded micro-batch (the whole one at world 1, where
    the model is the plain one), `repeats` times: the peak of the saved bytes over the steps, the fastest step
    (the first one also pays for first-touch allocations). The process group, if world > 1, is already up: the
    world is one context group."""
    cfg = load_config(None, overrides, world_size=world)
    groups = ParallelGroups(resolve_layout(cfg, world), rank) if world > 1 else None
    parallel = parallelize(build_model(cfg.model, VOCAB, "meta"), cfg, groups, "cpu")
    ids = torch.randint(0, VOCAB, (cfg.train.micro_batch_size, cfg.data.seq_len + 1),
                        generator=torch.Generator().manual_seed(0))
    whole = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    peak, fastest = 0, float("inf")
    for _ in range(repeats):
        batch = parallel.context.split(whole) if parallel.context is not None else whole
        meter = SavedActivationMeter(parallel.model)
        start = time.perf_counter()
        with meter.measuring():
            loss = cross_entropy_sum(parallel.model(**model_inputs(batch)), batch["labels"])
        loss.backward()
        fastest = min(fastest, time.perf_counter() - start)
        peak = max(peak, meter.peak)
        if parallel.context is not None:
            parallel.context.clear()
        parallel.model.zero_grad(set_to_none=True)
    return RankStep(peak, fastest)


def predicted_activations(overrides: list[str], world: int) -> int:
    """`bigtrain plan`'s saved activation bytes of one rank for this config (CPU: no framework constant)."""
    cfg = load_config(None, overrides, world_size=world)
    candidate, problem = given_candidate(cfg, world)
    if candidate is None:
        raise ValueError(f"the planner cannot estimate this config: {problem}")
    return stage_memory(model_shape(cfg), candidate, setting(cfg, on_gpu=False, framework_bytes=0))[0].activations


def _rank_main(rank: int, world: int, port: int, overrides: list[str], repeats: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        step = measure_rank(overrides, world, rank, repeats)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(asdict(step)))
    finally:
        if world > 1:
            dist.destroy_process_group()


@dataclass
class Point:
    seq: int
    context: int
    attention: str
    peak_bytes: int  # the largest over the ranks
    peak_bytes_ranks: list[int]
    seconds: float
    tokens_per_s: float
    predicted_bytes: int
    ratio_to_one_cth: float | None = None  # peak · C / peak(C = 1)

    @property
    def predicted_error(self) -> float:
        return self.predicted_bytes / self.peak_bytes - 1


def measure_point(model: Model, seq: int, batch: int, context: int, attention: str, repeats: int = 1) -> Point:
    """Spawn C ranks for one (S, C, attention) and collect their measurements."""
    overrides = model.overrides(seq, batch, context, attention)
    with tempfile.TemporaryDirectory(prefix="bigtrain-long-context-") as tmp:
        mp.spawn(_rank_main, args=(context, free_port(), overrides, repeats, tmp), nprocs=context)
        steps = [RankStep(**json.loads(Path(tmp, f"rank{r}.json").read_text())) for r in range(context)]
    seconds = max(s.seconds for s in steps)
    return Point(seq, context, attention, max(s.peak for s in steps), [s.peak for s in steps], seconds,
                 seq * batch / seconds, predicted_activations(overrides, context))


def measure(model: Model, seqs: list[int], contexts: list[int], attentions: list[str], batch: int,
            repeats: int = 1) -> list[Point]:
    """Every point; C = 1 runs once per sequence (its attention is the plain one whatever the key says) and is
    listed under each attention."""
    points = []
    for seq in seqs:
        one = measure_point(model, seq, batch, 1, attentions[0], repeats) if 1 in contexts else None
        for attention in attentions:
            if one is not None:
                points.append(Point(**{**asdict(one), "attention": attention, "ratio_to_one_cth": 1.0}))
            for context in (c for c in contexts if c > 1):
                p = measure_point(model, seq, batch, context, attention, repeats)
                if one is not None:
                    p.ratio_to_one_cth = p.peak_bytes * context / one.peak_bytes
                points.append(p)
            print(table([p for p in points if p.seq == seq and p.attention == attention]).split("\n", 2)[2],
                  flush=True)
    return points


def table(points: list[Point]) -> str:
    lines = ["| S | C | attention | saved activations per rank MiB (measured) | planned MiB | planned vs measured "
             "| × C / C=1 | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for p in points:
        ratio = "—" if p.ratio_to_one_cth is None else f"{p.ratio_to_one_cth:.3f}"
        lines.append(f"| {p.seq} | {p.context} | {p.attention if p.context > 1 else '(one device)'} | "
                     f"{p.peak_bytes / 2**20:.2f} | {p.predicted_bytes / 2**20:.2f} | {100 * p.predicted_error:+.1f}% "
                     f"| {ratio} | {p.tokens_per_s:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--attention", nargs="+", choices=["ring", "ulysses"], default=["ring", "ulysses"])
    parser.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="steps per point: peak over all, the fastest timed")
    parser.add_argument("--out", type=Path, default=RESULTS / "long_context.json")
    args = parser.parse_args(argv)
    model = Model(args.d_model, args.layers, args.heads)
    start = time.perf_counter()
    points = measure(model, args.seqs, args.contexts, args.attention, args.batch, args.repeats)
    print(table(points))
    command = " ".join(["python", "bench/long_context.py", *(argv if argv is not None else sys.argv[1:])])
    write_json(args.out, {"figure": "long_context", "command": command, "model": asdict(model), "batch": args.batch,
                          "repeats": args.repeats, "vocab": VOCAB, "machine": machine(),
                          "seconds": round(time.perf_counter() - start, 1),
                          "points": [{**asdict(p), "predicted_error": p.predicted_error} for p in points]})


if __name__ == "__main__":
    main()
