"""The layout-free checkpoint: the unsplit model's weights and optimizer state, whatever layout wrote them.

    step_N/layout_free/index.json            format, version, step, the parameters (name -> full shape),
                                             the optimizer, the trainer state, the layout that wrote it, every
                                             piece (where it lives), and the size and SHA-256 of every shard
    step_N/layout_free/rank00003.safetensors the pieces rank 3 owned

A piece is a part of one tensor of the unsplit model, named as in its `state_dict`: `kind` is `param` (the fp32
weight), `exp_avg` or `exp_avg_sq` (the optimizer's moments). It is the flat range [a, b) (row-major) of a
box of the full tensor, where the box is a tensor-parallel shard ([start, stop) per dimension) and the range is
what ZeRO gave the rank (the whole box without ZeRO). Each rank writes only the pieces it owns: nothing is
gathered. Each rank reads, for the tensors of its new layout, only the parts of the pieces that overlap them,
one tensor at a time, so a load needs about a rank's own shard plus the largest single tensor. Everything is
safetensors and JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigtrain.errors import CheckpointError
from bigtrain.io import confined, replace_text, save_safetensors, sha256_of

FORMAT, VERSION = "bigtrain-layout-free", 1
FOLDER, INDEX = "layout_free", "index.json"
KINDS = ("param", "exp_avg", "exp_avg_sq")
OTHER = "Use another checkpoint of the run, or delete this one."

Box = tuple[tuple[int, int], ...]  # [start, stop) per dimension of the full tensor


@dataclass
class Piece:
    name: str
    kind: str
    box: Box
    start: int  # flat range [start, stop) of the box, row-major
    stop: int
    data: torch.Tensor | None = None  # 1-D, stop - start values (when writing)
    file: str = ""
    key: str = ""

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "box": [list(b) for b in self.box],
                "range": [self.start, self.stop], "file": self.file, "key": self.key}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Piece:
        return cls(meta["name"], meta["kind"], tuple(tuple(b) for b in meta["box"]), *meta["range"],
                   file=meta["file"], key=meta["key"])


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def whole(shape: Iterable[int]) -> Box:
    return tuple((0, int(n)) for n in shape)


# ---- writing ---------------------------------------------------------------------------------------------------
def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def write_pieces(folder: Path, rank: int, pieces: Iterable[Piece]) -> dict[str, Any]:
    """Write this rank's pieces into `rankNNNNN.safetensors` (fsynced); returns its entry for the index: the
    pieces' metadata and the file's size and SHA-256."""
    folder.mkdir(parents=True, exist_ok=True)
    name = rank_file(rank)
    tensors, metas = {}, []
    for i, piece in enumerate(pieces):
        piece.file, piece.key = name, str(i)
        assert piece.data is not None and piece.data.numel() == piece.stop - piece.start, piece.name
        tensors[piece.key] = piece.data.detach().reshape(-1).to("cpu", torch.float32).contiguous()
        metas.append(piece.meta())
    path = folder / name
    save_safetensors(path, tensors)  # a full disk: WriteFailed, naming the file and its bytes
    return {"file": name, "bytes": path.stat().st_size, "sha256": sha256_of(path), "pieces": metas}


def write_index(folder: Path, rank_entries: list[dict[str, Any]], header: dict[str, Any]) -> None:
    """Rank 0, after every rank wrote its file: the index that makes the layout-free form complete."""
    index = {"format": FORMAT, "version": VERSION, **header,
             "files": {e["file"]: {"bytes": e["bytes"], "sha256": e["sha256"]} for e in rank_entries},
             "pieces": [p for e in rank_entries for p in e["pieces"]]}
    replace_text(folder / INDEX, json.dumps(index))


# ---- reading ---------------------------------------------------------------------------------------------------
class LayoutFreeReader:
    """Reads tensors (or boxes of them) of a layout-free checkpoint, verifying each shard before first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        path = folder / INDEX
        try:
            self.index = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}); the layout-free checkpoint is "
                                  f"incomplete or damaged.") from None
        if not isinstance(self.index, dict) or self.index.get("format") != FORMAT:
            found = self.index.get("format") if isinstance(self.index, dict) else None
            raise CheckpointError(f"{path} is not a bigtrain layout-free index (format {found!r}).")
        if self.index.get("version", 0) > VERSION:
            raise CheckpointError(f"{path} has format version {self.index['version']}, newer than this bigtrain "
                                  f"reads ({VERSION}). Upgrade bigtrain to resume it.")
        try:
            files, pieces = self.index["files"], [Piece.from_meta(meta) for meta in self.index["pieces"]]
            if not isinstance(files, dict) or not isinstance(self.index["parameters"], dict):
                raise TypeError("its files and parameters are not mappings")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a complete layout-free index ({type(exc).__name__}: {exc}); the "
                                  f"checkpoint is damaged. {OTHER}") from None
        # Every file the index names must lie in the folder: a crafted index could name any file on the machine.
        self.paths = {file: confined(folder, file, path, OTHER) for file in files}
        self.pieces: dict[tuple[str, str], list[Piece]] = {}
        for piece in pieces:
            if piece.file not in self.paths:
                raise CheckpointError(f"{path} puts a piece of {piece.name} in {piece.file!r}, a file it does not "
                                      f"list; the checkpoint is damaged. {OTHER}")
            self.pieces.setdefault((piece.name, piece.kind), []).append(piece)
        self._verified: set[str] = set()
        self._open: dict[str, Any] = {}

    @property
    def header(self) -> dict[str, Any]:
        return self.index

    def close(self) -> None:
        """Drop the open shards (their memory maps)."""
        self._open.clear()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.index["parameters"][name]["shape"])

    def has(self, name: str, kind: str) -> bool:
        return (name, kind) in self.pieces

    def verify_all(self) -> str | None:
        """Why a shard does not match the index (naming the file), or None."""
        for name in self.index["files"]:
            problem = self._verify(name)
            if problem:
                return problem
        return None

    def _verify(self, file: str) -> str | None:
        if file in self._verified:
            return None
        expected = self.index["files"][file]
        path = self.paths[file]
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return (f"{path} has {path.stat().st_size} bytes where {expected['bytes']} were written (truncated or "
                    f"altered)")
        if sha256_of(path) != expected["sha256"]:
            return f"{path} does not match its checksum (altered or corrupted)"
        self._verified.add(file)
        return None

    def _handle(self, file: str):
        problem = self._verify(file)
        if problem:
            raise CheckpointError(f"Layout-free checkpoint {self.folder}: {problem}.")
        if file not in self._open:
            from safetensors import safe_open

            self._open[file] = safe_open(str(self.paths[file]), framework="pt")
        return self._open[file]

    def read(self, name: str, kind: str, box: Box | None = None) -> torch.Tensor:
        """The values of `box` (default: the whole tensor) of `name`'s `kind`, assembled from the pieces that
        overlap it; fp32, shape of the box."""
        full = self.shape(name)
        box = box or whole(full)
        out = torch.empty(box_shape(box), dtype=torch.float32)
        covered = 0
        for piece in self.pieces.get((name, kind), []):
            covered += self._copy_overlap(piece, box, out)
        if covered != out.numel():
            raise CheckpointError(f"Layout-free checkpoint {self.folder} does not hold all of {name} ({kind}): "
                                  f"{covered} of {out.numel()} values found. It is incomplete.")
        return out

    def read_flat(self, name: str, kind: str, box: Box, start: int, stop: int) -> torch.Tensor:
        """The flat range [start, stop) (row-major) of `box` of `name`'s `kind`: what a ZeRO partition needs,
        read without the rest of the box."""
        parts = [self.read(name, kind, sub_box).reshape(-1) for sub_box, _ in flat_range_boxes(box, start, stop)]
        return torch.cat(parts) if parts else torch.empty(0)

    def _copy_overlap(self, piece: Piece, box: Box, out: torch.Tensor) -> int:
        """Copy what `piece` holds of `box` into `out`; returns how many values it filled."""
        handle = None
        filled = 0
        for sub_box, offset in flat_range_boxes(piece.box, piece.start, piece.stop):
            overlap = intersect(sub_box, box)
            if overlap is None:
                continue
            if handle is None:
                handle = self._handle(piece.file).get_slice(piece.key)
            values = _read_box(handle, sub_box, offset, overlap)
            out[tuple(slice(a - b0, b - b0) for (a, b), (b0, _) in zip(overlap, box, strict=True))] = values
            filled += values.numel()
        return filled


def intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return out if all(lo < hi for lo, hi in out) else None


def flat_range_boxes(box: Box, start: int, stop: int) -> Iterator[tuple[Box, int]]:
    """The flat range [start, stop) of `box` (row-major) as at most three boxes of full-tensor coordinates, each
    with its offset in the range: a partial first row, whole rows, a partial last row (1-D: one interval)."""
    if start >= stop:
        return
    shape = box_shape(box)
    if len(shape) == 1:
        (a, _), = box
        yield ((a + start, a + stop),), 0
        return
    if len(shape) != 2:
        raise ValueError(f"layout-free pieces are 1-D or 2-D, got a box of {len(shape)} dimensions")
    (r0, _), (c0, _) = box
    cols = shape[1]
    first, last = start // cols, (stop - 1) // cols
    if first == last:
        yield ((r0 + first, r0 + first + 1), (c0 + start % cols, c0 + (stop - 1) % cols + 1)), 0
        return
    offset = 0
    if start % cols:
        yield ((r0 + first, r0 + first + 1), (c0 + start % cols, c0 + cols)), 0
        offset = cols - start % cols
        first += 1
    full_rows_end = last if (stop % cols) else last + 1
    if full_rows_end > first:
        yield ((r0 + first, r0 + full_rows_end), (c0, c0 + cols)), offset
        offset += (full_rows_end - first) * cols
    if stop % cols:
        yield ((r0 + last, r0 + last + 1), (c0, c0 + stop % cols)), offset


def _read_box(handle, sub_box: Box, offset: int, overlap: Box) -> torch.Tensor:
    """The `overlap` part of the stored `sub_box`, whose values start at `offset` of the piece's 1-D data. Only
    the rows of the sub-box that overlap are read."""
    shape = box_shape(sub_box)
    if len(shape) == 1:
        (a, _), = sub_box
        (o0, o1), = overlap
        return handle[offset + o0 - a:offset + o1 - a]
    (r0, _), (c0, _) = sub_box
    (o0, o1), (p0, p1) = overlap
    cols = shape[1]
    rows = handle[offset + (o0 - r0) * cols:offset + (o1 - r0) * cols].reshape(o1 - o0, cols)
    return rows[:, p0 - c0:p1 - c0]


def tensor_bytes(shape: Iterable[int]) -> int:
    return 4 * math.prod(shape)
