"""SPEC §2: the expected backup jobs, read from TOML files under `jobs_path`.

A `JobSpec` that exists is a job that can run: its schedule is complete for its frequency and
its templates render to paths that stay inside their roots. Every check lives in the model, so a
spec built anywhere (a test, the store) obeys the same rules as one read from a file; the loader
only adds where each problem was found, and gathers all of them into one `ConfigError`.
"""

from __future__ import annotations

import functools
import re
import string
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from backupwatch.config import ConfigError, Settings
from backupwatch.enums import WEEKDAYS, BackupFrequency
from backupwatch.schedule import Schedule
from backupwatch.timeutil import as_utc

IDENTITY_FIELDS: tuple[str, ...] = ("company_name", "city", "neighborhood", "database_name")
SITE_PLACEHOLDERS: frozenset[str] = frozenset((*IDENTITY_FIELDS, "agent_id"))
FINAL_PLACEHOLDERS: frozenset[str] = SITE_PLACEHOLDERS | {
    "staged_file_name",
    "year",
    "month",
    "day",
    "cycle",
}
DEFAULT_AGENT_ID = "{company_name}_{city}_{neighborhood}"
DEFAULT_DEPOSIT_TEMPLATE = "{agent_id}"
DEFAULT_FINAL_TEMPLATE = (
    "{company_name}/{city}/{neighborhood}/{database_name}/{cycle:%Y%m%dT%H%MZ}_{staged_file_name}"
)
# `{cycle}` without a format: basic ISO 8601, which has no characters a file name dislikes.
DEFAULT_CYCLE_FORMAT = "%Y%m%dT%H%M%SZ"

# Which frequencies use a frequency-specific key (SPEC §2); the others must not set it.
APPLIES_TO: dict[str, frozenset[BackupFrequency]] = {
    "expected_hour_utc": frozenset(BackupFrequency) - {BackupFrequency.HOURLY},
    "days_of_week": frozenset(
        {BackupFrequency.DAILY, BackupFrequency.HOURLY, BackupFrequency.WEEKLY}
    ),
    "day_of_month": frozenset({BackupFrequency.MONTHLY}),
    "expected_date": frozenset({BackupFrequency.ONCE}),
}
# ...and for which of those frequencies the key is required.
REQUIRED_FOR: dict[str, frozenset[BackupFrequency]] = {
    "expected_hour_utc": APPLIES_TO["expected_hour_utc"],
    "days_of_week": frozenset({BackupFrequency.WEEKLY}),
    "day_of_month": APPLIES_TO["day_of_month"],
    "expected_date": APPLIES_TO["expected_date"],
}

# A trial render must exercise every placeholder, so the sample has two-digit everything.
_SAMPLE_CYCLE = datetime(2026, 11, 24, 13, 45, tzinfo=UTC)
_SAMPLE_STAGED = "sales.sql.gz"
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_SLASH_OR_CONTROL = re.compile(r"[/\x00-\x1f]")
_MAX_WINDOW_MINUTES = 100 * 366 * 24 * 60
_FORMATTER = string.Formatter()

Hour = Annotated[int, Field(ge=0, le=23)]
Minute = Annotated[int, Field(ge=0, le=59)]
DayOfMonth = Annotated[int, Field(ge=1, le=31)]
WindowMinutes = Annotated[int, Field(gt=0, le=_MAX_WINDOW_MINUTES)]
KeepCount = Annotated[int, Field(ge=0, le=100_000)]


# --------------------------------------------------------------------------- templates


def template_placeholders(template: str) -> Iterator[tuple[str, str]]:
    """Yield `(name, format_spec)` of each placeholder, refusing what `format` could abuse.

    Attribute and index access (`{cycle.tzinfo}`, `{city[0]}`), conversions and nested fields
    would turn a job file into a small program; a path template needs none of them.
    """
    for _literal, name, spec in _parsed(template):
        if name is not None:
            yield name, spec


@functools.lru_cache(maxsize=256)
def _parsed(template: str) -> tuple[tuple[str, str | None, str], ...]:
    """A template's `(literal, name, spec)` parts, checked once: 100,000 jobs share a few
    templates, and parsing each again was a third of the time to load them."""
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise ValueError(f"malformed template {template!r}: {exc}") from None
    parts = []
    for literal, name, spec, conversion in parsed:
        if name is not None and not name:
            raise ValueError(f"empty placeholder {{}} in {template!r}")
        if name is not None and (conversion is not None or "{" in (spec or "")):
            raise ValueError(f"unsupported placeholder {{{name}...}} in {template!r}")
        parts.append((literal, name, spec or ""))
    return tuple(parts)


