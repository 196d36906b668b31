"""Transformer models. No distributed code: parallelism is applied to these modules from outside."""

from bigtrain.models.build import build_model, count_parameters, materialize, resolve_vocab_size
from bigtrain.models.transformer import MODEL_CLASSES, CausalLM, MaskedLM, Seq2SeqLM, TransformerLM

__all__ = ["MODEL_CLASSES", "CausalLM", "MaskedLM", "Seq2SeqLM", "TransformerLM", "build_model",
           "count_parameters", "materialize", "resolve_vocab_size"]
