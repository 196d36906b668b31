"""The planner's terms for mixture-of-experts blocks (`model.moe`, docs/expert_parallel.md): parameters per rank
under expert parallelism, what an MoE feed-forward saves for backward, and the bytes of its all-to-alls.

E routed experts of width f_e per MoE block, a token visits K = top_k of them, S shared experts, EP ranks per
expert group (`parallel.expert`), T tensor ranks (each expert splits like the dense FFN), D data ranks.

Parameters of one rank (a pipeline layer's `routed` experts, `routed_split` of them cut by a tensor split):

    routed   (routed_split / T + routed − routed_split) / EP      each rank of an expert group holds E/EP experts
    dense    everything else, as without experts (router and shared experts included)

The routed experts' gradients are summed over the expert-data group (D / EP ranks holding the same experts), so
ZeRO / FSDP would partition their state over D / EP ranks, the dense state over D.

Saved activations of an MoE feed-forward per token of a micro-batch (in place of the dense FFN's e·h input and
e·f/T·(1 | 2 | 4) hidden values; e bytes per activation element, n = tokens of this rank's micro-batch):

    a          assignments per token: K dropless; with a capacity factor cf > 0 at most
               min(K, E·C/n), C = ceil(cf·n·K/E) the capacity of each expert (`bigtrain.models.moe.capacity`)
    input      e·h: the FFN's input, read by the router and the shared experts (under autocast each keeps its
               own 16-bit cast: 1 + S·(1, or 2 for SwiGLU's gate and up) copies)
    router     8·E + 13·K + 8: its fp32 logits (kept by the z-loss's log-sum-exp) and probabilities (kept by the
               softmax), 4·E each; the top-k indices (8·K), values (4·K) and kept mask (K); their sum and the
               log-sum-exp (4 + 4)
    shared     S · e·f_e/T·(1 | 2 | 4)
    routed     a · (e·h·c_in + e·f_e/T·(1 | 2 | 4) + e·h + r·h + 4 + 16): each assignment's gathered row (the
               expert's input; c_in = 2 casts for SwiGLU under autocast, else 1), the expert's hidden values,
               its output (kept by the router weighting), the weighted output (kept by the sum over a token's
               experts, in the residual stream's r bytes), the weight (fp32) and the token and choice indices
               (int64); under expert parallelism the rows a rank's experts receive, the load assumed balanced
               (each rank receives as many rows as it sends; an unbalanced step receives more)
    dropout    1-byte masks f_e/T per expert applied (+ e·f_e/T for ReLU), as in the dense FFN

All-to-all under expert parallelism, per MoE block and micro-batch: dispatch and combine forward, and both again
in backward (their gradients), each moving the rank's n·a rows of h values but the (EP − 1)/EP that cross:

    all_to_all = 4 · n·a·h·e·(EP − 1)/EP bytes       (6 · … when full recomputation reruns the forward)
"""

from __future__ import annotations

from bigtrain.models.moe import capacity
from bigtrain.planning.shape import ModelShape, PipelineLayer

FFN_SAVED = {"relu": 1, "gelu": 2, "gelu_tanh": 2, "swiglu": 4}  # hidden values an FFN saves, in units of f
ROUTER_INDEX_BYTES = 16  # per assignment: its token and choice (int64 each)
ROUTER_WEIGHT_BYTES = 4  # per assignment: its fp32 router weight, kept by the weighting


def layer_rank_parameters(x: PipelineLayer, tensor: int, expert: int) -> tuple[int, int]:
    """(dense, routed) parameters one rank holds of layer `x` (module docstring)."""
    routed = (x.routed_split // tensor + x.routed - x.routed_split) // expert
    dense_split = x.split - x.routed_split
    return dense_split // tensor + (x.params - x.routed - dense_split), routed


def assignments_per_token(shape: ModelShape, tokens: float) -> float:
    """a: the expert assignments each token of an n-token micro-batch gets, K dropless, at most E·C/n under a
    capacity factor."""
    limit = capacity(round(tokens), shape.top_k, shape.experts, shape.capacity_factor)
    if limit is None or tokens <= 0:
        return float(shape.top_k)
    return min(float(shape.top_k), shape.experts * limit / tokens)


def moe_ffn_bytes_per_token(shape: ModelShape, tokens: float, e: int, r: int, tensor: int, autocast: bool,
                            mask_bytes: int) -> float:
    """Bytes an MoE feed-forward saves per token of an n-token micro-batch (module docstring); e bytes per
    activation, r per element of the residual stream."""
    saved = FFN_SAVED[shape.activation]
    h, f = shape.d_model, shape.expert_d_ff / tensor
    swiglu = shape.activation == "swiglu"
    casts_in = 2 if swiglu and autocast else 1
    ffn_in = e * h * (1 + shape.shared_experts * casts_in if autocast else 1)
    router = 8 * shape.experts + 13 * shape.top_k + 8
    per_ffn = e * f * saved
    if shape.dropout > 0:
        per_ffn += mask_bytes * f + (e * f if shape.activation == "relu" else 0)
    per_assignment = e * h * casts_in + per_ffn + (e + r) * h + ROUTER_WEIGHT_BYTES + ROUTER_INDEX_BYTES
    return ffn_in + router + shape.shared_experts * per_ffn + assignments_per_token(shape, tokens) * per_assignment


def all_to_all_bytes(shape: ModelShape, tokens: float, e: int, expert: int, recompute: bool) -> float:
    """Bytes one rank sends across its expert group per MoE block and micro-batch: (4, or 6 with full
    recomputation) all-to-alls of n·a rows of h values, (EP − 1)/EP of them to other ranks."""
    if expert == 1 or shape.experts == 0:
        return 0.0
    passes = 6 if recompute else 4
    return passes * tokens * assignments_per_token(shape, tokens) * shape.d_model * e * (expert - 1) / expert