def check_placeholders(template: str, allowed: frozenset[str]) -> None:
    """Raise ValueError naming every placeholder that `allowed` does not offer."""
    unknown = _unknown_placeholders(template, allowed)
    if unknown:
        names = ", ".join(f"{{{name}}}" for name in unknown)
        offered = " ".join(f"{{{name}}}" for name in sorted(allowed))
        raise ValueError(f"unknown placeholder {names}; allowed: {offered}")


@functools.lru_cache(maxsize=1024)
def _unknown_placeholders(template: str, allowed: frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted({name for name, _ in template_placeholders(template)} - allowed))


def render_template(template: str, fields: Mapping[str, object]) -> str:
    """`str.format_map`, but only plain `{name}` / `{name:spec}` of exactly `fields`."""
    check_placeholders(template, frozenset(fields))
    out: list[str] = []
    for literal, name, spec in _parsed(template):
        out.append(literal)
        if name is not None:
            out.append(_format_one(fields[name], name, spec))
    return "".join(out)


def _format_one(value: object, name: str, spec: str) -> str:
    try:
        return format(value, spec)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot format {{{name}:{spec}}}: {exc}") from None


class _CycleInstant:
    """`{cycle}` and `{cycle:%strftime}`; a bare datetime would render with a space and `+`."""

    def __init__(self, cycle: datetime) -> None:
        self._cycle = as_utc(cycle)

    def __format__(self, spec: str) -> str:
        return self._cycle.strftime(spec or DEFAULT_CYCLE_FORMAT)


def safe_relpath(rendered: str) -> PurePosixPath:
    """The rendered path, if joining it onto its root can only land below that root."""
    check_relpath(rendered)
    return PurePosixPath(rendered)


def check_relpath(rendered: str) -> None:
    """`safe_relpath`'s checks on the string alone (no path object: run for every job)."""
    if "\0" in rendered:
        raise ValueError(f"path {rendered!r} contains a NUL character")
    if rendered.startswith("/"):
        raise ValueError(f"path {rendered!r} is absolute; it must be relative to its root")
    parts = [part for part in rendered.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"path {rendered!r} contains '..' and would leave its root")
    if not parts:
        raise ValueError(f"path {rendered!r} is empty; it must name a folder below its root")


def final_relpath(
    template: str, fields: Mapping[str, str], cycle: datetime, staged_file_name: str
) -> PurePosixPath:
    """SPEC §2: where a validated backup goes, relative to `validated_backups_base_path`."""
    return safe_relpath(_final_rendered(template, fields, cycle, staged_file_name))


def _final_rendered(
    template: str, fields: Mapping[str, str], cycle: datetime, staged_file_name: str
) -> str:
    parts = _cycle_rendered(template, as_utc(cycle))
    if parts is None:
        return _final_rendered_whole(template, fields, cycle, staged_file_name)
    values: dict[str, object] = {name: fields[name] for name in SITE_PLACEHOLDERS}
    values["staged_file_name"] = PurePosixPath(staged_file_name).name
    out: list[str] = []
    for literal, name, spec in parts:
        out.append(literal)
        if name is not None:
            out.append(_format_one(values[name], name, spec))
    return "".join(out)


_CYCLE_PLACEHOLDERS = frozenset(("year", "month", "day", "cycle"))


@functools.lru_cache(maxsize=4096)
def _cycle_rendered(
    template: str, cycle: datetime
) -> tuple[tuple[str, str | None, str], ...] | None:
    """The template's parts with the cycle's placeholders already rendered into the literals.

    The cycle's are the same for every database of a cycle (a `strftime` each), so they are
    rendered once per (template, cycle) instead of once per database (issue 10's burst). None
    when one of them cannot be rendered: `_final_rendered_whole` then raises as it always did,
    at the first placeholder that fails.
    """
    check_placeholders(template, FINAL_PLACEHOLDERS)
    times: dict[str, object] = {
        "year": f"{cycle.year:04d}",
        "month": f"{cycle.month:02d}",
        "day": f"{cycle.day:02d}",
        "cycle": _CycleInstant(cycle),
    }
    parts: list[tuple[str, str | None, str]] = []
    for literal, name, spec in _parsed(template):
        if name not in _CYCLE_PLACEHOLDERS:
            parts.append((literal, name, spec))
            continue
        try:
            text = _format_one(times[name], name, spec)
        except ValueError:
            return None
        if parts and parts[-1][1] is None:
            literal = parts.pop()[0] + literal
        parts.append((literal + text, None, ""))
    return tuple(parts)


