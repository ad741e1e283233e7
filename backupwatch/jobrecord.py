"""A validated job in a compact form, and a validation of the common case without pydantic.

`JobSpec` (a pydantic model) is the definition of a valid job, and its errors are what the
operator reads. Building 100,000 of them took most of a start-up at scale and held ~1.5 KiB
each, so the daemon reads job files through `quick_record`: the same rules, written as plain
checks, for the shapes a job file usually has. Anything it is not sure of (a wrong type, a value
out of range, a key it does not know) returns None, and the caller falls back to `JobSpec`, whose
error messages are the only ones ever shown. So `quick_record` never decides that a job is
invalid, it only vouches for valid ones; tests/unit/test_jobrecord.py holds it to giving exactly
what `JobSpec` gives.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from datetime import date
from pathlib import PurePosixPath
from typing import Any, NamedTuple

from backupwatch.enums import BackupFrequency
from backupwatch.jobs import (
    _MAX_WINDOW_MINUTES,
    _SAMPLE_CYCLE,
    _SAMPLE_STAGED,
    APPLIES_TO,
    DEFAULT_AGENT_ID,
    DEFAULT_DEPOSIT_TEMPLATE,
    DEFAULT_FINAL_TEMPLATE,
    FINAL_PLACEHOLDERS,
    IDENTITY_FIELDS,
    JOB_NUMBER,
    SITE_PLACEHOLDERS,
    JobSpec,
    _CycleInstant,
    _effective_values,
    _format_one,
    _parse_date,
    _parse_days,
    _parse_frequency,
    _parsed,
    check_frequency_use,
    check_name,
    check_placeholders,
    check_relpath,
    job_source,
)

_IDENTITY = frozenset(IDENTITY_FIELDS)
_OPTIONAL_INTS = {
    "expected_hour_utc": (0, 23),
    "day_of_month": (1, 31),
    "collection_window_minutes": (1, _MAX_WINDOW_MINUTES),
    "keep_daily": (0, 100_000),
    "keep_weekly": (0, 100_000),
    "keep_monthly": (0, 100_000),
}


class JobRecord(NamedTuple):
    """What a `JobSpec` holds, as a tuple (about 230 bytes, its strings shared with other
    jobs), plus the deposit path its template renders to: the sync stores it, and rendering
    it again cost more than the rest of the comparison. A tuple, not a frozen dataclass:
    building 100,000 of those cost a second in `object.__setattr__` alone."""

    company_name: str
    city: str
    neighborhood: str
    database_name: str
    frequency: BackupFrequency
    expected_hour_utc: int | None
    expected_minute_utc: int
    days_of_week: tuple[int, ...] | None
    day_of_month: int | None
    expected_date: date | None
    collection_window_minutes: int | None
    agent_id: str
    agent_deposit_path_template: str
    final_storage_path_template: str
    active: bool
    alert_channels: tuple[str, ...] | None
    archive_test: bool | None
    keep_daily: int | None
    keep_weekly: int | None
    keep_monthly: int | None
    source_file: str
    source_number: int
    deposit_path: str

    @classmethod
    def of(cls, spec: JobSpec) -> JobRecord:
        values = {name: getattr(spec, name) for name in type(spec).model_fields}
        file, number = split_source(values.pop("source"))
        return cls(
            **_shared(values),
            source_file=file,
            source_number=number,
            deposit_path=sys.intern(str(spec.deposit_relpath)),
        )

    @property
    def source(self) -> str:
        """Where the job was written, as `JobSpec.source` says it ("FILE: job #N"): built when
        asked (an error message, the sync's `config_source`), as 100,000 of these strings held
        ~9 MiB while the file's path is one string that every record of the file shares."""
        return joined_source(self.source_file, self.source_number)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.company_name, self.city, self.neighborhood, self.database_name)

    def same_job(self, other: JobRecord) -> bool:
        """Equal but for where it was written (as `JobSpec.__eq__`)."""
        return _compared(self) == _compared(other)


