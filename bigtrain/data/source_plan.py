"""Cutting a source into shards of about `shard_bytes` input bytes (`plan_shards`).

A source is a list of *units* (a file, or a whole dataset) with their input bytes. `plan_shards` cuts the units, in
order, into shards of about `shard_bytes` input bytes: a JSONL file at byte offsets (a shard owns the lines that
start inside its byte range), a Parquet file at row groups, a dataset at rows, and text files and the embedded
corpus's files whole. The cut points depend only on the input and `shard_bytes`, never on the number of workers,
so any worker count and any resumed run tokenize the same documents into the same shard.
"""

from __future__ import annotations

from typing import Any

from bigtrain.data.source_units import Source


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
