"""Local data files: which files `data.source` names, in which format, and reading their columns.

`data.source` is a file or a directory; a directory contributes its files (recursively, in sorted
order) whose suffix matches `data.format` (any known suffix when it is `auto`). Formats:
- text (`.txt`): each file is one document (put many documents in one file as JSONL instead);
- jsonl (`.jsonl`, `.json`) and parquet (`.parquet`): one document per row, read with Hugging Face
  `datasets`; its Arrow cache goes under `data.cache_dir`/hf.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from bigtrain.errors import DataError

_SUFFIXES = {".txt": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_BATCH_ROWS = 1024


def resolve_files(source: str, fmt: str) -> list[tuple[Path, str]]:
    """(path, format) of every data file named by data.source / data.format."""
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"data.source: '{source}' does not exist. Set data.source to 'embedded' (the Python standard "
            f"library, no download), to a generated seq2seq task ('reverse' or 'sort'), or to an existing "
            f".txt / .jsonl / .parquet file or a directory of them.")
    if path.is_file():
        return [(path, fmt if fmt != "auto" else _format_of(path))]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES
                   and (fmt == "auto" or _SUFFIXES[p.suffix.lower()] == fmt))
    if not files:
        wanted = "/".join(s for s, f in _SUFFIXES.items() if fmt in ("auto", f))
        raise DataError(
            f"data.source: the directory '{source}' holds no {wanted} files (data.format='{fmt}'). Put data "
            f"files there, point data.source at a file, or change data.format.")
    return [(p, _SUFFIXES[p.suffix.lower()]) for p in files]


def _format_of(path: Path) -> str:
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"data.format: cannot tell the format of '{path}' from its suffix '{path.suffix}'. Rename it to "
            f".txt, .jsonl or .parquet, or set data.format to 'text', 'jsonl' or 'parquet'.")
    return fmt


def file_identity(files: list[tuple[Path, str]]) -> list[list]:
    """What identifies the files' contents for a cache key: absolute path, format, size, mtime."""
    out = []
    for path, fmt in files:
        st = path.stat()
        out.append([str(path.resolve()), fmt, st.st_size, st.st_mtime_ns])
    return out


def read_documents(files: list[tuple[Path, str]], text_field: str, cache_dir: str) -> Iterator[str]:
    """Every non-empty document of the files, in order."""
    for path, fmt in files:
        if fmt == "text":
            text = path.read_text(encoding="utf-8", errors="replace")
            if text:
                yield text
            continue
        for rows in read_rows(path, fmt, [text_field], "data.text_field", cache_dir):
            yield from (t for t in rows[text_field] if isinstance(t, str) and t)


def read_rows(path: Path, fmt: str, fields: list[str], key: str, cache_dir: str) -> Iterator[dict[str, list]]:
    """Batches of rows of a JSONL/Parquet file as {field: values}; `key` names the config key of fields."""
    if fmt == "text":
        raise DataError(
            f"data.source: '{path}' is plain text, but {key} asks for columns {fields}. Use a .jsonl or "
            f".parquet file with those columns.")
    table = _load_table(path, fmt, cache_dir)
    if table is None:
        return
    missing = [f for f in fields if f not in table.column_names]
    if missing:
        raise DataError(
            f"{key}: '{path}' has no column {missing[0]!r}; its columns are {table.column_names}. Set "
            f"{key} to one of them.")
    table = table.select_columns(fields)
    for start in range(0, table.num_rows, _BATCH_ROWS):
        yield table[start:start + _BATCH_ROWS]


def _load_table(path: Path, fmt: str, cache_dir: str):
    """The file as a `datasets.Dataset`, or None when it has no rows."""
    if path.stat().st_size == 0:
        return None
    import datasets

    builder = "json" if fmt == "jsonl" else "parquet"
    try:
        with _quiet(datasets):
            table = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train",
                                          cache_dir=str(Path(cache_dir) / "hf"))
    except Exception as exc:  # datasets raises many types for malformed files
        raise DataError(
            f"data.source: could not read '{path}' as {fmt} ({type(exc).__name__}: {exc}). Fix the file, "
            f"or set data.format to its real format.") from exc
    return table if table.num_rows > 0 else None


@contextlib.contextmanager
def _quiet(datasets) -> Iterator[None]:
    """Hide the `datasets` progress bars while loading, restoring their previous state."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