def _final_rendered_whole(
    template: str, fields: Mapping[str, str], cycle: datetime, staged_file_name: str
) -> str:
    """The whole template rendered at once: the reference `_final_rendered` must agree with."""
    cycle = as_utc(cycle)
    values: dict[str, object] = {name: fields[name] for name in SITE_PLACEHOLDERS}
    values |= {
        "staged_file_name": PurePosixPath(staged_file_name).name,
        "year": f"{cycle.year:04d}",
        "month": f"{cycle.month:02d}",
        "day": f"{cycle.day:02d}",
        "cycle": _CycleInstant(cycle),
    }
    return render_template(template, values)


# --------------------------------------------------------------------------- the model


def _parse_frequency(value: object) -> BackupFrequency:
    if isinstance(value, BackupFrequency):
        return value
    if isinstance(value, str):
        try:
            return BackupFrequency(value.strip().upper())
        except ValueError:
            pass
    choices = ", ".join(BackupFrequency)
    raise ValueError(f"unknown frequency {value!r}; expected one of {choices}")


def _parse_days(value: object) -> tuple[int, ...]:
    """Day codes from a file, or the stored 0=Monday tuple (so a spec round-trips).

    Integers in a *list* are refused: cron counts Sunday as 0, and a silent shift by one day
    is the worst kind of schedule bug.
    """
    if isinstance(value, tuple):
        days = [_stored_day(item) for item in value]
    elif isinstance(value, list):
        days = _day_codes(value)
    else:
        raise ValueError(f"expected a list of day codes {' '.join(WEEKDAYS)}")
    if not days:
        raise ValueError("must list at least one day")
    return tuple(sorted(set(days)))


def _stored_day(item: object) -> int:
    if isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= 6:
        return item
    raise ValueError(f"stored day {item!r} is not 0 (Monday) to 6 (Sunday)")


def _day_codes(items: list[object]) -> list[int]:
    codes = [item.strip().upper() if isinstance(item, str) else item for item in items]
    bad = [item for item, code in zip(items, codes, strict=True) if code not in WEEKDAYS]
    if bad:
        shown = ", ".join(repr(item) for item in bad)
        raise ValueError(f"unknown day {shown}; expected codes among {' '.join(WEEKDAYS)}")
    return [WEEKDAYS.index(str(code)) for code in codes]


