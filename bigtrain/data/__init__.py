"""Data: tokenizers, cached tokenized corpora, per-family datasets, layout-independent batch order."""

from bigtrain.data.build import build_datasets
from bigtrain.data.collate import collate
from bigtrain.data.sampler import GlobalBatchSampler, eval_batch_indices
from bigtrain.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "GlobalBatchSampler",
    "HFTokenizer",
    "Tokenizer",
    "build_datasets",
    "build_tokenizer",
    "collate",
    "eval_batch_indices",
]
