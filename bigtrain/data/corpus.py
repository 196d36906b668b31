"""Tokenize a corpus once into sharded token files under `data.cache_dir` (`bigtrain prepare`, or the first
training run), then read them.

A prepared folder, `<data.cache_dir>/tokens/<key>.<dtype>/`, holds

    shard_NNNNN.bin         the shard's documents' ids, each document followed by eos (uint16 when the vocabulary
                            fits, else uint32), concatenated
    shard_NNNNN.docs.npy    each document's exclusive end offset within the shard (int64, eos included)
    shard_NNNNN.json        what the shard was made from (its pieces of the input), its token and document counts
                            and the SHA-256 of its .bin: written last, so its presence marks a finished shard
    index.json              written last of all: format and version, the tokenizer (name, which hashes a
                            tokenizer.json's bytes, and vocabulary size), the id dtype, the source and its identity,
                            the settings in the key, and every shard with its counts and SHA-256

The concatenated shards are exactly the corpus an unsharded cache held: every non-empty document of data.source in
order, each followed by eos. Shard k covers a fixed piece of the input (`bigtrain.data.source_plan.plan_shards`:
about `SHARD_BYTES` of input, cut at line, row-group or row boundaries), tokenized on its own, so the shards are
byte-identical whatever the number of worker processes, and a killed build resumes: finished shards (their .json
present and matching the plan) are kept, the others are made again. The key covers the source's identity (paths,
sizes, mtimes; a dataset's fingerprint), the tokenizer, `data.encoding_errors` and (for the embedded corpus)
`data.max_bytes`, so a changed corpus or setting gets a new folder.

One process builds a folder at a time: the builder holds an exclusive lock on `<key>.<dtype>.lock` beside it;
another process that needs the folder waits for it (saying so), then finds it finished. In a training job, global
rank 0 prepares the data while the other ranks wait at a barrier; a rank that then finds nothing (its
data.cache_dir is on a node-local disk) prepares it for its node, the lock letting one process per node build and
the others of the node wait. `docs/data.md` has the rules.

Files are written to temporary names and renamed into place, so a crash never leaves a truncated file, and
concurrent writers produce identical files. Temporary names carry the writer's host and pid
(`<final name>.<host>.<pid>.<random>.tmp`); leftovers of a killed writer on this host are removed before the next
build, never those of a live one. A failed write (disk full, read-only or unwritable cache) stops the run with the
path and sizes, leaving no partial file (and no folder, when no shard was finished).

The jobs live in modules of their own: `bigtrain.data.corpus_build` (a folder built under its lock,
`bigtrain.data.build_lock`), `bigtrain.data.shard_workers` (the worker processes), `bigtrain.data.shard_build` (one
shard tokenized), `bigtrain.data.build_progress` (MB/s, ETA), `bigtrain.data.cache_writes` (temporary files,
write errors) and `bigtrain.data.shard_checksums` (the shards against their SHA-256, before training); this one keeps
the entry points.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bigtrain.config.schema import Config, DataConfig
from bigtrain.data.corpus_build import Prepared, build_corpus, summarize
from bigtrain.data.shard_checksums import verify_shards
from bigtrain.data.shards import (
    FORMAT_VERSION,
    INDEX,
    TokenCorpus,
    files_present,
    open_prepared,
    read_index,
    shard_files,
    token_dtype,
)
from bigtrain.data.source_units import Source
from bigtrain.data.sources import open_source, source_kind, text_corpora
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import DataError

__all__ = ["SHARD_BYTES", "Prepared", "TokenCorpus", "data_ready", "load_corpus", "prepare_corpus", "token_dtype"]

SHARD_BYTES = 64 << 20  # input bytes per shard


# --- where a source's shards are -----------------------------------------------------------------------


def corpus_folder(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[Path, Source | None]:
    """(the prepared folder of data.source, its Source); the Source is None for a folder given as data.source."""
    if source_kind(cfg.source) == "prepared":
        return Path(cfg.source), None
    source = open_source(cfg)
    settings = {"encoding_errors": cfg.encoding_errors}
    if cfg.source == "embedded":
        settings["max_bytes"] = cfg.max_bytes  # caps the embedded corpus only
    key_src = json.dumps({"v": FORMAT_VERSION, "source": source.identity, "tokenizer": tokenizer.name, **settings},
                         sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    dtype = token_dtype(tokenizer.vocab_size)
    return Path(cfg.cache_dir) / "tokens" / f"{key}.{dtype.name}", source


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer, *, workers: int | None = None,
                verify: bool = False) -> TokenCorpus:
    """The prepared corpus of data.source, prepared first (with `workers` processes; default: one per CPU, at most
    one per shard) if it is missing or incomplete. With `verify`, shards found prepared are compared with their
    SHA-256 as data.verify_shards says (`bigtrain.data.shard_checksums`; a sampled or full check is stated on the
    console); shards this call built were hashed as they were written."""
    folder, source = corpus_folder(cfg, tokenizer)
    if source is None:
        corpus = _open_given(folder, tokenizer, cfg.tokenizer)
    else:
        corpus = _open_complete(folder, tokenizer, cfg.tokenizer)
        if corpus is None:
            build_corpus(folder, source, tokenizer, cfg, workers, SHARD_BYTES)
            corpus = _open_complete(folder, tokenizer, cfg.tokenizer)
            assert corpus is not None
            corpus.from_cache = False
            return corpus
    if verify:
        index = read_index(folder)
        assert index is not None
        checked = verify_shards(folder, index, cfg.verify_shards, rebuildable=source is not None)
        if checked.sampled or cfg.verify_shards == "all":
            print(f"bigtrain: {checked.describe()}", flush=True)
    return corpus


def prepare_corpus(cfg: DataConfig, tokenizer: Tokenizer, workers: int | None = None,
                   shard_bytes: int = SHARD_BYTES, verify: bool = False) -> Prepared:
    """Tokenize data.source into its prepared folder (only the shards missing there); with `verify`, check every
    shard's SHA-256 against the index as well."""
    folder, source = corpus_folder(cfg, tokenizer)
    if source is None:
        _open_given(folder, tokenizer, cfg.tokenizer)
        index = read_index(folder)
        assert index is not None
        result = summarize(folder, index, built=0, seconds=0.0)
    else:
        index = read_index(folder)
        if index is not None and files_present(folder, index):
            open_prepared(folder, index, tokenizer, cfg.tokenizer, rebuildable=True)
            result = summarize(folder, index, built=0, seconds=0.0)
        else:
            result = build_corpus(folder, source, tokenizer, cfg, workers, shard_bytes)
            index = read_index(folder)
            assert index is not None
    if verify:
        verify_shards(folder, index, "all", rebuildable=source is not None)
    return result