def _parse_date(value: object) -> date:
    """Only a calendar date: a TOML datetime or a timestamp would silently drop information."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str) and _ISO_DATE.fullmatch(value.strip()):
        try:
            return date.fromisoformat(value.strip())
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a calendar date: {exc}") from None
    raise ValueError(f"expected a date YYYY-MM-DD, got {value!r}")


def _check_frequency_use(key: str, value: object, info: ValidationInfo) -> None:
    """Reject a key its frequency ignores, and demand one it cannot do without."""
    frequency = info.data.get("frequency")
    if not isinstance(frequency, BackupFrequency):
        return  # the frequency's own error is reported; guessing here would only add noise
    check_frequency_use(key, value, frequency)


def check_name(value: str) -> None:
    """The names build paths and the `company/city/neighborhood/database` job reference."""
    if not value:
        raise ValueError("must not be empty")
    if value != value.strip():
        raise ValueError(f"{value!r} has leading or trailing spaces")
    if _SLASH_OR_CONTROL.search(value):
        raise ValueError(f"{value!r} must not contain '/' or control characters")


def check_frequency_use(key: str, value: object, frequency: BackupFrequency) -> None:
    """`_check_frequency_use` once the frequency is known to be valid."""
    if value is not None and frequency not in APPLIES_TO[key]:
        users = ", ".join(f for f in BackupFrequency if f in APPLIES_TO[key])
        raise ValueError(f"not used by {frequency} jobs (only by {users})")
    if value is None and frequency in REQUIRED_FOR[key]:
        raise ValueError(f"required for {frequency} jobs")


def _known(info: ValidationInfo, names: tuple[str, ...]) -> dict[str, str] | None:
    """The already-valid fields a render needs, or None when one of them failed."""
    values = {name: info.data.get(name) for name in names}
    if all(isinstance(value, str) for value in values.values()):
        return {name: str(value) for name, value in values.items()}
    return None


class JobSpec(BaseModel):
    """One expected backup job (SPEC §2), complete and consistent by construction."""

    # strict: TOML is typed, so `hour = "13"` or `active = 1` is a typo worth reporting.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    company_name: str
    city: str
    neighborhood: str
    database_name: str
    frequency: BackupFrequency = BackupFrequency.DAILY
    expected_hour_utc: Hour | None = Field(default=None, validate_default=True)
    expected_minute_utc: Minute = 0
    days_of_week: tuple[int, ...] | None = Field(default=None, validate_default=True)
    day_of_month: DayOfMonth | None = Field(default=None, validate_default=True)
    expected_date: date | None = Field(default=None, validate_default=True)
    collection_window_minutes: WindowMinutes | None = None
    agent_id: str = Field(default=DEFAULT_AGENT_ID, validate_default=True)
    agent_deposit_path_template: str = Field(
        default=DEFAULT_DEPOSIT_TEMPLATE, validate_default=True
    )
    final_storage_path_template: str = Field(default=DEFAULT_FINAL_TEMPLATE, validate_default=True)
    active: bool = True
    # SPEC §10: the named channels this job's alerts go to (None: the unnamed [alerts] one).
    alert_channels: tuple[str, ...] | None = None
    # SPEC §13, §14 (None: the config's `archive_test`, `[retention]` keep_*): the archive test,
    # and how many validated backups the GFS rule keeps (a job with none set prunes none).
    archive_test: bool | None = None
    keep_daily: KeepCount | None = None
    keep_weekly: KeepCount | None = None
    keep_monthly: KeepCount | None = None
    source: str = Field(default="", exclude=True)

    @field_validator("alert_channels", mode="before")
    @classmethod
    def _coerce_channels(cls, value: object) -> object:
        if isinstance(value, list):
            if not value or not all(isinstance(item, str) and item for item in value):
                raise ValueError("expected a non-empty list of channel names")
            return tuple(value)
        return value

    @field_validator(*IDENTITY_FIELDS, mode="after")
    @classmethod
    def _check_name(cls, value: str) -> str:
        check_name(value)
        return value

    @field_validator("frequency", mode="before")
    @classmethod
    def _coerce_frequency(cls, value: object) -> BackupFrequency:
        return _parse_frequency(value)

    @field_validator("days_of_week", mode="before")
    @classmethod
    def _coerce_days(cls, value: object) -> tuple[int, ...] | None:
        return None if value is None else _parse_days(value)

    @field_validator("expected_date", mode="before")
    @classmethod
    def _coerce_date(cls, value: object) -> date | None:
        return None if value is None else _parse_date(value)

    @field_validator(*APPLIES_TO, mode="after")
    @classmethod
    def _check_frequency_key(cls, value: object, info: ValidationInfo) -> object:
        assert info.field_name is not None
        _check_frequency_use(info.field_name, value, info)
        return value

    @field_validator("agent_id", mode="after")
    @classmethod
    def _render_agent_id(cls, value: str, info: ValidationInfo) -> str:
        """The agent_id may itself be a template, as its default is."""
        check_placeholders(value, frozenset(IDENTITY_FIELDS))
        fields = _known(info, IDENTITY_FIELDS)
        if fields is None:
            return value
        rendered = render_template(value, fields)
        if not rendered.strip():
            raise ValueError("must not be empty")
        return rendered

    @field_validator("agent_deposit_path_template", mode="after")
    @classmethod
    def _check_deposit_template(cls, value: str, info: ValidationInfo) -> str:
        check_placeholders(value, SITE_PLACEHOLDERS)
        fields = _known(info, tuple(SITE_PLACEHOLDERS))
        if fields is not None:
            check_relpath(render_template(value, fields))
        return value

    @field_validator("final_storage_path_template", mode="after")
    @classmethod
    def _check_final_template(cls, value: str, info: ValidationInfo) -> str:
        """A trial render catches what the placeholders alone cannot: `..`, a leading `/`."""
        check_placeholders(value, FINAL_PLACEHOLDERS)
        fields = _known(info, tuple(SITE_PLACEHOLDERS))
        if fields is not None:
            check_relpath(_final_rendered(value, fields, _SAMPLE_CYCLE, _SAMPLE_STAGED))
        return value

    def __eq__(self, other: object) -> bool:
        """Where a job was written is not part of what it is (a moved job is unchanged)."""
        if not isinstance(other, JobSpec):
            return NotImplemented
        return self._compared() == other._compared()

    def __hash__(self) -> int:
        return hash(self._compared())

    def _compared(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in type(self).model_fields if name != "source")

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.company_name, self.city, self.neighborhood, self.database_name)

    @property
    def fields(self) -> dict[str, str]:
        """The values of the placeholders every template may use."""
        return {name: getattr(self, name) for name in (*IDENTITY_FIELDS, "agent_id")}

    @property
    def deposit_relpath(self) -> PurePosixPath:
        """The site's deposit folder, relative to `backup_storage_root`."""
        return safe_relpath(render_template(self.agent_deposit_path_template, self.fields))

    def schedule(self, default_window_minutes: int) -> Schedule:
        window = self.collection_window_minutes or default_window_minutes
        days = None if self.days_of_week is None else frozenset(self.days_of_week)
        return Schedule(
            frequency=self.frequency,
            hour=self.expected_hour_utc,
            minute=self.expected_minute_utc,
            days_of_week=days,
            day_of_month=self.day_of_month,
            expected_date=self.expected_date,
            window=timedelta(minutes=window),
        )


