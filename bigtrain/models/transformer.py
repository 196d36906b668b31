"""The three model families, each a plain sequence: embedding -> blocks -> final norm -> head.

That sequence is what pipeline parallelism cuts into stages and what tensor parallelism rewrites linear
by linear; nothing here knows about either.
"""

from __future__ import annotations

import torch
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.models.blocks import Block
from bigtrain.models.embedding import Embedding
from bigtrain.models.layers import Rotary, make_norm


def _final_norm(cfg: ModelConfig) -> nn.Module:
    # Post-norm blocks already end in a norm; pre-norm stacks need one before the head.
    if cfg.norm_position == "pre":
        return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
    return nn.Identity()


def _rotary(cfg: ModelConfig) -> Rotary | None:
    if cfg.positions != "rotary":
        return None
    return Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)


class TransformerLM(nn.Module):
    """Shared parts of the families: embedding, output head (optionally tied to the embedding)."""

    family: str = ""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = Embedding(cfg, vocab_size)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share E between input and output (logits = h Eᵀ); re-run after moving off the meta device."""
        if self.cfg.tie_embeddings:
            self.head.weight = self.embed.tokens.weight

    def stacks(self) -> list[nn.ModuleList]:
        """The block stacks, in the order data flows through them."""
        raise NotImplementedError


class _EncoderOrDecoderLM(TransformerLM):
    """One stack of blocks with self-attention only; `causal` decides the mask."""

    causal: bool = True

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__(cfg, vocab_size)
        rotary = _rotary(cfg)
        self.blocks = nn.ModuleList(Block(cfg, causal=self.causal, cross_attention=False, rotary=rotary)
                                    for _ in range(cfg.n_layers))
        self.final_norm = _final_norm(cfg)

    def stacks(self) -> list[nn.ModuleList]:
        return [self.blocks]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, T]; attention_mask: bool [B, T], True at real tokens -> logits [B, T, vocab]."""
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, padding_mask=attention_mask)
        return self.head(self.final_norm(x))


class CausalLM(_EncoderOrDecoderLM):
    """Decoder-only language model (GPT): logits[t] predict token t + 1 from tokens ≤ t."""

    family, causal = "causal", True


class MaskedLM(_EncoderOrDecoderLM):
    """Encoder-only masked language model (BERT): bidirectional blocks, logits at every position."""

    family, causal = "masked", False


class Seq2SeqLM(TransformerLM):
    """Encoder-decoder (the original Transformer / T5): the decoder attends causally to itself and fully
    to the encoder output. One embedding serves encoder, decoder and (tied) head."""

    family = "seq2seq"

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__(cfg, vocab_size)
        rotary = _rotary(cfg)
        n_dec = cfg.n_decoder_layers or cfg.n_layers
        self.encoder_blocks = nn.ModuleList(Block(cfg, causal=False, cross_attention=False, rotary=rotary)
                                            for _ in range(cfg.n_layers))
        self.encoder_norm = _final_norm(cfg)
        self.decoder_blocks = nn.ModuleList(Block(cfg, causal=True, cross_attention=True, rotary=rotary)
                                            for _ in range(n_dec))
        self.final_norm = _final_norm(cfg)

    def stacks(self) -> list[nn.ModuleList]:
        return [self.encoder_blocks, self.decoder_blocks]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.encoder_blocks:
            x = block(x, padding_mask=attention_mask)
        return self.encoder_norm(x)

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
               attention_mask: torch.Tensor | None = None,
               decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.embed(decoder_input_ids)
        for block in self.decoder_blocks:
            y = block(y, padding_mask=decoder_attention_mask, memory=memory, memory_padding_mask=attention_mask)
        return self.head(self.final_norm(y))

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)


MODEL_CLASSES: dict[str, type[TransformerLM]] = {
    "causal": CausalLM, "masked": MaskedLM, "seq2seq": Seq2SeqLM,
}
