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


def _entries(node: dict[str, Any], name: str, item: str) -> EntryOverrides:
    """The entry overrides of list key `name` under `node`."""
    entries = node.setdefault(name, EntryOverrides())
    if not isinstance(entries, EntryOverrides):
        raise ConfigError(f"Override {show(item)} changes an entry of '{show_key(name)}', which another override "
                          f"sets whole; give one or the other.")
    return entries


def place(nested: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    """Put `value` at the dotted key `parts` (of the override `item`) into `nested`."""
    node: Any = nested
    for i, part in enumerate(parts):
        indexed = _INDEXED.fullmatch(part)
        name = indexed.group(1) if indexed else part
        last = i == len(parts) - 1
        if indexed:
            entries, index = _entries(node, name, item), int(indexed.group(2))
            if last:
                entries[index] = value
                return
            node = entries.setdefault(index, {})
        elif last:
            if isinstance(node.get(name), EntryOverrides):
                raise ConfigError(f"Override {show(item)} sets '{show_key(name)}' whole, and another override one of "
                                  f"its entries; give one or the other.")
            node[name] = value
            return
        else:
            node = node.setdefault(name, {})
        if not isinstance(node, dict) or isinstance(node, EntryOverrides):
            raise ConfigError(f"Override {show(item)} sets a key inside '{show_key(part)}', which is a value.")
