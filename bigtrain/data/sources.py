"""What `data.source` names (`source_kind`), and the source it names opened as units (`open_source`).

Kinds of data.source (`open_source`):

    embedded                   the Python standard library's source (bigtrain.data.embedded), one document per file
    a file or a directory      .txt (one document per file), .jsonl / .json (one per line, the data.text_field
                               string), .parquet (one per row); a directory contributes its files recursively in
                               sorted order (data.format filters them)
    a datasets folder          written by `Dataset.save_to_disk` (dataset_info.json + state.json); a DatasetDict's
                               folder (dataset_dict.json) reads its `train` split, or point at a split's folder
    hf:NAME[:CONFIG][@SPLIT]   `datasets.load_dataset(NAME, CONFIG, split=SPLIT or "train")`, through datasets' own
                               download and cache (HF_HOME / HF_DATASETS_CACHE, HF_DATASETS_OFFLINE)

A folder written by `bigtrain prepare` (its index.json) is read as it is by `bigtrain.data.corpus`.

A source is a list of *units* (`bigtrain.data.source_units`); `bigtrain.data.source_plan` cuts them into shards
of about `shard_bytes` input bytes, and `bigtrain.data.source_reading` reads one shard. Datasets (saved folders and
hf:) are opened by `bigtrain.data.source_datasets`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from bigtrain.config.schema import DataConfig
from bigtrain.data.embedded import stdlib_files, stdlib_root
from bigtrain.data.files import file_identity, resolve_files
from bigtrain.data.source_datasets import hf_source, saved_source
from bigtrain.data.source_units import Source, Unit
from bigtrain.errors import DataError

ALLOWED = ("'embedded' (the Python standard library, no download), a .txt / .jsonl / .parquet file or a directory of "
           "them, a folder written by datasets' save_to_disk, a folder written by `bigtrain prepare`, or "
           "hf:NAME[:CONFIG][@SPLIT] (a Hugging Face hub dataset through datasets' own download and cache)")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def text_corpora(data: DataConfig) -> list[tuple[str, DataConfig]]:
    """(config key, data.* of that one corpus) for data.source, or for each source of a mixture (its source and
    text_field in place of data.source's)."""
    if not data.sources:
        return [("data.source", data)]
    return [(f"data.sources[{i}].source", dataclasses.replace(data, source=s.source, sources=[],
                                                              text_field=s.text_field or data.text_field))
            for i, s in enumerate(data.sources)]


def source_kind(source: str) -> str:
    """embedded | hf | url | prepared | saved | files: what data.source names (without reading it)."""
    if source == "embedded":
        return "embedded"
    if source.startswith("hf:"):
        return "hf"
    if _URL.match(source):
        return "url"
    path = Path(source)
    if path.is_dir():
        if (path / "index.json").is_file():
            return "prepared"
        if (path / "dataset_dict.json").is_file() or (
                (path / "dataset_info.json").is_file() and (path / "state.json").is_file()):
            return "saved"
    return "files"


def open_source(cfg: DataConfig) -> Source:
    """data.source (not a prepared folder) as a Source; DataError naming data.source for what cannot be read."""
    kind = source_kind(cfg.source)
    if kind == "url":
        scheme = _URL.match(cfg.source).group(1)
        raise DataError(
            f"data.source: '{cfg.source}' is an address ({scheme}://) that bigtrain does not read. data.source can "
            f"be {ALLOWED}. Copy the data to a local or shared file system first.")
    if kind == "embedded":
        files = stdlib_files(cfg.max_bytes)
        identity = {"embedded": str(stdlib_root()), "python": sys.version, "files": files}
        units = [Unit("embedded", rel, take, take=take) for rel, take, _ in files]
        return Source("embedded", identity, units, cfg.text_field, cfg.encoding_errors, cfg.cache_dir)
    if kind == "hf":
        return hf_source(cfg)
    if kind == "saved":
        return saved_source(cfg)
    files = resolve_files(cfg.source, cfg.format)
    units = [_file_unit(path, fmt, cfg.text_field) for path, fmt in files]
    identity = {"files": file_identity(files), "text_field": cfg.text_field}
    return Source(cfg.source, identity, units, cfg.text_field, cfg.encoding_errors, cfg.cache_dir)


# --- files --------------------------------------------------------------------------------------------


def _file_unit(path: Path, fmt: str, text_field: str) -> Unit:
    size = path.stat().st_size
    if fmt == "text":
        return Unit("text", str(path), size)
    if fmt == "parquet":
        return _parquet_unit(path, text_field)
    lines = _first_lines(path)
    if not lines:
        return Unit("jsonl", str(path), 0)  # empty: nothing to read
    records: list[Any] = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:  # reported with its offset when the shard is read
            if not records:
                records.append(None)
            break
    if not isinstance(records[0], dict):
        if path.suffix.lower() == ".json":  # a JSON document (an array, or an object over many lines)
            return Unit("json", str(path), size)
        raise DataError(
            f"data.source: '{path}' is not JSON Lines: its first line is not a JSON object ({lines[0][:80]!r}). "
            f"Write one JSON object per line, or set data.format to the file's real format.")
    if not any(isinstance(r, dict) and text_field in r for r in records):
        columns = sorted({key for r in records if isinstance(r, dict) for key in r})
        raise DataError(
            f"data.text_field: '{path}' has no column {text_field!r}; its columns are {columns}. Set "
            f"data.text_field to one of them.")
    return Unit("jsonl", str(path), size)


def _first_lines(path: Path, count: int = 100, limit: int = 1 << 20) -> list[bytes]:
    """The first `count` non-blank lines of a file, within its first `limit` bytes (at least one line)."""
    found: list[bytes] = []
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                found.append(line)
            if len(found) >= count or (found and f.tell() > limit):
                break
    return found


def _parquet_unit(path: Path, text_field: str) -> Unit:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises ArrowInvalid and others for files that are not Parquet
        raise DataError(f"data.source: could not read '{path}' as parquet ({type(exc).__name__}: {exc}). Fix the "
                        f"file, or set data.format to its real format.") from exc
    names = meta.schema.to_arrow_schema().names
    if text_field not in names:
        raise DataError(f"data.text_field: '{path}' has no column {text_field!r}; its columns are {names}. Set "
                        f"data.text_field to one of them.")
    sizes = [max(1, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]
    return Unit("parquet", str(path), sum(sizes), sizes=sizes)
