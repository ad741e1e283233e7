"""Cutting a job file into its `[[job]]` tables, and reading the plain ones without tomllib.

tomllib is written in Python: a file of 100,000 jobs took ~4 s to parse, on every start and on
every reload, even when one job changed. A job file is almost always a `[defaults]` table and
`[[job]]` tables of `key = "string"`, `key = 13`, `key = true` and `key = ["MO", "FR"]` lines.
`split_jobs` cuts the text before each line that starts with `[[job]]`, and `parse_table` reads
a table's lines when every one of them has one of those plain shapes, which read exactly as
tomllib reads them. Anything else (an escape, a float, a date, a sub-table, a dotted key, a
duplicate key...) returns None, and the caller parses the whole file with tomllib instead: its
results and its error messages are the reference, this is only a shortcut for what is certain.

Cutting is safe: a cut inside a multi-line string leaves the part before it unterminated, which
`parse_table` (and tomllib) refuses, so that file falls back as a whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

JOB_HEADER = b"\n[[job]]"
_CTRL = r"\x00-\x08\x0a-\x1f\x7f"  # TOML: no control characters but tab in strings, comments
_BASIC = rf'"[^"\\{_CTRL}]*"'
_LITERAL = rf"'[^'{_CTRL}]*'"
_COMMENT = rf"(?:#[^{_CTRL}]*)?"
_LINE = re.compile(
    rf"[ \t]*(?:([A-Za-z0-9_-]+)[ \t]*=[ \t]*"
    rf"({_BASIC}|{_LITERAL}|0|[+-]?[1-9][0-9]*|true|false|\[[^\]]*\])[ \t]*)?{_COMMENT}"
)
_ITEM = re.compile(rf"[ \t]*({_BASIC}|{_LITERAL})[ \t]*")
_BLANK = re.compile(rf"[ \t]*{_COMMENT}")


@dataclass(frozen=True, slots=True)
class JobText:
    """A job file's bytes cut before each `[[job]]` header: what precedes the first one (the
    `[defaults]` table and comments), and each job's bytes after its header, cut one at a time
    as they are read. Bytes, decoded a table at a time by the caller: the whole file as one
    str (and a list of 100,000 table strings) was 23 MiB more at the peak of a reload. The
    header is ASCII, so a file is valid UTF-8 exactly when each of its parts is."""

    preamble: bytes
    tables: Iterator[bytes]


def split_jobs(data: bytes) -> JobText:
    if data.startswith(JOB_HEADER[1:]):
        return JobText(b"", _tables(data, len(JOB_HEADER) - 1))
    first = data.find(JOB_HEADER)
    if first < 0:
        return JobText(data, iter(()))
    return JobText(data[:first], _tables(data, first + len(JOB_HEADER)))


def _tables(data: bytes, start: int) -> Iterator[bytes]:
    while True:
        end = data.find(JOB_HEADER, start)
        if end < 0:
            yield data[start:]
            return
        yield data[start:end]
        start = end + len(JOB_HEADER)


Line = tuple[str | None, object]  # (key, value), or (None, None) for a blank or comment


def parse_table(text: str, memo: dict[str, Line] | None = None) -> dict[str, object] | None:
    """A `[[job]]` table's keys, from the text after its header; None unless every line is
    plain (the first line is the rest of the header line: blank or a comment). `memo` keeps
    each distinct line read once: the jobs of a file repeat most of their lines."""
    lines = text.split("\n")
    if not _BLANK.fullmatch(_line(lines[0])):
        return None
    memo = {} if memo is None else memo
    table: dict[str, object] = {}
    for raw in lines[1:]:
        read = memo.get(raw)
        if read is None:
            read = _read_line(raw)
            if read is None:
                return None
            memo[raw] = read
        key, value = read
        if key is None:
            continue
        if key in table:
            return None
        table[key] = list(value) if type(value) is list else value
    return table


def _read_line(raw: str) -> Line | None:
    match = _LINE.fullmatch(_line(raw))
    if match is None:
        return None
    key, value = match.group(1), match.group(2)
    if key is None:
        return (None, None)
    parsed = _value(value)
    return None if parsed is None else (key, parsed)


def _line(raw: str) -> str:
    """A line without its CRLF's CR (a lone CR elsewhere matches nothing: tomllib refuses it)."""
    return raw[:-1] if raw.endswith("\r") else raw


def _value(text: str) -> object:
    first = text[0]
    if first in "\"'":
        return text[1:-1]
    if text == "true" or text == "false":
        return text == "true"
    if first == "[":
        return _array(text[1:-1])
    return int(text)


def _array(inner: str) -> list[str] | None:
    """`["MO", 'FR',]`: strings only (anything else is left to tomllib)."""
    if not inner.strip(" \t"):
        return []
    items = inner.split(",")
    if len(items) > 1 and not items[-1].strip(" \t"):
        items.pop()  # a trailing comma
    out = []
    for item in items:
        match = _ITEM.fullmatch(item)
        if match is None:
            return None
        out.append(match.group(1)[1:-1])
    return out
