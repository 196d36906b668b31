"""Slurm's compressed host lists (`SLURM_JOB_NODELIST`): `gpu[01-03,07],login1` -> gpu01 gpu02 gpu03 gpu07 login1."""

from __future__ import annotations

import re

from bigtrain.errors import ConfigError

_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(spec: str, hostlist: str) -> list[str]:
    """`01-03,7` -> ['01', '02', '03', '7'] (zero padding kept, as Slurm does)."""
    out = []
    for item in spec.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ConfigError(f"Cannot read the Slurm host list {hostlist!r}: {item!r} is not a number or a "
                              f"range lo-hi.")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi or lo) + 1))
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Every host name of a Slurm host list, in order (what `scontrol show hostnames` prints)."""
    hosts: list[str] = []
    for part in _split_top_level(hostlist.strip()):
        match = _BRACKET.search(part)
        if match is None:
            if "[" in part or "]" in part:
                raise ConfigError(f"Cannot read the Slurm host list {hostlist!r}: unbalanced brackets in {part!r}.")
            hosts.append(part)
            continue
        head, tail = part[:match.start()], part[match.end():]
        for value in _expand_range(match.group(1), hostlist):
            hosts.extend(expand_hostlist(head + value + tail))  # further bracket groups, e.g. rack[1-2]-n[1-4]
    return hosts
