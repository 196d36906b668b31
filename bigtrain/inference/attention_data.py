"""The attention maps of one input, grouped for drawing: one `AttentionGrid` per kind of attention.

    causal / masked   self      blocks.i.self_attn              queries and keys: the input tokens
    seq2seq           encoder   encoder_blocks.i.self_attn      the source tokens
                      decoder   decoder_blocks.i.self_attn      the decoder input tokens
                      cross     decoder_blocks.i.cross_attn     queries: decoder input, keys: source

The weights are the attention probabilities of the first sample (softmax rows, masks and position bias
included): [layers, heads, query, key].
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bigtrain.compat.fairscale import clean_name
from bigtrain.data import Tokenizer
from bigtrain.models.inspect import attention_maps

# kind -> (stack, attention module) for each family
KINDS: dict[str, dict[str, tuple[str, str]]] = {
    "causal": {"self": ("blocks", "self_attn")},
    "masked": {"self": ("blocks", "self_attn")},
    "seq2seq": {"encoder": ("encoder_blocks", "self_attn"), "decoder": ("decoder_blocks", "self_attn"),
                "cross": ("decoder_blocks", "cross_attn")},
}
_NAME = re.compile(r"^(?P<stack>\w+)\.(?P<layer>\d+)\.(?P<attn>self_attn|cross_attn)$")
_SPECIAL_NAMES = ("pad", "eos", "mask", "bos")
MAX_LABEL = 10  # characters of a token label before it is cut


@dataclass
class AttentionGrid:
    """One kind of attention: weights [len(layers), len(heads), query, key] with the tokens' labels."""

    kind: str
    layers: list[int]
    heads: list[int]
    weights: np.ndarray
    queries: list[str]
    keys: list[str]

    def select(self, layers: list[int] | None, heads: list[int] | None) -> AttentionGrid:
        """The grid restricted to some layers and heads (indices into the model's, all when None)."""
        layers = self.layers if layers is None else layers
        heads = self.heads if heads is None else heads
        rows = [self.layers.index(i) for i in layers]
        cols = [self.heads.index(h) for h in heads]
        return AttentionGrid(self.kind, list(layers), list(heads), self.weights[rows][:, cols], self.queries,
                             self.keys)


def record(model: nn.Module, inputs: dict[str, torch.Tensor],
           autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
           ) -> dict[str, torch.Tensor]:
    """{module name: weights [batch, heads, query, key]} of one forward of `model` on `inputs`, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with attention_maps(model) as maps, torch.no_grad(), autocast():
            model(**inputs)
    finally:
        model.train(was_training)
    return maps


def group(maps: dict[str, torch.Tensor], family: str, labels: dict[str, list[str]]) -> list[AttentionGrid]:
    """The grids of the first sample, one per kind of `family`, in the order of `KINDS`. `labels` holds the
    token labels of 'input' (causal, masked, seq2seq source) and, for seq2seq, 'target' (decoder input)."""
    found: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, weights in maps.items():
        match = _NAME.match(clean_name(name))  # the unwrapped model's name (FSDP inserts its wrappers)
        if match:
            found.setdefault((match["stack"], match["attn"]), {})[int(match["layer"])] = weights[0]
    source, target = labels["input"], labels.get("target", [])
    sides = {"self": (source, source), "encoder": (source, source), "decoder": (target, target),
             "cross": (target, source)}
    grids = []
    for kind, key in KINDS[family].items():
        layers = found.get(key, {})
        if not layers:
            continue
        order = sorted(layers)
        weights = torch.stack([layers[i] for i in order]).float().cpu().numpy()
        queries, keys = sides[kind]
        grids.append(AttentionGrid(kind, order, list(range(weights.shape[1])), weights, queries, keys))
    return grids


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """A short printable label per token id: each id decoded alone, whitespace and control characters escaped
    (a space shows as ␣), special tokens as <bos>, <eos>, ..., a piece that is no text alone as its byte (\\xe2,
    byte tokenizer) or its id (#1234)."""
    specials = {getattr(tokenizer, f"{name}_id"): f"<{name}>" for name in _SPECIAL_NAMES}
    byte_ids = tokenizer.name == "byte"
    return [specials.get(int(i)) or _printable(tokenizer.decode([int(i)]), int(i), byte_ids) for i in ids]


def _printable(text: str, token_id: int, byte_ids: bool) -> str:
    if not text or "\ufffd" in text:
        return f"\\x{token_id:02x}" if byte_ids else f"#{token_id}"
    shown = "".join("␣" if ch == " " else ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                    for ch in text)
    return shown if len(shown) <= MAX_LABEL else shown[:MAX_LABEL - 1] + "…"
