"""Per-rank memory of one layout, predicted from the model's shape (bytes; the binding pipeline stage).

Model state, Ψ = this rank's parameters (its stage's layers; tensor-split ones / T), D ranks over which ZeRO /
FSDP partition: the gradient group, data × context (D·C ranks: the C ranks of a context group hold the same
weights, bigtrain/distributed/groups.py), whatever the engine:
    bigtrain's one-process engine (fp32 weights, autocast for bf16): 4Ψ + 4Ψ + 8Ψ
    the fairscale engine (fp32 weights): OSS 4Ψ + 4Ψ + 8Ψ/D; FullyShardedDataParallel (4Ψ + 4Ψ + 8Ψ)/D
    PyTorch's FSDP2 (parallel.engine=torch on several ranks, and its pipeline stages at zero_stage 2 or 3;
    fp32 master shards): (4Ψ + 4Ψ + 8Ψ)/D
    DeepSpeed: the ZeRO formulas of `bigtrain.planning.zero` (b = 2 in bf16/fp16, 4 in fp32;
    K = 8 bytes of Adam/LAMB moments, + 4 for the fp32 master copy of mixed precision); at ZeRO-0 in bf16
    DeepSpeed's bf16 optimizer also keeps fp32 gradients (4Ψ)
    DeepSpeed's buffers on GPUs: ZeRO-1/2 one reduction bucket (reduce_bucket_size elements of b bytes);
    ZeRO-3 the prefetch bucket and the largest gathered layer (of b bytes); fairscale's FSDP: the largest
    gathered layer and its full gradient (b bytes each: bf16 under its mixed precision) and one reduce-scatter
    bucket shard (25 MB / D); FSDP2 at zero_stage 3: the largest gathered layer and its full gradient; at
    zero_stage 2 (reshard_after_forward=False) the whole gathered stage, e·Ψ, held from forward to backward

Saved activations per micro-batch, per token (s·b tokens), e bytes per activation element (2 in bf16/fp16, 4
in fp32), h = d_model, a heads, g = kv heads / heads, f = d_ff, T tensor ranks, h' = h/T with sequence
parallelism (else h). The terms are those of Korthikanti et al. 2022 (section 4), counted for bigtrain's
layers and PyTorch's fused kernels (flash attention saves Q, K, V, its output and a log-sum-exp per head,
no s×s matrix):
    each sublayer   norm input r·h' (RMSNorm: its fp32 copy 4·h' and the normalized r·h'), the sublayer's input
                    e·h (gathered from the sequence shards under sequence parallelism; under autocast Q, K and V
                    each keep their own 16-bit cast of it), norm statistics 4·(2 or 1)·h'/h; r = e, but 4 for
                    the fp32 residual stream of bigtrain's one-process autocast (which also keeps 16-bit copies
                    of the weights, e·N)
    attention       e·h·(2 + 2g)/T (Q, K, V, output) + 4·a/T (log-sum-exp)
    feed-forward    e·f/T · (1 relu | 2 gelu | 4 swiglu)
    dropout p > 0   1-byte masks: h' per sublayer, f/T in the feed-forward (+ e·f/T for relu)
    full checkpointing keeps only each block's input (e·h'); selective drops the attention core's
    log-sum-exp (its output is also the output projection's input, so it stays)
    first stage     token ids (8 bytes); last stage the head's input e·h (+ the final norm) and the fp32
                    log-softmax of the logits 4·V/T
Under the 1F1B schedule stage k of p holds min(p − k, m) micro-batches in flight (m per step); the
interleaved and zero-bubble schedules are counted alike (their warm-up is as deep), GPipe holds all m. On top of the
saved activations the peak has the logits of one micro-batch alive through backward with their fp32
gradient ((e + 4)·V/T per token, last stage), the block being recomputed under full checkpointing, and a
framework constant (CUDA context, kernels' workspaces, allocator rounding).

Mixture-of-experts blocks (`bigtrain.planning.experts`): each rank holds E/EP of the routed experts (EP =
parallel.expert), whose state ZeRO would partition over the expert-data group (D/EP ranks), the rest over D; an MoE
block saves its router's logits and probabilities and, per token, the top_k (capacity-limited) experts' inputs,
hidden values and outputs in place of the dense FFN's.

Context parallelism (C ranks share each sequence; the zig-zag split gives every rank 2 of the 2C equal chunks):
every term above that is per token (saved activations, the logits and their gradient, the recomputed block, the
attention's Q, K, V, output and log-sum-exp) counts a rank's s·b/C tokens instead of s·b, so

    activations(C) = activations(1) / C          (the 16-bit weight copies of autocast, e·N, excepted)

Ring attention saves this rank's Q, K, V, output and log-sum-exp and passes K/V blocks again in backward;
Ulysses saves s·b tokens × h/C heads after its all-to-all, the same bytes. Model state is unchanged but for
its partitions over D·C ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bigtrain.config.deepspeed import ZERO3_COMMUNICATION, ZERO_COMMUNICATION
from bigtrain.config.layout import engine_for
from bigtrain.planning.experts import FFN_SAVED, layer_rank_parameters, moe_ffn_bytes_per_token
from bigtrain.planning.partition import stage_boundaries
from bigtrain.planning.shape import ModelShape, PipelineLayer
from bigtrain.planning.zero import zero_formula

FSDP_BUCKET_BYTES = 25 * 2**20  # fairscale FSDP's reduce-scatter bucket (bucket_cap_mb=25, its default)


@dataclass(frozen=True)
class Candidate:
    """One layout of the search: sizes, ZeRO stage, recomputation, micro-batch, context parallelism (C ranks
    sharing each sequence, `context_attention` ring or ulysses; ring at C = 1, where it does nothing), and for a
    mixture-of-experts model (`moe`) the expert size EP (ranks of an expert group, out of the data ranks)."""

    tensor: int
    pipeline: int
    data: int
    zero_stage: int
    checkpointing: str  # none | selective | full
    sequence_parallel: bool
    micro_batch_size: int
    context: int = 1
    context_attention: str = "ring"
    expert: int = 1
    moe: bool = False  # a layout of an MoE model: its overrides name parallel.expert

    @property
    def world(self) -> int:
        """T·C·P·D ranks."""
        return self.tensor * self.context * self.pipeline * self.data

    @property
    def gradient_ranks(self) -> int:
        """D·C: the ranks whose gradients are summed, over which ZeRO / FSDP partition."""
        return self.data * self.context

    @property
    def expert_data_ranks(self) -> int:
        """D·C / EP: the ranks holding the same experts, over which their gradients are summed."""
        return self.gradient_ranks // self.expert

    def rank_tokens(self, seq_len: int) -> float:
        """Tokens of one micro-batch on one rank: s·b/C."""
        return seq_len * self.micro_batch_size / self.context

    def overrides(self) -> list[str]:
        context = [f"parallel.context={self.context}"]
        if self.context > 1:
            context.append(f"parallel.context_attention={self.context_attention}")
        expert = [f"parallel.expert={self.expert}"] if self.moe else []
        return [f"parallel.tensor={self.tensor}", *context, f"parallel.pipeline={self.pipeline}", *expert,
                f"parallel.zero_stage={self.zero_stage}", f"parallel.activation_checkpointing={self.checkpointing}",
                f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                f"train.micro_batch_size={self.micro_batch_size}"]


@dataclass(frozen=True)
class Setting:
    """What the layouts share: the run's precision, batch and engine choice, the framework constant."""

    precision: str
    global_batch_size: int
    engine: str  # parallel.engine as asked: auto | torch | deepspeed | fairscale
    on_gpu: bool
    framework_bytes: int
    partition_method: str = "parameters"
    checkpoint_every_n_layers: int = 1
    norm_position: str = "pre"
    pipeline_schedule: str = "1f1b"  # parallel.pipeline_schedule; its bubble: planning/bubble.py
    virtual_stages: int = 1

    @property
    def activation_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    def residual_bytes(self, c: Candidate) -> int:
        """Bytes of the residual stream and the norms: fp32 under bigtrain's one-process autocast (its weights
        stay fp32), else those of the activations (DeepSpeed casts the model to bf16/fp16)."""
        return 4 if not self.deepspeed(c) else self.activation_bytes

    def autocast(self, c: Candidate) -> bool:
        """bigtrain's one-process engine in bf16/fp16: autocast casts each matmul's input (once per consumer) and
        weight to 16 bits, and the graph keeps those copies."""
        return self.precision != "fp32" and not self.deepspeed(c)

    def mask_bytes(self) -> int:
        """A dropout mask element: 1 byte from the fused GPU kernel; the CPU kernel keeps a scaled copy."""
        return 1 if self.on_gpu else self.activation_bytes

    def resolved(self, c: Candidate) -> str:
        """The engine the candidate runs on (`bigtrain.config.layout.engine_for`)."""
        return engine_for(self.engine, c.world, c.zero_stage, c.pipeline)

    def fsdp2(self, c: Candidate) -> bool:
        """Whether the candidate shards with PyTorch's FSDP2: the torch engine on several ranks, or its pipeline
        stages at parallel.zero_stage 2 or 3."""
        engine = self.resolved(c)
        return engine == "fsdp2" or (engine == "torch_pipeline" and c.zero_stage in (2, 3))

    def deepspeed(self, c: Candidate) -> bool:
        """Whether the candidate runs on DeepSpeed's engines."""
        return self.resolved(c) in ("deepspeed", "pipeline")


    def micro_batches(self, c: Candidate) -> int:
        return self.global_batch_size // (c.micro_batch_size * c.data)


