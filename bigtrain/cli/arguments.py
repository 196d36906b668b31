"""How every command reads its command line: one parser class and the value types its options share.

- `CommandParser` reports argparse's own errors (an unknown option, a missing one, a value of the wrong type) as
  every other bad input is reported: one paragraph, `bigtrain: error: ...`, exit status 2; under a launcher once,
  by rank 0 (`report.fail`), not once per rank with the usage text.
- `CommandParser.parse` reads options and positionals in any order (argparse's intermixed parsing), so
  `section.key=value` overrides may stand before, between or after the options; a command that takes one path
  and overrides (`evaluate RUN k=v`, `generate k=v RUN --prompt ...`) tells the path from the overrides by their
  shape, not their position.
- The types: `path` (a leading `~` expanded, as a shell would), `text` (UTF-8 only: a terminal in another
  encoding hands Python bytes it cannot encode), `finite` (no nan or inf), `whole` (an integer, also written
  1e8).
"""

from __future__ import annotations

import argparse
import decimal
import math
import os
import re
from pathlib import Path
from typing import NoReturn

from bigtrain.errors import UsageError

# section.key=value, with list elements as section.key[i].field=value (a path such as runs/a.b=c has a slash)
OVERRIDE = re.compile(r"[A-Za-z_]\w*(?:\[\d+\])?(?:\.[A-Za-z_]\w*(?:\[\d+\])?)+=")


def looks_like_override(text: str) -> bool:
    return OVERRIDE.match(text) is not None


class CommandParser(argparse.ArgumentParser):
    """argparse with bigtrain's error reporting and order-free parsing (the module docstring)."""

    def error(self, message: str) -> NoReturn:
        from bigtrain.cli.report import fail
        from bigtrain.distributed.rendezvous import stated_rank

        rank, world = stated_rank()
        err = UsageError(f"{self.prog}: {message}. `{self.prog} --help` lists the options.")
        raise SystemExit(fail(err, rank, world, everywhere=True))

    def parse(self, argv: list[str], path: str | None = None) -> argparse.Namespace:
        """The options of `argv` in any order. `path`: the destination of the command's one path positional,
        which the parser fills together with `overrides` (positionals that look like section.key=value are the
        overrides, the one that does not is the path)."""
        args = self.parse_intermixed_args(argv)
        if path is not None:
            given = [str(getattr(args, path)), *args.overrides]
            paths = [item for item in given if not looks_like_override(item)]
            if len(paths) != 1:
                what = f"{len(paths)}: {', '.join(repr(p) for p in paths)}" if paths else "none"
                self.error(f"give one {path.upper()} (a path) and any section.key=value overrides; paths given: "
                           f"{what}")
            setattr(args, path, Path(os.path.expanduser(paths[0])))
            args.overrides = [item for item in given if looks_like_override(item)]
        return args


def path(text: str) -> Path:
    """A path argument, `~` and `~user` expanded (the shell leaves `--out=~/x` and quoted ones alone)."""
    return Path(os.path.expanduser(text))


def text(value: str) -> str:
    """Text that is valid UTF-8. Arguments that are not reach Python as lone surrogates (one per undecodable
    byte), which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = value.encode("utf-8", "surrogateescape")
        byte = ord(value[exc.start]) - 0xDC00 if 0xDC80 <= ord(value[exc.start]) <= 0xDCFF else None
        what = f"byte 0x{byte:02x}" if byte is not None else f"character U+{ord(value[exc.start]):04X}"
        raise argparse.ArgumentTypeError(
            f"{show_bytes(raw)} is not UTF-8 text ({what} at character {exc.start}); pass UTF-8 (check that the "
            f"terminal or script writes UTF-8: LANG / LC_ALL)") from None
    return value


def show_bytes(raw: bytes, limit: int = 60) -> str:
    shown = repr(raw[:limit])
    return shown if len(raw) <= limit else f"{shown}... ({len(raw)} bytes)"


def finite(value: str) -> float:
    """A finite number (argparse's float takes 'nan' and 'inf')."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    return number


def whole(value: str) -> int:
    """An integer, written as digits or as a whole number in exponent form (1e8: exactly 100000000)."""
    try:
        number = decimal.Decimal(value.strip())
    except decimal.InvalidOperation:
        number = decimal.Decimal("nan")
    if number.is_finite() and number.adjusted() <= 100 and number == number.to_integral_value():
        return int(number)
    raise argparse.ArgumentTypeError(f"{value!r} is not a whole number")
