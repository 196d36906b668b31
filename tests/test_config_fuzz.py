"""Seeded property tests of the config loader: whatever the overrides or the YAML file hold, `load_config`
returns a valid `Config` (which dumps and loads back unchanged) or raises `ConfigError` with a one-paragraph
message. Any other exception is a bug; a failure names the seed and case, e.g. `_overrides_case(3, 41)`.

The regression tests of the bugs it found are tests/test_config_regressions.py.
"""

from __future__ import annotations

import dataclasses
import math
import random
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml

from bigtrain.config import Config, dump_config, load_config
from bigtrain.config.loader import config_from_dict
from bigtrain.errors import ConfigError

# --- the schema, flattened ------------------------------------------------------------------------------

SECTIONS: dict[str, Any] = {f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)}
FIELDS: list[tuple[str, Any]] = [
    (f"{name}.{f.name}", typing.get_type_hints(type(section))[f.name])
    for name, section in SECTIONS.items() if dataclasses.is_dataclass(section)
    for f in dataclasses.fields(section)
]
MAX_MESSAGE = 4000  # a message is one readable paragraph, not a dump of the value

# --- value pools (YAML text, as written after `key=`) ---------------------------------------------------

INT_TEXTS = ["0", "-1", "1", "2", "3", "4", "7", "8", "16", "64", "512", "-0", "+5", "1_000", "0x1F", "0o17",
             "0b101", "010", "12:30", "2e3", "1e-3", str(2**31), str(2**32 - 1), str(2**32), str(2**63 - 1),
             str(2**63), str(-2**63 - 1), str(10**23), str(10**309), "1" + "0" * 400, "1e308", "1e999"]
FLOAT_TEXTS = ["0", "0.0", "-0.0", "0.1", "0.5", "0.999", "1", "1.0", "2.5", "3e-4", "1e-3", "1E-9", "1.0e-8",
               "-3e-4", "1e308", "-1e308", "1e309", "1e-320", ".nan", ".NaN", "nan", "NaN", ".inf", "-.inf",
               "inf", "-inf", "+.inf", "1e999", "1" + "0" * 400, "9" * 400 + ".0", str(2**63)]
BOOL_TEXTS = ["true", "false", "True", "FALSE", "yes", "no", "on", "off", "y", "1", "0", "maybe", "null"]
STR_TEXTS = ["runs/x", "embedded", "reverse", "sort", "byte", "type:BlockPipe", "type:[", "uniform", "parameters",
             "text", "def ", "''", "' '", "\"\"", "/tmp", "/dev/null", ".", "..", "~/x", "a b", "C:\\x",
             "run\\x00dir", "'a\x00b'", "\"a\\0b\"", "ünïcødé ☃ 😀", "\"\\ud800\"", "\"\\u2028\"", "\"a\\nb\"",
             "2020-01-01", "2020-13-45", "12:30", "1e3", "0x10", ".inf"]
GENERIC_TEXTS = ["", " ", "null", "~", "Null", "true", "[]", "[1, 2]", "{}", "{a: 1}", "{a: {b: [1, {c: 2}]}}",
                 "[null]", "[.nan]", "abc", "'quoted'", "\"double\"", "ünïcødé ☃ 😀", "\u2028x", "\x85", "\t",
                 "a\nb", "\x00", "a\x00b", "\x1b[31m", "\x7f", "\ufeff", "\udcff", "'unterminated", "\"unterminated",
                 "[1, 2", "{a: ", "]", "}", "a: b: c", "- a\n- b", "a:\n  b", "*alias", "&anchor 5", "&a [*a]",
                 "!!int abc", "!!float x", "!!bool maybe", "!!timestamp nope", "!!int ''", "!!float ''",
                 "!!binary ###", "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1]", "!!pairs [a: 1]",
                 "!!python/object/apply:os.system [echo]", "!!python/name:os.system", "!!str 5", "!custom x",
                 "!!map [1]", "!!seq {a: 1}", "{<<: 5}", "{<<: [1]}", "2020-13-45", "2020-02-30 25:61:61",
                 "2001-12-14t21:59:43.10-05:00", "12:30:00", "%YAML 1.1", "%TAG ! x", "---", "...", "--- 5",
                 "5\n---\n6", "@x", "`x", "? a", "? [a]\n: b", "|\n  block", ">-\n  folded", "=", "a=b", "#", "# c",
                 "[" * 3000 + "]" * 3000, "{a: " * 600 + "1" + "}" * 600, "[" * 3000, "1" * 5000, "-" + "1" * 5000,
                 "0x" + "f" * 5000, "0b" + "1" * 20000, "9" * 400, "9" * 400 + ".5", "1." + "0" * 5000 + "e5",
                 "x" * 100_000, "'" + "y" * 50_000 + "'", "1" * 60 + "x", "1" * 20_000 + "e",
                 "1" * 20_000 + "z"]