@dataclass
class StageMemory:
    stage: int
    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int  # saved for backward, every micro-batch in flight
    transient: int  # logits and their gradient, the recomputed block
    framework: int
    in_flight: int
    expert_state: int = 0  # of the model state, the routed experts' parameters, gradients and optimizer state

    @property
    def model_state(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_state + self.buffers + self.activations + self.transient + self.framework


def stages(shape: ModelShape, pipeline: int, method: str) -> list[tuple[PipelineLayer, ...]]:
    bounds = stage_boundaries([x.params for x in shape.layers], shape.kinds, pipeline, method)
    return [shape.layers[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def rank_split_parameters(layers: tuple[PipelineLayer, ...], tensor: int, expert: int = 1) -> tuple[int, int]:
    """(dense, routed-expert) parameters of one rank holding `layers`: split parameters / T, the rest whole, the
    routed experts / EP (`bigtrain.planning.experts`); the tied embedding once."""
    seen_tied = False
    dense = routed = 0
    for x in layers:
        if x.tied:
            if seen_tied:
                continue
            seen_tied = True
        mine, experts = layer_rank_parameters(x, tensor, expert)
        dense, routed = dense + mine, routed + experts
    return dense, routed


def rank_parameters(layers: tuple[PipelineLayer, ...], tensor: int, expert: int = 1) -> int:
    """Ψ of one rank holding `layers` (`rank_split_parameters`, both kinds)."""
    return sum(rank_split_parameters(layers, tensor, expert))


def largest_layer(layers: tuple[PipelineLayer, ...], c: Candidate) -> int:
    """The most parameters one rank holds of a single layer (what ZeRO-3 / FSDP gather at once)."""
    return max(sum(layer_rank_parameters(x, c.tensor, c.expert)) for x in layers)


def model_state(psi: int, c: Candidate, s: Setting, ranks: int | None = None) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) bytes of Ψ parameters on one rank; D = `ranks` that partition
    them, by default the gradient group (D·C)."""
    d = c.gradient_ranks if ranks is None else ranks
    if s.engine == "fairscale":  # fp32 weights
        if c.zero_stage == 3:  # FSDP: parameters, gradients and moments sharded over the data group
            return 4 * psi // d, 4 * psi // d, 8 * psi // d
        return 4 * psi, 4 * psi, 8 * psi // d  # OSS shards the moments (whole gradients while accumulating)
    if s.fsdp2(c):  # parameters, gradients and moments sharded over the gradient group (stages too)
        return 4 * psi // d, 4 * psi // d, 8 * psi // d
    if not s.deepspeed(c):
        return 4 * psi, 4 * psi, 8 * psi
    mixed = s.precision != "fp32"
    # DeepSpeed's ZeRO optimizers keep fp32 partitions of the weights whatever the precision
    state = zero_formula(psi, c.zero_stage, d, s.precision, master_copy=mixed or c.zero_stage > 0)
    params, grads, optimizer = state.params, state.grads, state.optimizer
    if mixed and c.zero_stage == 0:  # DeepSpeed's bf16/fp16 optimizer: fp32 master copy and fp32 gradients
        optimizer = 12 * psi
        grads += 4 * psi if s.precision in ("bf16", "fp8") else 0
    return params, grads, optimizer


def deepspeed_buffers(layers: tuple[PipelineLayer, ...], c: Candidate, s: Setting) -> int:
    """The engine's communication buffers (module docstring): DeepSpeed's, or those of fairscale's FSDP or of
    FSDP2."""
    if s.on_gpu and s.engine == "fairscale" and c.zero_stage == 3:
        largest = largest_layer(layers, c)
        return 2 * s.activation_bytes * largest + FSDP_BUCKET_BYTES // c.gradient_ranks
    if s.on_gpu and s.fsdp2(c):
        if c.zero_stage == 2:  # reshard_after_forward=False: the stage stays gathered from forward to backward
            return s.activation_bytes * rank_parameters(layers, c.tensor, c.expert)
        largest = largest_layer(layers, c)
        return 2 * s.activation_bytes * largest
    if not s.on_gpu or c.zero_stage == 0 or not s.deepspeed(c):
        return 0
    b = s.activation_bytes
    if c.zero_stage in (1, 2):
        return ZERO_COMMUNICATION["reduce_bucket_size"] * b
    largest = largest_layer(layers, c)
    return (ZERO3_COMMUNICATION["stage3_prefetch_bucket_size"] + largest) * b


def block_bytes_per_token(shape: ModelShape, c: Candidate, s: Setting, cross: bool, checkpointed: bool,
                          moe: bool = False) -> float:
    """Bytes one block saves for backward per token of a micro-batch (module docstring); `moe`: its feed-forward
    is a mixture of experts (`bigtrain.planning.experts.moe_ffn_bytes_per_token`)."""
    e, r, t, h = s.activation_bytes, s.residual_bytes(c), c.tensor, shape.d_model
    h_local = h / t if c.sequence_parallel else h
    if checkpointed:
        return r * h_local
    rms = shape.norm == "rmsnorm"
    stats = 4 * (1 if rms else 2) * (1 / t if c.sequence_parallel else 1)
    norm = r * h_local + 4 * h_local * rms + stats  # RMSNorm also keeps its fp32 input for the statistics
    casts = s.autocast(c)  # Q, K and V (and SwiGLU's gate and up) each save their own cast of the input
    attention_in, ffn_in = (3, 2 if shape.activation == "swiglu" else 1) if casts else (1, 1)
    g = shape.n_kv_heads / shape.n_heads
    lse = 0.0 if c.checkpointing == "selective" else 4 * shape.n_heads / t
    attention = e * h * (2 + 2 * g) / t + lse
    f = shape.d_ff / t
    ffn = e * h * ffn_in + e * f * FFN_SAVED[shape.activation]
    if moe:
        ffn = moe_ffn_bytes_per_token(shape, c.rank_tokens(shape.seq_len), e, r, t, casts, s.mask_bytes())
    n_sublayers = 3 if cross else 2
    total = n_sublayers * norm + e * h * attention_in + (2 if cross else 1) * attention + ffn
    if cross:  # the query's input, and the encoder output's keys and values (s encoder positions assumed)
        total += e * h * (1 + 2 * g / t)
    if shape.dropout > 0:  # (an MoE block's feed-forward counts its own masks)
        total += s.mask_bytes() * (n_sublayers * h_local + (0 if moe else f))
        total += e * f if shape.activation == "relu" and not moe else 0
    return total


def stage_activation_bytes(shape: ModelShape, layers: tuple[PipelineLayer, ...], c: Candidate, s: Setting,
                           first: bool, last: bool) -> float:
    """Saved bytes of one micro-batch on a stage holding `layers` (this rank's s·b/C tokens)."""
    e, r, t, h = s.activation_bytes, s.residual_bytes(c), c.tensor, shape.d_model
    tokens = c.rank_tokens(shape.seq_len)
    per_token, kept = 0.0, []  # kept: layers whose activations (and autocast's weight copies) stay
    for layer in layers:
        checkpointed = c.checkpointing == "full" and layer.index % s.checkpoint_every_n_layers == 0
        if layer.kind in ("block", "cross_block"):
            per_token += block_bytes_per_token(shape, c, s, layer.kind == "cross_block", checkpointed,
                                               layer.routed > 0)
        if not (checkpointed and layer.kind in ("block", "cross_block")):
            kept.append(layer)
    weights = e * sum(x.matmul for x in kept) if s.autocast(c) else 0  # 16-bit copies of the weights
    if first:
        per_token += 8 + s.mask_bytes() * (h / t if c.sequence_parallel else h) * (shape.dropout > 0)
    if last:
        h_local = h / t if c.sequence_parallel else h
        norm = r * h_local + 4 * h_local * (shape.norm == "rmsnorm") + 8 if s.norm_position == "pre" else 0
        per_token += e * h + norm + 4 * shape.vocab / t
    return per_token * tokens + weights


def in_flight_micro_batches(s: Setting, c: Candidate, k: int, m: int) -> int:
    """Micro-batches whose activations stage k holds at once: GPipe runs every forward first (m); the 1F1B
    family (DeepSpeed's, torch's 1F1B, interleaved and zero-bubble schedules) at most p - k, as 1F1B's warm-up."""
    gpipe = s.resolved(c) == "torch_pipeline" and s.pipeline_schedule == "gpipe"
    return m if gpipe else min(c.pipeline - k, m)


def stage_memory(shape: ModelShape, c: Candidate, s: Setting,
                 parts: list[tuple[PipelineLayer, ...]] | None = None) -> list[StageMemory]:
    """Every stage's prediction for one rank of it (ranks of one stage are alike); `parts`: the stages'
    layers when already partitioned."""
    out = []
    parts = parts or stages(shape, c.pipeline, s.partition_method)
    m = s.micro_batches(c)
    tokens = c.rank_tokens(shape.seq_len)
    for k, layers in enumerate(parts):
        first, last = k == 0, k == c.pipeline - 1
        dense, routed = rank_split_parameters(layers, c.tensor, c.expert)
        experts = model_state(routed, c, s, c.expert_data_ranks)  # gradients summed over D·C / EP ranks
        params, grads, optimizer = (a + b for a, b in zip(model_state(dense, c, s), experts, strict=True))
        per_micro = stage_activation_bytes(shape, layers, c, s, first, last)
        in_flight = in_flight_micro_batches(s, c, k, m)
        transient = (s.activation_bytes + 4) * shape.vocab / c.tensor * tokens if last else 0
        if c.checkpointing == "full" and any(x.kind in ("block", "cross_block") for x in layers):
            recompute = replace(c, checkpointing="none")
            block = max((x for x in layers if x.kind in ("block", "cross_block")), key=lambda x: x.routed)
            transient += block_bytes_per_token(shape, recompute, s, "cross_block" in shape.kinds, False,
                                               block.routed > 0) * tokens
        out.append(StageMemory(k, params, grads, optimizer, deepspeed_buffers(layers, c, s),
                               int(per_micro * in_flight), int(transient), s.framework_bytes, in_flight,
                               sum(experts)))
    return out