def _compared(record: JobRecord) -> tuple[object, ...]:
    return record._replace(source_file="", source_number=0)


def split_source(source: str) -> tuple[str, int]:
    """("FILE", N) of "FILE: job #N", or (source, 0) for any other text (`joined_source`
    gives it back whole)."""
    file, mark, number = source.rpartition(JOB_NUMBER)
    if mark and number.isdigit() and number.isascii() and number[0] != "0":
        return sys.intern(file), int(number)
    return source, 0


def joined_source(file: str, number: int) -> str:
    """The inverse of `split_source`."""
    return job_source(file, number) if number else file


def _shared(values: dict[str, Any]) -> dict[str, Any]:
    """Strings interned: 100,000 jobs name a few companies, cities and templates."""
    return {k: sys.intern(v) if type(v) is str else v for k, v in values.items()}


def quick_record(values: Mapping[str, Any], source: str) -> JobRecord | None:
    """The record `JobSpec.model_validate({**values, "source": source})` would give, or None
    when it would fail or this check is not sure (the caller then asks `JobSpec`)."""
    return Shapes({}).record(values, *split_source(source))


_KNOWN = frozenset(JobSpec.model_fields) - {"source"}
_TEMPLATES = ("agent_id", "agent_deposit_path_template", "final_storage_path_template")
_PER_JOB = _IDENTITY | set(_TEMPLATES)
_ShapeKey = tuple[tuple[str, type, object], ...]


class Shapes:
    """The jobs of one file, read against its `[defaults]`, as `JobSpec` would read
    `jobs._effective_values(defaults, raw)`.

    The jobs of a file differ in their names and little else: what a job's other keys give
    (its options and templates, with the defaults merged in and checked) is worked out once
    per distinct set of those keys and values, its `_Shape`. A job then costs its four names,
    its three renders and its tuple (it was ~25 us a job when each did all of it)."""

    def __init__(self, defaults: Mapping[str, Any]) -> None:
        self._defaults = defaults
        self._names = tuple((name, defaults.get(name)) for name in IDENTITY_FIELDS)
        self._shapes: dict[_ShapeKey, _Shape | None] = {}
        self._good: set[str] = set()  # names known to pass `check_name`

    def record(self, raw: Mapping[str, Any], file: str, number: int) -> JobRecord | None:
        """The job of this `[[job]]` table, or None (see `quick_record`); it was written at
        `joined_source(file, number)`."""
        try:
            key: _ShapeKey = ()  # the common case: a table of the four names alone
            if raw.keys() != _IDENTITY:
                key = tuple(
                    (name, type(value), _hashable(value))
                    for name, value in raw.items()
                    if name not in _IDENTITY
                )
            shape = self._shapes.get(key)
            if shape is None and key not in self._shapes:
                rest = {name: value for name, value in raw.items() if name not in _IDENTITY}
                shape = self._shapes[key] = _shape(_effective_values(self._defaults, rest))
            if shape is None:
                return None
            names = [raw.get(name, default) for name, default in self._names]
            return shape.record(names, (file, number), self._good)
        except (ValueError, TypeError, KeyError):
            return None