# Keys a job file may set: every field but `source`, which the loader fills in.
JOB_KEYS: frozenset[str] = frozenset(JobSpec.model_fields) - {"source"}


# --------------------------------------------------------------------------- loading


def load_jobs(settings: Settings) -> list[JobSpec]:
    """Every job of every file under `jobs_path`, or one ConfigError listing every problem."""
    specs, errors = read_jobs(settings)
    if errors:
        raise ConfigError(errors)
    return specs


def read_jobs(settings: Settings) -> tuple[list[JobSpec], list[str]]:
    """The valid jobs and every problem found: `backupwatchctl jobs` shows the first and warns
    about the second (SPEC §11: a typo in one file does not blind the tool)."""
    errors: list[str] = []
    specs: list[JobSpec] = []
    try:
        files = job_files(settings.jobs_path)
    except ConfigError as exc:
        return [], exc.errors
    for path in files:
        file_specs, file_errors = load_file(path)
        specs.extend(file_specs)
        errors.extend(file_errors)
    errors.extend(cross_file_errors(specs, settings))
    return specs, errors


class Located(Protocol):
    """What the checks across files need of a job: a `JobSpec` or a `jobrecord.JobRecord`."""

    @property
    def key(self) -> tuple[str, str, str, str]: ...
    @property
    def source(self) -> str: ...
    @property
    def alert_channels(self) -> tuple[str, ...] | None: ...


def cross_file_errors(specs: Sequence[Located], settings: Settings) -> list[str]:
    """What no single file shows: a job defined twice, a channel the config lacks."""
    return [*_duplicates(specs), *_unknown_channels(specs, settings)]


def _unknown_channels(specs: Sequence[Located], settings: Settings) -> Iterator[str]:
    """SPEC §10: a job routed to a channel `[alerts.channels]` does not define is an error."""
    known = settings.alerts.channel_names
    for spec in specs:
        unknown = [name for name in spec.alert_channels or () if name not in known]
        if unknown:
            offered = ", ".join(sorted(known))
            yield (
                f"{spec.source} ({'/'.join(spec.key)}): alert_channels: unknown channel "
                f"{', '.join(repr(n) for n in unknown)}; defined: {offered}"
            )


def job_files(jobs_path: Path) -> list[Path]:
    """One file, or a folder's `*.toml` in name order (hidden editor files skipped)."""
    try:
        if jobs_path.is_dir():
            found = [p for p in jobs_path.iterdir() if _is_job_file(p)]
            return sorted(found, key=lambda p: p.name)
        if jobs_path.is_file():
            return [jobs_path]
    except OSError as exc:
        raise ConfigError([f"{jobs_path}: cannot read jobs_path: {exc.strerror or exc}"]) from exc
    raise ConfigError([f"{jobs_path}: jobs_path is neither a file nor a folder (missing?)"])


def _is_job_file(path: Path) -> bool:
    return path.suffix == ".toml" and not path.name.startswith(".") and path.is_file()


def unread_job_files(settings: Settings) -> list[str]:
    """Files in the jobs folder that are not read (`acme.tml`, `acme.toml.bak`): each one a
    warning, since an operator who saved jobs there expects them to count. Hidden files
    (editors' swap files) are left out."""
    folder = settings.jobs_path
    try:
        if not folder.is_dir():
            return []
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and not _is_job_file(p))
    except OSError:
        return []
    return [
        f"{folder / name}: not read: only *.toml files in {folder} hold jobs"
        for name in names
        if not name.startswith(".")
    ]


