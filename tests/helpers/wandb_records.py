"""Read the records of a W&B offline run file (run-<id>.wandb) back, for tests/test_tracking.py.

The file is W&B's transaction log: a 7-byte header (":W&B", 0xBEE1, version), then LevelDB's log format: blocks of
32 KiB, each a run of chunks [crc32c: 4][length: 2, little-endian][type: 1][data], a record being one FULL chunk
(type 1) or FIRST (2), MIDDLE (3)..., LAST (4); a block's tail shorter than a chunk header is zero padding. Each
record is a protobuf `wandb.proto.wandb_internal_pb2.Record`. wandb 0.31 ships no Python reader of its own (the Go
core writes and reads the file), so the few lines of the format are here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7  # both the file's header and a chunk's header are 7 bytes
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """Every protobuf Record of the file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file (header {data[:7]!r})"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the padded tail of a block
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def run_contents(path: Path) -> dict[str, Any]:
    """{"run_id", "history": {step: {key: value}}, "summary": {key: value}, "config": {key: value}} of one file
    (values decoded from JSON; W&B's own keys starting with "_" left out)."""
    out: dict[str, Any] = {"run_id": None, "history": {}, "summary": {}, "config": {}}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = record.run.run_id
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in record.history.item}
            step = row.get("_step")
            out["history"].setdefault(step, {}).update({k: v for k, v in row.items() if not k.startswith("_")})
            continue
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
            continue
        else:
            continue
        out["config"].update({_key(i): json.loads(i.value_json) for i in updates if not _key(i).startswith("_")})
    return out
