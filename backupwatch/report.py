"""STATUS.json version 1 (SPEC §3): pydantic models, parsing and validation.

Pure: bytes in, a validated `StatusReport` or a `ReportRejected` out. The reports come from
agents that are not trusted (SPEC §9), so every failure mode of decoding and validation ends
in `ReportRejected` with a one-line reason an agent author can act on, never in another
exception that could take the daemon down.
"""

from __future__ import annotations

import json
import re
from datetime import date, datetime, timedelta
from typing import Annotated, Any, Final

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from backupwatch.timeutil import as_utc, format_z

__all__ = [
    "DatabaseReport",
    "ProcessStep",
    "ReportRejected",
    "StatusReport",
    "accept_report",
    "check_freshness",
    "parse_report",
    "size_problem",
]

MAX_NAME_CHARS: Final = 4096
"""Identifiers and paths: far above any real one, low enough to keep logs and rows sane."""
MAX_TEXT_CHARS: Final = 65536
"""Free text (logs_summary, error_message): agents paste log excerpts, so allow more."""
MAX_TIME_CHARS: Final = 64
MAX_SIZE_BYTES: Final = 2**63 - 1
"""A size must fit a signed 64-bit column (PostgreSQL BIGINT)."""
MAX_LISTED_ERRORS: Final = 20
"""A reason stays one readable line even when a report has thousands of errors."""
_MAX_SHOWN_CHARS: Final = 40

_SHA256_RE: Final = re.compile(r"[0-9a-fA-F]{64}")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
_ESCAPE_TAIL_RE: Final = re.compile(r"u[0-9a-fA-F]{0,4}(\\(u[0-9a-fA-F]{0,3})?)?")
_JSON_LITERALS: Final = ("true", "false", "null", "-")
_NUMBER_TAILS: Final = frozenset({".", "e", "E", "e-", "e+", "E-", "E+"})
_UTF8_BOM: Final = "\ufeff"


class ReportRejected(Exception):
    """A report that cannot be accepted; `reason` goes to the log and to NAME.reason.txt.

    `incomplete` is true when the bytes are not (yet) a JSON document at all: empty, cut short,
    not UTF-8 or not JSON. Such a report may still be being written, so the daemon rejects it
    only once its writer is done (SPEC §3); a whole JSON document with schema errors, or one
    nested too deeply to read, is rejected at once.
    """

    reason: str
    incomplete: bool

    def __init__(self, reason: str, *, incomplete: bool = False) -> None:
        # The reason file and log lines promise one line; the split is only a safety net.
        self.reason = " ".join(reason.splitlines())
        self.incomplete = incomplete
        super().__init__(self.reason)


# --- field types ---------------------------------------------------------------------------


def _schema_error(kind: str, message: str) -> PydanticCustomError:
    """Our own messages, so that reasons read the same whatever pydantic's wording."""
    return PydanticCustomError(kind, message)


def _storable(value: str) -> str:
    """PostgreSQL text cannot hold NUL: refuse it here rather than fail the insert later.

    Lone surrogates, which would break UTF-8 writers, are already refused by pydantic's
    str validation (`string_unicode`).
    """
    if "\x00" in value:
        raise _schema_error("nul_character", "must not contain a NUL character")
    return value


def _sha256(value: str) -> str:
    """Compared byte-for-byte with the server's hexdigest, hence lower case."""
    if not _SHA256_RE.fullmatch(value):
        raise _schema_error("sha256", "must be 64 hexadecimal digits (a SHA-256)")
    return value.lower()


