"""Rules of context parallelism (`parallel.context`, `parallel.context_attention`) at load time.

A context group of C ranks splits every sequence of length L into 2C equal chunks, rank i holding chunks i and
2C-1-i (`bigtrain.parallel.context.sharding`), so L must divide by 2C. Ulysses turns the sequence split into a
head split with an all-to-all, so the query heads and the key/value heads must both divide by C (after the
tensor-parallel split, each rank's n_heads / tensor and n_kv_heads / tensor).
"""

from __future__ import annotations

from bigtrain.config.rules import positive, require
from bigtrain.config.schema import Config

CONTEXT_ATTENTIONS = ("ring", "ulysses")


def check_context(cfg: Config) -> None:
    """Refuse a context-parallel config that cannot be split, or that asks for what is not wired, naming the
    keys."""
    p, m = cfg.parallel, cfg.model
    positive("parallel.context", p.context)
    require(p.context_attention in CONTEXT_ATTENTIONS, f"parallel.context_attention={p.context_attention!r} is "
            f"not known; allowed values: {', '.join(CONTEXT_ATTENTIONS)}.")
    c = p.context
    if c == 1:
        return
    seq = cfg.data.seq_len
    require(seq % (2 * c) == 0, f"data.seq_len={seq} cannot be split over parallel.context={c}: the zig-zag split "
            f"cuts every sequence into 2 * context = {2 * c} equal chunks, so data.seq_len must be a multiple of "
            f"{2 * c}.")
    if p.context_attention == "ulysses":
        kv = m.n_kv_heads or m.n_heads
        for key, heads in (("model.n_heads", m.n_heads), ("model.n_kv_heads", kv)):
            local = heads // max(p.tensor, 1)
            require(local % c == 0, f"parallel.context_attention='ulysses' with parallel.context={c} needs the "
                    f"heads on each tensor rank ({key}={heads} / parallel.tensor={p.tensor} = {local}) divisible "
                    f"by {c}. Use parallel.context_attention=ring (any head count) or change {key}.")
    _check_wired(cfg, c)


def _check_wired(cfg: Config, c: int) -> None:
    """What context parallelism is wired with (issue 28): DeepSpeed (ZeRO 0-3), FSDP2, and pipeline stages for the
    causal and masked families (DeepSpeed's pipeline engine; PyTorch's schedules without FSDP2), with tensor and
    sequence parallelism and activation checkpointing; refused with the keys that ask for the rest."""
    p, m = cfg.parallel, cfg.model
    why = f"parallel.context={c}"
    if p.pipeline > 1:
        require(p.engine != "torch" or p.zero_stage < 2, f"{why} with parallel.pipeline={p.pipeline}, "
                f"parallel.engine='torch' (PyTorch's pipeline schedules) and parallel.zero_stage={p.zero_stage} "
                f"(FSDP2 stages) is not wired yet: use parallel.zero_stage=0, parallel.engine=auto (DeepSpeed's "
                f"pipeline engine), parallel.pipeline=1, or parallel.context=1.")
        require(m.family != "seq2seq", f"{why} with parallel.pipeline={p.pipeline} is wired for "
                f"model.family=causal and masked, not model.family='seq2seq' (its stages carry two sequences): use "
                f"parallel.pipeline=1 or parallel.context=1.")
    require(p.engine != "fairscale", f"{why} with parallel.engine='fairscale' is not wired: use parallel.engine=auto "
            f"(DeepSpeed) or torch (FSDP2), or parallel.context=1.")
    attention_dropout = m.dropout if m.attention_dropout is None else m.attention_dropout
    require(attention_dropout == 0, f"{why} runs attention without dropout on the attention weights, but "
            f"model.attention_dropout is {attention_dropout} (null means model.dropout={m.dropout}). Set "
            f"model.attention_dropout=0 (residual and FFN dropout stay), or parallel.context=1.")