def _bomb_flow(depth: int, width: int = 2) -> str:
    """A 'billion laughs' list in flow style (width**depth leaves if expanded): each element repeats the one
    before it `width` times, so the last one, and the list, hold the whole expansion."""
    levels = ["&a0 [lol, lol]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth + 1)]
    return "[" + ", ".join(levels) + "]"


def _literal_texts(rng: random.Random, tp: Any) -> list[str]:
    choices = [str(a) for a in get_args(tp)]
    pick = rng.choice(choices)
    return [*choices, pick.upper(), pick[:-1], pick + "x", " " + pick, f"'{pick}'", f"[{pick}]", "auto", "none"]


def _typed_texts(rng: random.Random, tp: Any) -> list[str]:
    """YAML texts around the annotation `tp`: valid values, edge values and values of neighbouring types."""
    origin = get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        arms = [a for a in get_args(tp) if a is not type(None)]
        return ["null", "~", *_typed_texts(rng, rng.choice(arms))]
    if origin is Literal:
        return _literal_texts(rng, tp)
    if tp is bool:
        return BOOL_TEXTS
    if tp is int:
        return [*INT_TEXTS, str(rng.randint(-10, 10)), str(rng.randint(0, 2**rng.randint(1, 80))),
                str(2 ** rng.randint(0, 70)), str(rng.randint(1, 8) * rng.choice([1, 2, 4, 8, 16, 64]))]
    if tp is float:
        return [*FLOAT_TEXTS, repr(rng.uniform(-2, 2)), repr(rng.random()), f"{rng.random():.3e}",
                repr(rng.uniform(0, 1e9))]
    if tp is str:
        return STR_TEXTS
    return GENERIC_TEXTS


def _plausible_text(rng: random.Random, tp: Any) -> str:
    """A value that is likely valid on its own, so that a case gets past the type checks to the cross-field rules."""
    arms = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) not in (None, Literal) else [tp]
    tp = arms[0]
    if get_origin(tp) is Literal:
        return str(rng.choice(get_args(tp)))
    return {bool: lambda: rng.choice(["true", "false"]), int: lambda: str(2 ** rng.randint(0, 4)),
            float: lambda: f"{rng.uniform(0.001, 0.5):.3f}", str: lambda: rng.choice(["runs/x", "embedded"])
            }.get(tp, lambda: "{}")()


def _value_text(rng: random.Random, tp: Any) -> str:
    roll = rng.random()
    if roll < 0.3:
        return _plausible_text(rng, tp)
    if roll < 0.65:
        return rng.choice(_typed_texts(rng, tp))
    if roll < 0.8:  # a value of another field's type
        return rng.choice(_typed_texts(rng, rng.choice(FIELDS)[1]))
    if roll < 0.97:
        return rng.choice(GENERIC_TEXTS)
    return _bomb_flow(rng.randint(1, 10), rng.randint(2, 3))


