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
    """Refuse a context-parallel config that cannot be split, naming the keys; and, until the training engines
    are wired (issue 28), refuse parallel.context > 1 for training with a clear message."""
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
    require(False, f"parallel.context={c} is accepted by the config but not yet wired into the layout, model and "
            f"engines (issue 28, items 1-2). Set parallel.context=1; the ring and Ulysses attention exist as a "
            f"library in bigtrain.parallel.context.")