class _Shape(NamedTuple):
    """What the jobs of one shape share: their fields before and after `agent_id` in a
    `JobRecord`, and their templates, known to render plainly (`_checked`)."""

    head: tuple[Any, ...]  # frequency ... collection_window_minutes
    tail: tuple[Any, ...]  # agent_deposit_path_template ... keep_monthly
    agent_id: str
    deposit: str
    final: str

    def record(self, names: list[Any], source: tuple[str, int], good: set[str]) -> JobRecord | None:
        """`str.format_map` renders exactly as `jobs.render_template` once `_checked` has
        accepted the template: only plain placeholders of the allowed names."""
        for name in names:
            if name not in good:
                if type(name) is not str or not _good_name(name):
                    return None
                good.add(name)
        company_name, city, neighborhood, database_name = names
        fields = {
            "company_name": company_name,
            "city": city,
            "neighborhood": neighborhood,
            "database_name": database_name,
        }
        agent_id = self.agent_id.format_map(fields)
        if not agent_id.strip():
            return None
        fields["agent_id"] = agent_id
        deposit = self.deposit.format_map(fields)
        _check_relpath(deposit)
        _check_relpath(self.final.format_map(fields))
        return tuple.__new__(
            JobRecord,
            (
                *map(sys.intern, names),
                *self.head,
                sys.intern(agent_id),
                *self.tail,
                *source,
                sys.intern(_normal_path(deposit)),
            ),
        )


_AGENT_ID_AT = JobRecord._fields.index("agent_id")


def _shape(values: Mapping[str, Any]) -> _Shape | None:
    """The shared part of the jobs whose keys but their names are `values`, or None."""
    if not values.keys() <= _KNOWN:
        return None
    options = _options(_options_key(values))
    if options is None:
        return None
    templates = tuple(values.get(key, _DEFAULTS[key]) for key in _TEMPLATES)
    if any(type(t) is not str for t in templates):
        return None
    record = JobRecord(
        company_name="",
        city="",
        neighborhood="",
        database_name="",
        **options,
        agent_id="",
        agent_deposit_path_template=sys.intern(templates[1]),
        final_storage_path_template=sys.intern(templates[2]),
        source_file="",
        source_number=0,
        deposit_path="",
    )
    return _Shape(
        head=tuple(record[4:_AGENT_ID_AT]),
        tail=tuple(record[_AGENT_ID_AT + 1 : -3]),
        agent_id=_checked(templates[0], _IDENTITY),
        deposit=_checked(templates[1], SITE_PLACEHOLDERS),
        final=_checked_final(templates[2]),
    )


def _check_relpath(rendered: str) -> None:
    """`check_relpath`, with the common case (no NUL, relative, no `..`, some character
    that is neither `/` nor `.`) decided by string methods alone."""
    if "\0" in rendered or rendered[:1] == "/" or ".." in rendered or not rendered.strip("/."):
        check_relpath(rendered)


_DEFAULTS = {
    "agent_id": DEFAULT_AGENT_ID,
    "agent_deposit_path_template": DEFAULT_DEPOSIT_TEMPLATE,
    "final_storage_path_template": DEFAULT_FINAL_TEMPLATE,
}


@functools.lru_cache(maxsize=65_536)
def _good_name(name: str) -> bool:
    try:
        check_name(name)
    except ValueError:
        return False
    return True


_OptionsKey = tuple[tuple[str, type, object], ...]


def _options_key(values: Mapping[str, Any]) -> _OptionsKey:
    """The keys every job of a file tends to share, hashable, and typed: `True == 1` must
    not make a bool and an int one entry of the cache."""
    return tuple(
        (name, type(value), _hashable(value))
        for name, value in values.items()
        if name not in _PER_JOB
    )


def _hashable(value: object) -> object:
    if type(value) is list:
        return tuple((type(item), item) for item in value)
    return value


@functools.lru_cache(maxsize=1024)
def _options(key: _OptionsKey) -> dict[str, Any] | None:
    """Everything but the names and the templates, checked once per distinct combination."""
    values = {name: _unkeyed(kind, value) for name, kind, value in key}
    try:
        return _checked_options(values)
    except (ValueError, TypeError):
        return None


def _unkeyed(kind: type, value: object) -> object:
    """A value as the job file gave it, from its cache key (a list was made a tuple)."""
    if kind is list and isinstance(value, tuple):
        return [item for _, item in value]
    return value


