"""Build a `Config` from a YAML file and dotted `section.key=value` overrides.

Order: dataclass defaults, then the file, then overrides (left to right). Unknown keys fail with the
nearest valid name, values are type-checked against the schema, and `checks.validate` runs the
cross-field rules, all before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from bigtrain.config.checks import INT64, validate
from bigtrain.config.layout import Layout
from bigtrain.config.overrides import EntryOverrides, place
from bigtrain.config.rules import show, show_key
from bigtrain.config.schema import Config, key_name
from bigtrain.errors import ConfigError


def _nearest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5) if len(name) <= 100 else []
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(choices))}."


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


# YAML 1.2 floats that PyYAML (YAML 1.1) reads as strings because they lack a dot: 1e-3, 3E+4, 5e2.
# (No nested quantifiers over the same digits: the pattern stays linear on long strings of digits.)
_EXPONENT_FLOAT = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+")


def _bad_type(key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(f"Config key '{key}' must be {_type_name(tp)}, got {show(value)} ({type(value).__name__}). "
                       f"Fix it in the YAML file or override it as {key}=VALUE.")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints become floats where floats are due)."""
    origin = get_origin(tp)
    if tp in (int, float) and isinstance(value, str) and len(value) <= 100 and _EXPONENT_FLOAT.fullmatch(
            value.strip()):
        value = float(value)  # inf when out of range, refused by the checks
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise _bad_type(key, value, tp)
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            close = (difflib.get_close_matches(value, [str(a) for a in get_args(tp)], n=1)
                     if isinstance(value, str) and len(value) <= 100 else [])
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Config key '{key}' has value {show(value)}, which is not allowed.{hint} "
                              f"Allowed values: {allowed}.")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        if tp is bool and isinstance(value, bool):
            return value
        if tp is int and number and (isinstance(value, int) or value.is_integer()):
            return int(value)
        if tp is float and number:
            return float(value)  # OverflowError for an int beyond the float range
        if tp is str and (isinstance(value, str) or number):
            return value if isinstance(value, str) else str(value)  # ValueError for an int of over 4300 digits
    except (OverflowError, ValueError):
        pass
    if tp in (bool, int, float, str):
        raise _bad_type(key, value, tp)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a schema bug, not a user error


def _merge_section(obj: Any, data: Any, prefix: str) -> Any:
    """Return a copy of dataclass `obj` with the keys in `data` applied (recursively)."""
    if not isinstance(data, dict):
        raise ConfigError(f"Config section '{prefix}' must be a mapping of keys to values, "
                          f"got {show(data)}.")
    hints = typing.get_type_hints(type(obj))
    fields = {key_name(f): f for f in dataclasses.fields(obj)}  # by the key's name (`async` is the field async_)
    names = list(fields)
    updates = {}
    for key, value in data.items():
        if key not in names:
            where = f"section '{prefix}'" if prefix else "the top level"
            shown = show_key(key)
            raise ConfigError(f"Unknown config key '{prefix + '.' if prefix else ''}{shown}' in {where}."
                              f"{_nearest(shown, names)}")
        full, name = f"{prefix}.{key}" if prefix else key, fields[key].name
        current = getattr(obj, name)
        if isinstance(value, EntryOverrides) and not isinstance(current, list):
            raise ConfigError(f"Override {full}[{min(value)}]: '{full}' is not a list; [i] picks an entry of a "
                              f"list key (as in data.sources[0].weight=2).")
        if isinstance(current, dict):  # free-form passthrough section (deepspeed:)
            if not isinstance(value, dict):
                raise ConfigError(f"Config section '{full}' must be a mapping of keys to values, got {show(value)}.")
            merged = _deep_merge(current, value)
            _check_plain(full, merged)
            updates[name] = merged
        elif dataclasses.is_dataclass(current):
            updates[name] = _merge_section(current, value, full)
        elif isinstance(current, list) and get_origin(hints[name]) is list:  # a list of sections (data.sources)
            item_type = get_args(hints[name])[0]
            if isinstance(value, EntryOverrides):  # overrides of single entries: data.sources[0].weight=2
                updates[name] = _merge_items(current, value, item_type, full)
                continue
            if not isinstance(value, list):
                keys = ", ".join(f.name for f in dataclasses.fields(item_type))
                raise ConfigError(f"Config key '{full}' must be a list of mappings with the keys {keys}, got "
                                  f"{show(value)}.")
            updates[name] = [_merge_section(item_type(), item, f"{full}[{i}]") for i, item in enumerate(value)]
        else:
            value = _coerce(full, value, hints[name])
            if fields[key].metadata.get("path") and isinstance(value, str):
                value = os.path.expanduser(value)  # run.dir=~/x is the home folder's x, as in a shell
            updates[name] = value
    return dataclasses.replace(obj, **updates)


