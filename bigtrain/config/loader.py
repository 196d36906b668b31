"""Build a `Config` from a YAML file and dotted `section.key=value` overrides.

Order: dataclass defaults, then the file, then overrides (left to right). Unknown keys fail with the
nearest valid name, values are type-checked against the schema, and `checks.validate` runs the
cross-field rules, all before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from bigtrain.config.checks import validate
from bigtrain.config.schema import Config
from bigtrain.errors import ConfigError


def _nearest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
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
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints become floats where floats are due)."""
    origin = get_origin(tp)
    bad = ConfigError(f"Config key '{key}' must be {_type_name(tp)}, got {value!r} "
                      f"({type(value).__name__}). Fix it in the YAML file or override it as {key}=VALUE.")
    if tp in (int, float) and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)
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
        raise bad
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Config key '{key}' has value {value!r}, which is not allowed.{hint} "
                              f"Allowed values: {allowed}.")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a schema bug, not a user error


def _merge_section(obj: Any, data: Any, prefix: str) -> Any:
    """Return a copy of dataclass `obj` with the keys in `data` applied (recursively)."""
    if not isinstance(data, dict):
        raise ConfigError(f"Config section '{prefix}' must be a mapping of keys to values, "
                          f"got {data!r}.")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    updates = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            where = f"section '{prefix}'" if prefix else "the top level"
            raise ConfigError(f"Unknown config key '{full}' in {where}.{_nearest(str(key), names)}")
        current = getattr(obj, key)
        if isinstance(current, dict):  # free-form passthrough section (deepspeed:)
            if not isinstance(value, dict):
                raise ConfigError(f"Config section '{full}' must be a mapping of keys to values, got {value!r}.")
            updates[key] = _deep_merge(current, value)
        elif dataclasses.is_dataclass(current):
            updates[key] = _merge_section(current, value, full)
        else:
            updates[key] = _coerce(full, value, hints[key])
    return dataclasses.replace(obj, **updates)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['train.steps=50', 'model.dropout=0.0'] into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form section.key=value "
                              f"(for example train.steps=50).")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if any(not p for p in parts):
            raise ConfigError(f"Override '{item}' has an empty key; write section.key=value.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override '{item}' sets a key inside '{part}', which is a value.")
        node[parts[-1]] = value
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"Config path '{path}' is a directory; pass a YAML file to --config (for example "
                          f"{path / 'smoke.yaml'}).")
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist. Pass an existing YAML file to --config "
                          f"(the shipped ones are in configs/).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        # PyYAML's own message spans several lines (with a source excerpt); keep one paragraph.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"Config file '{path}' is not valid YAML{where}: {problem}. Fix the syntax; the file "
                          f"holds sections (model:, train:, ...) of indented `key: value` lines.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections (model:, train:, ...), "
                          f"got {type(data).__name__}.")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                world_size: int = 1) -> Config:
    """Defaults <- YAML file <- overrides, then the cross-field checks for `world_size` ranks."""
    cfg = Config()
    if path is not None:
        cfg = _merge_section(cfg, read_yaml(path), "")
    if overrides:
        cfg = _merge_section(cfg, parse_overrides(overrides), "")
    validate(cfg, world_size=world_size)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], world_size: int = 1) -> Config:
    cfg = _merge_section(Config(), data, "")
    validate(cfg, world_size=world_size)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
