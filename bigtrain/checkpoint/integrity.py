"""Checkpoint integrity: a manifest of every file's size and SHA-256, written last into each checkpoint, and
the choice of what to resume from.

    step_N/manifest.json   {"format": 1, "step": N, "layout": {"tensor": 1, …, "engine": "torch", …},
                            "files": {"model.pt": {"bytes": n, "sha256": "…"}, …}}

The layout is the one that wrote the checkpoint (`bigtrain.config.layout.Layout.record`); manifests written
before it was recorded lack it (`saved.py` derives it then).

On resume the checkpoint `latest` names is verified file by file. A missing, truncated or altered file makes
it damaged: it is renamed aside (`step_N.damaged`, never deleted) and the next older intact checkpoint is
used, with a note saying which file failed and which step the run resumes from. A missing or invalid
`latest` (empty, garbage, a path leaving the checkpoint folder, a step that is gone) is rebuilt from the
newest intact `step_*` folder. Checkpoints written before manifests existed are used without verification,
with a note.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bigtrain.config.layout import Layout
from bigtrain.errors import CheckpointError
from bigtrain.io import confined, replace_text, sha256_of

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = 1
STEP_DIR = re.compile(r"^step_(\d{8})$")


def manifest_for(directory: Path, step: int, layout: Layout | None = None, known: dict | None = None) -> dict:
    """The manifest of every file under `directory` (relative names, sizes, SHA-256), itself excluded, with the
    layout that wrote the checkpoint; `known`: checksums its writers took (used where the size still matches)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        name, size = path.relative_to(directory).as_posix(), path.stat().st_size
        noted = (known or {}).get(name)
        sha = noted["sha256"] if noted is not None and noted["bytes"] == size else sha256_of(path)
        files[name] = {"bytes": size, "sha256": sha}
    layout_record = {"layout": layout.record()} if layout is not None else {}
    return {"format": FORMAT, "step": step, **layout_record, "files": files}


def write_manifest(directory: Path, step: int, layout: Layout | None, known: dict | None = None) -> None:
    """Write `manifest.json` into a fully written checkpoint directory (flushed to disk)."""
    with open(directory / MANIFEST, "w") as f:
        json.dump(manifest_for(directory, step, layout, known), f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(checkpoint: Path) -> dict | None:
    """The manifest of `checkpoint` as written, or None where it has none or it cannot be read (`verify` says
    why)."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def verify(checkpoint: Path) -> str | None:
    """Why `checkpoint` is damaged (one sentence naming the file), or None when every file matches its manifest.
    A checkpoint without a manifest (written by an earlier bigtrain) is not verified: None."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            return f"{MANIFEST} has an unknown format"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({type(exc).__name__})"
    for name, expected in files.items():
        try:
            path = confined(checkpoint, name, manifest_path, "")
        except CheckpointError:
            return f"{MANIFEST} names {name!r}, outside the checkpoint"
        if not isinstance(expected, dict):
            return f"{MANIFEST} has an unknown format"
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} has {size} bytes where {expected.get('bytes')} were written (truncated or altered)"
        if sha256_of(path) != expected.get("sha256"):
            return f"{name} does not match its checksum (altered or corrupted)"
    return None


def has_manifest(checkpoint: Path) -> bool:
    return (checkpoint / MANIFEST).exists()


def step_of(checkpoint: Path) -> int:
    match = STEP_DIR.match(checkpoint.name)
    if match is None:
        raise ValueError(f"{checkpoint} is not a step_NNNNNNNN checkpoint directory")
    return int(match.group(1))


def step_dirs(directory: Path) -> list[Path]:
    """Complete checkpoint directories (`step_NNNNNNNN`, not `.tmp` or moved aside), oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def read_latest(directory: Path) -> tuple[Path | None, str | None]:
    """(the checkpoint `latest` names, None) or (None, why the pointer is unusable); (None, None) without one.
    The pointer must name a `step_NNNNNNNN` folder beside it: no path may lead out of the checkpoint folder."""
    pointer = directory / LATEST
    if not pointer.exists():
        return None, None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"'{pointer}' is unreadable ({type(exc).__name__})"
    if not STEP_DIR.match(name):
        shown = name[:40] + ("…" if len(name) > 40 else "")
        return None, f"'{pointer}' holds {shown!r}, not the name of a step_NNNNNNNN folder"
    target = directory / name
    if not target.is_dir():
        return None, f"'{pointer}' names {name}, which does not exist"
    return target, None


def write_latest(directory: Path, name: str) -> None:
    replace_text(directory / LATEST, name + "\n")


def move_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint to `step_N.damaged` (`.damaged-2`, … if taken): kept, never deleted."""
    target = checkpoint.with_name(checkpoint.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"{checkpoint.name}.damaged-{n}")
    os.rename(checkpoint, target)
    return target


@dataclass
class ResumeChoice:
    """What to resume from, and the notes to print about how it was chosen."""

    checkpoint: Path | None
    notes: list[str] = field(default_factory=list)


def choose_checkpoint(directory: Path, verify_one: Callable[[Path], str | None] = verify) -> ResumeChoice:
    """The newest intact checkpoint: the one `latest` names if intact, else older ones in turn; with an unusable
    `latest`, the newest intact `step_*`. Damaged checkpoints are moved aside and `latest` is rewritten to the
    choice. Raises CheckpointError when checkpoints exist but none is intact (nothing is deleted)."""
    notes: list[str] = []
    latest, problem = read_latest(directory)
    candidates = step_dirs(directory)
    if latest is not None:
        candidates = [p for p in candidates if step_of(p) <= step_of(latest)]
    elif problem is not None:
        notes.append(f"{problem}; rebuilding it from the newest intact checkpoint")
    elif candidates:
        notes.append(f"'{directory / LATEST}' is missing; rebuilding it from the newest intact checkpoint")
    damaged: list[str] = []
    for checkpoint in reversed(candidates):
        reason = verify_one(checkpoint)
        if reason is None:
            if damaged or problem is not None or latest is None:
                write_latest(directory, checkpoint.name)
            if damaged:
                notes.append(f"resuming from the newest intact checkpoint, {checkpoint.name} (step "
                             f"{step_of(checkpoint)})")
            if not has_manifest(checkpoint):
                notes.append(f"{checkpoint.name} has no {MANIFEST} (written by an earlier bigtrain): not verified")
            return ResumeChoice(checkpoint, notes)
        aside = move_aside(checkpoint)
        damaged.append(f"{checkpoint.name} ({reason})")
        notes.append(f"checkpoint {checkpoint.name} is damaged: {reason}; moved aside to {aside.name}")
    if damaged:
        raise CheckpointError(
            f"No intact checkpoint in {directory}: {'; '.join(damaged)}; each was moved aside (renamed "
            f"*.damaged, nothing deleted). To start over from step 0, use a new run.dir (or move "
            f"{directory} away); to try a damaged one anyway, rename it back and delete its {MANIFEST}.")
    return ResumeChoice(None, notes)