def _merge_items(current: list[Any], items: EntryOverrides, item_type: type, key: str) -> list[Any]:
    """`current` with the overridden entries merged in (an index one past the end adds an entry)."""
    merged = list(current)
    for index in sorted(items):
        where = f"{key}[{index}]"
        if index < len(merged):
            merged[index] = _merge_section(merged[index], items[index], where)
        elif index == len(merged):
            merged.append(_merge_section(item_type(), items[index], where))
        else:
            have = f"entries 0 to {len(merged) - 1}" if merged else "no entries"
            raise ConfigError(f"Override of {where}: '{key}' has {have}; an override changes one of them or adds "
                              f"{key}[{len(merged)}].")
    return merged


_MAX_PLAIN_VALUES = 10_000  # values in a passthrough section, counted as a tree (aliases repeat what they name)
_MAX_PLAIN_DEPTH = 32


def _check_plain(section: str, data: dict[str, Any]) -> None:
    """A passthrough section holds JSON-like data: string keys, lists, strings, finite numbers, booleans, null;
    no alias bomb or cycle (which would hang or overflow when the config is copied or dumped)."""
    budget = _MAX_PLAIN_VALUES

    def walk(where: str, value: Any, depth: int) -> None:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise ConfigError(f"Config section '{section}' holds more than {_MAX_PLAIN_VALUES} values (counting "
                              f"each use of a YAML alias); is it an alias bomb or does it refer to itself?")
        if depth > _MAX_PLAIN_DEPTH:
            raise ConfigError(f"Config section '{section}' nests lists or mappings deeper than {_MAX_PLAIN_DEPTH} "
                              f"levels (at {show_key(where)}); does it refer to itself?")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ConfigError(f"Config section '{section}' keys must be strings, got {show(key)} "
                                      f"({type(key).__name__}) at {where}.")
                walk(f"{where}.{show_key(key)}", item, depth + 1)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(f"{where}[{index}]", item, depth + 1)
        elif not (value is None or isinstance(value, (bool, str))
                  or (isinstance(value, int) and INT64[0] <= value < INT64[1])
                  or (isinstance(value, float) and math.isfinite(value))):
            raise ConfigError(f"Config key '{show_key(where)}' must be plain data (a mapping with string keys, a "
                              f"list, a string, a finite number, a 64-bit integer, true/false or null), got "
                              f"{show(value)} ({type(value).__name__}).")

    walk(section, data, 0)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAX_MERGED = 10_000  # entries a mapping may get from merge keys (<<)
# What PyYAML's constructors raise on scalars they cannot build: `!!int abc`, `2020-13-45`, `!!bool maybe`,
# `!!int ''`, an int of over 4300 digits, `!!timestamp x`.
_BUILD_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses duplicate keys and turns values it cannot build into YAML errors
    with a position (instead of a ValueError or KeyError from deep inside PyYAML)."""

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], yaml.Mark] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                first = seen.setdefault((key_node.tag, key_node.value), key_node.start_mark)
                if first is not key_node.start_mark:
                    raise yaml.composer.ComposerError(
                        None, None, f"duplicate key {show(key_node.value)} (first at line {first.line + 1})",
                        key_node.start_mark)
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except _BUILD_ERRORS as exc:
            kind = node.tag.rsplit(":", 1)[-1]
            what = show(node.value) if isinstance(node, yaml.ScalarNode) else f"this {node.id}"
            detail = f" ({' '.join(str(exc).split())[:120]})" if isinstance(exc, (ValueError, OverflowError)) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot build {'an' if kind[:1] in 'aeiou' else 'a'} {kind} from {what}{detail}",
                node.start_mark) from None

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        super().flatten_mapping(node)  # older PyYAML doubles the entries of each `<<: [*a, *a]` level
        if len(node.value) > _MAX_MERGED:
            raise yaml.constructor.ConstructorError(
                None, None, f"merge keys (<<) expand this mapping to more than {_MAX_MERGED} entries",
                node.start_mark)


def _parse(text: str) -> Any:
    """One YAML document (raises yaml.YAMLError, or RecursionError on absurd nesting)."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _override_value(raw: str) -> Any:
    """An override's value, parsed as YAML; text that YAML cannot read stays a string."""
    if not raw.strip():
        return ""
    try:
        return _parse(raw)
    except (yaml.YAMLError, RecursionError, *_BUILD_ERRORS):
        return raw


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['train.steps=50', 'model.dropout=0.0', 'data.sources[0].weight=2'] into a nested dict (values parsed
    as YAML; entries of a list key by index)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"Override {show(item)} is not a string; write section.key=value.")
        if "=" not in item:
            raise ConfigError(f"Override {show(item)} is not of the form section.key=value "
                              f"(for example train.steps=50).")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if any(not p for p in parts):
            raise ConfigError(f"Override {show(item)} has an empty key; write section.key=value.")
        place(nested, parts, _override_value(raw), item)
    return nested


