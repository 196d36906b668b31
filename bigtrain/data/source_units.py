"""A source as the build sees it: its *units* (a file, or a whole dataset) with their input bytes, held by the
`Source` that carries what a worker process needs to read them (`bigtrain.data.sources.open_source` makes one).

The input bytes of a source are the sum over its units, n = Σ_u n_u; they size the shards
(`bigtrain.data.source_plan`) and the progress of a build.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
