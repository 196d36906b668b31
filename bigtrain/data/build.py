"""Build the train and held-out datasets for the configured model family."""

from __future__ import annotations

from torch.utils.data import Dataset

from bigtrain.config.schema import Config
from bigtrain.data.causal import causal_datasets
from bigtrain.data.corpus import load_corpus
from bigtrain.data.masked import masked_datasets
from bigtrain.data.seq2seq import TASKS, seq2seq_datasets
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import DataError


def build_datasets(cfg: Config, tokenizer: Tokenizer) -> tuple[Dataset, Dataset]:
    """(train, held-out) for cfg.model.family; samples are dicts of 1-D int64 tensors.

    Every dataset has `lengths` (tokens per sample, for length bucketing).
    """
    family = cfg.model.family
    if family == "seq2seq":
        return seq2seq_datasets(cfg, tokenizer)
    if cfg.data.source in TASKS:
        raise DataError(
            f"data.source: '{cfg.data.source}' is a generated seq2seq task, but model.family='{family}'. "
            f"Set model.family='seq2seq', or point data.source at text ('embedded' or a file).")
    corpus = load_corpus(cfg.data, tokenizer)
    if family == "causal":
        return causal_datasets(corpus, cfg)
    if family == "masked":
        return masked_datasets(corpus, cfg, tokenizer)
    raise DataError(f"model.family: unknown family '{family}'; expected 'causal', 'masked' or 'seq2seq'.")
