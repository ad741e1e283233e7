"""Structured logging for backupwatchd (SPEC §7): console lines, JSON lines or the journal.

Every module logs through structlog (`structlog.get_logger(__name__)`); the events are handed to
the stdlib `logging` root handler installed here, so that third-party libraries (watchdog, alembic,
SQLAlchemy, Python warnings) come out of the same stream, in the same format, with one level knob.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

SYSLOG_IDENTIFIER = "backupwatch"
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")  # where libsystemd sends, unconfigurable

JournalSend = Callable[..., Any]

# Our own loggers and everything structlog emits are filtered by the requested level; other
# libraries only reach the output from WARNING up, so that `--log-level DEBUG` stays readable.
_OWN_PREFIX = "backupwatch"
_HANDLER_NAME = "backupwatch"  # marks the root handler that a later configure_logging replaces
_THIRD_PARTY_MIN_LEVEL = logging.WARNING
# The filter alone would drop their INFO records, but SQLAlchemy decides once, from its logger's
# effective level, whether to build a log record for every statement: make it not bother.
_QUIET_LIBRARIES = ("sqlalchemy", "alembic", "watchdog")
_JSON_LEADING_KEYS = ("timestamp", "level", "event", "logger")

# RFC 5424 severities as journald's PRIORITY= field expects them.
_PRIORITIES = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warn": 4,
    "warning": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}
_DEFAULT_PRIORITY = 6

# Fields that journal entries already carry from us or from journald: an event field of the same
# name must not overwrite them (the value is still readable in MESSAGE).
_RESERVED_FIELDS = frozenset(
    {
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
    }
)
_INVALID_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")
_MAX_FIELD_NAME = 64  # journald drops longer names
_PLAIN_VALUE = re.compile(r"[^\s\"'=]+")

# Keys structlog adds for its own bookkeeping; they are not event fields.
_META_KEYS = ("event", "level", "timestamp", "logger", "exception", "exc_info", "stack")


class LogTarget(enum.StrEnum):
    AUTO = "auto"
    CONSOLE = "console"
    JSON = "json"
    JOURNAL = "journal"


def journal_send() -> JournalSend | None:
    """systemd-python's `journal.send` when the journal can take it, else None.

    systemd-python is an optional extra (SPEC §7), and libsystemd silently discards entries
    when journald's socket is missing, so without the socket JOURNAL would lose every line.
    """
    if not JOURNAL_SOCKET.exists():
        return None
    try:
        import systemd.journal as journal
    except ImportError:
        return None
    send: JournalSend = journal.send
    return send


def resolve_target(
    requested: LogTarget, environ: Mapping[str, str], stream_fd: int = 2
) -> LogTarget:
    """Decide AUTO: the journal only when our stderr really is the journal stream.

    systemd sets JOURNAL_STREAM=<dev>:<inode> of the stderr it connected; a terminal started from
    a user service inherits the variable with another stderr, so the pair is compared (as
    systemd.exec(5) recommends) before leaving the console.
    """
    if requested is not LogTarget.AUTO:
        return requested
    if _stream_is_journal(environ.get("JOURNAL_STREAM", ""), stream_fd) and journal_send():
        return LogTarget.JOURNAL
    return LogTarget.CONSOLE


def _stream_is_journal(journal_stream: str, fd: int) -> bool:
    """Compare JOURNAL_STREAM's device:inode with the fd's, tolerating garbage in the variable."""
    device, _, inode = journal_stream.partition(":")
    try:
        stat = os.fstat(fd)
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def configure_logging(target: LogTarget, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Install (or, on reload, replace) the one root handler and the structlog chain.

    `stream` defaults to the sys.stderr of the moment, not of import time, so that a replaced
    stderr (tests, daemonizing wrappers) is honoured. Handlers that others put on the root
    logger (pytest's caplog) are left in place; only ours is swapped.
    """
    out = sys.stderr if stream is None else stream
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    target = resolve_target(target, os.environ)
    send = journal_send() if target is LogTarget.JOURNAL else None
    handler = _make_handler(target, out, send)
    _install(handler, numeric_level)
    if target is LogTarget.JOURNAL and send is None:
        structlog.get_logger(__name__).warning(
            "logging.journal_unavailable",
            reason=f"systemd-python missing or no {JOURNAL_SOCKET}",
            fallback=str(LogTarget.CONSOLE),
        )


