"""What a resume must match: the saved config against the new one, key by key.

A change that alters the meaning of the saved state is refused unless the user allows that key by name
(`--allow-changes KEY,...`): the model (the weights would not fit), the data and tokenizer (ids and the
sample order would mean something else), the seed (the data order would be another), the optimizer (its state
would be read as another's). The parallel layout may change (the trainer loads the layout-free form then); a
changed global batch size is allowed with a warning saying what it does. Every other change (steps,
intervals, logging, paths, threads, precision, ...) passes with a note.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bigtrain.config.schema import Config, key_name
from bigtrain.errors import CheckpointError, ConfigError

# Keys (or whole sections, ending in ".") whose change alters what the saved state means.
MEANINGFUL = (
    "model.",
    "data.source", "data.format", "data.text_field", "data.source_field", "data.target_field", "data.tokenizer",
    "data.seq_len", "data.max_bytes", "data.holdout_fraction", "data.mask_prob", "data.task_samples",
    "data.task_min_len", "data.task_max_len", "data.bucket_size", "data.encoding_errors", "data.document_masking",
    "train.seed",
    "optim.name",
)
# Keys the layout check (or nothing) owns: not reported as config changes.
IGNORED = ("run.dir",)


@dataclass(frozen=True)
class Change:
    key: str
    saved: Any
    now: Any

    @property
    def meaningful(self) -> bool:
        return any(self.key == k or (k.endswith(".") and self.key.startswith(k)) for k in MEANINGFUL)

    def describe(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.now!r}"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(obj):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out.update(_flatten(value, f"{prefix}{key_name(f)}."))
            else:
                out[f"{prefix}{key_name(f)}"] = value
        return out
    return {prefix.rstrip("."): obj}


def config_changes(saved: Config, now: Config) -> list[Change]:
    """Every key whose value differs between the saved and the new config (the `deepspeed:` passthrough as one
    key), in schema order."""
    a, b = _flatten(saved), _flatten(now)
    return [Change(key, a.get(key), b.get(key)) for key in b
            if key not in IGNORED and a.get(key) != b.get(key)]


def known_keys() -> set[str]:
    return set(_flatten(Config()))


def parse_allowed(text: str | None) -> set[str]:
    """The keys of `--allow-changes KEY,KEY` (a section name with a trailing dot allows the whole section)."""
    if not text:
        return set()
    keys = {k.strip() for k in text.split(",") if k.strip()}
    valid = known_keys()
    sections = {k.split(".")[0] + "." for k in valid}
    unknown = sorted(k for k in keys if k not in valid and k not in sections)
    if unknown:
        raise ConfigError(f"--allow-changes names unknown config keys {unknown}; give dotted keys such as "
                          f"data.source,train.seed (or a section with a trailing dot, e.g. model.).")
    return keys


def _allowed(change: Change, allowed: set[str]) -> bool:
    return change.key in allowed or any(k.endswith(".") and change.key.startswith(k) for k in allowed)


def check_resume(changes: list[Change], allowed: set[str], where: str) -> tuple[list[Change], list[Change]]:
    """(allowed meaningful changes, harmless changes); raises CheckpointError naming every refused key."""
    refused = [c for c in changes if c.meaningful and not _allowed(c, allowed)]
    if refused:
        keys = ",".join(c.key for c in refused)
        raise CheckpointError(
            f"{where} holds a checkpoint of a run with other settings that change what its state means: "
            f"{'; '.join(c.describe() for c in refused)}. Resume with the saved values, use a new run.dir, or "
            f"accept the change explicitly with --allow-changes {keys} (it is recorded in metrics.jsonl).")
    return [c for c in changes if c.meaningful], [c for c in changes if not c.meaningful]
