"""What `data.source` names, read as a stream of documents, cut into shard-sized pieces.

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

A source is a list of *units* (a file, or a whole dataset) with their input bytes. `plan_shards` cuts the units, in
order, into shards of about `shard_bytes` input bytes: a JSONL file at byte offsets (a shard owns the lines that
start inside its byte range), a Parquet file at row groups, a dataset at rows, and text files and the embedded
corpus's files whole. The cut points depend only on the input and `shard_bytes`, never on the number of workers,
so any worker count and any resumed run tokenize the same documents into the same shard. Reading a shard
(`read_shard`) streams: one line, one record batch or 1024 rows at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigtrain.config.schema import DataConfig
from bigtrain.data.embedded import stdlib_files, stdlib_root
from bigtrain.data.files import _REPLACED, file_identity, not_utf8, read_text, resolve_files
from bigtrain.errors import DataError

_ROWS = 1024  # rows per batch read from Parquet files and datasets
ALLOWED = ("'embedded' (the Python standard library, no download), a .txt / .jsonl / .parquet file or a directory of "
           "them, a folder written by datasets' save_to_disk, a folder written by `bigtrain prepare`, or "
           "hf:NAME[:CONFIG][@SPLIT] (a Hugging Face hub dataset through datasets' own download and cache)")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass
class Unit:
    """One input of a source: `kind` embedded | text | jsonl | json | parquet | dataset.

    `sizes` are the input bytes of its parts (row groups of a Parquet file); `rows` the rows of a dataset.
    """

    kind: str
    path: str = ""
    nbytes: int = 0
    sizes: list[int] = field(default_factory=list)
    rows: int = 0
    take: int = 0  # embedded: bytes of the file taken
    arrow_files: list[str] = field(default_factory=list)  # dataset: its Arrow files (what a worker opens)


@dataclass
class Source:
    """data.source as units; `identity` keys the cache; `dataset` is the live dataset (not sent to workers)."""

    description: str
    identity: dict[str, Any]
    units: list[Unit]
    text_field: str
    encoding_errors: str
    cache_dir: str
    dataset: Any = None

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    @property
    def in_process_only(self) -> bool:
        """A dataset held in memory only (no Arrow files): worker processes cannot open it."""
        return any(u.kind == "dataset" and not u.arrow_files for u in self.units)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["dataset"] = None
        return state


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
        return _hf_source(cfg)
    if kind == "saved":
        return _saved_source(cfg)
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


# --- datasets -----------------------------------------------------------------------------------------


def parse_hf(source: str) -> tuple[str, str | None, str]:
    """hf:NAME[:CONFIG][@SPLIT] -> (NAME, CONFIG or None, SPLIT or 'train')."""
    rest = source[len("hf:"):]
    name_config, _, split = rest.partition("@")
    name, _, config = name_config.partition(":")
    if not name.strip():
        raise DataError(f"data.source: '{source}' names no dataset; write hf:NAME[:CONFIG][@SPLIT], e.g. "
                        f"hf:wikitext:wikitext-2-raw-v1@train.")
    return name, config or None, split or "train"


def _hf_source(cfg: DataConfig) -> Source:
    import datasets

    name, config, split = parse_hf(cfg.source)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing dataset, config or split: datasets raises many types
        raise DataError(
            f"data.source: could not load the Hugging Face dataset '{name}' (config {config!r}, split '{split}') "
            f"through datasets ({type(exc).__name__}: {' '.join(str(exc).split())[:400]}). Check the name, "
            f"config and split (data.source=hf:NAME[:CONFIG][@SPLIT]), the network or datasets' cache "
            f"(HF_DATASETS_OFFLINE=1 uses it alone), or download the data and point data.source at the files.") from exc
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"data.source: '{cfg.source}' gave a {type(ds).__name__}, not one split; name the split "
                        f"with @SPLIT (hf:NAME[:CONFIG]@train).")
    identity = {"hf": name, "config": config, "split": split, "fingerprint": ds._fingerprint, "rows": len(ds),
                "text_field": cfg.text_field}
    return _dataset_source(cfg, ds, identity)


def _saved_source(cfg: DataConfig) -> Source:
    import datasets

    path = Path(cfg.source)
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        if "train" not in splits:
            raise DataError(f"data.source: '{path}' is a datasets DatasetDict with the splits {splits} and no "
                            f"'train'; point data.source at one split's folder, e.g. '{path / splits[0]}'."
                            if splits else f"data.source: '{path}' is a datasets DatasetDict folder without splits.")
        path = path / "train"
    try:
        with _quiet(datasets):
            ds = datasets.load_from_disk(str(path))
        state = (path / "state.json").read_bytes()
    except Exception as exc:  # datasets raises many types for damaged folders
        raise DataError(f"data.source: could not load '{path}' with datasets.load_from_disk ({type(exc).__name__}: "
                        f"{exc}). Point data.source at a folder written by Dataset.save_to_disk.") from exc
    files = [(Path(f["filename"]), "arrow") for f in ds.cache_files]
    identity = {"saved": str(path.resolve()), "state": hashlib.sha256(state).hexdigest(),
                "files": file_identity(files), "text_field": cfg.text_field}
    return _dataset_source(cfg, ds, identity)


def _dataset_source(cfg: DataConfig, ds: Any, identity: dict[str, Any]) -> Source:
    if cfg.text_field not in ds.column_names:
        raise DataError(f"data.text_field: the dataset '{cfg.source}' has no column {cfg.text_field!r}; its "
                        f"columns are {ds.column_names}. Set data.text_field to one of them.")
    column = ds.data.column(cfg.text_field)
    # Worker processes reopen the dataset from its Arrow files; one held in memory, or a view through an indices
    # mapping, is read in this process only.
    arrow = [f["filename"] for f in ds.cache_files] if ds._indices is None else []
    if arrow and _rows_of(arrow) != len(ds):  # a slice of its files (split="train[10%:]"): not reopened alone
        arrow = []
    unit = Unit("dataset", cfg.source, max(1, column.nbytes), rows=len(ds), arrow_files=arrow)
    return Source(cfg.source, identity, [unit], cfg.text_field, cfg.encoding_errors, cfg.cache_dir, dataset=ds)


def _rows_of(arrow_files: list[str]) -> int:
    import datasets

    with _quiet(datasets):
        return sum(datasets.Dataset.from_file(f).num_rows for f in arrow_files)


def _open_dataset(source: Source, unit: Unit) -> Any:
    if source.dataset is not None:
        return source.dataset
    import datasets

    with _quiet(datasets):
        parts = [datasets.Dataset.from_file(f) for f in unit.arrow_files]
    source.dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return source.dataset


class _quiet:
    """Hide the `datasets` progress bars while loading, restoring their previous state."""

    def __init__(self, datasets: Any) -> None:
        self.datasets = datasets

    def __enter__(self) -> None:
        self.was_disabled = self.datasets.are_progress_bars_disabled()
        self.datasets.disable_progress_bars()

    def __exit__(self, *exc: object) -> None:
        if not self.was_disabled:
            self.datasets.enable_progress_bars()


# --- planning -----------------------------------------------------------------------------------------


def plan_shards(source: Source, shard_bytes: int) -> list[dict[str, Any]]:
    """The shards: each {"pieces": [[unit, start, end], ...], "bytes": input bytes}, in order (module docstring).

    A piece is a byte range of a JSONL file, a row-group range of a Parquet file, a row range of a dataset, or a
    whole unit ([unit, 0, nbytes]) otherwise.
    """
    shards: list[dict[str, Any]] = []
    pieces: list[list[int]] = []
    fill = 0

    def close() -> None:
        nonlocal pieces, fill
        if pieces:
            shards.append({"pieces": pieces, "bytes": fill})
        pieces, fill = [], 0

    for index, unit in enumerate(source.units):
        if unit.nbytes == 0:
            continue
        if unit.kind == "jsonl":
            pos = 0
            while pos < unit.nbytes:
                take = min(unit.nbytes - pos, shard_bytes - fill)
                pieces.append([index, pos, pos + take])
                pos, fill = pos + take, fill + take
                if fill >= shard_bytes:
                    close()
        elif unit.kind in ("parquet", "dataset"):
            sizes = unit.sizes if unit.kind == "parquet" else None
            count = len(sizes) if sizes is not None else unit.rows
            per_row = unit.nbytes / max(1, unit.rows)
            start = 0
            while start < count:
                end, got = start, 0.0
                while end < count and (end == start or fill + got < shard_bytes):
                    if sizes is not None:
                        got += sizes[end]
                        end += 1
                    else:  # rows: as many as fill the shard, at least one
                        n = max(1, int((shard_bytes - fill - got) // per_row) or 1)
                        n = min(n, count - end)
                        got += n * per_row
                        end += n
                pieces.append([index, start, end])
                fill += int(round(got))
                start = end
                if fill >= shard_bytes:
                    close()
        else:
            pieces.append([index, 0, unit.nbytes])
            fill += unit.nbytes
            if fill >= shard_bytes:
                close()
    close()
    return shards


# --- reading ------------------------------------------------------------------------------------------


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
    ds = _open_dataset(source, unit).select_columns([source.text_field]).with_format("arrow")
    per_row = unit.nbytes / max(1, unit.rows)
    done = start * per_row
    for first in range(start, end, _ROWS):
        texts = ds[first:min(first + _ROWS, end)].column(0).to_pylist()
        for text in texts:
            before, done = done, done + per_row
            yield (text if isinstance(text, str) else None), int(done) - int(before)