def _shared_processors() -> list[Processor]:
    """What both structlog events and stdlib records go through before rendering."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _make_handler(target: LogTarget, stream: TextIO, send: JournalSend | None) -> logging.Handler:
    """One handler per target; JOURNAL without systemd-python renders like CONSOLE."""
    handler: logging.Handler
    if target is LogTarget.JOURNAL and send is not None:
        handler = _JournalHandler(send, stream)
        handler.setFormatter(_formatter(_render_journal_payload))
    elif target is LogTarget.JSON:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(_formatter(_json_renderer(), format_exceptions=True))
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(_formatter(_console_renderer(), format_exceptions=False))
    handler.addFilter(_third_party_filter)
    handler.set_name(_HANDLER_NAME)
    return handler


def _formatter(renderer: Processor, format_exceptions: bool = True) -> logging.Formatter:
    """Wrap a structlog renderer so stdlib records are rendered exactly like our events."""
    processors: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if format_exceptions:
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(), processors=processors
    )


def _json_renderer() -> Processor:
    """One object per line; unknown value types are stringified rather than crash the logger."""
    render = structlog.processors.JSONRenderer(default=str)

    def leading_keys_first(logger: WrappedLogger, name: str, event_dict: EventDict) -> Any:
        # A person tailing the file reads when/what first; the fields follow in call order.
        ordered = {k: event_dict[k] for k in _JSON_LEADING_KEYS if k in event_dict}
        ordered.update(event_dict)
        return render(logger, name, ordered)

    return leading_keys_first


def _console_renderer() -> Processor:
    """Plain text (stderr may be a file or the journal), keys in call order, plain tracebacks."""
    return structlog.dev.ConsoleRenderer(
        colors=False,
        sort_keys=False,
        exception_formatter=structlog.dev.plain_traceback,
    )


def _install(handler: logging.Handler, level: int) -> None:
    """Swap our root handler and (re)configure structlog; safe to repeat on SIGHUP."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    for library in _QUIET_LIBRARIES:
        logging.getLogger(library).setLevel(_THIRD_PARTY_MIN_LEVEL)
    logging.captureWarnings(True)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Module-level loggers exist before configure(); caching would pin them to whatever
        # configuration was current at their first use.
        cache_logger_on_first_use=False,
    )


def _third_party_filter(record: logging.LogRecord) -> bool:
    """Let other libraries through only from WARNING, whatever our own level is."""
    if "_logger" in record.__dict__:  # set by structlog's wrap_for_formatter
        return True
    name = record.name
    if name == _OWN_PREFIX or name.startswith(_OWN_PREFIX + "."):
        return True
    return record.levelno >= _THIRD_PARTY_MIN_LEVEL


class _JournalHandler(logging.Handler):
    """Send each rendered record to journald; print it to the stream if journald is away.

    The formatter returns the journal fields as a JSON object (formatters must return str), so
    all the field logic stays a pure function and this class only does I/O.
    """

    def __init__(self, send: JournalSend, fallback: TextIO) -> None:
        super().__init__()
        self._send = send
        self._fallback = fallback
        self._warned = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = json.loads(self.format(record))
            # Without CODE_*, systemd-python would record its caller: this handler.
            fields.update(
                CODE_FILE=record.pathname, CODE_LINE=record.lineno, CODE_FUNC=record.funcName
            )
            self._deliver(fields)
        except Exception:
            self.handleError(record)

    def _deliver(self, fields: dict[str, Any]) -> None:
        message = fields.pop("MESSAGE")
        try:
            self._send(message, **fields)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                self._fallback.write(f"backupwatch: journal unreachable ({exc}); using stderr\n")
            self._fallback.write(f"<{fields.get('PRIORITY', _DEFAULT_PRIORITY)}>{message}\n")
            self._fallback.flush()


def _render_journal_payload(_: WrappedLogger, __: str, event_dict: EventDict) -> str:
    """Final processor of the journal formatter: the fields, JSON-encoded for the handler."""
    return json.dumps(journal_fields(event_dict))


def journal_fields(event_dict: Mapping[str, Any]) -> dict[str, str]:
    """Map a structlog event to journald fields.

    Every event field becomes an upper-case journal field so `journalctl STATUS=MISSING` finds
    it, and MESSAGE repeats them as key=value for readers of the plain journal.
    """
    fields = _event_fields(event_dict)
    message = format_message(str(event_dict.get("event", "")), fields)
    exception = event_dict.get("exception")
    journal: dict[str, str] = {
        "MESSAGE": f"{message}\n{exception}" if exception else message,
        "PRIORITY": str(_PRIORITIES.get(str(event_dict.get("level", "")), _DEFAULT_PRIORITY)),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
    }
    if event_dict.get("logger"):
        journal["LOGGER"] = str(event_dict["logger"])
    if exception:
        journal["TRACEBACK"] = str(exception)
    for key, value in fields.items():
        name = journal_field_name(key)
        if name not in journal and name not in _RESERVED_FIELDS:
            journal[name] = _stringify(value)
    return journal


def _event_fields(event_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The caller's own key/values, without structlog's bookkeeping."""
    return {k: v for k, v in event_dict.items() if k not in _META_KEYS and not k.startswith("_")}


def format_message(event: str, fields: Mapping[str, Any]) -> str:
    """`event key=value ...`, quoting only the values a reader could not split unambiguously."""
    parts = [event]
    for key, value in fields.items():
        text = _stringify(value)
        if not _PLAIN_VALUE.fullmatch(text):
            text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def journal_field_name(key: str) -> str:
    """A valid journal field name: A-Z, 0-9 and `_`, not leading with `_` or a digit.

    journald silently drops entries' fields with invalid names; a leading underscore would even
    claim to be a trusted field. `job-id` becomes JOB_ID, `2fa` becomes F_2FA.
    """
    name = _INVALID_FIELD_CHARS.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    return name[:_MAX_FIELD_NAME]


def _stringify(value: Any) -> str:
    """Journal values are text: strings as they are, everything else through str()."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value if isinstance(value, str) else str(value)