def _checked_options(values: dict[str, Any]) -> dict[str, Any] | None:
    frequency = _parse_frequency(values.get("frequency", BackupFrequency.DAILY))
    schedule = _schedule(values, frequency)
    if schedule is None or not _plain_optionals(values):
        return None
    active = values.get("active", True)
    archive_test = values.get("archive_test")
    if type(active) is not bool or not (archive_test is None or type(archive_test) is bool):
        return None
    channels = _channels(values.get("alert_channels"))
    if channels is False:
        return None
    return {
        "frequency": frequency,
        **schedule,
        "collection_window_minutes": values.get("collection_window_minutes"),
        "active": active,
        "alert_channels": channels,
        "archive_test": archive_test,
        "keep_daily": values.get("keep_daily"),
        "keep_weekly": values.get("keep_weekly"),
        "keep_monthly": values.get("keep_monthly"),
    }


def _int_in(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _plain_optionals(values: Mapping[str, Any]) -> bool:
    """The optional integers: absent, or an int (never a bool: strict) in its range."""
    for key, (low, high) in _OPTIONAL_INTS.items():
        value = values.get(key)
        if value is not None and not _int_in(value, low, high):
            return False
    return True


def _schedule(values: Mapping[str, Any], frequency: BackupFrequency) -> dict[str, Any] | None:
    """The schedule keys as `JobSpec` normalises them, each used only by its frequencies."""
    minute = values.get("expected_minute_utc", 0)
    if not _int_in(minute, 0, 59):
        return None
    days = values.get("days_of_week")
    if days is not None and type(days) is not list:
        return None
    when = values.get("expected_date")
    if when is not None and type(when) not in (str, date):
        return None
    out = {
        "expected_hour_utc": values.get("expected_hour_utc"),
        "expected_minute_utc": minute,
        "days_of_week": None if days is None else _parse_days(days),
        "day_of_month": values.get("day_of_month"),
        "expected_date": None if when is None else _parse_date(when),
    }
    for key in APPLIES_TO:
        check_frequency_use(key, out[key], frequency)
    return out


@functools.lru_cache(maxsize=256)
def _checked(template: str, allowed: frozenset[str]) -> str:
    """The template, once its placeholders are known to be plain and allowed."""
    check_placeholders(template, allowed)
    return template


@functools.lru_cache(maxsize=256)
def _checked_final(template: str) -> str:
    """The final template with the trial render's cycle and staged name filled in (once per
    template): what is left to render per job is the site's names."""
    constants = {
        "staged_file_name": _SAMPLE_STAGED,
        "year": f"{_SAMPLE_CYCLE.year:04d}",
        "month": f"{_SAMPLE_CYCLE.month:02d}",
        "day": f"{_SAMPLE_CYCLE.day:02d}",
        "cycle": _CycleInstant(_SAMPLE_CYCLE),
    }
    check_placeholders(template, FINAL_PLACEHOLDERS)
    out: list[str] = []
    for literal, name, spec in _parsed(template):
        out.append(_escaped(literal))
        if name in constants:
            out.append(_escaped(_format_one(constants[name], name, spec)))
        elif name is not None:
            out.append(f"{{{name}:{spec}}}" if spec else f"{{{name}}}")
    return "".join(out)


def _escaped(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _normal_path(rendered: str) -> str:
    """`str(PurePosixPath(rendered))`, without building the path when it is already normal."""
    empty_part = not rendered or "//" in rendered or rendered.startswith("/") or rendered[-1] == "/"
    dot_part = rendered in (".", "") or "/./" in rendered or rendered.startswith("./")
    if empty_part or dot_part or rendered.endswith("/."):
        return str(PurePosixPath(rendered))
    return rendered


def _channels(value: object) -> tuple[str, ...] | bool | None:
    """The alert channels as a tuple, None when absent, False when `JobSpec` must judge."""
    if value is None:
        return None
    if type(value) is not list or not value:
        return False
    if not all(type(item) is str and item for item in value):
        return False
    return tuple(sys.intern(item) for item in value)