BAD_KEYS = ["train..steps", ".train", "train.", "", " ", ".", "..", "train.st eps", "tráin.steps", "train.steps\n",
            "train.steps.x", "train.steps.x.y", "a.b.c.d.e", "__class__", "model.__dict__", "model.__class__",
            "train.steps ", " train.steps", "modle.d_model", "model.d_modle", "model", "train", "deepspeed",
            "deepspeed.zero_optimization.stage", "deepspeed.a.b.c", "deepspeed.", "1.2", "null.x", "true",
            "train.\u2028steps", "train.\x00steps", "x" * 10_000, "model." + "y" * 10_000, "=", "train.steps=x"]


def _key(rng: random.Random) -> tuple[str, Any]:
    """A dotted key and the annotation its value is drawn around."""
    roll = rng.random()
    if roll < 0.75:
        return rng.choice(FIELDS)
    if roll < 0.85:  # an unknown key in a known section, often a near miss
        key, tp = rng.choice(FIELDS)
        section, name = key.split(".")
        mangled = rng.choice([name[:-1], name + "s", name.upper(), name.replace("_", "-"), "x", "_" + name])
        return f"{section}.{mangled}", tp
    return rng.choice(BAD_KEYS), rng.choice(FIELDS)[1]


def _base_overrides(rng: random.Random, world_size: int) -> list[str]:
    """A valid starting point for `world_size` ranks, so that fuzzed keys reach the cross-field rules."""
    tensor = rng.choice([t for t in (1, 2, 4, 8) if world_size % t == 0])
    pipeline = rng.choice([p for p in (1, 2) if (world_size // tensor) % p == 0])
    data = world_size // (tensor * pipeline)
    micro = rng.choice([1, 2, 4])
    return [f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}", f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro * data * rng.choice([1, 2])}",
            f"parallel.zero_stage={rng.choice([0, 1])}"]


def _overrides_case(seed: int, index: int) -> tuple[list[str], int]:
    """Case `index` of `seed`: a list of `section.key=value` overrides and a world size (1-8)."""
    rng = random.Random(seed * 1_000_003 + index)
    world_size = rng.randint(1, 8)
    items = _base_overrides(rng, world_size) if rng.random() < 0.6 else []
    if rng.random() < 0.3:  # near-valid: known keys, mostly plausible values (reaches the cross-field rules)
        for _ in range(rng.randint(1, 4)):
            key, tp = rng.choice(FIELDS)
            items.append(f"{key}={_plausible_text(rng, tp) if rng.random() < 0.9 else _value_text(rng, tp)}")
        return items, world_size
    for _ in range(rng.randint(1, 5)):
        key, tp = _key(rng)
        items.append(key if rng.random() < 0.03 else f"{key}={_value_text(rng, tp)}")
    return items, world_size


# --- malformed YAML documents ---------------------------------------------------------------------------


def _python_value(rng: random.Random, tp: Any, depth: int = 0) -> Any:
    """A Python value for a YAML document: often of the field's type, sometimes anything."""
    roll = rng.random()
    if roll < 0.6 and tp is not None:
        text = rng.choice(_typed_texts(rng, tp))
        try:
            return yaml.safe_load(text)
        except Exception:  # noqa: BLE001 -- a text that is not YAML becomes a plain string
            return text
    if roll < 0.8 or depth > 2:
        return rng.choice([0, -1, 10**23, 1e308, math.nan, math.inf, -0.0, "", "ünï ☃", True, None, "x" * 300])
    if roll < 0.9:
        return [_python_value(rng, None, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["a", "b", 1, None, True]): _python_value(rng, None, depth + 1) for _ in range(2)}


def _random_document(rng: random.Random) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(rng.randint(0, 5)):
        key, tp = rng.choice(FIELDS)
        section, name = key.split(".")
        doc.setdefault(section, {})[name] = _python_value(rng, tp)
    if rng.random() < 0.2:
        doc["deepspeed"] = {"zero_optimization": {"stage": rng.randint(0, 3)}, "x": _python_value(rng, None)}
    return doc


MUTATIONS = ["syntax", "tab", "nul", "binary", "latin1", "utf16", "bom", "truncate", "dup-section", "dup-key",
             "top-level", "section-shape", "anchors", "bomb", "merge", "recursive", "deep", "multi-doc",
             "long-line", "crlf", "directive", "unicode-key", "control", "tag"]
SYNTAX_BITS = [":", "[", "{", "]", "}", "'", '"', "&", "*", "!", "%", "@", "`", "|", ">", "- ", "? ", "\t",
               "  ", "\n  x", "\nx", "#", ",", ": :", "&a", "*b", "!!int", "\\", "\n- ", "\n  - y\n"]


def _mutate(rng: random.Random, text: str, data: bytes | None) -> tuple[str, bytes | None]:
    """Apply one mutation to the document (text, or raw bytes once it is no longer text)."""
    kind = rng.choice(MUTATIONS)
    at = rng.randint(0, len(text))
    if kind == "syntax":
        text = text[:at] + rng.choice(SYNTAX_BITS) + text[at:]
    elif kind == "tab":
        text = text.replace("  ", "\t", rng.randint(1, 3)) if "  " in text else "model:\n\td_model: 64\n"
    elif kind == "nul":
        text = text[:at] + "\x00" + text[at:]
    elif kind == "binary":
        data = (data or text.encode()) + rng.randbytes(rng.randint(1, 64))
    elif kind == "latin1":
        data = ("# café\n" + text + "train:\n  sample_prompt: 'é'\n").encode("latin-1", "replace")
    elif kind == "utf16":
        data = text.encode(rng.choice(["utf-16", "utf-16-le", "utf-32"]))
    elif kind == "bom":
        data = b"\xef\xbb\xbf" + text.encode()
    elif kind == "truncate":
        text = text[:at]
    elif kind == "dup-section":
        text += rng.choice(["train:\n  steps: 5\ntrain:\n  steps: 6\n", "model: {}\nmodel: {}\n",
                            "\n" + text])
    elif kind == "dup-key":
        text += rng.choice(["optim:\n  lr: 0.1\n  lr: 0.2\n", "run: {dir: a, dir: b}\n",
                            "deepspeed:\n  a: 1\n  'a': 2\n", "log:\n  every: 1\n  ? every\n  : 2\n"])
    elif kind == "top-level":
        text = rng.choice(["- model\n- train\n", "5\n", "hello\n", "null\n", "~\n", "[]\n", "''\n", "!!set {a}\n",
                           "? [model]\n: 1\n", "1: 2\n", "null: 1\n", "true: 1\n", "[model]: 1\n",
                           "!!binary aGVsbG8=\n", "2020-01-01\n", "|\n  text\n"])
    elif kind == "section-shape":
        section = rng.choice([*SECTIONS, "deepspeed"])
        text += rng.choice([f"{section}:\n  - a\n  - b\n", f"{section}: 5\n", f"{section}:\n", f"{section}: ''\n",
                            f"{section}: [{{}}]\n", f"{section}: !!set {{a}}\n", f"{section}: {{{{}}: 1}}\n"])
    elif kind == "anchors":
        text += rng.choice(["model: &m {d_model: 64, n_heads: 4}\nschedule: *m\n",
                            "train: {steps: &s 10, eval_every: *s}\ncheckpoint: {every: *s}\n",
                            "log: *undefined\n", "optim: &o\n  lr: 0.1\nlog: *o\n", "run: {dir: &d x, d2: *d}\n"])
    elif kind == "bomb":
        where = rng.choice(["deepspeed:\n  bomb: ", "model:\n  d_model: ", "train:\n  sample_prompt: ",
                            "model:\n  nope: ", "lol: ", "deepspeed: "])
        text = f"{where}{_bomb_flow(rng.randint(1, 12), rng.randint(2, 3))}\n"
    elif kind == "merge":
        text += rng.choice(["base: &b {d_model: 64}\nmodel:\n  <<: *b\n  n_heads: 4\n",
                            "model:\n  <<: {d_model: 64}\n  d_model: 128\n", "model:\n  <<: 5\n",
                            "deepspeed:\n  base: &b {x: 1}\n  more:\n    <<: [*b, *b]\n",
                            "model:\n  <<: [{d_model: 64}, {n_heads: 4}]\n  <<: {d_ff: 8}\n"])
    elif kind == "recursive":
        text = rng.choice(["deepspeed: &a {x: *a}\n", "model: &a {d_model: *a}\n", "deepspeed: {x: &l [*l]}\n",
                           "train:\n  sample_prompt: &p [*p]\n", "&t {model: *t}\n"])
    elif kind == "deep":
        depth = rng.choice([50, 300, 3000])
        text += rng.choice(["deepspeed:\n  x: ", "model:\n  d_model: "]) + "[" * depth + "]" * depth + "\n"
    elif kind == "multi-doc":
        text = text + "---\ntrain: {steps: 5}\n" if rng.random() < 0.5 else "---\n" + text + "...\n"
    elif kind == "long-line":
        text += f"run:\n  dir: {'z' * rng.choice([1000, 200_000])}\n"
    elif kind == "crlf":
        text = text.replace("\n", "\r\n")
    elif kind == "directive":
        text = rng.choice(["%YAML 1.2\n---\n", "%YAML 2.0\n---\n", "%FOO bar\n---\n", "%TAG !e! tag:x,2000:\n"]) + text
    elif kind == "unicode-key":
        text += rng.choice(["mödel:\n  d_model: 64\n", "model:\n  d_mödel: 64\n", "😀: 1\n", "\u2028: 1\n",
                            "\"train\\nx\": 1\n", "model:\n  \"d_model\\u0000\": 1\n", "\"\": 1\n"])
    elif kind == "control":
        text = text[:at] + rng.choice(["\x1b", "\x7f", "\x85", "\u2028", "\ufffe", "\x0c", "\x0b", "\r"]) + text[at:]
    elif kind == "tag":
        text += rng.choice(["train:\n  steps: !!int abc\n", "train:\n  seed: !!timestamp x\n",
                            "model:\n  bias: !!bool maybe\n", "optim:\n  lr: !!float ''\n",
                            "run:\n  dir: !!python/object:os.system x\n", "train:\n  steps: 2020-13-45\n",
                            "model: !!omap [d_model: 64]\n", "optim: !custom {lr: 1}\n"])
    return text, data


def _yaml_case(seed: int, index: int) -> tuple[str, bytes | None, int]:
    """Case `index` of `seed`: (kind, file contents or None, world size); kinds 'dir' and 'missing' name no file."""
    rng = random.Random(seed * 1_000_003 + index + 500_000)
    world_size = rng.randint(1, 8)
    roll = rng.random()
    if roll < 0.04:
        return "empty", rng.choice([b"", b"\n", b"   \n", b"# only a comment\n", b"---\n", b"...\n"]), world_size
    if roll < 0.06:
        return rng.choice(["dir", "missing"]), None, world_size
    text = yaml.safe_dump(_random_document(rng), sort_keys=False, allow_unicode=rng.random() < 0.5)
    data: bytes | None = None
    for _ in range(rng.randint(1, 3)):
        text, data = _mutate(rng, text, data)
    return "document", data if data is not None else text.encode("utf-8", "surrogatepass"), world_size


# --- the property ---------------------------------------------------------------------------------------


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check(load: Callable[..., Config], args: tuple[Any, ...], world_size: int, where: str,
           scratch: Path) -> tuple[str | None, bool]:
    """(None, loaded) if `load(*args, world_size=world_size)` gives a Config that dumps and loads back unchanged
    or raises a one-paragraph ConfigError; (what went wrong, False) otherwise."""
    try:
        cfg = load(*args, world_size=world_size)
    except ConfigError as exc:
        message = str(exc)
        if len(message.splitlines()) != 1 or "\n" in message or "\r" in message:
            return f"{where}: ConfigError message is not one paragraph: {_short(message)}", False
        if len(message) > MAX_MESSAGE:
            return f"{where}: ConfigError message has {len(message)} characters: {_short(message)}", False
        return None, False
    except Exception as exc:  # noqa: BLE001 -- every other exception is the bug being looked for
        return f"{where}: {type(exc).__name__}: {_short(str(exc))}", False
    if not isinstance(cfg, Config):
        return f"{where}: returned {type(cfg).__name__}, not a Config", False
    try:  # what run.dir/config.yaml holds must load back to the same config
        scratch.write_text(dump_config(cfg), encoding="utf-8")
        again = load_config(scratch, world_size=world_size)
    except Exception as exc:  # noqa: BLE001
        return (f"{where}: the loaded config does not dump and load back: {type(exc).__name__}: "
                f"{_short(str(exc))}", False)
    if again != cfg:
        return f"{where}: dump/load changed the config: {_short(cfg)} -> {_short(again)}", False
    return None, True


def _report(problems: list[str], total: int) -> None:
    assert not problems, f"{len(problems)} of {total} cases failed:\n" + "\n".join(problems[:30])


OVERRIDE_SEEDS, OVERRIDE_CASES = range(4), 150  # 600 override lists
YAML_SEEDS, YAML_CASES = range(2), 100  # 200 YAML documents
DICT_SEEDS, DICT_CASES = range(2), 60  # 120 dicts through config_from_dict


@pytest.mark.parametrize("seed", OVERRIDE_SEEDS)
def test_fuzz_overrides(seed: int, tmp_path: Path) -> None:
    """Random, type-aware `section.key=value` lists: a Config or a one-paragraph ConfigError, nothing else."""
    problems, loaded = [], 0
    for index in range(OVERRIDE_CASES):
        items, world_size = _overrides_case(seed, index)
        where = f"_overrides_case({seed}, {index}) world_size={world_size} overrides={_short(items, 600)}"
        problem, ok = _check(load_config, (None, items), world_size, where, tmp_path / "dump.yaml")
        problems += [problem] if problem else []
        loaded += ok
    _report(problems, OVERRIDE_CASES)
    assert loaded >= OVERRIDE_CASES // 10, f"only {loaded} cases loaded: the generator no longer reaches valid configs"


@pytest.mark.parametrize("seed", YAML_SEEDS)
def test_fuzz_yaml_documents(seed: int, tmp_path: Path) -> None:
    """Malformed and odd YAML files (syntax, shape, duplicates, aliases, bytes, encodings, paths)."""
    problems = []
    for index in range(YAML_CASES):
        kind, data, world_size = _yaml_case(seed, index)
        path = tmp_path / f"case{index}.yaml"
        if kind == "dir":
            path.mkdir()
        elif data is not None:
            path.write_bytes(data)
        where = f"_yaml_case({seed}, {index}) kind={kind} world_size={world_size} bytes={_short(data, 600)}"
        problem, _ = _check(load_config, (path,), world_size, where, tmp_path / "dump.yaml")
        problems += [problem] if problem else []
    _report(problems, YAML_CASES)


@pytest.mark.parametrize("seed", DICT_SEEDS)
def test_fuzz_config_from_dict(seed: int, tmp_path: Path) -> None:
    """Python dicts (what a checkpoint's config.yaml gives back) through `config_from_dict`."""
    problems = []
    for index in range(DICT_CASES):
        rng = random.Random(seed * 1_000_003 + index + 900_000)
        world_size = rng.randint(1, 8)
        data: Any = _random_document(rng)
        if rng.random() < 0.1:
            data = rng.choice([None, [], 5, "model", {1: 2}, {"model": None}, {"model": [1]}, {None: {}}])
        where = f"config_from_dict case ({seed}, {index}) world_size={world_size} data={_short(data, 600)}"
        problem, _ = _check(config_from_dict, (data,), world_size, where, tmp_path / "dump.yaml")
        problems += [problem] if problem else []
    _report(problems, DICT_CASES)
