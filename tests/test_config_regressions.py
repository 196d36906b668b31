"""Regression tests of the config loader's bugs that tests/test_config_fuzz.py's seeded fuzzing found: bytes that
are not UTF-8, unbounded seeds and integers, non-finite floats, YAML the parser cannot build, duplicate keys, alias
bombs; each a one-paragraph `ConfigError` naming the key."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bigtrain.config import Config, load_config
from bigtrain.config.checks import validate
from bigtrain.errors import ConfigError
from tests.test_config_fuzz import MAX_MESSAGE, _bomb_flow


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Fail instead of hanging (alias bombs that are expanded take exponential time)."""
    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _one_paragraph(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(exc.value)
    assert len(message.splitlines()) == 1 and len(message) <= MAX_MESSAGE, message
    return message


def _file(tmp_path: Path, data: bytes | str) -> Path:
    path = tmp_path / "cfg.yaml"
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize(("data", "match"), [
    (b"train:\n  sample_prompt: caf\xe9\n", r"not UTF-8 text: byte 0xe9 at line 2, column 21 \(offset 27\)"),
    ("model:\n  d_model: 64\n".encode("utf-16"), r"not UTF-8 text: byte 0xff at line 1, column 1"),
    (b"\xff\xfe\x00", r"not UTF-8 text"),
    (b"\xef\xbb\xbfmodel:\n  d_model: 6\xff4\n", r"byte 0xff at line 2, column 13 \(offset 22\)"),
])
def test_non_utf8_file_is_a_config_error(tmp_path: Path, data: bytes, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(_file(tmp_path, data))
    assert "cfg.yaml" in _one_paragraph(info)


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    assert load_config(_file(tmp_path, b"\xef\xbb\xbftrain:\n  steps: 7\n")).train.steps == 7


@pytest.mark.parametrize("seed", ["10**23", str(2**32), "-1", str(2**64)])
def test_seed_is_bounded(seed: str) -> None:
    with pytest.raises(ConfigError, match=r"'train\.seed' must lie in \[0, 2\*\*32\) = \[0, 4294967295\]") as info:
        load_config(None, [f"train.seed={eval(seed)}"])
    _one_paragraph(info)
    assert load_config(None, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
    assert load_config(None, ["train.seed=0"]).train.seed == 0


@pytest.mark.parametrize("key", ["optim.lr", "model.dropout", "model.rope_theta", "model.norm_eps", "optim.eps",
                                 "optim.weight_decay", "optim.grad_clip", "optim.lamb_max_trust_ratio",
                                 "schedule.noam_scale", "log.peak_tflops", "train.hang_timeout",
                                 "parallel.collective_timeout", "model.attention_dropout", "data.mask_prob"])
@pytest.mark.parametrize("value", [".nan", ".NaN", ".inf", "-.inf", "1e999", "-1e400"])
def test_non_finite_floats_are_refused(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}' must be a finite number, got (nan|inf|-inf)\.") as info:
        load_config(None, [f"{key}={value}"])
    _one_paragraph(info)


@pytest.mark.parametrize(("key", "hint"), [
    ("train.hang_timeout", r"train\.hang_timeout=0 turns the watchdog off"),
    ("optim.grad_clip", r"optim\.grad_clip=0 disables clipping"),
    ("optim.lamb_max_trust_ratio", r"optim\.lamb_max_trust_ratio=null leaves the trust ratio unbounded"),
    ("log.peak_tflops", r"log\.peak_tflops=null looks the peak up"),
])
def test_infinity_names_the_finite_way_to_say_it(key: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=hint):
        load_config(None, [f"{key}=.inf"])


@pytest.mark.parametrize("key", ["train.hang_timeout", "parallel.collective_timeout"])
def test_timeouts_are_bounded(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}' must be at most 1e\+09 seconds"):
        load_config(None, [f"{key}=1e300"])
    assert load_config(None, [f"{key}=1e9"]) is not None


@pytest.mark.parametrize("item", ["train.steps=10**23", f"train.steps={2**63}", f"model.d_model={-2**63 - 1}",
                                  f"train.threads={10**30}"])
def test_integers_must_fit_in_64_bits(item: str) -> None:
    key, value = item.split("=")
    with pytest.raises(ConfigError, match=rf"'{key}' must be an integer in \[-2\*\*63, 2\*\*63\)") as info:
        load_config(None, [f"{key}={eval(value)}"])
    _one_paragraph(info)


def test_absurd_but_representable_sizes_pass_to_the_memory_check() -> None:
    cfg = load_config(None, ["model.d_model=1000000000", "model.n_heads=8", "model.d_ff=4000000000"])
    assert cfg.model.d_model == 10**9


@pytest.mark.parametrize(("item", "match"), [
    ("optim.lr=1" + "0" * 400, r"'optim\.lr' must be float, got an integer of 401 digits"),
    ("run.dir=0x" + "f" * 5000, r"'run\.dir' must be str, got an integer of 6021 digits"),
    ("train.steps=" + "1" * 5000, r"'train\.steps' must be int, got '1111111111"),
    ("train.steps=!!int abc", r"'train\.steps' must be int, got '!!int abc'"),
    ("model.bias=!!bool maybe", r"'model\.bias' must be bool, got '!!bool maybe'"),
    ("train.seed=2020-13-45", r"'train\.seed' must be int, got '2020-13-45'"),
    ("train.steps=!!timestamp x", r"'train\.steps' must be int"),
    ("train.steps=!!int ''", r"'train\.steps' must be int"),
    ("model.d_model=" + "[" * 3000, r"'model\.d_model' must be int, got '\[\[\[\["),
])
def test_values_yaml_cannot_build_are_config_errors(item: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, [item])
    _one_paragraph(info)


@pytest.mark.parametrize(("text", "match"), [
    ("train:\n  steps: !!int abc\n", r"not valid YAML at line 2, column 10: cannot build an int from 'abc'"),
    ("train:\n  seed: 2020-13-45\n", r"line 2, column 9: cannot build a timestamp from '2020-13-45'"),
    ("model:\n  bias: !!bool maybe\n", r"line 2, column 9: cannot build a bool from 'maybe'"),
    ("train:\n  steps: " + "1" * 5000 + "\n", r"line 2, column 10: cannot build an int from '1111"),
    ("deepspeed:\n  x: " + "[" * 3000 + "]" * 3000 + "\n", r"nests lists or mappings deeper than"),
    ("a\x00b: 1\n", r"not valid YAML at line 1, column 2: unacceptable character #x0000"),
])
def test_yaml_the_parser_cannot_build_is_a_config_error(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(_file(tmp_path, text))
    _one_paragraph(info)


@pytest.mark.parametrize(("text", "match"), [
    ("train:\n  steps: 5\ntrain:\n  seed: 3\n", r"line 3, column 1: duplicate key 'train' \(first at line 1\)"),
    ("optim:\n  lr: 0.1\n  'lr': 0.2\n", r"line 3, column 3: duplicate key 'lr' \(first at line 2\)"),
    ("run: {dir: a, dir: b}\n", r"line 1, column 15: duplicate key 'dir'"),
])
def test_duplicate_keys_are_refused(tmp_path: Path, text: str, match: str) -> None:
    """PyYAML keeps the last of two equal keys, so a repeated section silently dropped the first one."""
    with pytest.raises(ConfigError, match=match) as info:
        load_config(_file(tmp_path, text))
    _one_paragraph(info)


def test_merge_keys_still_override(tmp_path: Path) -> None:
    cfg = load_config(_file(tmp_path, "model:\n  <<: {d_model: 64, n_heads: 2}\n  d_model: 128\n"))
    assert (cfg.model.d_model, cfg.model.n_heads) == (128, 2)


def test_alias_bomb_in_a_value_is_refused_quickly(tmp_path: Path) -> None:
    """2**40 leaves if expanded: the message shows a bounded excerpt instead of the expansion."""
    match = r"'model\.d_model' must be int, got \[\['lol', 'lol'\], "
    with _deadline(10), pytest.raises(ConfigError, match=match) as info:
        load_config(_file(tmp_path, f"model:\n  d_model: {_bomb_flow(40)}\n"))
    _one_paragraph(info)


@pytest.mark.parametrize("text", [
    "deepspeed:\n  bomb: " + _bomb_flow(40) + "\n",
    "deepspeed: &a {x: *a}\n",
    "deepspeed: {x: &l [*l]}\n",
])
def test_deepspeed_passthrough_must_be_plain_bounded_data(tmp_path: Path, text: str) -> None:
    """An alias bomb or a cycle under deepspeed: loaded fine, then hung or overflowed in dump_config."""
    with _deadline(10), pytest.raises(ConfigError, match=r"Config section 'deepspeed'.* (more than|deeper than)"):
        load_config(_file(tmp_path, text), world_size=2)


def test_merge_key_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """Merge keys copy key/value pairs, so `<<: [*a, *a]` chains double the pairs at each level."""
    lines = ["l0: &l0 {a: 1}"] + [f"l{i}: &l{i} {{<<: [*l{i - 1}, *l{i - 1}]}}" for i in range(1, 30)]
    with _deadline(10):
        try:
            load_config(_file(tmp_path, "parallel: {engine: deepspeed}\ndeepspeed:\n  " + "\n  ".join(lines)))
        except ConfigError as exc:  # PyYAML >= 6.0.2 drops repeated merge keys; older ones hit the bound
            assert "merge keys (<<) expand this mapping to more than" in str(exc)


@pytest.mark.parametrize(("text", "match"), [
    ("deepspeed:\n  1: 2\n", r"'deepspeed' keys must be strings, got 1 \(int\) at deepspeed"),
    ("deepspeed:\n  a: 2020-01-01\n", r"'deepspeed\.a' must be plain data .* got datetime\.date"),
    ("deepspeed:\n  a: !!set {x}\n", r"'deepspeed\.a' must be plain data"),
    ("deepspeed:\n  a: [1, .nan]\n", r"'deepspeed\.a\[1\]' must be plain data .* finite"),
    ("deepspeed:\n  a: " + str(2**64) + "\n", r"'deepspeed\.a' must be plain data"),
])
def test_deepspeed_passthrough_values(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(_file(tmp_path, text), world_size=2)
    _one_paragraph(info)


@pytest.mark.parametrize(("items", "match"), [
    (["train.st\neps=5"], r"Unknown config key 'train\.st\\neps'"),
    (["train.steps\n5"], r"Override 'train\.steps\\n5' is not of the form"),
    (["train..steps\n=5"], r"Override 'train\.\.steps\\n=5' has an empty key"),
    (["model.d_model=1\n2"], r"'model\.d_model' must be int"),
    (["run.dir=x", "run.dir.y=1"], r"Override 'run\.dir\.y=1' sets a key inside 'dir'"),
    (["x" * 10_000 + "=1"], r"Unknown config key 'x{50}\.\.\.x{20}' in the top level"),
    (["parallel.pipeline=2", "parallel.partition_method=" + "q" * 100_000],
     r"partition_method='q+\.\.\.q+' is not known"),
    ([5], r"Override 5 is not a string"),
])
def test_messages_stay_one_short_paragraph(items: list[Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, items, world_size=2)
    _one_paragraph(info)


def test_newline_in_a_yaml_key_stays_escaped(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Unknown config key 'train\.a\\nb'") as info:
        load_config(_file(tmp_path, 'train:\n  "a\\nb": 1\n'))
    _one_paragraph(info)


def test_exponent_check_is_linear_on_long_strings() -> None:
    """`1e-3` is read as a float where a number is due; the pattern once backtracked quadratically, which on this
    200 000-character value takes far longer than the deadline (a hang fails the test; a slow machine does not)."""
    with _deadline(60), pytest.raises(ConfigError):
        load_config(None, ["train.steps='" + "1" * 200_000 + "x'"])


@pytest.mark.parametrize(("path", "match"), [
    ("x" * 5000 + ".yaml", r"cannot be read: File name too long"),
    ("d" * 200 + "/cfg.yaml", r"Config file '.*/d{200}/cfg\.yaml' does not exist"),  # paths are not shortened
    ("a\nb.yaml", r"Config file '.*a\\nb\.yaml' does not exist"),
    ("nul\x00.yaml", r"Config file '.*nul\\x00\.yaml' does not exist"),
])
def test_odd_config_paths(tmp_path: Path, path: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(tmp_path / path)
    _one_paragraph(info)


def test_config_path_that_is_not_a_regular_file() -> None:
    with pytest.raises(ConfigError, match=r"Config path '/dev/null' is not a regular file"):
        load_config("/dev/null")


@pytest.mark.parametrize("key", ["run.dir", "data.source", "data.tokenizer", "data.cache_dir"])
@pytest.mark.parametrize("value", ["''", "'a\x00b'"])
def test_paths_must_be_non_empty_without_nul(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}' must be a non-empty path without NUL characters") as info:
        load_config(None, [f"{key}={value}"])
    _one_paragraph(info)


@pytest.mark.parametrize("world_size", [0, -1])
def test_world_size_must_be_positive(world_size: int) -> None:
    with pytest.raises(ConfigError, match=rf"world size must be at least 1, got {world_size}"):
        load_config(None, world_size=world_size)


def test_validate_refuses_nan_set_in_code() -> None:
    """The finite rule lives in the checks, so a Config built in code gets it too."""
    cfg = Config()
    cfg.optim.lr = math.nan
    with pytest.raises(ConfigError, match=r"'optim\.lr' must be a finite number, got nan"):
        validate(cfg)