def _line_column(text: str | bytes, offset: int) -> str:
    newline = "\n" if isinstance(text, str) else b"\n"
    line = text.count(newline, 0, offset) + 1
    return f"line {line}, column {offset - text.rfind(newline, 0, offset)}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    shown = show_key(str(path), limit=1000)
    try:
        if path.is_dir():
            raise ConfigError(f"Config path '{shown}' is a directory; pass a YAML file to --config (for example "
                              f"{show_key(str(path / 'smoke.yaml'), limit=1000)}).")
        if not path.exists():
            raise ConfigError(f"Config file '{shown}' does not exist. Pass an existing YAML file to --config "
                              f"(the shipped ones are in configs/).")
        if not path.is_file():
            raise ConfigError(f"Config path '{shown}' is not a regular file; pass a YAML file to --config.")
        raw = path.read_bytes()
    except OSError as exc:  # permissions, a name too long, an I/O error
        raise ConfigError(f"Config file '{shown}' cannot be read: {exc.strerror or exc}. Pass a readable YAML "
                          f"file to --config.") from None
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte order mark is fine
    except UnicodeDecodeError as exc:  # positions count from after a byte order mark
        body, at = exc.object, exc.start
        raise ConfigError(f"Config file '{shown}' is not UTF-8 text: byte 0x{body[at]:02x} at "
                          f"{_line_column(body, at)} (offset {len(raw) - len(body) + at}) cannot be decoded. Save "
                          f"the file as UTF-8.") from None
    try:
        data = _parse(text)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, most control characters)
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError(f"Config file '{shown}' is not valid YAML at {_line_column(text, exc.position)}: "
                          f"unacceptable character #x{code:04x}: {exc.reason}. Remove it; the "
                          f"file holds sections (model:, train:, ...) of indented `key: value` lines.") from None
    except yaml.YAMLError as exc:
        # PyYAML's own message spans several lines (with a source excerpt); keep one paragraph.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())[:300]
        raise ConfigError(f"Config file '{shown}' is not valid YAML{where}: {problem}. Fix the syntax; the file "
                          f"holds sections (model:, train:, ...) of indented `key: value` lines.") from None
    except RecursionError:
        raise ConfigError(f"Config file '{shown}' nests lists or mappings deeper than the YAML parser can follow; "
                          f"a config file needs a few levels only.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{shown}' must hold a mapping of sections (model:, train:, ...), "
                          f"got {type(data).__name__}.")
    return data


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """`cfg` with the overrides applied (a later one wins; `data.sources=[...]` then `data.sources[1].weight=3`
    changes the list just given)."""
    return _merge_section(cfg, parse_overrides(overrides), "") if overrides else cfg


def merged_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- overrides, each key and type checked, but not yet the cross-field checks (which
    need the world size: `validate`)."""
    cfg = Config()
    if path is not None:
        cfg = _merge_section(cfg, read_yaml(path), "")
    cfg = apply_overrides(cfg, overrides)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                world_size: int = 1) -> Config:
    """Defaults <- YAML file <- overrides, then the cross-field checks for `world_size` ranks."""
    return load_config_and_layout(path, overrides, world_size)[0]


def load_config_and_layout(path: str | Path | None = None, overrides: list[str] | None = None,
                           world_size: int = 1) -> tuple[Config, Layout]:
    """`load_config`, and the layout the config resolves to on `world_size` ranks (`resolve_layout`)."""
    cfg = merged_config(path, overrides)
    return cfg, validate(cfg, world_size=world_size)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data, each key named as files spell it (`key_name`)."""
    return _as_dict(cfg)


def _as_dict(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {key_name(f): _as_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return type(value)(_as_dict(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_dict(v) for k, v in value.items()}
    return value


def config_from_dict(data: dict[str, Any], world_size: int = 1, overrides: list[str] | None = None) -> Config:
    """Defaults <- `data` (e.g. a checkpoint's config) <- overrides, then the cross-field checks."""
    return config_from_dict_and_layout(data, world_size, overrides)[0]


def config_from_dict_and_layout(data: dict[str, Any], world_size: int = 1, overrides: list[str] | None = None
                                ) -> tuple[Config, Layout]:
    """`config_from_dict`, and the layout the config resolves to on `world_size` ranks."""
    cfg = _merge_section(Config(), data, "")
    cfg = apply_overrides(cfg, overrides)
    return cfg, validate(cfg, world_size=world_size)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
