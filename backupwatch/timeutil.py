"""Aware-UTC helpers: every instant in backupwatch is an aware UTC datetime."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    """The one place that reads the wall clock; everything else takes `now` as a value."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Treat a naive datetime as UTC (SPEC §3: a time without offset is UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def format_z(value: datetime | None) -> str | None:
    """SPEC §8: ISO 8601 UTC to the second, ending in `Z`; None stays None."""
    if value is None:
        return None
    return as_utc(value).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    """Parse ISO 8601 (a trailing `Z` included) into an aware UTC datetime."""
    return as_utc(datetime.fromisoformat(text.strip()))