def _staged_file_name(value: str) -> str:
    """Refused here so that no path an agent writes can point outside D (SPEC §9)."""
    if not value:
        raise _schema_error("path_empty", "must not be empty")
    if value.startswith("/"):
        raise _schema_error("path_absolute", "must be a path relative to the deposit folder")
    if "\\" in value:
        raise _schema_error("path_backslash", "must use '/' as separator, not '\\'")
    if _CONTROL_RE.search(value):
        raise _schema_error("path_control", "must not contain control characters")
    parts = value.split("/")
    if ".." in parts:
        raise _schema_error("path_traversal", "must not contain a '..' component")
    if all(part in ("", ".") for part in parts):
        raise _schema_error("path_no_file", "must name a file inside the deposit folder")
    return value


def _database_name(value: str) -> str:
    """Names end up in log fields, messages and lookups; keep them single-line and path-free."""
    if not value:
        raise _schema_error("name_empty", "database name must not be empty")
    if "/" in value:
        raise _schema_error("name_slash", "database name must not contain '/'")
    if _CONTROL_RE.search(value):
        raise _schema_error("name_control", "database name must not contain control characters")
    return value


def _utc_time(value: object) -> datetime:
    """SPEC §3: ISO 8601 strings only (not epoch numbers), naive meaning UTC."""
    if isinstance(value, datetime):
        return _aware(value)
    if not isinstance(value, str):
        raise _schema_error("time_type", "must be an ISO 8601 time string")
    text = value.strip()
    if len(text) > MAX_TIME_CHARS:
        raise _schema_error("time_too_long", "is too long for an ISO 8601 time")
    if _is_bare_date(text):
        raise _schema_error("time_date_only", "must be a time, not only a date")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise _schema_error("time_format", "must be an ISO 8601 time") from None
    return _aware(parsed)


def _aware(value: datetime) -> datetime:
    """Converting an offset time near year 1 or 9999 to UTC can overflow."""
    try:
        return as_utc(value)
    except OverflowError:
        raise _schema_error("time_range", "is out of the representable range") from None


def _is_bare_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


Name = Annotated[str, Field(strict=True, max_length=MAX_NAME_CHARS), AfterValidator(_storable)]
Text = Annotated[str, Field(strict=True, max_length=MAX_TEXT_CHARS), AfterValidator(_storable)]
Sha256 = Annotated[str, Field(strict=True), AfterValidator(_sha256)]
SizeBytes = Annotated[int, Field(strict=True, ge=0, le=MAX_SIZE_BYTES)]
UtcTime = Annotated[datetime, BeforeValidator(_utc_time)]
StagedFileName = Annotated[Name, AfterValidator(_staged_file_name)]
DatabaseName = Annotated[Name, AfterValidator(_database_name)]


# --- models --------------------------------------------------------------------------------

_MODEL_CONFIG: Final = ConfigDict(extra="ignore", frozen=True)


class ProcessStep(BaseModel):
    """One of the agent's three steps; only `status` is always required."""

    model_config = _MODEL_CONFIG

    status: bool = Field(strict=True)
    # Each step names its start time after itself; one model for the three keeps the
    # pipeline simple, and accepting a sibling's key costs nothing.
    start_time: UtcTime | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "backup_process_start_time",
            "compress_process_start_time",
            "transfer_process_start_time",
            "start_time",
        ),
    )
    timestamp: UtcTime | None = None
    sha256_checksum: Sha256 | None = None
    size_bytes: SizeBytes | None = None
    error_message: Text | None = None


class DatabaseReport(BaseModel):
    """One database block; a successful one must say what file to verify (SPEC §3, §5)."""

    model_config = _MODEL_CONFIG

    backup_process: ProcessStep
    compress_process: ProcessStep
    transfer_process: ProcessStep
    staged_file_name: StagedFileName | None = None
    logs_summary: Text | None = None

    @property
    def all_steps_ok(self) -> bool:
        return (
            self.backup_process.status
            and self.compress_process.status
            and self.transfer_process.status
        )

    @model_validator(mode="after")
    def _success_names_its_file(self) -> DatabaseReport:
        """Without these, §5 steps 3-5 cannot check the staged file, so refuse up front."""
        if not self.all_steps_ok:
            return self
        missing = [
            loc
            for loc, value in (
                (("compress_process", "sha256_checksum"), self.compress_process.sha256_checksum),
                (("compress_process", "size_bytes"), self.compress_process.size_bytes),
                (("staged_file_name",), self.staged_file_name),
            )
            if value is None
        ]
        if missing:
            # A ValidationError raised here is merged by pydantic under this model's path,
            # so each missing field gets its own full dotted path in the reason.
            raise ValidationError.from_exception_data(
                type(self).__name__, [_required_when_ok(loc) for loc in missing]
            )
        return self


