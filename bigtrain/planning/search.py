"""`bigtrain plan`: every layout of a config over N GPUs, with predicted per-rank memory and step time, ranked.

The search covers tensor sizes that split the model and stay inside a node, pipeline sizes that leave no
stage empty, context sizes C (ranks sharing each sequence, without pipeline stages: data.seq_len divisible by 2C,
and by 2C·T with sequence parallelism; ring attention, and Ulysses where each tensor rank's query and key/value
heads divide by C), the data-parallel rest, ZeRO 0-3 (0-1 with a pipeline, as the engine allows; LAMB's own
limits), activation checkpointing none / selective / full, sequence parallelism with T > 1, every
micro-batch size that divides the per-replica batch (up to MAX_MICRO_BATCH sequences), and for a
mixture-of-experts model every expert size EP dividing both model.moe.experts and D, keeping only the layouts
training runs for MoE: each is put to the config check (`bigtrain.config.model_checks.check_moe`) with its sizes
and choices, so the search follows that check as it grows. Only arithmetic runs per
layout (the model is read once on the meta device), so 175B over 1024 GPUs takes about a second. The work is
bounded whatever is asked: a GPU count no layout uses is refused with the reason (`splits.check_splits`), and a
search of more than MAX_CONSIDERED layouts is refused before it starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from math import gcd
from pathlib import Path

from bigtrain.config import Config
from bigtrain.config.layout import resolve_engine, resolve_layout
from bigtrain.config.model_checks import check_moe
from bigtrain.errors import ConfigError
from bigtrain.planning.hardware import ASSUMED_EFFICIENCY, Accelerator, GiB
from bigtrain.planning.memory_model import Candidate, Setting, StageMemory, stage_memory
from bigtrain.planning.shape import ModelShape, PipelineLayer, model_shape
from bigtrain.planning.splits import Parts, Splits, check_splits, context_problem, divisors
from bigtrain.planning.time_model import Network, StepTime, step_time

MAX_MICRO_BATCH = 2**16  # sequences; no GPU holds the activations of more
MAX_CONSIDERED = 50_000  # layouts (175B over 1024 GPUs: 6372); about 15 s of arithmetic
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


@dataclass
class Estimate:
    candidate: Candidate
    stages: list[StageMemory]
    time: StepTime
    tokens_per_s: float
    mfu: float
    fits: bool
    given: bool = False

    @property
    def peak(self) -> StageMemory:
        """The stage that needs the most memory (it decides whether the layout fits)."""
        return max(self.stages, key=lambda m: m.total)


@dataclass
class Plan:
    shape: ModelShape
    accelerator: Accelerator
    gpus: int
    gpus_per_node: int
    efficiency: float
    efficiency_source: str
    ranked: list[Estimate]  # fitting layouts, fastest first
    considered: int
    given: Estimate | None
    given_problem: str | None = None
    smallest: Estimate | None = None  # the layout needing the least memory (when none fits)
    notes: list[str] = field(default_factory=list)


def measured_efficiency(accelerator: Accelerator) -> tuple[float, str]:
    """The MFU that bench/throughput.py measured on this kind of GPU (bench/results), else the assumption."""
    found = []
    for path in sorted(RESULTS.glob("throughput-*.json")) if RESULTS.is_dir() else []:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        gpu = str(result.get("gpu") or result.get("machine", {}).get("gpu") or "").lower()
        if result.get("device") == "cuda" and result.get("mfu") and accelerator.name.split("-")[0] in gpu:
            found.append((float(result["mfu"]), path.name))
    if found:
        mfu, name = max(found)
        return mfu, f"measured: bench/results/{name}"
    return ASSUMED_EFFICIENCY, ("assumed (no GPU measurement in bench/results; run bench/throughput.py on the "
                                "GPU and plan again, or pass --efficiency)")


def _zero_stages(cfg: Config, pipeline: int, world: int, data: int) -> list[int]:
    if cfg.parallel.engine == "fairscale":  # OSS, OSS + ShardedDataParallel, FSDP; no pipeline
        return [1, 2, 3] if pipeline == 1 else []
    if cfg.parallel.engine == "torch":  # the plain engine on one process; FSDP2 (ZeRO-2/3) on several
        return [0] if world == 1 else ([2, 3] if pipeline == 1 else _torch_stage_sharding(cfg, data))
    allowed = [0, 1] if pipeline > 1 else [0, 1, 2, 3]
    if cfg.optim.name == "lamb":
        allowed = [z for z in allowed if z < 3]
        if cfg.train.precision != "fp32":
            allowed = [z for z in allowed if z > 0 or world == 1]
    return allowed


def _torch_stage_sharding(cfg: Config, data: int) -> list[int]:
    """torch.distributed.pipelining's stages: whole replicas over the data ranks (0), or each stage sharded with
    FSDP2 (2, 3) where there are data ranks to shard over; DualPipeV with a tied embedding only as replicas
    (`bigtrain.config.parallel_checks.check_torch`)."""
    tied = cfg.model.tie_embeddings or cfg.model.family == "seq2seq"
    if data == 1 or (cfg.parallel.pipeline_schedule == "dualpipev" and tied):
        return [0]
    return [0, 2, 3]


def context_attentions(shape: ModelShape, tensor: int, context: int) -> tuple[str, ...]:
    """The attention algorithms of a context size: none to choose at C = 1 (ring stands for it); ring always,
    Ulysses where the query and key/value heads of each tensor rank divide by C."""
    if context == 1:
        return ("ring",)
    heads = (shape.n_heads // tensor, shape.n_kv_heads // tensor)
    return ("ring", "ulysses") if all(h % context == 0 for h in heads) else ("ring",)


def sequence_parallel_options(seq_len: int, tensor: int, context: int) -> tuple[bool, ...]:
    """Sequence parallelism with T > 1; under context parallelism only where each rank's s/C tokens split over T
    without padding (s divisible by 2C·T)."""
    if tensor == 1:
        return (False,)
    return (False, True) if context == 1 or seq_len % (2 * context * tensor) == 0 else (False,)


def expert_sizes(shape: ModelShape, data: int) -> list[int]:
    """EP: the divisors of both model.moe.experts and the data size D (1 for a dense model)."""
    return divisors(gcd(shape.experts, data)) if shape.experts else [1]


def moe_problem(cfg: Config, c: Candidate) -> str | None:
    """Why training refuses layout `c` for the config's mixture-of-experts model: the config check
    (`bigtrain.config.model_checks.check_moe`) asked with the candidate's sizes, ZeRO stage, recomputation and
    sequence parallelism on its world size; None when it runs."""
    p = replace(cfg.parallel, tensor=c.tensor, pipeline=c.pipeline, context=c.context, data=c.data,
                expert=c.expert, zero_stage=c.zero_stage, activation_checkpointing=c.checkpointing,
                sequence_parallel=c.sequence_parallel, context_attention=c.context_attention)
    layout_cfg = replace(cfg, parallel=p)
    try:
        check_moe(layout_cfg, resolve_layout(layout_cfg, c.world))
    except ConfigError as e:
        return str(e)
    return None


def built_for_moe(cfg: Config, found: list[Candidate]) -> tuple[list[Candidate], list[str]]:
    """(the layouts of `found` that training runs for the MoE model, the refusals of the others); the check runs
    once per layout apart from its micro-batch size."""
    problems: dict[Candidate, str | None] = {}
    kept, refused = [], []
    for c in found:
        key = replace(c, micro_batch_size=1)
        if key not in problems:
            problems[key] = moe_problem(cfg, c)
            if problems[key] is not None:
                refused.append(problems[key])
        if problems[key] is None:
            kept.append(c)
    return kept, refused


def candidates(cfg: Config, splits: Splits, shape: ModelShape) -> list[Candidate]:
    """Every layout of the splits (context attention, ZeRO stage, checkpointing, sequence parallelism,
    micro-batch size, expert size); refused when there would be more than MAX_CONSIDERED."""
    global_batch = cfg.train.global_batch_size
    options = []
    for t, c, p, d in splits.found:
        zeros = _zero_stages(cfg, p, splits.gpus, d)
        sps = sequence_parallel_options(shape.seq_len, t, c)
        attentions = context_attentions(shape, t, c)
        options.append((t, c, p, d, expert_sizes(shape, d), attentions, zeros, sps,
                        divisors(global_batch // d, limit=MAX_MICRO_BATCH)))
    count = sum(len(eps) * len(a) * len(zeros) * 3 * len(sps) * len(sizes)
                for *_, eps, a, zeros, sps, sizes in options)
    if count > MAX_CONSIDERED:
        most = max(len(sizes) for *_, sizes in options)
        raise ConfigError(f"--gpus {splits.gpus} with train.global_batch_size={global_batch} makes {count:,} layouts "
                          f"to consider ({len(options)} splits into tensor x context x pipeline x data, up to {most} "
                          f"micro-batch sizes each), more than the planner searches ({MAX_CONSIDERED:,}). Plan with "
                          f"a global batch size that has fewer divisors (a power of two times a small factor), or "
                          f"fewer GPUs.")
    moe = shape.experts > 0
    return [Candidate(t, p, d, zero, ckpt, sp, mbs, c, a, ep, moe)
            for t, c, p, d, eps, attentions, zeros, sps, sizes in options for ep in eps
            for a in attentions for zero in zeros for ckpt in ("none", "selective", "full") for sp in sps
            for mbs in sizes]


def moe_note(shape: ModelShape, searched: int, kept: int) -> str:
    """What the plan of a mixture-of-experts model counts, for the notes."""
    left_out = (f"; {searched - kept} of the {searched} layouts searched were left out, training refuses them for "
                f"MoE (bigtrain/config/model_checks.py)" if kept < searched else "")
    return (f"mixture of experts: {shape.n_params / 1e6:,.1f}M parameters in all, {shape.active_params / 1e6:,.1f}M "
            f"active per token (top_k={shape.top_k} of {shape.experts} routed experts in {shape.moe_blocks} MoE "
            f"blocks); memory holds the routed experts / EP per rank, time adds the all-to-alls of expert "
            f"parallelism (the expert load assumed balanced){left_out}")


def setting(cfg: Config, on_gpu: bool, framework_bytes: int) -> Setting:
    p = cfg.parallel
    return Setting(precision=cfg.train.precision, global_batch_size=cfg.train.global_batch_size, engine=p.engine,
                   on_gpu=on_gpu, framework_bytes=framework_bytes, partition_method=p.partition_method,
                   checkpoint_every_n_layers=p.checkpoint_every_n_layers, norm_position=cfg.model.norm_position,
                   pipeline_schedule=p.pipeline_schedule, virtual_stages=p.virtual_stages)


def estimate(shape: ModelShape, c: Candidate, s: Setting, net: Network, gpus: int,
             parts: list[tuple[PipelineLayer, ...]] | None = None) -> Estimate:
    memory = stage_memory(shape, c, s, parts)
    time = step_time(shape, c, s, net, parts)
    tokens_per_s = s.global_batch_size * shape.seq_len / time.total
    mfu = shape.flops_per_token() * tokens_per_s / (gpus * net.accelerator.peak_tflops * 1e12)
    fits = max(m.total for m in memory) <= net.accelerator.memory_bytes
    return Estimate(c, memory, time, tokens_per_s, mfu, fits)


def given_candidate(cfg: Config, gpus: int) -> tuple[Candidate | None, str | None]:
    """The config's own layout over `gpus` ranks, or the reason it is not one: data = gpus / (T·C·P), and its
    context size and attention (parallel.context, parallel.context_attention) and expert size (parallel.expert)."""
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tensor * p.pipeline * p.context
    data = gpus // model_parallel
    if t.global_batch_size % (t.micro_batch_size * data):
        return None, (f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
                      f"{t.micro_batch_size} x {data} data-parallel ranks")
    return Candidate(p.tensor, p.pipeline, data, p.zero_stage, p.activation_checkpointing, p.sequence_parallel,
                     t.micro_batch_size, p.context, p.context_attention, p.expert, cfg.model.moe.experts > 0), None


def check_request(cfg: Config, gpus: int, gpus_per_node: int) -> None:
    if gpus < 1:
        raise ConfigError(f"--gpus must be a positive number of GPUs, got {gpus}.")
    if gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be positive, got {gpus_per_node}.")
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise ConfigError(f"--gpus {gpus} is not a whole number of nodes of --gpus-per-node {gpus_per_node}; use a "
                          f"multiple of {gpus_per_node}, or set --gpus-per-node.")
    p = cfg.parallel
    if gpus % (p.tensor * p.pipeline * p.context):
        ctx = f" x parallel.context={p.context}" if p.context > 1 else ""
        raise ConfigError(f"parallel.tensor={p.tensor}{ctx} x parallel.pipeline={p.pipeline} = "
                          f"{p.tensor * p.context * p.pipeline} does not divide --gpus {gpus}; use a GPU count that "
                          f"is a multiple of it, or override parallel.tensor / parallel.pipeline"
                          f"{' / parallel.context' if ctx else ''} (the search covers every layout anyway).")
    if p.tensor > min(gpus, gpus_per_node):
        raise ConfigError(f"parallel.tensor={p.tensor} spans more than one node of {gpus_per_node} GPUs; tensor "
                          f"parallelism stays inside a node: use parallel.tensor <= {min(gpus, gpus_per_node)}.")


def make_plan(cfg: Config, gpus: int, gpus_per_node: int, accelerator: Accelerator, efficiency: float | None = None,
              framework_gib: float = 1.0, on_gpu: bool = True, config_name: str = "this config") -> Plan:
    check_request(cfg, gpus, gpus_per_node)
    shape = model_shape(cfg)
    parts: Parts = {}
    splits = check_splits(cfg, shape, gpus, gpus_per_node, parts, config_name)  # before any estimate
    if efficiency is None:
        efficiency, source = measured_efficiency(accelerator)
    else:
        if not 0 < efficiency <= 1:
            raise ConfigError(f"--efficiency is the fraction of peak FLOP/s reached, in (0, 1]; got {efficiency}.")
        source = "given with --efficiency"
    net = Network(accelerator, min(gpus_per_node, gpus), efficiency)
    s = setting(cfg, on_gpu, int(framework_gib * GiB))
    found = candidates(cfg, splits, shape)
    searched = len(found)
    if shape.experts:
        found, refused = built_for_moe(cfg, found)
        if not found:
            raise ConfigError(f"None of the {searched} layouts of {config_name} over {gpus} GPUs runs its "
                              f"mixture-of-experts model (model.moe.experts={shape.experts}): the config check "
                              f"refuses each, the first saying: {refused[0]}")
    estimates = [estimate(shape, c, s, net, gpus, parts[c.pipeline]) for c in found]
    # equal speed: the simpler engine (lower ZeRO stage), then the one with more memory to spare
    ranked = sorted((e for e in estimates if e.fits),
                    key=lambda e: (-round(e.tokens_per_s, 6), e.candidate.zero_stage, e.peak.total))
    given_c, problem = given_candidate(cfg, gpus)
    if given_c is not None and shape.experts and (moe_refusal := moe_problem(cfg, given_c)) is not None:
        given_c, problem = None, f"training refuses it for this mixture-of-experts model: {moe_refusal}"
    given = None
    if given_c is not None:
        given = estimate(shape, given_c, s, net, gpus)
        given.given = True
    notes = []
    if accelerator.peak_from is not None:
        notes.append(f"only the GPU's memory was given: its peak ({accelerator.peak_tflops:g} TFLOP/s) and bandwidths "
                     f"are those of the {accelerator.peak_from}, the known GPU nearest in memory, and the step times "
                     f"and MFU assume them; give --peak-tflops (and --intra-node-gbps / --inter-node-gbps) for yours")
    if shape.attention_dropout > 0:
        notes.append("attention dropout is assumed inside the fused (flash) attention kernel, which keeps no s x s "
                     "matrix; a kernel without it would save more")
    if resolve_engine(cfg, gpus) in ("deepspeed", "pipeline") and cfg.train.precision == "fp16":
        notes.append("fp16 is counted like bf16 (DeepSpeed's loss scaler adds no per-parameter state)")
    problem_cp = context_problem(cfg)
    if problem_cp is not None:
        notes.append(f"context parallelism (parallel.context) was not searched: {problem_cp}")
    if shape.experts:
        notes.append(moe_note(shape, searched, len(found)))
    smallest = min(estimates, key=lambda e: e.peak.total, default=None)
    return Plan(shape, accelerator, gpus, min(gpus_per_node, gpus), efficiency, source, ranked, len(estimates),
                given, problem, smallest, notes)
