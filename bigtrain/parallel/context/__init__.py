"""Context parallelism: each rank of a context group holds 1/C of every sequence (`sharding`: the zig-zag
split and global positions) and attention stays exact over the whole sequence, by ring attention (`ring`:
K/V blocks passed around the group with point-to-point sends, `exchange`, merged by the log-sum-exp rule) or
by DeepSpeed-Ulysses (`ulysses`: all-to-all from a sequence split to a head split and back). Both build their
masks from global positions, documents and padding (`tokens`)."""

from bigtrain.parallel.context.ring import ring_attention
from bigtrain.parallel.context.sharding import (
    check_context_split,
    global_positions,
    shard_sequence,
    unshard_sequence,
)
from bigtrain.parallel.context.tokens import Tokens, gather_tokens
from bigtrain.parallel.context.ulysses import check_ulysses_heads, ulysses_attention

__all__ = ["Tokens", "check_context_split", "check_ulysses_heads", "gather_tokens", "global_positions",
           "ring_attention", "shard_sequence", "ulysses_attention", "unshard_sequence"]