def _required_when_ok(loc: tuple[str, ...]) -> InitErrorDetails:
    return InitErrorDetails(
        type=_schema_error("required_when_ok", "required when all three steps succeeded"),
        loc=loc,
        input=None,
    )


class StatusReport(BaseModel):
    """A whole STATUS.json; databases are independent of one another (SPEC §5)."""

    model_config = _MODEL_CONFIG

    agent_id: Name | None = None
    operation_start_time: UtcTime | None = None
    operation_timestamp: UtcTime
    overall_status: Name | None = None
    databases: dict[DatabaseName, DatabaseReport] = Field(min_length=1)


# --- parsing -------------------------------------------------------------------------------


def parse_report(data: bytes) -> StatusReport:
    """Decode, parse and validate a report; every failure becomes `ReportRejected`."""
    document = _load_json(data)
    if not isinstance(document, dict):
        raise ReportRejected(f"top level must be a JSON object, got {_describe(document)}")
    try:
        return StatusReport.model_validate(document)
    except ValidationError as exc:
        raise ReportRejected(_format_errors(exc.errors())) from exc


def _decode(data: bytes) -> str:
    """UTF-8, tolerating the BOM that some Windows tools put in front of it."""
    return data.decode("utf-8").removeprefix(_UTF8_BOM)


def _load_json(data: bytes) -> Any:
    try:
        text = _decode(data)
    except UnicodeDecodeError as exc:
        raise ReportRejected(
            f"not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}",
            incomplete=True,
        ) from exc
    if not text.strip():
        raise ReportRejected("not valid JSON: the file is empty", incomplete=True)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (the file is cut short: write it under a name starting with '.' and rename it)"
        cut = hint if _cut_short(exc) else ""
        raise ReportRejected(
            f"not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}{cut}",
            incomplete=True,
        ) from exc
    except RecursionError as exc:
        raise ReportRejected("JSON not accepted: nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ReportRejected(f"JSON not accepted: {exc}") from exc


def _cut_short(exc: json.JSONDecodeError) -> bool:
    """True when the parser failed only because the text ended, wherever it reports it."""
    rest = exc.doc[exc.pos :]
    if exc.msg.startswith("Unterminated string"):
        return True  # raised only when the closing quote is missing up to the end
    if exc.msg.startswith("Invalid \\uXXXX escape"):
        return _ESCAPE_TAIL_RE.fullmatch(rest) is not None
    if not rest.strip():
        return True
    if any(literal.startswith(rest) for literal in _JSON_LITERALS):
        return True  # "tru", "nul", a lone "-"
    after_digit = exc.pos > 0 and exc.doc[exc.pos - 1].isdigit()
    return after_digit and rest in _NUMBER_TAILS  # "1." or "1e-" of a longer number


# --- reasons -------------------------------------------------------------------------------

_FRIENDLY: Final[dict[str, str]] = {
    "missing": "required",
    "bool_type": "must be true or false",
    "int_type": "must be a whole number",
    "string_type": "must be a string",
    "string_unicode": "must not contain an unpaired \\u surrogate escape",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
    "greater_than_equal": "must not be negative",
    "less_than_equal": f"must be at most {MAX_SIZE_BYTES}",
    "too_short": "must contain at least one database",
}
_NO_INPUT: Final = frozenset({"missing", "required_when_ok", "too_short"})


def _format_errors(errors: list[ErrorDetails]) -> str:
    """All schema errors, each behind the dotted path of the field an agent author must fix."""
    parts = [_format_error(error) for error in errors[:MAX_LISTED_ERRORS]]
    if len(errors) > MAX_LISTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_LISTED_ERRORS} more errors")
    return "; ".join(parts)