def load_file(path: Path) -> tuple[list[JobSpec], list[str]]:
    try:
        document = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        return [], [f"{path}: cannot read job file: {exc.strerror or exc}"]
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return [], [f"{path}: invalid TOML: {exc}"]
    errors = [
        f"{path}: {key}: unknown key (a job file holds [defaults] and [[job]])"
        for key in document
        if key not in ("defaults", "job")
    ]
    defaults = _defaults(path, document.get("defaults", {}), errors)
    specs: list[JobSpec] = []
    for number, raw in enumerate(_job_tables(path, document.get("job", []), errors), start=1):
        spec = None if raw is None else _build_job(job_source(path, number), defaults, raw, errors)
        if spec is not None:
            specs.append(spec)
    return specs, errors


JOB_NUMBER = ": job #"
"""Between a job file's path and the job's number in `JobSpec.source` ("FILE: job #N")."""


def job_source(file: str | Path, number: int) -> str:
    """Where the `number`th `[[job]]` table of `file` was written, as messages name it."""
    return f"{file}{JOB_NUMBER}{number}"


def _defaults(path: Path, table: object, errors: list[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        errors.append(f"{path}: defaults: expected a table [defaults]")
        return {}
    for key in table:
        if key not in JOB_KEYS:
            errors.append(f"{path}: [defaults]: {key}: unknown key")
    return {key: value for key, value in table.items() if key in JOB_KEYS}


def _job_tables(path: Path, jobs: object, errors: list[str]) -> list[dict[str, Any] | None]:
    """The `[[job]]` tables; a non-table entry keeps its number so later ones keep theirs."""
    if not isinstance(jobs, list):
        errors.append(f"{path}: job: expected an array of tables [[job]]")
        return []
    for number, raw in enumerate(jobs, start=1):
        if not isinstance(raw, dict):
            errors.append(f"{job_source(path, number)}: expected a table [[job]]")
    return [raw if isinstance(raw, dict) else None for raw in jobs]


def _build_job(
    where: str, defaults: Mapping[str, Any], raw: dict[str, Any], errors: list[str]
) -> JobSpec | None:
    values = _effective_values(defaults, raw)
    label = _label(where, values)
    for key in raw:
        if key not in JOB_KEYS:
            errors.append(f"{label}: {key}: unknown key")
    values = {key: value for key, value in values.items() if key in JOB_KEYS}
    try:
        return JobSpec.model_validate({**values, "source": where})
    except ValidationError as exc:
        inherited = {key for key in defaults if key not in raw}
        errors.extend(_describe(exc, label, inherited))
        return None


def _effective_values(defaults: Mapping[str, Any], raw: Mapping[str, Any]) -> dict[str, Any]:
    """The job's own keys over its file's defaults, minus defaults its frequency does not use.

    A `[defaults]` table serves jobs of several frequencies: its `expected_hour_utc` must not
    make every HOURLY job of the file invalid. A key written in the job itself is still checked.
    """
    values = {**defaults, **raw}
    try:
        frequency = _parse_frequency(values.get("frequency", BackupFrequency.DAILY))
    except ValueError:
        return values
    return {
        key: value
        for key, value in values.items()
        if key in raw or key not in APPLIES_TO or frequency in APPLIES_TO[key]
    }


def _label(where: str, values: Mapping[str, Any]) -> str:
    names = [values.get(name) for name in IDENTITY_FIELDS]
    if all(isinstance(name, str) for name in names):
        return f"{where} ({'/'.join(str(name) for name in names)})"
    return where


def _describe(exc: ValidationError, label: str, inherited: set[str]) -> Iterator[str]:
    for error in exc.errors(include_url=False):
        key = str(error["loc"][0]) if error["loc"] else "?"
        if error["type"] == "missing":
            message = "required key is missing"
        else:
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] != "value_error":
                message += f" (got {error['input']!r})"
        if key in inherited:
            message += " (inherited from [defaults])"
        yield f"{label}: {key}: {message}"


def _duplicates(specs: Sequence[Located]) -> Iterator[str]:
    """SPEC §2: a job defined twice names both places, wherever they are."""
    first: dict[tuple[str, str, str, str], Located] = {}
    for spec in specs:
        earlier = first.setdefault(spec.key, spec)
        if earlier is not spec:
            yield f"{spec.source} duplicates {earlier.source} ({'/'.join(spec.key)})"
