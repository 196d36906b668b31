"""The embedded corpus: the Python standard library's own source code, so training needs no download.

Files are the `.py` files under `sysconfig.get_paths()["stdlib"]` in sorted relative-path order,
skipping third-party and test code (`site-packages`, `dist-packages`, `test`, `tests`, `idlelib`,
`__pycache__`). Each file is one document. Files are added until `data.max_bytes` bytes are reached;
the last one is truncated there. The corpus is deterministic for a given Python installation.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "encodings", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_bytes: int) -> list[tuple[str, int, int]]:
    """(relative path, bytes taken, mtime_ns) of the files in the corpus, in order, at most max_bytes."""
    root = stdlib_root()
    found: list[tuple[str, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(".py"):
                full = Path(dirpath) / name
                found.append(((rel_dir / name).as_posix(), full.stat()))
    found.sort(key=lambda item: item[0])
    chosen, total = [], 0
    for rel, st in found:
        if total >= max_bytes:
            break
        take = min(st.st_size, max_bytes - total)
        if take > 0:
            chosen.append((rel, take, st.st_mtime_ns))
            total += take
    return chosen


def stdlib_documents(files: list[tuple[str, int, int]]) -> Iterator[str]:
    """The text of each chosen file, cut to the bytes taken (as listed by `stdlib_files`)."""
    root = stdlib_root()
    for rel, take, _ in files:
        with open(root / rel, "rb") as f:
            yield f.read(take).decode("utf-8", errors="replace")
