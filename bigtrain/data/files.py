"""Local data files: which files `data.source` names, in which format, and reading their columns.

`data.source` is a file or a directory; a directory contributes its files (recursively, in sorted
order) whose suffix matches `data.format` (any known suffix when it is `auto`). Formats:
- text (`.txt`): each file is one document (put many documents in one file as JSONL instead). It must be
  UTF-8: undecodable bytes stop the run naming the file and offset (`data.encoding_errors=strict`), or are
  replaced by U+FFFD with one warning per file (`replace`). A file holding a NUL byte or starting with a
  known binary signature (PNG, zip, ...) is refused in both modes: it is not text, whatever its name;
- jsonl (`.jsonl`, `.json`) and parquet (`.parquet`): one document per row, read with Hugging Face
  `datasets`; its Arrow cache goes under `data.cache_dir`/hf.
"""

from __future__ import annotations

import codecs
import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from bigtrain.errors import DataError

_SUFFIXES = {".txt": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_BATCH_ROWS = 1024
# Leading bytes of common binary formats (that may hold no NUL early on, or be renamed .txt).
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF87a": "a GIF image",
               b"GIF89a": "a GIF image", b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip file",
               b"\xfd7zXZ\x00": "an xz file", b"\x28\xb5\x2f\xfd": "a zstd file", b"%PDF-": "a PDF document",
               b"\x7fELF": "an ELF executable", b"7z\xbc\xaf\x27\x1c": "a 7-Zip archive"}
_REPLACED = threading.local()  # undecodable bytes counted by the "bigtrain.count_replace" error handler


def _count_replace(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: like "replace" (one U+FFFD per undecodable sequence), counting the bytes."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _REPLACED.count = getattr(_REPLACED, "count", 0) + exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("bigtrain.count_replace", _count_replace)


def resolve_files(source: str, fmt: str) -> list[tuple[Path, str]]:
    """(path, format) of every data file named by data.source / data.format."""
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"data.source: '{source}' does not exist. Set data.source to 'embedded' (the Python standard "
            f"library, no download), to a generated seq2seq task ('reverse' or 'sort'), to an existing "
            f".txt / .jsonl / .parquet file or a directory of them, to a folder written by datasets' save_to_disk "
            f"or by bigtrain prepare, or to hf:NAME[:CONFIG][@SPLIT] (a Hugging Face hub dataset).")
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
            f"data.format: cannot tell the format of data.source '{path}' from its suffix '{path.suffix}' (known: "
            f".txt, .jsonl, .json, .parquet). Rename it, set data.format to 'text', 'jsonl' or 'parquet', or point "
            f"data.source at a directory of such files, a datasets save_to_disk folder or hf:NAME.")
    return fmt


def file_identity(files: list[tuple[Path, str]]) -> list[list]:
    """What identifies the files' contents for a cache key: absolute path, format, size, mtime."""
    out = []
    for path, fmt in files:
        st = path.stat()
        out.append([str(path.resolve()), fmt, st.st_size, st.st_mtime_ns])
    return out


def read_documents(files: list[tuple[Path, str]], text_field: str, cache_dir: str,
                   encoding_errors: str = "strict") -> Iterator[str]:
    """Every non-empty document of the files, in order; `encoding_errors` is data.encoding_errors."""
    for path, fmt in files:
        if fmt == "text":
            text = read_text(path, encoding_errors)
            if text:
                yield text
            continue
        for rows in read_rows(path, fmt, [text_field], "data.text_field", cache_dir):
            yield from (t for t in rows[text_field] if isinstance(t, str) and t)


def not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError, offset: int = 0) -> DataError:
    """The error for text that is not UTF-8 under data.encoding_errors=strict; `offset`: where `data` starts."""
    return DataError(f"data.source: '{path}' is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset "
                     f"{offset + exc.start} cannot be decoded. Convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8), or "
                     f"set data.encoding_errors=replace to replace undecodable bytes.")


def read_text(path: Path, encoding_errors: str = "strict") -> str:
    """A .txt file's text, refusing binary files and treating invalid UTF-8 as data.encoding_errors says."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"data.source: cannot read '{path}' ({exc}). Make it readable, or point data.source "
                        f"elsewhere.") from exc
    _refuse_binary(path, data)
    if encoding_errors != "replace":
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise not_utf8(path, data, exc) from exc
    _REPLACED.count = 0
    text = data.decode("utf-8", errors="bigtrain.count_replace")
    if _REPLACED.count:
        print(f"bigtrain: warning: data.source: '{path}' had {_REPLACED.count} undecodable bytes, replaced by "
              f"U+FFFD (data.encoding_errors=replace)", file=sys.stderr, flush=True)
    return text


def _refuse_binary(path: Path, data: bytes) -> None:
    """DataError when the bytes are not text: a NUL byte anywhere, or a known binary signature."""
    signs = [f"it starts like {name}" for magic, name in _SIGNATURES.items() if data.startswith(magic)]
    nul = data.find(b"\0")
    if nul >= 0:
        signs.append(f"its first NUL byte is at offset {nul}")
    if signs:
        raise DataError(
            f"data.source: '{path}' looks like a binary file, not text ({'; '.join(signs)}). Point data.source "
            f"at text files, or remove or filter such files out of the directory (UTF-16 text must be "
            f"converted to UTF-8).")


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