def data_ready(cfg: Config, tokenizer: Tokenizer) -> bool:
    """Whether every text corpus of the run (data.source, or each of data.sources) is prepared already: the
    other ranks of a job say that they wait for rank 0 only when it is not."""
    if cfg.model.family == "seq2seq":
        return True
    data = cfg.data
    for _, one in text_corpora(data):
        if source_kind(one.source) == "hf":
            return False  # knowing would mean loading the dataset (rank 0 downloads it meanwhile)
        try:
            folder, _ = corpus_folder(one, tokenizer)
            index = read_index(folder)
            if index is None or not files_present(folder, index):
                return False
        except DataError:
            return False  # reported when the data is loaded
    return True


def _open_given(folder: Path, tokenizer: Tokenizer, setting: str) -> TokenCorpus:
    """A folder given as data.source: complete, or a DataError (it cannot be rebuilt without its source)."""
    index = read_index(folder)
    assert index is not None
    missing = [str(b if not b.is_file() else d) for b, d in shard_files(folder, index)
               if not (b.is_file() and d.is_file())]
    if missing:
        raise DataError(f"data.source: the prepared folder '{folder}' lacks {len(missing)} of the shard files its "
                        f"{INDEX} lists (first: '{missing[0]}'). Copy the folder again from where it was prepared, "
                        f"or prepare its source ('{index.get('source')}') again (bigtrain prepare --config FILE).")
    return open_prepared(folder, index, tokenizer, setting, rebuildable=False)


def _open_complete(folder: Path, tokenizer: Tokenizer, setting: str) -> TokenCorpus | None:
    """The cached corpus; None when its index or a shard file is missing (then it is built)."""
    index = read_index(folder)
    if index is None or not files_present(folder, index):
        return None
    return open_prepared(folder, index, tokenizer, setting, rebuildable=True)
