"""Reading the docs the way tests/test_docs*.py compare them with the code: markdown tables, sections, code spans
and code blocks, and the command lines (`bigtrain COMMAND ...`, `launch/train.py ...`) they show."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass
class Table:
    path: Path
    line: int  # 1-based line of the header
    header: list[str]
    rows: list[list[str]]

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def split_row(line: str) -> list[str]:
    """The cells of a table row; a `|` inside a code span belongs to the cell."""
    cells, cell, in_code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
    cells.append(cell.strip())
    return cells


def tables(path: Path, text: str | None = None) -> list[Table]:
    """Every markdown table of a file (outside code blocks)."""
    lines = (path.read_text() if text is None else text).splitlines()
    found: list[Table] = []
    in_fence, i = False, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            in_fence = not in_fence
        elif (not in_fence and line.startswith("|") and i + 1 < len(lines)
              and re.fullmatch(r"\|?\s*:?-{3,}.*", lines[i + 1].strip())):
            table = Table(path, i + 1, split_row(line), [])
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                table.rows.append(split_row(lines[i]))
                i += 1
            found.append(table)
            continue
        i += 1
    return found


def tables_headed(first: str, paths: list[Path] | None = None) -> list[Table]:
    """The tables whose header's first cell is `first` (e.g. "engine")."""
    return [t for path in (paths or DOCS) for t in tables(path) if t.header and t.header[0].lower() == first]


def section(text: str, heading: str) -> str:
    """The text under `heading` (a line like "## Where things live") up to the next heading of its level or
    above."""
    lines = text.splitlines()
    level = len(heading) - len(heading.lstrip("#"))
    start = lines.index(heading)
    end = next((j for j in range(start + 1, len(lines))
                if re.match(f"#{{1,{level}}} ", lines[j])), len(lines))
    return "\n".join(lines[start:end])


def spans(text: str) -> list[str]:
    """The contents of the inline code spans of `text`."""
    return re.findall(r"`([^`\n]+)`", text)


def code_lines(path: Path) -> list[tuple[int, str]]:
    """Every line of code a doc shows, with its line number: the lines of fenced and indented blocks (a line
    continued with a backslash, or an option line under its command, joined to it), and every inline code span."""
    found: list[tuple[int, str]] = []
    block: list[tuple[int, str]] = []
    in_fence, in_block, previous_blank = False, False, True
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_fence = not in_fence
        elif in_fence or (line.startswith("    ") and (previous_blank or in_block)):
            block.append((n, line))
            in_block = not in_fence
        else:
            found += _joined(block)
            block, in_block = [], False
            found += [(n, s) for s in spans(line)]
        previous_blank = not line.strip()
    found += _joined(block)
    return found


def _joined(block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Lines of a code block with continuations joined: a trailing backslash, or a line that starts (after its
    indentation) with an option or a bracketed option."""
    out: list[tuple[int, str]] = []
    for n, line in block:
        text = line.strip()
        if out and (out[-1][1].endswith("\\") or re.match(r"\[?--?\w", text) and out[-1][1]):
            out[-1] = (out[-1][0], out[-1][1].rstrip("\\").rstrip() + " " + text)
        else:
            out.append((n, text))
    return out


COMMAND = re.compile(r"(-m bigtrain\.cli|(?<![\w/.-])(?<!from )(?<!import )bigtrain|launch/train\.py)"
                     r"(?:\s+([a-z][a-z|-]*))?")


def command_lines(path: Path) -> list[tuple[int, str, str]]:
    """(line, command, the rest of the line) for every `bigtrain COMMAND ...`, `-m bigtrain.cli COMMAND ...` and
    `launch/train.py ...` (which is `bigtrain train`) a doc shows in code; the rest ends at a shell comment, a
    pipe into another program or a `;`. `bigtrain a|b ...` counts for a and for b."""
    found = []
    for n, code in code_lines(path):
        for m in COMMAND.finditer(code):
            rest = re.split(r"\s#|\s\|\s(?!-)|;", code[m.end():])[0]
            if m.group(1) == "launch/train.py":
                found.append((n, "train", (m.group(2) or "") + rest))
            elif m.group(2):
                found += [(n, name, rest) for name in m.group(2).split("|")]
    return found


def options(text: str) -> set[str]:
    """The long options (`--name`) written in `text`."""
    return set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text))


# The programs a doc command starts with; SHELL_BLOCKS: fenced blocks whose every line is a command (or a comment).
COMMAND_WORDS = {"bigtrain", "python", "python3", "make", "bash", "deepspeed", "torchrun", "accelerate", "mpirun",
                 "mpiexec", "srun", "sbatch"}
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
PROSE_BLOCKS = {"text", "yaml", "json", "python", "toml"}  # output, diagrams, files: no commands


@dataclass(frozen=True)
class DocCommand:
    path: Path
    line: int  # 1-based line where the command starts
    text: str  # continuations joined, the trailing comment kept

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def block_commands(path: Path) -> list[DocCommand]:
    """Every command line of the code blocks of a doc: in a fenced block marked bash/sh/shell/console every line but
    blanks and comments; in an unmarked fenced block or an indented block each line that starts with a program of
    COMMAND_WORDS; blocks marked text/yaml/json/python/toml hold none. Continuations are joined as `code_lines`
    joins them. Inline code spans are not commands here (they name a command in a sentence)."""
    found: list[DocCommand] = []
    block: list[tuple[int, str]] = []
    kind, in_block, previous_blank = None, False, True

    def flush() -> None:
        for n, text in _joined(block):
            first = text.split(maxsplit=1)[0] if text.split() else ""
            if kind in PROSE_BLOCKS or not first or first.startswith("#"):
                continue
            if kind in SHELL_BLOCKS or first in COMMAND_WORDS:
                found.append(DocCommand(path, n, text))

    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            if kind is None:
                kind = line[3:].strip().lower()
            else:
                flush()
                block, kind = [], None
        elif kind is not None:
            block.append((n, line))
        elif line.startswith("    ") and (previous_blank or in_block):
            block.append((n, line))
            in_block = True
        elif in_block:
            kind = "indented"
            flush()
            block, kind, in_block = [], None, False
        previous_blank = not line.strip()
    if in_block:
        kind = "indented"
        flush()
    return found