def _format_error(error: ErrorDetails) -> str:
    kind = error["type"]
    message = _FRIENDLY.get(kind, error["msg"])
    if kind == "string_too_long":
        message = f"longer than {error.get('ctx', {}).get('max_length')} characters"
    if kind not in _NO_INPUT:
        message = f"{message}, got {_describe(error['input'])}"
    path = _format_path(error["loc"])
    return f"{path}: {message}" if path else message


def _format_path(loc: tuple[int | str, ...]) -> str:
    """`databases.sales.compress_process.size_bytes`; odd database names are quoted."""
    return ".".join(_path_part(part) for part in loc if part != "[key]")


def _path_part(part: int | str) -> str:
    if isinstance(part, int):
        return str(part)
    if part and part.isprintable() and "." not in part and '"' not in part:
        return part
    return _quote(part)


def _quote(text: str) -> str:
    """JSON-quoted, escaping anything that could break the reason's single line."""
    return json.dumps(text, ensure_ascii=not text.isprintable())


def _describe(value: object) -> str:
    """A short, one-line picture of a JSON value for a reason."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        shown = repr(value) if isinstance(value, float) else _short_int(value)
        return f"number {shown}"
    if isinstance(value, str):
        shown = value if len(value) <= _MAX_SHOWN_CHARS else value[:_MAX_SHOWN_CHARS] + "..."
        return f"string {_quote(shown)}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _short_int(value: int) -> str:
    text = str(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[:_MAX_SHOWN_CHARS] + "..."


# --- acceptance ----------------------------------------------------------------------------


def accept_report(
    data: bytes,
    now: datetime,
    max_age: timedelta,
    agent_ids: frozenset[str] | None = None,
) -> StatusReport:
    """SPEC §3's whole acceptance of a report's bytes, for the daemon and `validate` alike.

    `agent_ids` are the site's agents; None (an agent author checking a file offline) skips
    that check. Raises ReportRejected with the reason.
    """
    report = parse_report(data)
    check_freshness(report, now, max_age)
    if agent_ids is not None and report.agent_id is not None and report.agent_id not in agent_ids:
        expected = ", ".join(sorted(agent_ids))
        raise ReportRejected(f"agent_id {report.agent_id!r} is not this site's ({expected})")
    return report


def size_problem(size: int, limit: int) -> str | None:
    """SPEC §3: a report over `report_max_bytes` is rejected unread."""
    if size > limit:
        return f"it is {size} bytes, over report_max_bytes ({limit})"
    return None


# --- freshness -----------------------------------------------------------------------------


def check_freshness(
    report: StatusReport,
    now: datetime,
    max_age: timedelta,
    future_tolerance: timedelta = timedelta(minutes=5),
) -> None:
    """SPEC §3: stale reports (seed scenario 4) and reports from a clock running ahead.

    Both bounds are inclusive: a report exactly `max_age` old, or exactly
    `future_tolerance` ahead, is accepted.
    """
    now = as_utc(now)
    stamp = report.operation_timestamp
    if now - stamp > max_age:
        raise ReportRejected(
            f"operation_timestamp {format_z(stamp)} is older than "
            f"{max_age / timedelta(days=1):g} day(s) (server time {format_z(now)})"
        )
    if stamp - now > future_tolerance:
        raise ReportRejected(
            f"operation_timestamp {format_z(stamp)} is more than "
            f"{future_tolerance / timedelta(minutes=1):g} minutes in the future "
            f"(server time {format_z(now)}; check the agent's clock)"
        )
