"""Fingerprints of tensors that add up across the pieces a layout cuts them into (`bigtrain parity --locate`).

A fingerprint is six float64 numbers of a tensor x, in this order:

    n       the number of values
    sum     Σ x
    sumsq   Σ x²                    (the norm is its square root)
    abssum  Σ |x|
    pos     Σ w(position) · x       a positional checksum: w = sin(0.5 + Σ_k c_k · i_k) of the value's index
                                    (i_0, i_1, ...) in the whole tensor, c_k fixed irrational steps, so two
                                    tensors with the same values in other places differ in it
    pos2    the same with w² - 1/2 (a second, independent checksum)

Every entry is a sum over the values, so the fingerprint of a whole tensor is the sum of the fingerprints of
disjoint pieces of it, each computed with its values' positions in the whole tensor: the layout's shards are never
gathered. For parameters the position comes from the piece's box (`bigtrain.checkpoint.state`); for activations
(`activation_prints`) the two last dimensions are the positions that count (sequence and feature), given once
with this rank's offset along the last dimension (a tensor-parallel cut of features), once along the one before
(a sequence-parallel cut), once without (a tensor that every tensor rank holds whole, or one cut along a leading
dimension, such as attention heads in [batch, heads, seq, head_dim]).

Under context parallelism (C ranks of a context group, `bigtrain.parallel.context.sharding`) the dimension before
the last holds this context rank's zig-zag share of the sequence: chunks c and 2C-1-c of 2C. The three prints are
given again ("ctx:whole", "ctx:last", "ctx:seq") with each local sequence index s replaced by the token's position
in the whole sequence,

    ctx:whole, ctx:last     g_c(s)          = global_positions(C · L, C, c)[s]         (L the local length)
    ctx:seq                 g_c(t · L + s)  over C · T · L tokens                      (sequence parallelism cuts
                                                                                        the context share again:
                                                                                        tensor rank t holds rows
                                                                                        [t · L, (t + 1) · L) of it)

so that the context ranks' prints add up to the whole sequence's, and two chunks in each other's place differ.
"""

from __future__ import annotations

import torch

from bigtrain.parallel.context.sharding import global_positions

STEPS = (0.6180339887, 0.4142135624, 0.7320508076, 0.2360679775, 0.3166247904, 0.6457513111)
FIELDS = ("n", "sum", "sumsq", "abssum", "pos", "pos2")


def _weighted(x: torch.Tensor, phase: torch.Tensor) -> list[float]:
    w = torch.sin(phase)
    return [float((x * w).sum()), float((x * (w * w - 0.5)).sum())]


def _basic(x: torch.Tensor) -> list[float]:
    return [float(x.numel()), float(x.sum()), float((x * x).sum()), float(x.abs().sum())]


@torch.no_grad()
def piece_print(values: torch.Tensor, box: tuple[tuple[int, int], ...], start: int, stop: int) -> list[float]:
    """The fingerprint of a flat piece `values` = [start, stop) of the row-major box `box` of a whole tensor."""
    x = values.detach().reshape(-1).double().cpu()
    index = torch.arange(start, stop, dtype=torch.int64)
    phase = torch.full(index.shape, 0.5, dtype=torch.float64)
    for k in reversed(range(len(box))):
        low, high = box[k]
        size = high - low
        phase += STEPS[k % len(STEPS)] * (index % size + low).double()
        index = index // size
    return _basic(x) + _weighted(x, phase)


@torch.no_grad()
def activation_prints(t: torch.Tensor, tensor_rank: int, tensor_size: int = 1, context_rank: int = 0,
                      context_size: int = 1) -> dict[str, list[float]]:
    """{"whole": print, "last": print, "seq": print}: positions as held, offset by this tensor rank's share along
    the last dimension, along the one before it; with `context_size` > 1 also "ctx:whole", "ctx:last" and
    "ctx:seq", the same with the sequence positions of this context rank's zig-zag share (module docstring; left
    out where the local length cannot be such a share)."""
    x = t.detach().double().cpu()
    if x.dim() == 0:
        x = x.reshape(1)
    if x.dim() == 1:
        x = x.reshape(1, -1)
    seq, width = x.shape[-2], x.shape[-1]
    rows = torch.arange(seq, dtype=torch.int64)
    kinds = {"whole": (0, rows), "last": (tensor_rank * width, rows), "seq": (0, rows + tensor_rank * seq)}
    if context_size > 1 and (seq * context_size) % (2 * context_size) == 0:
        share = global_positions(seq * context_size, context_size, context_rank)
        kinds.update({"ctx:whole": (0, share), "ctx:last": (tensor_rank * width, share)})
    if context_size > 1 and (seq * context_size * tensor_size) % (2 * context_size) == 0:
        share = global_positions(seq * context_size * tensor_size, context_size, context_rank)
        kinds["ctx:seq"] = (0, share[rows + tensor_rank * seq])
    j = torch.arange(width, dtype=torch.float64)
    basic = _basic(x)
    out = {}
    for kind, (dj, positions) in kinds.items():
        phase = 0.5 + STEPS[0] * (j + dj) + STEPS[1] * positions.double().unsqueeze(-1)
        out[kind] = basic + _weighted(x, phase)
    return out


def add(a: list[float], b: list[float]) -> list[float]:
    return [x + y for x, y in zip(a, b, strict=True)]


def scaled(a: list[float], c: float) -> list[float]:
    """The fingerprint of c · x: linear entries times c, Σ x² times c², Σ |x| times |c|."""
    n, s, sq, ab, p, p2 = a
    return [n, s * c, sq * c * c, ab * abs(c), p * c, p2 * c]


def difference(ref: list[float], got: list[float]) -> float:
    """How far `got` is from `ref`, relative to the size of `ref`'s values: the largest of |Δsum|, |Δ Σ|x||, |Δpos|
    and |Δpos2| over Σ|x|, and |Δ‖x‖| over ‖x‖ (an absolute difference where the reference is 0); infinite when the
    counts differ."""
    if ref[0] != got[0]:
        return float("inf")
    _, s, sq, ab, p, p2 = ref
    _, gs, gsq, gab, gp, gp2 = got
    scale = ab if ab > 0 else 1.0
    norm, gnorm = max(sq, 0.0) ** 0.5, max(gsq, 0.0) ** 0.5
    return max(abs(gs - s) / scale, abs(gab - ab) / scale, abs(gp - p) / scale, abs(gp2 - p2) / scale,
               abs(gnorm - norm) / (norm if norm > 0 else 1.0))
