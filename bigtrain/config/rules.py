"""The vocabulary the config checks are written in: a rule that must hold (`require`), the common ones
(positive, a fraction, a bounded timeout), and `show` / `show_key`, which quote a value or a key the way a
one-paragraph message can (short, one line, whatever the value is)."""

from __future__ import annotations

import math
import reprlib
from typing import Any

from bigtrain.errors import ConfigError

MAX_TIMEOUT = 1e9  # seconds (about 31 years); timedelta, thread waits and NCCL refuse much larger values


class _Short(reprlib.Repr):
    """reprlib with short limits and integers too long for `repr` (over 4300 digits) described by size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 4, 6, 6, 6
        self.maxstring, self.maxother, self.maxlong = 80, 80, 60

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() <= 1000:
            return super().repr_int(x, level)
        digits = int(x.bit_length() * math.log10(2))
        digits += abs(x) >= 10**digits
        return f"{'a negative' if x < 0 else 'an'} integer of {digits} digits"

_SHORT = _Short()


def show(value: Any) -> str:
    """A short one-line repr of a config value for messages (bounded for huge, deep or self-referencing values)."""
    return _SHORT.repr(value)


def show_key(key: Any, limit: int = 80) -> str:
    """A key (or path) as written, with control characters escaped and, beyond `limit` characters, shortened
    (to quote in a message)."""
    text = key if isinstance(key, str) else show(key)
    if len(text) > limit:
        text = f"{text[:limit * 5 // 8]}...{text[-(limit // 4):]}"
    return repr(text)[1:-1]


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def positive(name: str, value: int | float) -> None:
    require(value > 0, f"Config key '{name}' must be positive, got {value}.")


def fraction(name: str, value: float, low_open: bool = False, high_open: bool = True) -> None:
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    require(lo_ok and hi_ok, f"Config key '{name}' must lie in {lo}0, 1{hi}, got {value}.")


def at_most_timeout(name: str, value: float) -> None:
    require(value <= MAX_TIMEOUT, f"Config key '{name}' must be at most {MAX_TIMEOUT:g} seconds (about 31 years), "
            f"got {value}.")
