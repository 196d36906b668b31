"""`bigtrain prepare` (its synopsis: `bigtrain.cli.USAGE`): tokenize the config's data (data.source, or every
source of data.sources) once into sharded token files under data.cache_dir, the folder training reads.
Resumable: a killed run keeps its finished shards and makes only the others. Exit 0 when the data is prepared, 2
on bad input (one paragraph naming the key)."""

from __future__ import annotations

import time

from bigtrain.cli.arguments import CommandParser, finite, path, whole
from bigtrain.cli.report import run_guarded
from bigtrain.cli.train import SMOKE_CONFIG


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_prepare(argv: list[str]) -> int:
    parser = CommandParser(prog="bigtrain prepare", description="Tokenize the config's data once into sharded token "
                           "files with an index (docs/data.md); training reads them.")
    parser.add_argument("--config", type=path, help=f"YAML config file (default: {SMOKE_CONFIG})")
    parser.add_argument("--workers", type=whole, help="worker processes (default: one per CPU, at most one per "
                        "shard)")
    parser.add_argument("--shard-mb", type=finite, help="input megabytes per shard (default: 64 MiB); the shards "
                        "depend on it, never on --workers")
    parser.add_argument("--verify", action="store_true", help="also check every shard against its SHA-256 in the "
                        "index")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse(argv)

    def command() -> int:
        from bigtrain.config import load_config
        from bigtrain.data.corpus import SHARD_BYTES, corpus_folder, prepare_corpus
        from bigtrain.data.seq2seq import TASKS
        from bigtrain.data.sources import text_corpora
        from bigtrain.data.tokenizer import build_tokenizer
        from bigtrain.errors import DataError, UsageError

        if args.workers is not None and args.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {args.workers}.")
        if args.shard_mb is not None and not args.shard_mb > 0:
            raise UsageError(f"--shard-mb must be a positive number of megabytes, got {args.shard_mb}.")
        shard_bytes = int(args.shard_mb * (1 << 20)) if args.shard_mb else SHARD_BYTES
        cfg = load_config(args.config or SMOKE_CONFIG, args.overrides)
        data = cfg.data
        if cfg.model.family == "seq2seq":
            raise DataError(f"model.family: 'seq2seq' reads source/target pairs (data.source='{data.source}') "
                            f"directly; bigtrain prepare tokenizes text corpora for the causal and masked families.")
        if not data.sources and data.source in TASKS:
            raise DataError(f"data.source: '{data.source}' is a generated seq2seq task, not text to prepare.")
        tokenizer = build_tokenizer(data)
        jobs = text_corpora(data)

        def named(key: str, one, error: DataError) -> DataError:
            return error if key == "data.source" else DataError(f"{key}={one.source!r}: {error}")

        for key, one in jobs:  # every source readable before any work
            try:
                corpus_folder(one, tokenizer)
            except DataError as error:
                raise named(key, one, error) from None
        started = time.perf_counter()
        totals = [0, 0, 0, 0]
        for key, one in jobs:
            try:
                done = prepare_corpus(one, tokenizer, workers=args.workers, shard_bytes=shard_bytes,
                                      verify=args.verify)
            except DataError as error:
                raise named(key, one, error) from None
            what = f"built {plural(done.built, 'shard')} in {done.seconds:.1f} s" if done.built else \
                "already prepared"
            print(f"{key} '{done.source}': {done.folder}\n"
                  f"  {done.tokens:,} tokens ({done.dtype}), {done.documents:,} documents, "
                  f"{plural(done.shards, 'shard')}, {done.input_bytes / 1e6:.1f} MB of input; {what}"
                  f"{'; checksums verified' if args.verify else ''}", flush=True)
            totals = [totals[0] + done.tokens, totals[1] + done.documents, totals[2] + done.shards,
                      totals[3] + done.built]
        if len(jobs) > 1:
            print(f"total: {totals[0]:,} tokens, {totals[1]:,} documents, {plural(totals[2], 'shard')} "
                  f"({totals[3]} built) "
                  f"in {time.perf_counter() - started:.1f} s; tokenizer {tokenizer.name}", flush=True)
        return 0

    return run_guarded(command, args.debug)
