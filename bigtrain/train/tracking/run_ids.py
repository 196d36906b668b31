"""run.dir/tracking.json: the tracker runs a run.dir records into, so that a resumed run continues them.

    {"mlflow": {"run_id": "...", "tracking_uri": "...", "experiment": "..."}, "wandb": {"run_id": "...", ...}}

An entry is reused only by a start that resumes from a checkpoint and records to the same place (store and
experiment, or project): a fresh start, or one pointed elsewhere, opens a new run and replaces the entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bigtrain.io import replace_text

FILE = "tracking.json"


class RunIds:
    """The entries of run.dir/tracking.json (missing or unreadable: none)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / FILE
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        self.entries: dict[str, dict[str, Any]] = data if isinstance(data, dict) else {}

    def reusable(self, tracker: str, where: dict[str, str], resuming: bool) -> str | None:
        """The run id `tracker` recorded into at `where`, when this start resumes and `where` is unchanged."""
        entry = self.entries.get(tracker)
        if not resuming or not isinstance(entry, dict):
            return None
        if any(entry.get(key) != value for key, value in where.items()):
            return None
        run_id = entry.get("run_id")
        return run_id if isinstance(run_id, str) and run_id else None

    def remember(self, tracker: str, run_id: str, where: dict[str, str]) -> None:
        """Keep `run_id` (with where it records) for the next start."""
        self.entries[tracker] = {"run_id": run_id, **where}
        replace_text(self.path, json.dumps(self.entries, indent=2, sort_keys=True) + "\n")
