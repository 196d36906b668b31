"""`bigtrain plan`: will the config fit on N GPUs, and which layout is fastest (its synopsis: `bigtrain.cli.USAGE`).
Exit 0 with the ranked table, 1 when no layout fits, 2 on bad input."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from bigtrain.cli.arguments import CommandParser, finite, path, whole
from bigtrain.cli.report import run_guarded
from bigtrain.planning.hardware import ACCELERATORS, ASSUMED_EFFICIENCY, DEFAULT_GPU

GiB = 2**30


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def _row(rank: str, e) -> str:
    c, t = e.candidate, e.time
    bubble = t.pipeline_bubble / t.total
    attention = c.context_attention if c.context > 1 else "-"
    expert = f" {c.expert:>3}" if c.moe else ""
    return (f"{rank:>5} {c.tensor:>3} {c.context:>3} {attention:<7} {c.pipeline:>3} {c.data:>5}{expert} "
            f"{c.zero_stage:>4}  "
            f"{c.checkpointing:<9} {'yes' if c.sequence_parallel else 'no':<3} {c.micro_batch_size:>4} "
            f"{_gib(e.peak.total):>9} "
            f"{t.total:>8.3g} {e.tokens_per_s:>10.4g} {100 * e.mfu:>5.1f}% {100 * bubble:>5.1f}%")


def _details(e) -> list[str]:
    m, t = e.peak, e.time
    experts = (f" (of the model state, the routed experts / EP {e.candidate.expert}: {_gib(m.expert_state)})"
               if e.candidate.moe else "")
    all_to_all = f", expert-parallel all-to-all {t.expert:.3g} s" if e.candidate.moe else ""
    return [
        f"  memory per rank in GiB (stage {m.stage} of {e.candidate.pipeline}){experts}: parameters "
        f"{_gib(m.parameters)}, "
        f"gradients {_gib(m.gradients)}, optimizer state {_gib(m.optimizer)}, DeepSpeed buffers {_gib(m.buffers)}, "
        f"activations {_gib(m.activations)} ({m.in_flight} micro-batch(es) in flight), logits and recomputation "
        f"{_gib(m.transient)}, framework {_gib(m.framework)} = {_gib(m.total)}",
        f"  step time: compute {t.compute:.3g} s, tensor-parallel communication {t.tensor:.3g} s, pipeline bubble "
        f"{t.pipeline_bubble:.3g} s, pipeline sends {t.pipeline_send:.3g} s, data-parallel communication "
        f"{t.data:.3g} s, context-parallel communication {t.context:.3g} s{all_to_all}, per-micro-batch overhead "
        f"{t.overhead:.3g} s = {t.total:.3g} s"]


def _parameters(s) -> str:
    """'1.3B parameters', or for a mixture-of-experts model the total and the active per token."""
    if not s.experts:
        return f"{s.n_params / 1e9:.3g}B parameters"
    return (f"{s.n_params / 1e9:.3g}B parameters in all, {s.active_params / 1e9:.3g}B active per token (top_k "
            f"{s.top_k} of {s.experts} routed experts, d_ff {s.expert_d_ff}, in {s.moe_blocks} MoE blocks)")


def render(plan, config: Path, top: int) -> str:
    s, a = plan.shape, plan.accelerator
    borrowed = f" as the {a.peak_from}'s, the known GPU nearest in memory" if a.peak_from else ""
    lines = [f"bigtrain plan: {config} on {plan.gpus} x {a.name} ({a.memory_gib:g} GiB, {a.peak_tflops:g} TFLOP/s "
             f"bf16), {plan.gpus_per_node} per node; intra-node {a.intra_node_gbps:g} GB/s, inter-node "
             f"{a.inter_node_gbps:g} GB/s per GPU{borrowed}",
             f"model: {s.family}, {_parameters(s)}, {s.n_blocks} blocks, d_model {s.d_model}, "
             f"vocabulary {s.vocab}, sequence {s.seq_len}; {s.flops_per_token() / 1e9:.4g} GFLOP per token",
             f"efficiency {plan.efficiency:g} of peak ({plan.efficiency_source})"]
    ep = f" {'EP':>3}" if s.experts else ""
    header = (f"{'':>5} {'TP':>3} {'CP':>3} {'CP attn':<7} {'PP':>3} {'DP':>5}{ep} {'ZeRO':>4}  {'ckpt':<9} {'SP':<3} "
              f"{'mbs':>4} {'GiB/rank':>9} {'step s':>8} {'tokens/s':>10} {'MFU':>6} {'bubble':>6}")
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
            "n_params": plan.shape.n_params, "active_params": plan.shape.active_params, "moe": _moe(plan.shape),
            "considered": plan.considered,
            "given": estimate(plan.given) if plan.given else None, "given_problem": plan.given_problem,
            "ranked": [estimate(e) for e in plan.ranked], "notes": plan.notes}


def _moe(s) -> dict | None:
    """The mixture-of-experts numbers of the JSON (None for a dense model)."""
    if not s.experts:
        return None
    return {"experts": s.experts, "top_k": s.top_k, "d_ff": s.expert_d_ff, "shared_experts": s.shared_experts,
            "capacity_factor": s.capacity_factor, "moe_blocks": s.moe_blocks, "routed_params": s.routed_params}


def plan_parser() -> CommandParser:
    parser = CommandParser(prog="bigtrain plan", description="Predict per-rank memory and step time of every layout "
                           "of a config over N GPUs and rank those that fit.")
    parser.add_argument("--config", type=path, required=True, metavar="FILE", help="the YAML config to plan")
    parser.add_argument("--gpus", type=whole, required=True, metavar="N", help="GPUs in all")
    parser.add_argument("--gpus-per-node", type=whole, default=8, metavar="G", help="GPUs per node (default 8)")
    parser.add_argument("--gpu", metavar="NAME", help=f"{', '.join(ACCELERATORS)} (default {DEFAULT_GPU} unless "
                        f"--gpu-memory is given)")
    parser.add_argument("--gpu-memory", type=finite, metavar="GiB", help="GiB per GPU: another GPU (alone: the peak "
                        "and bandwidths of the known GPU nearest in memory, said in the output), or overriding --gpu's")
    parser.add_argument("--peak-tflops", type=finite, metavar="T", help="dense bf16 TFLOP/s per GPU (default: "
                        "--gpu's, or that of the known GPU nearest to --gpu-memory)")
    parser.add_argument("--intra-node-gbps", type=finite, metavar="GB/s",
                        help="GB/s per GPU inside a node (default: the GPU's)")
    parser.add_argument("--inter-node-gbps", type=finite, metavar="GB/s",
                        help="GB/s per GPU between nodes (default: the GPU's)")
    parser.add_argument("--efficiency", type=finite, metavar="E", help=f"fraction of peak FLOP/s reached in compute "
                        f"(default: the MFU bench/throughput.py measured on this GPU, else {ASSUMED_EFFICIENCY})")
    parser.add_argument("--framework-gib", type=finite, default=1.0, metavar="GiB",
                        help="GiB per GPU outside the model: CUDA context, NCCL, workspaces (default 1)")
    parser.add_argument("--top", type=whole, default=10, metavar="K", help="layouts to list (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, before, between or after the options")
    return parser


def run_plan(argv: list[str]) -> int:
    args = plan_parser().parse(argv)

    def command() -> int:
        from bigtrain.config import load_config
        from bigtrain.config.loader import merged_config
        from bigtrain.errors import ConfigError
        from bigtrain.planning import accelerator, make_plan
        from bigtrain.planning.search import check_request

        described = args.gpu_memory is not None or args.peak_tflops is not None  # another GPU than the default
        named = DEFAULT_GPU if args.gpu is None and not described else args.gpu
        gpu = accelerator(named, args.gpu_memory, args.peak_tflops, args.intra_node_gbps, args.inter_node_gbps)
        if args.framework_gib < 0:
            raise ConfigError(f"--framework-gib must be >= 0, got {args.framework_gib}.")
        if args.top < 1:
            raise ConfigError(f"--top is how many layouts to list, at least 1; got {args.top}.")
        raw = merged_config(args.config, args.overrides)
        check_request(raw, args.gpus, args.gpus_per_node)  # before the checks that need a world size
        # validated as one replica of its layout (with its expert group): the search varies the data-parallel size
        # and batch split
        p = raw.parallel
        cfg = load_config(args.config, args.overrides, world_size=p.tensor * p.context * p.pipeline * p.expert)
        plan = make_plan(cfg, args.gpus, args.gpus_per_node, gpu, args.efficiency, args.framework_gib,
                         config_name=str(args.config))
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
