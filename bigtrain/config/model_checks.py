"""Rules of the `model` section (its `moe` subsection included), and whether a model splits over tensor-parallel
ranks."""

from __future__ import annotations

import math

from bigtrain.config.layout import Layout
from bigtrain.config.rules import fraction, positive, require
from bigtrain.config.schema import Config, ModelConfig


def tensor_split_problems(cfg: ModelConfig, vocab_size: int | None, tensor: int) -> list[str]:
    """Problems that stop a model from splitting over `tensor` ranks, each naming both numbers."""
    problems = []
    sizes = [("model.n_heads", cfg.n_heads), ("model.n_kv_heads", cfg.n_kv_heads), ("model.d_ff", cfg.d_ff)]
    if cfg.moe.experts:  # each expert (and shared expert) splits like the dense FFN
        sizes.append(("model.moe.d_ff", cfg.moe.d_ff))
    for key, value in sizes:
        if value is not None and value % tensor:
            problems.append(f"{key}={value} is not divisible by parallel.tensor={tensor}")
    if vocab_size is not None and vocab_size % tensor:
        padded = -(-vocab_size // tensor) * tensor
        problems.append(f"the vocabulary of {vocab_size} ids is not divisible by parallel.tensor={tensor} (pad it "
                        f"with model.vocab_size={padded})")
    return problems


def check_tensor_parallel(cfg: Config) -> None:
    """The model must split evenly over parallel.tensor ranks; checked before the world size matters."""
    p, m = cfg.parallel, cfg.model
    if p.tensor == 1:
        require(not p.sequence_parallel, "parallel.sequence_parallel=true cuts the sequence over the tensor-"
                "parallel ranks, but parallel.tensor=1. Set parallel.tensor > 1 or sequence_parallel=false.")
        return
    problems = tensor_split_problems(m, m.vocab_size, p.tensor)
    if m.vocab_size is None and m.vocab_multiple % p.tensor:
        problems.append(f"model.vocab_multiple={m.vocab_multiple} (the automatic vocabulary size is a multiple "
                        f"of it) is not divisible by parallel.tensor={p.tensor}")
    require(not problems, f"The model does not split over parallel.tensor={p.tensor} ranks: "
            f"{'; '.join(problems)}. Choose a tensor size that divides each of them (or change the model).")
    if p.sequence_parallel:
        longest = -(-cfg.data.seq_len // p.tensor) * p.tensor
        require(longest <= m.max_seq_len,
                f"parallel.sequence_parallel pads sequences to a multiple of parallel.tensor={p.tensor}: "
                f"data.seq_len={cfg.data.seq_len} becomes {longest} > model.max_seq_len={m.max_seq_len}. "
                f"Raise model.max_seq_len to {longest} or pick a data.seq_len divisible by {p.tensor}.")


def check_model(cfg: Config) -> None:
    m = cfg.model
    for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "vocab_multiple"):
        positive(f"model.{name}", getattr(m, name))
    if m.vocab_size is not None:
        positive("model.vocab_size", m.vocab_size)
    if m.n_decoder_layers is not None:
        positive("model.n_decoder_layers", m.n_decoder_layers)
    require(m.d_model % m.n_heads == 0,
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; each head gets "
            f"d_model / n_heads dimensions. Pick n_heads from the divisors of {m.d_model}.")
    if m.n_kv_heads is not None:
        positive("model.n_kv_heads", m.n_kv_heads)
        require(m.n_heads % m.n_kv_heads == 0,
                f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
                f"grouped-query attention shares each key/value head among n_heads / n_kv_heads heads.")
    head_dim = m.d_model // m.n_heads
    if m.positions == "rotary":
        require(head_dim % 2 == 0, f"model.positions='rotary' needs an even head size, but d_model "
                f"{m.d_model} / n_heads {m.n_heads} = {head_dim}.")
    if m.positions == "sinusoidal":
        require(m.d_model % 2 == 0, f"model.positions='sinusoidal' needs an even model.d_model, "
                f"got {m.d_model}.")
    if m.positions == "relative":
        require(m.relative_buckets >= 4, f"model.relative_buckets={m.relative_buckets}: relative positions need "
                f"at least 4 buckets (T5 uses 32).")
        require(m.relative_max_distance > m.relative_buckets // 2,
                f"model.relative_max_distance={m.relative_max_distance} must exceed half of "
                f"model.relative_buckets={m.relative_buckets} (the exact buckets); T5 uses 128 with 32 buckets.")
    require(m.type_vocab_size >= 0, f"model.type_vocab_size must be 0 (no token types) or more, "
            f"got {m.type_vocab_size}.")
    require(not m.scale_tied_output or m.tie_embeddings,
            "model.scale_tied_output=true rescales the input of a tied output head (T5), but "
            "model.tie_embeddings=false. Set model.tie_embeddings=true or model.scale_tied_output=false.")
    require(not m.head_transform or m.activation != "swiglu",
            "model.head_transform=true applies model.activation to one dense layer, which swiglu (a gated pair) "
            "cannot be. Use model.activation=gelu (BERT) or model.head_transform=false.")
    fraction("model.dropout", m.dropout)
    if m.attention_dropout is not None:
        fraction("model.attention_dropout", m.attention_dropout)
    positive("model.init_std", m.init_std)
    positive("model.norm_eps", m.norm_eps)
    positive("model.rope_theta", m.rope_theta)
    if m.family != "seq2seq":
        require(m.n_decoder_layers is None, f"model.n_decoder_layers is only used by "
                f"model.family='seq2seq'; remove it for family '{m.family}'.")


def check_moe(cfg: Config, layout: Layout) -> None:
    """`model.moe`: values in range; parallel.expert divides the experts (it divides the data size: `Layout`); and
    the layouts built for MoE: one process on the plain engine; data (and expert, and tensor) parallelism on
    DeepSpeed's engine; pipeline stages with data (and expert) parallelism on DeepSpeed's pipeline engine; each at
    ZeRO-0 in fp32; data (and expert) parallelism on PyTorch's FSDP2 (parallel.engine=torch, zero_stage 2 or 3,
    fp32, parallel.tensor=1; LAMB only with parallel.expert=1); activation checkpointing with any of them (a
    recomputed MoE block routes again, the same tokens to the same experts, and repeats its all-to-alls in the
    order of the forward). Tensor with pipeline parallelism, context parallelism, ZeRO 1, ZeRO 2-3 on DeepSpeed,
    fairscale, mixed precision and compiled blocks are not built for MoE yet."""
    moe, p = cfg.model.moe, cfg.parallel
    require(moe.experts >= 0, f"model.moe.experts must be >= 0 (0 = dense blocks), got {moe.experts}.")
    require(moe.experts > 0 or p.expert == 1, f"parallel.expert={p.expert} splits the routed experts of MoE blocks, "
            f"but model.moe.experts=0 (dense blocks). Set parallel.expert=1, or model.moe.experts to a multiple of "
            f"{p.expert}.")
    if moe.experts == 0:
        return
    positive("model.moe.top_k", moe.top_k)
    require(moe.top_k <= moe.experts, f"model.moe.top_k={moe.top_k} exceeds model.moe.experts={moe.experts}: "
            f"each token picks top_k distinct experts. Use top_k <= {moe.experts}.")
    require(moe.experts % p.expert == 0, f"parallel.expert={p.expert} does not divide model.moe.experts="
            f"{moe.experts}: each rank of an expert group holds experts / parallel.expert of them. Use a "
            f"parallel.expert that divides {moe.experts}.")
    positive("model.moe.every", moe.every)
    blocks = cfg.model.n_layers if cfg.model.family != "seq2seq" else min(
        cfg.model.n_layers, cfg.model.n_decoder_layers or cfg.model.n_layers)
    require(moe.every <= blocks, f"model.moe.every={moe.every} exceeds the {blocks} blocks of a stack "
            f"(model.n_layers={cfg.model.n_layers}), so no block would be MoE. Use every <= {blocks}.")
    require(moe.shared_experts >= 0, f"model.moe.shared_experts must be >= 0, got {moe.shared_experts}.")
    if moe.d_ff is not None:
        positive("model.moe.d_ff", moe.d_ff)
    for key in ("aux_loss_coef", "z_loss_coef", "capacity_factor"):
        value = getattr(moe, key)
        require(math.isfinite(value) and value >= 0, f"model.moe.{key} must be a finite number >= 0, got {value}.")
    one_process = layout.engine == "torch" and layout.world_size == 1
    zero0_fp32 = layout.zero_stage == 0 and layout.precision == "fp32" and layout.context == 1
    data_parallel = layout.engine == "deepspeed" and zero0_fp32 and layout.pipeline == 1
    pipelined = layout.engine == "pipeline" and zero0_fp32 and layout.tensor == 1
    sharded = (layout.engine == "fsdp2" and layout.precision == "fp32" and layout.context == 1
               and layout.tensor == 1)
    require(one_process or data_parallel or pipelined or sharded,
            f"model.moe.experts={moe.experts} with {layout.describe()} on {layout.engine}, ZeRO-{layout.zero_stage}, "
            f"{layout.precision} is not built yet: mixture-of-experts blocks run on one process with the plain "
            f"engine, over data-parallel ranks (with parallel.expert splitting the experts, and parallel.tensor "
            f"splitting every expert like the dense FFN) on DeepSpeed's engine, or over parallel.pipeline stages "
            f"(with data and expert parallelism, parallel.tensor=1) on DeepSpeed's pipeline engine, each at "
            f"parallel.zero_stage=0 in train.precision=fp32, or over data-parallel ranks (with parallel.expert, "
            f"parallel.tensor=1) on PyTorch's FSDP2 (parallel.engine=torch, zero_stage 2 or 3, fp32). MoE with "
            f"parallel.tensor > 1 and parallel.pipeline > 1 together, parallel.context, parallel.zero_stage 1, "
            f"zero_stage 2-3 on DeepSpeed, bf16 / fp16, parallel.tensor > 1 on FSDP2, and fairscale is not built "
            f"yet. Use parallel.engine=auto with zero_stage=0 (context = 1, tensor = 1 or pipeline = 1), or "
            f"parallel.engine=torch with zero_stage 2 or 3 (tensor = 1), in train.precision=fp32, or set "
            f"model.moe.experts=0.")
    require(not (layout.engine == "fsdp2" and layout.expert > 1 and cfg.optim.name == "lamb"),
            f"model.moe.experts={moe.experts} with parallel.expert={layout.expert} on PyTorch's FSDP2 and "
            f"optim.name=lamb is not built yet (LAMB's per-parameter norms would be summed over every data rank, "
            f"whose experts differ). Use optim.name=adamw, parallel.expert=1, or parallel.engine=auto with "
            f"zero_stage=0.")
    require(not p.sequence_parallel, f"model.moe.experts={moe.experts} with parallel.sequence_parallel=true is not "
            f"built yet (the router would run on sequence shards). Set parallel.sequence_parallel=false.")
    require(not cfg.train.compile, f"model.moe.experts={moe.experts} with train.compile=true is not built yet "
            f"(the router's data-dependent dispatch). Set train.compile=false.")
