"""Names agents control: stored and shown safely, derived names always fit NAME_MAX."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from backupwatch.fsutil import UNIQUE_RESERVE, unique_name
from backupwatch.names import NAME_MAX, display_name, fit_name

# Any file name Linux allows: bytes without NUL or '/', as Python hands them over.
raw_names = st.binary(min_size=1, max_size=NAME_MAX).filter(
    lambda b: b"\x00" not in b and b"/" not in b and b not in (b".", b"..")
)


@given(raw_names)
def test_display_name_is_storable_single_line_text(raw: bytes) -> None:
    shown = display_name(os.fsdecode(raw))
    shown.encode("utf-8")  # no lone surrogates: PostgreSQL and UTF-8 logs accept it
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in shown)


def test_display_name_shows_undecodable_bytes_and_controls() -> None:
    assert display_name(os.fsdecode(b"STATUS-\xff.json")) == "STATUS-\\xff.json"
    assert display_name("a\x1b[31mred\n.json") == "a\\x1b[31mred\\n.json"
    assert display_name("rapport-été.json") == "rapport-été.json"


@given(raw_names, st.integers(min_value=0, max_value=40))
def test_fit_name_fits_with_its_reserve(raw: bytes, reserve: int) -> None:
    name = os.fsdecode(raw)
    fitted = fit_name(name, reserve)
    assert len(os.fsencode(fitted)) + reserve <= NAME_MAX
    if len(raw) + reserve <= NAME_MAX:
        assert fitted == name


def test_fit_name_keeps_the_extensions_and_tells_long_names_apart() -> None:
    first = "a" * 300 + "1.sql.gz"
    second = "a" * 300 + "2.sql.gz"
    assert fit_name(first).endswith(".sql.gz")
    assert fit_name(first) != fit_name(second)


@given(raw_names, st.integers(min_value=0, max_value=9_999))
def test_every_unique_variant_and_its_reason_file_fit(raw: bytes, attempt: int) -> None:
    """Issue 11 item 8: a 250-byte report name gave reason files over NAME_MAX."""
    variant = unique_name(os.fsdecode(raw), attempt)
    assert len(os.fsencode(variant + ".reason.txt")) <= NAME_MAX
    assert len(os.fsencode(variant)) <= NAME_MAX - UNIQUE_RESERVE + len("-10000")
