"""Build the train and held-out datasets for the configured model family (one text source, or a mixture of
them: `bigtrain.data.mixture`)."""

from __future__ import annotations

from torch.utils.data import Dataset

from bigtrain.config.data_checks import source_name
from bigtrain.config.schema import Config
from bigtrain.data.causal import causal_datasets
from bigtrain.data.corpus import TokenCorpus, load_corpus
from bigtrain.data.masked import masked_datasets
from bigtrain.data.mixture import Concatenation, Mixture
from bigtrain.data.seq2seq import TASKS, seq2seq_datasets
from bigtrain.data.sources import text_corpora
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import DataError


def build_datasets(cfg: Config, tokenizer: Tokenizer, verify: bool = False) -> tuple[Dataset, Dataset]:
    """(train, held-out) for cfg.model.family; samples are dicts of 1-D int64 tensors. With `verify`, prepared
    shards are checked against their SHA-256 first (data.verify_shards).

    Every dataset has `lengths` (tokens per sample, for length bucketing).
    """
    family = cfg.model.family
    if family == "seq2seq":
        return seq2seq_datasets(cfg, tokenizer)
    if cfg.data.source in TASKS:
        raise DataError(
            f"data.source: '{cfg.data.source}' is a generated seq2seq task, but model.family='{family}'. "
            f"Set model.family='seq2seq', or point data.source at text ('embedded' or a file).")
    if family not in ("causal", "masked"):
        raise DataError(f"model.family: unknown family '{family}'; expected 'causal', 'masked' or 'seq2seq'.")
    if cfg.data.sources:
        return mixture_datasets(cfg, tokenizer, verify)
    return text_datasets(load_corpus(cfg.data, tokenizer, verify=verify), cfg, tokenizer)


def text_datasets(corpus: TokenCorpus, cfg: Config, tokenizer: Tokenizer) -> tuple[Dataset, Dataset]:
    if cfg.model.family == "causal":
        return causal_datasets(corpus, cfg)
    return masked_datasets(corpus, cfg, tokenizer)


def mixture_datasets(cfg: Config, tokenizer: Tokenizer, verify: bool = False) -> tuple[Mixture, Concatenation]:
    """Each source's own (train, held-out) split; training draws from them by weight, evaluation reads every
    source's held-out samples."""
    trains, helds = [], []
    for key, one in text_corpora(cfg.data):
        try:
            corpus = load_corpus(one, tokenizer, verify=verify)
        except DataError as error:  # its message names data.source: say which source of the mixture
            raise DataError(f"{key}={one.source!r}: {error}") from None
        train, held = text_datasets(corpus, cfg, tokenizer)
        trains.append(train)
        helds.append(held)
    names = [source_name(s.name, s.source) for s in cfg.data.sources]
    weights = [s.weight for s in cfg.data.sources]
    return Mixture(trains, weights, names, cfg.train.seed), Concatenation(helds, names)
