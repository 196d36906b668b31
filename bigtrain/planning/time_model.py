"""Predicted step time of one layout (seconds), its tokens/s and MFU.

compute     each stage's FLOPs per micro-batch, 6·N_stage + 12·L_stage·h·s per token (PaLM; N the active
            matmul parameters: of an MoE block's routed experts only the top_k of E a token visits), plus the
            recomputed forward (full checkpointing: 2·N + 4·L·h·s; selective: the attention core, 4·L·h·s),
            split over T tensor ranks, at peak × efficiency (the efficiency measured by bench/throughput.py
            on a GPU, or an assumed one that the report names)
tensor      per block and micro-batch, 2 all-reduces forward and 2 backward (3 + 3 with cross-attention; one
            more forward set with full recomputation) of s·b·h·e bytes, ring cost 2(T−1)/T · bytes / bandwidth
            inside a node (sequence parallelism moves the same bytes as all-gather + reduce-scatter)
pipeline    m slots of the slowest stage plus the schedule's bubble, a fraction f of the step (planning/bubble.py:
            1F1B (p − 1)/(m + p − 1), interleaved (p − 1)/(V·m + p − 1), zero-bubble bounded by the interleaved
            V = 2 form), i.e. m·slot·f/(1 − f); each slot also sends s·b·h·e bytes forward and back between neighbours
data        once per step the gradients of this rank's Ψ over the gradient group (D = data × context ranks):
            2(D−1)/D · Ψ·b bytes for ZeRO 0-2 (all-reduce, or reduce-scatter + all-gather of the updated
            parameters), 3(D−1)/D · Ψ·b for ZeRO-3 (parameters
            gathered in forward and backward, gradients reduce-scattered; fairscale's FSDP gathers in e bytes
            and reduces in fp32: (D−1)/D · Ψ·(2e + 4)), not assumed to overlap with compute; under expert
            parallelism the routed experts' Ψ_e (E/EP of them) over their expert-data group of D/EP ranks,
            the rest over D, one after the other
expert      per MoE block and micro-batch 4 all-to-alls (dispatch and combine forward, their gradients backward;
            6 with full recomputation) of n·a rows (n = s·b tokens, a = top_k, or fewer under a capacity factor)
            of h values in e bytes, (EP−1)/EP of each crossing: 4·n·a·h·e·(EP−1)/EP bytes
            (`bigtrain.planning.experts`), over the bandwidth of the expert group (EP data ranks, T·C·EP
            consecutive ranks), not assumed to overlap with the experts' compute
context     with C > 1 ranks sharing each sequence (compute, tensor and pipeline terms above count a rank's s·b/C
            tokens), per attention layer and micro-batch, e bytes, d_kv = h·g/T (this tensor rank's key/value
            width, g = kv heads / heads), R = 1 more forward when checkpointing (full or selective) recomputes it:
              ring     (C−1) K/V block exchanges forward, each 2·(s/C)·b·d_kv·e bytes, twice that in backward
                       (the K/V blocks again, and dK/dV travel back): (3 + R)·(C−1)·2·(s/C)·b·d_kv·e bytes
              ulysses  4 all-to-alls forward (Q, K, V in, the output back), (C−1)/C of each crossing, and the
                       same in backward: (2 + R)·(C−1)/C·(s/C)·b·(h/T)·(2 + 2g)·e bytes
              cross-attention (encoder-decoder) all-gathers the encoder's K and V, reduce-scatters their
                       gradients: (2 + R)·(C−1)/C·s·b·2·d_kv·e bytes
            over the context group's bandwidth (its ranks lie within T·C consecutive ranks), not assumed to
            overlap with the attention's compute (an upper bound, as for the other terms)
overhead    a fixed cost per block and micro-batch (kernel launches and framework work of forward and backward,
            LAUNCH_S), which makes larger micro-batches and fewer of them cheaper, as on a real GPU
Bandwidths are within a node when the group's ranks share one (ranks are numbered tensor innermost, then
context, then data, then pipeline), else across nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigtrain.planning.bubble import bubble_fraction
from bigtrain.planning.experts import all_to_all_bytes
from bigtrain.planning.flops import training_flops
from bigtrain.planning.hardware import Accelerator
from bigtrain.planning.memory_model import Candidate, Setting, rank_split_parameters, stages
from bigtrain.planning.shape import ModelShape, PipelineLayer

LAUNCH_S = 3e-4  # per block and micro-batch: ~60 kernels of forward + backward at ~5 µs each


@dataclass(frozen=True)
class Network:
    accelerator: Accelerator
    gpus_per_node: int
    efficiency: float

    def bandwidth(self, span: int) -> float:
        """Bytes/s for a group whose ranks lie within `span` consecutive ranks."""
        gbps = (self.accelerator.intra_node_gbps if span <= self.gpus_per_node
                else self.accelerator.inter_node_gbps)
        return gbps * 1e9


@dataclass
class StepTime:
    compute: float
    tensor: float
    pipeline_bubble: float
    pipeline_send: float
    data: float
    overhead: float
    context: float = 0.0
    expert: float = 0.0  # the all-to-alls of expert parallelism

    @property
    def total(self) -> float:
        return (self.compute + self.tensor + self.pipeline_bubble + self.pipeline_send + self.data + self.overhead
                + self.context + self.expert)


def context_bytes(shape: ModelShape, c: Candidate, e: int, recompute: bool) -> tuple[float, float]:
    """(bytes one rank moves per self-attention layer, per cross-attention layer) for one micro-batch under
    context parallelism (module docstring); (0, 0) at C = 1."""
    if c.context == 1:
        return 0.0, 0.0
    C, T, b, s = c.context, c.tensor, c.micro_batch_size, shape.seq_len
    g = shape.n_kv_heads / shape.n_heads
    d_kv = shape.d_model * g / T
    extra = 1 if recompute else 0
    if c.context_attention == "ulysses":
        self_attention = (2 + extra) * (C - 1) / C * (s / C) * b * (shape.d_model / T) * (2 + 2 * g) * e
    else:
        self_attention = (3 + extra) * (C - 1) * 2 * (s / C) * b * d_kv * e
    cross = (2 + extra) * (C - 1) / C * s * b * 2 * d_kv * e
    return self_attention, cross


def step_time(shape: ModelShape, c: Candidate, s: Setting, net: Network,
              parts: list[tuple[PipelineLayer, ...]] | None = None) -> StepTime:
    h, seq, e = shape.d_model, shape.seq_len, s.activation_bytes
    tokens = c.rank_tokens(seq)  # s·b/C
    m = s.micro_batches(c)
    peak = net.accelerator.peak_tflops * 1e12 * net.efficiency
    slot_compute, slot_tensor, slot_overhead, slot_context, slot_expert = 0.0, 0.0, 0.0, 0.0, 0.0
    cross = "cross_block" in shape.kinds
    parts = parts or stages(shape, c.pipeline, s.partition_method)
    per_self, per_cross = context_bytes(shape, c, e, c.checkpointing != "none")
    per_moe = all_to_all_bytes(shape, tokens, e, c.expert, c.checkpointing == "full")
    for layers in parts:
        blocks = sum(x.kind in ("block", "cross_block") for x in layers)
        matmul = sum(x.active for x in layers)
        block_matmul = sum(x.active for x in layers if x.kind in ("block", "cross_block"))
        flops = training_flops(matmul, blocks, h, seq)
        if c.checkpointing == "full":
            flops += 2 * block_matmul + 4 * blocks * h * seq
        elif c.checkpointing == "selective":
            flops += 4 * blocks * h * seq
        compute = flops * tokens / c.tensor / peak
        reduces = blocks * ((3 if cross else 2) * (3 if c.checkpointing == "full" else 2))
        tensor = 0.0
        if c.tensor > 1:
            tensor = reduces * 2 * (c.tensor - 1) / c.tensor * tokens * h * e / net.bandwidth(c.tensor)
        overhead = blocks * LAUNCH_S
        context = 0.0
        if c.context > 1:
            crosses = sum(x.kind == "cross_block" for x in layers)
            context = (blocks * per_self + crosses * per_cross) / net.bandwidth(c.tensor * c.context)
        expert = sum(x.routed > 0 for x in layers) * per_moe / net.bandwidth(c.tensor * c.context * c.expert)
        if (compute + tensor + overhead + context + expert
                > slot_compute + slot_tensor + slot_overhead + slot_context + slot_expert):
            slot_compute, slot_tensor, slot_overhead, slot_context = compute, tensor, overhead, context
            slot_expert = expert
    send = 0.0
    if c.pipeline > 1:  # neighbours are T·C·D ranks apart
        send = 2 * tokens * h * e / net.bandwidth(c.tensor * c.context * c.data * 2)
    data = 0.0
    d, d_expert = c.gradient_ranks, c.expert_data_ranks
    if d > 1:
        grad_bytes = 4 if s.precision == "fp32" or not s.deepspeed(c) else 2  # autocast keeps fp32 gradients
        if c.zero_stage == 3 and not s.deepspeed(c):  # FSDP (fairscale, FSDP2): two all-gathers (bf16 under mixed
            per_value = 2 * s.activation_bytes + 4  # precision), one fp32 reduce-scatter
        else:
            per_value = (3 if c.zero_stage == 3 else 2) * grad_bytes
        volumes = []  # per stage: the dense parameters over D ranks, the routed experts over D/EP
        for layers in parts:
            dense, routed = rank_split_parameters(layers, c.tensor, c.expert)
            volumes.append((d - 1) / d * dense * per_value + (d_expert - 1) / d_expert * routed * per_value)
        data = max(volumes) / net.bandwidth(c.tensor * d)
    slot = slot_compute + slot_tensor + slot_overhead + slot_context + slot_expert
    schedule = s.pipeline_schedule if s.resolved(c) == "torch_pipeline" else "1f1b"  # DeepSpeed's: 1F1B only
    f = bubble_fraction(schedule, c.pipeline, m, s.virtual_stages)
    return StepTime(compute=m * slot_compute, tensor=m * slot_tensor, pipeline_bubble=m * slot * f / (1 - f),
                    pipeline_send=(m + c.pipeline - 1) * send if c.pipeline > 1 else 0.0, data=data,
                    overhead=m * slot_overhead, context=m * slot_context, expert=m * slot_expert)
