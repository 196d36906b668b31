"""`bigtrain plan`: will the config fit on N GPUs, and which layout is fastest (its synopsis: `bigtrain.cli.USAGE`).
Exit 0 with the ranked table, 1 when no layout fits, 2 on bad input."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from bigtrain.cli.report import run_guarded

GiB = 2**30


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def _row(rank: str, e) -> str:
    c, t = e.candidate, e.time
    bubble = t.pipeline_bubble / t.total
    return (f"{rank:>5} {c.tensor:>3} {c.pipeline:>3} {c.data:>5} {c.zero_stage:>4}  {c.checkpointing:<9} "
            f"{'yes' if c.sequence_parallel else 'no':<3} {c.micro_batch_size:>4} {_gib(e.peak.total):>9} "
            f"{t.total:>8.3g} {e.tokens_per_s:>10.4g} {100 * e.mfu:>5.1f}% {100 * bubble:>5.1f}%")


def _details(e) -> list[str]:
    m, t = e.peak, e.time
    return [
        f"  memory per rank in GiB (stage {m.stage} of {e.candidate.pipeline}): parameters {_gib(m.parameters)}, "
        f"gradients {_gib(m.gradients)}, optimizer state {_gib(m.optimizer)}, DeepSpeed buffers {_gib(m.buffers)}, "
        f"activations {_gib(m.activations)} ({m.in_flight} micro-batch(es) in flight), logits and recomputation "
        f"{_gib(m.transient)}, framework {_gib(m.framework)} = {_gib(m.total)}",
        f"  step time: compute {t.compute:.3g} s, tensor-parallel communication {t.tensor:.3g} s, pipeline bubble "
        f"{t.pipeline_bubble:.3g} s, pipeline sends {t.pipeline_send:.3g} s, data-parallel communication "
        f"{t.data:.3g} s, per-micro-batch overhead {t.overhead:.3g} s = {t.total:.3g} s"]


def render(plan, config: Path, top: int) -> str:
    s, a = plan.shape, plan.accelerator
    lines = [f"bigtrain plan: {config} on {plan.gpus} x {a.name} ({a.memory_gib:g} GiB, {a.peak_tflops:g} TFLOP/s "
             f"bf16), {plan.gpus_per_node} per node; intra-node {a.intra_node_gbps:g} GB/s, inter-node "
             f"{a.inter_node_gbps:g} GB/s per GPU",
             f"model: {s.family}, {s.n_params / 1e9:.3g}B parameters, {s.n_blocks} blocks, d_model {s.d_model}, "
             f"vocabulary {s.vocab}, sequence {s.seq_len}; {s.flops_per_token() / 1e9:.4g} GFLOP per token",
             f"efficiency {plan.efficiency:g} of peak ({plan.efficiency_source})"]
    header = (f"{'':>5} {'TP':>3} {'PP':>3} {'DP':>5} {'ZeRO':>4}  {'ckpt':<9} {'SP':<3} {'mbs':>4} {'GiB/rank':>9} "
              f"{'step s':>8} {'tokens/s':>10} {'MFU':>6} {'bubble':>6}")
    if plan.given is not None:
        fits = "fits" if plan.given.fits else f"does NOT fit in {a.memory_gib:g} GiB"
        lines += ["", f"as given ({fits}):", header, _row("given", plan.given), *_details(plan.given)]
    else:
        lines += ["", f"as given: not a layout of {plan.gpus} GPUs ({plan.given_problem})"]
    shown = min(top, len(plan.ranked))
    lines += ["", f"{plan.considered} layouts considered, {len(plan.ranked)} fit; the fastest {shown}:", header]
    lines += [_row(str(i + 1), e) for i, e in enumerate(plan.ranked[:top])]
    if plan.ranked:
        best = plan.ranked[0]
        lines += ["", "best:", *_details(best), "  overrides: " + " ".join(best.candidate.overrides())]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def as_json(plan) -> dict:
    def estimate(e) -> dict:
        return {"layout": dataclasses.asdict(e.candidate), "overrides": e.candidate.overrides(),
                "fits": e.fits, "tokens_per_s": e.tokens_per_s, "mfu": e.mfu, "step_s": e.time.total,
                "step_time": dataclasses.asdict(e.time), "peak_bytes": e.peak.total,
                "stages": [{**dataclasses.asdict(m), "total": m.total} for m in e.stages]}

    return {"gpus": plan.gpus, "gpus_per_node": plan.gpus_per_node, "gpu": dataclasses.asdict(plan.accelerator),
            "efficiency": plan.efficiency, "efficiency_source": plan.efficiency_source,
            "n_params": plan.shape.n_params, "considered": plan.considered,
            "given": estimate(plan.given) if plan.given else None, "given_problem": plan.given_problem,
            "ranked": [estimate(e) for e in plan.ranked], "notes": plan.notes}


def run_plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain plan", description="Predict per-rank memory and step time of "
                                     "every layout of a config over N GPUs and rank those that fit.")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", help="h200, h100, a100-80gb, a100-40gb, l40s, a10, v100, 4090")
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU (another GPU, or to override)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s per GPU")
    parser.add_argument("--intra-node-gbps", type=float, help="GB/s per GPU inside a node")
    parser.add_argument("--inter-node-gbps", type=float, help="GB/s per GPU between nodes")
    parser.add_argument("--efficiency", type=float, help="fraction of peak FLOP/s reached in compute")
    parser.add_argument("--framework-gib", type=float, default=1.0,
                        help="GiB per GPU outside the model (CUDA context, NCCL, workspaces)")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)

    def command() -> int:
        from bigtrain.config import load_config
        from bigtrain.config.loader import merged_config
        from bigtrain.errors import ConfigError
        from bigtrain.planning import accelerator, make_plan
        from bigtrain.planning.search import check_request

        if args.gpu is None and (args.gpu_memory is not None or args.peak_tflops is not None):
            gpu = accelerator(None, args.gpu_memory, args.peak_tflops, args.intra_node_gbps, args.inter_node_gbps)
        else:
            gpu = accelerator(args.gpu or "h100", args.gpu_memory, args.peak_tflops, args.intra_node_gbps,
                              args.inter_node_gbps)
        if args.framework_gib < 0:
            raise ConfigError(f"--framework-gib must be >= 0, got {args.framework_gib}.")
        if args.top < 1:
            raise ConfigError(f"--top is how many layouts to list, at least 1; got {args.top}.")
        raw = merged_config(args.config, args.overrides)
        check_request(raw, args.gpus, args.gpus_per_node)  # before the checks that need a world size
        # validated as one replica of its layout: the search varies the data-parallel size and batch split
        cfg = load_config(args.config, args.overrides, world_size=raw.parallel.tensor * raw.parallel.pipeline)
        plan = make_plan(cfg, args.gpus, args.gpus_per_node, gpu, args.efficiency, args.framework_gib)
        print(json.dumps(as_json(plan), indent=1) if args.json else render(plan, args.config, args.top))
        if not plan.ranked:
            least = plan.smallest
            detail = (f" (the least is {least.peak.total / GiB:.1f} GiB per rank: "
                      f"{' '.join(least.candidate.overrides())})" if least else "")
            print(f"bigtrain plan: no layout fits in {gpu.memory_gib:g} GiB per GPU{detail}. Use more GPUs, GPUs "
                  f"with more memory, or a smaller model.", file=sys.stderr)
            return 1
        return 0

    return run_guarded(command, args.debug)
