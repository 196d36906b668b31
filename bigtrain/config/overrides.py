"""Where a dotted override lands in the nested mapping the loader merges: `model.dropout=0` under model, and an
entry of a list key by its index, `data.sources[0].weight=2` (`EntryOverrides`: {0: {"weight": 2}}), which is
how the config checks name such a key, so that the fix a message suggests is an override the loader takes."""

from __future__ import annotations

import re
from typing import Any

from bigtrain.config.rules import show, show_key
from bigtrain.errors import ConfigError

_INDEXED = re.compile(r"([^\[\]]+)\[(\d{1,9})\]")  # sources[0]


class EntryOverrides(dict):
    """Overrides of single entries of a list key, by index ({0: {"weight": 2}} for data.sources[0].weight=2)."""


def _entries(node: dict[str, Any], name: str, item: str) -> EntryOverrides | list[Any]:
    """Where the entries of list key `name` under `node` are overridden: the list an earlier override gave whole
    (changed in place), else the entry overrides of the config's list."""
    entries = node.setdefault(name, EntryOverrides())
    if not isinstance(entries, (EntryOverrides, list)):
        raise ConfigError(f"Override {show(item)} sets an entry of '{show_key(name)}', which is a value.")
    return entries


def _entry(entries: list[Any], index: int, item: str, name: str) -> dict[str, Any]:
    """Entry `index` of a list given whole (one past its end: a new one), as a mapping to set keys in."""
    if index > len(entries):
        raise ConfigError(f"Override {show(item)}: the '{show_key(name)}' given before has {len(entries)} entries; "
                          f"an override changes one of them or adds entry {len(entries)}.")
    if index == len(entries):
        entries.append({})
    if not isinstance(entries[index], dict):
        raise ConfigError(f"Override {show(item)} sets a key inside entry {index} of '{show_key(name)}', which is "
                          f"{show(entries[index])}, not a mapping.")
    return entries[index]


def place(nested: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    """Put `value` at the dotted key `parts` (of the override `item`) into `nested`."""
    node: Any = nested
    for i, part in enumerate(parts):
        indexed = _INDEXED.fullmatch(part)
        name = indexed.group(1) if indexed else part
        last = i == len(parts) - 1
        if indexed:
            entries, index = _entries(node, name, item), int(indexed.group(2))
            if isinstance(entries, list):  # a list an earlier override gave whole
                if last and index <= len(entries):
                    entries[index:index + 1] = [value]
                    return
                node = _entry(entries, index, item, name)
                continue
            if last:
                entries[index] = value
                return
            node = entries.setdefault(index, {})
        elif last:
            node[name] = value  # a later override wins, over entry overrides too
            return
        else:
            node = node.setdefault(name, {})
        if not isinstance(node, dict) or isinstance(node, EntryOverrides):
            raise ConfigError(f"Override {show(item)} sets a key inside '{show_key(part)}', which is a value.")
