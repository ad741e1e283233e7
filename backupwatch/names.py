"""File names that agents control, made safe to store, show and derive new names from.

An agent may name a report with bytes that are not UTF-8 (Python hands them over as lone
surrogates, which no database column or UTF-8 log line accepts), with control characters that
would rewrite an operator's terminal, or long enough that `NAME.reason.txt` or `NAME-2` no
longer fits the 255 bytes a file name may have. Pure functions only.
"""

from __future__ import annotations

import hashlib
import os

NAME_MAX = 255
"""Bytes in one file name on Linux filesystems (ext4, xfs, tmpfs)."""

_HASH_CHARS = 8


def display_name(name: str) -> str:
    """`name` as valid, single-line UTF-8 text: undecodable bytes as `\\xff`, controls escaped.

    The result goes into the database, logs and messages; it is never used to open a file.
    """
    return visible(os.fsencode(name).decode("utf-8", "backslashreplace"))


def visible(text: str) -> str:
    """`text` with every character a terminal would not simply print shown as a Python escape.

    Agents choose report names, file names and error messages; raw, an ANSI escape could
    rewrite the operator's screen and a newline forge a line of its own. C0, DEL and C1
    controls, line separators, bidi and other format characters, lone surrogates (from
    undecodable file names) become `\\x1b`, `\\n`, `\\u202e`, `\\udcff`; printable text,
    backslashes included, is left as it is. `--json` needs none of this: JSON escapes them.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def fit_name(name: str, reserve: int = 0) -> str:
    """`name`, shortened if needed so that it plus `reserve` more bytes fits NAME_MAX.

    The extensions are kept (`.sql.gz`, `.json`), the stem is cut on a character boundary and
    tagged with a short hash of the whole name, so two long names that differ only at the end
    still get different short names.
    """
    raw = os.fsencode(name)
    budget = NAME_MAX - reserve
    if len(raw) <= budget:
        return name
    stem, dot, suffixes = name.partition(".")
    tail = os.fsencode(dot + suffixes)
    if len(tail) > budget // 2:
        stem, tail = name, b""
    tag = "~" + hashlib.sha256(raw).hexdigest()[:_HASH_CHARS]
    room = budget - len(tail) - len(tag)
    short = _cut(os.fsencode(stem), room)
    return os.fsdecode(short + os.fsencode(tag) + tail)


def _cut(raw: bytes, limit: int) -> bytes:
    """At most `limit` bytes of `raw`, never ending inside a UTF-8 character."""
    cut = raw[: max(limit, 0)]
    while cut and (cut[-1] & 0xC0) == 0x80:
        cut = cut[:-1]
    if cut and cut[-1] >= 0xC0:
        cut = cut[:-1]  # a lead byte whose continuation was cut off
    return cut
