"""Reading one shard of a source (`read_shard`): its documents in order, each with the input bytes it took.

Reading streams: one line, one record batch or 1024 rows at a time. The bytes reported add up to about the shard's
input bytes, which drive the progress of a build: a JSONL line counts its length, a text or embedded file its
size, a Parquet row of a row group of b bytes and R rows b / R, a dataset row of a unit of n bytes and R rows n / R
(reported as the growth of int(running total)).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bigtrain.data.embedded import stdlib_root
from bigtrain.data.files import _REPLACED, not_utf8, read_text
from bigtrain.data.source_datasets import open_dataset
from bigtrain.data.source_units import Source, Unit
from bigtrain.errors import DataError

_ROWS = 1024  # rows per batch read from Parquet files and datasets


def read_shard(source: Source, spec: dict[str, Any]) -> Iterator[tuple[str | None, int]]:
    """(document or None, input bytes consumed since the last item) for every record of the shard, in order;
    None (or "") for records without text, which are skipped."""
    for index, start, end in spec["pieces"]:
        unit = source.units[index]
        if unit.kind == "embedded":
            with open(stdlib_root() / unit.path, "rb") as f:
                yield f.read(unit.take).decode("utf-8", errors="replace"), unit.nbytes
        elif unit.kind == "text":
            yield read_text(Path(unit.path), source.encoding_errors), unit.nbytes
        elif unit.kind == "jsonl":
            yield from _jsonl_range(Path(unit.path), start, end, source.text_field, source.encoding_errors)
        elif unit.kind == "json":
            yield from _json_document(source, unit)
        elif unit.kind == "parquet":
            yield from _parquet_groups(source, unit, start, end)
        elif unit.kind == "dataset":
            yield from _dataset_rows(source, unit, start, end)
        else:
            raise AssertionError(f"unknown unit kind {unit.kind}")


def _text_of(record: Any, text_field: str) -> str | None:
    if isinstance(record, dict):
        text = record.get(text_field)
        if isinstance(text, str):
            return text
    return None


def _jsonl_range(path: Path, start: int, end: int, text_field: str,
                 encoding_errors: str) -> Iterator[tuple[str | None, int]]:
    """The lines of `path` that start at a byte offset in [start, end)."""
    replaced = 0
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of the line that began before `start` (just its newline if one ends there)
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                break
            at, pos = pos, pos + len(line)
            if not line.strip():
                yield None, len(line)
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError as exc:
                if encoding_errors != "replace":
                    raise not_utf8(path, line, exc, at) from exc
                _REPLACED.count = 0
                text = line.decode("utf-8", errors="bigtrain.count_replace")
                replaced += _REPLACED.count
                record = _loads(text, path, at)
            except ValueError as exc:
                raise DataError(f"data.source: '{path}' holds a line that is not JSON at byte offset {at} ({exc}). "
                                f"Fix the line, or remove it.") from exc
            yield _text_of(record, text_field), len(line)
    if replaced:
        print(f"bigtrain: warning: data.source: '{path}' had {replaced} undecodable bytes in bytes {start}-{end}, "
              f"replaced by U+FFFD (data.encoding_errors=replace)", file=sys.stderr, flush=True)


def _loads(text: str, path: Path, at: int) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DataError(f"data.source: '{path}' holds a line that is not JSON at byte offset {at} ({exc}). Fix the "
                        f"line, or remove it.") from exc


def _json_document(source: Source, unit: Unit) -> Iterator[tuple[str | None, int]]:
    """A .json file that is not JSON Lines (one array, or an object over many lines), read whole by datasets."""
    from bigtrain.data.files import read_rows

    first = True
    for rows in read_rows(Path(unit.path), "jsonl", [source.text_field], "data.text_field", source.cache_dir):
        for text in rows[source.text_field]:
            yield (text if isinstance(text, str) else None), (unit.nbytes if first else 0)
            first = False


def _parquet_groups(source: Source, unit: Unit, start: int, end: int) -> Iterator[tuple[str | None, int]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(unit.path)
        for group in range(start, end):
            n_rows = parquet.metadata.row_group(group).num_rows
            per_row = unit.sizes[group] / max(1, n_rows)
            done = 0.0
            for batch in parquet.iter_batches(batch_size=_ROWS, row_groups=[group], columns=[source.text_field]):
                texts = batch.column(0).to_pylist()
                for text in texts:
                    before, done = done, done + per_row
                    yield (text if isinstance(text, str) else None), int(done) - int(before)
    except OSError:
        raise
    except Exception as exc:  # pyarrow's errors for damaged files
        raise DataError(f"data.source: could not read '{unit.path}' as parquet ({type(exc).__name__}: {exc}). Fix "
                        f"the file, or set data.format to its real format.") from exc


def _dataset_rows(source: Source, unit: Unit, start: int, end: int) -> Iterator[tuple[str | None, int]]:
    ds = open_dataset(source, unit).select_columns([source.text_field]).with_format("arrow")
    per_row = unit.nbytes / max(1, unit.rows)
    done = start * per_row
    for first in range(start, end, _ROWS):
        texts = ds[first:min(first + _ROWS, end)].column(0).to_pylist()
        for text in texts:
            before, done = done, done + per_row
            yield (text if isinstance(text, str) else None), int(done) - int(before)
