"""SPEC §1: `backupwatch.toml`, its environment overrides, and every error they hold at once.

Like borgmatic's `config/validate.py`, one schema checks everything and every error is
gathered before anything starts, each naming where it came from (the file or the environment
variable) and the key, so that an operator fixes a config in one pass instead of one error per
restart.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from backupwatch.alerting import Routing, routing
from backupwatch.control import CONTROL_SOCKET_MAX
from backupwatch.locate import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    DEFAULT_CONTROL_SOCKET,
    ENV_PREFIX,
    ConfigError,
    default_config_path,
)

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "ConfigError",
    "Lenient",
    "Settings",
    "default_config_path",
    "load_settings",
    "load_settings_lenient",
    "parse_listen",
]

# Upper bounds keep later `timedelta` arithmetic from overflowing; no sane value comes near.
_MAX_MINUTES = 100 * 366 * 24 * 60
_MAX_DAYS = 100 * 366

PositiveMinutes = Annotated[int, Field(gt=0, le=_MAX_MINUTES)]
PositiveFloatMinutes = Annotated[float, Field(gt=0, le=_MAX_MINUTES, allow_inf_nan=False)]
PositiveDays = Annotated[float, Field(gt=0, le=_MAX_DAYS, allow_inf_nan=False)]
PositiveSeconds = Annotated[float, Field(gt=0, le=_MAX_DAYS * 86400, allow_inf_nan=False)]


EVENT_KIND_NAMES = (
    "MISSING",
    "FAILED",
    "HASH_MISMATCH",
    "TRANSFER_INTEGRITY_FAILED",
    "RECOVERED",
    "UNCHANGED",
    "SUSPICIOUS",
    "REJECTED",
)
DEFAULT_CHANNEL = "default"
_CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_URL_SECRET = re.compile(r"(://[^/:@?#]*:)[^@/?#]*@")


def masked(url: str) -> str:
    """An Apprise URL as it may be shown or logged: its password replaced by `***`."""
    return _URL_SECRET.sub(r"\1***@", url)


def _check_apprise_urls(urls: list[str], info: ValidationInfo) -> list[str]:
    """SPEC §10: an invalid URL is a config error (naming the file and the key).

    Apprise takes a third of a second to import: `backupwatchctl` commands that never send
    skip this check (`check_urls=False`); the daemon, `check-config` and `alert-test` do not.
    """
    if isinstance(info.context, dict) and info.context.get("check_urls") is False:
        return urls
    import apprise

    bad = [
        f"urls[{n}]: {masked(url)!r}"
        for n, url in enumerate(urls)
        if apprise.Apprise.instantiate(url, suppress_exceptions=True) is None
    ]
    if bad:
        raise ValueError(
            "not a valid Apprise URL (https://github.com/caronc/apprise/wiki): " + "; ".join(bad)
        )
    return urls


class ChannelSettings(BaseModel):
    """One named channel, `[alerts.channels.NAME]`: its Apprise URLs."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    urls: list[str] = Field(min_length=1)

    @field_validator("urls", mode="after")
    @classmethod
    def _valid_urls(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return _check_apprise_urls(value, info)


class AlertSettings(BaseModel):
    """`[alerts]` (SPEC §10): the unnamed channel's URLs, what is sent, reminders, digest."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    urls: list[str] = []
    on: list[str] = list(EVENT_KIND_NAMES)
    repeat_hours: Annotated[float, Field(ge=0, le=_MAX_DAYS * 24, allow_inf_nan=False)] = 24.0
    digest_hour_utc: Annotated[int, Field(ge=0, le=23)] | None = None
    channels: dict[str, ChannelSettings] = {}

    @field_validator("urls", mode="after")
    @classmethod
    def _valid_urls(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return _check_apprise_urls(value, info)

    @field_validator("on", mode="after")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        unknown = [kind for kind in value if kind.upper() not in EVENT_KIND_NAMES]
        if unknown:
            raise ValueError(f"unknown event {unknown}; expected among {list(EVENT_KIND_NAMES)}")
        return [kind.upper() for kind in value]

    @field_validator("channels", mode="after")
    @classmethod
    def _channel_names(cls, value: dict[str, ChannelSettings]) -> dict[str, ChannelSettings]:
        for name in value:
            if name == DEFAULT_CHANNEL:
                raise ValueError(
                    f"{name!r} is the unnamed channel of [alerts]: choose another name"
                )
            if not _CHANNEL_NAME.fullmatch(name):
                raise ValueError(f"channel name {name!r}: letters, digits, '.', '_', '-' only")
        return value

    def channel_urls(self) -> dict[str, list[str]]:
        """Every channel that has URLs, the unnamed one as `default`."""
        found = {name: list(channel.urls) for name, channel in self.channels.items()}
        if self.urls:
            found[DEFAULT_CHANNEL] = list(self.urls)
        return found

    @property
    def channel_names(self) -> frozenset[str]:
        return frozenset({DEFAULT_CHANNEL, *self.channels})

    def routing(self) -> Routing:
        return routing(self.channel_urls(), self.on, self.repeat_hours, self.digest_hour_utc)


class RetentionSettings(BaseModel):
    """`[retention]` (SPEC §14): how long history and moved reports are kept, and the GFS
    defaults of jobs that do not set their own `keep_daily`/`keep_weekly`/`keep_monthly`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    history_days: Annotated[float, Field(gt=0, le=_MAX_DAYS, allow_inf_nan=False)] = 400.0
    archive_days: Annotated[float, Field(gt=0, le=_MAX_DAYS, allow_inf_nan=False)] = 30.0
    stale_upload_hours: Annotated[float, Field(gt=0, le=_MAX_DAYS * 24, allow_inf_nan=False)] = 24.0
    keep_daily: Annotated[int, Field(ge=0, le=100_000)] | None = None
    keep_weekly: Annotated[int, Field(ge=0, le=100_000)] | None = None
    keep_monthly: Annotated[int, Field(ge=0, le=100_000)] | None = None

    @field_validator("history_days", "archive_days", "stale_upload_hours", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        """Strict mode refuses an integer for a float; `history_days = 400` is meant."""
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value


class Settings(BaseModel):
    """The validated `backupwatch.toml`; every path is absolute once loaded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config_path: Path
    backup_storage_root: Path = Path("/srv/backupwatch/deposit")
    validated_backups_base_path: Path = Path("/srv/backupwatch/validated")
    scanner_report_collection_window_minutes: PositiveMinutes = 60
    max_status_file_age_days: PositiveDays = 1.0
    database_url: str = "sqlite:////var/lib/backupwatch/backupwatch.db"
    jobs_path: Path = Path("/etc/backupwatch/jobs.d")
    control_socket: Path = DEFAULT_CONTROL_SOCKET
    rescan_interval_minutes: PositiveFloatMinutes = 10.0
    report_max_bytes: Annotated[int, Field(gt=0)] = 1048576
    # SPEC §3, §5: how long a file must stay unchanged (or a site folder quiet) before a verdict
    # that would otherwise wait for a writer we cannot observe.
    report_settle_seconds: PositiveSeconds = 120.0
    alerts: AlertSettings = AlertSettings()
    # SPEC §12: the read-only HTTP listener (`/metrics`, the status page); "" turns it off.
    http_listen: str = "127.0.0.1:9787"
    metrics_per_job: bool = True
    # SPEC §1, §15: whose jobs these are in a database several daemons share. A failover pair
    # shares one (and the jobs); hosts with their own sites each have their own.
    instance: str = Field(default_factory=lambda: host_name())
    # SPEC §13: decompress .gz/.zst/.xz/.bz2 staged files while hashing them (a job may say
    # otherwise), and warn about a success much smaller than the job's recent ones.
    archive_test: bool = True
    size_drop_ratio: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.5
    retention: RetentionSettings = RetentionSettings()

    @field_validator("config_path", mode="after")
    @classmethod
    def _absolute_config_path(cls, value: Path) -> Path:
        """Relative paths are anchored on the config's folder, so that folder must be absolute."""
        return Path(os.path.abspath(value))

    @field_validator(
        "backup_storage_root",
        "validated_backups_base_path",
        "jobs_path",
        "control_socket",
        mode="before",
    )
    @classmethod
    def _reject_empty_path(cls, value: object) -> object:
        """`Path("")` silently means "here"; an empty setting is a mistake, not a wish."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator(
        "backup_storage_root",
        "validated_backups_base_path",
        "jobs_path",
        "control_socket",
        mode="after",
    )
    @classmethod
    def _resolve_path(cls, value: Path, info: ValidationInfo) -> Path:
        """SPEC §1: relative paths are resolved against the config file's folder."""
        return _anchor(value, info)

    @field_validator("control_socket", mode="after")
    @classmethod
    def _check_socket_length(cls, value: Path) -> Path:
        """Linux cannot bind a Unix socket whose path is longer than `sun_path` allows, and the
        daemon binds it first under a slightly longer private name (control.ControlServer)."""
        if len(os.fsencode(value)) > CONTROL_SOCKET_MAX:
            raise ValueError(
                f"path too long for a Unix socket ({CONTROL_SOCKET_MAX} bytes at most)"
            )
        return value

    @field_validator("database_url", mode="after")
    @classmethod
    def _check_database_url(cls, value: str, info: ValidationInfo) -> str:
        """Reject a URL SQLAlchemy cannot use now, rather than when the daemon opens it."""
        url = _parse_url(value)
        relative = _relative_sqlite_file(url)
        if relative is None:
            return value
        url = url.set(database=str(_anchor(relative, info)))
        return url.render_as_string(hide_password=False)

    @field_validator("http_listen", mode="after")
    @classmethod
    def _check_http_listen(cls, value: str) -> str:
        """`host:port` (an IPv6 host in brackets) or "" for off: checked now, not at bind."""
        if value.strip():
            parse_listen(value)
        return value.strip()

    @field_validator("instance", mode="after")
    @classmethod
    def _check_instance(cls, value: str) -> str:
        """A name shown in every view and stored with each job: short, printable, one word."""
        if not INSTANCE_NAME.fullmatch(value):
            raise ValueError(
                f"{_show(value)} is not an instance name: 1 to {INSTANCE_MAX} letters, digits, "
                "'.', '_' or '-', starting with a letter or digit (a host name fits)"
            )
        return value


def parse_listen(value: str) -> tuple[str, int]:
    """`127.0.0.1:9787`, `[::1]:9787`, `localhost:9787` -> (host, port); ValueError otherwise.
    Port 0 asks the kernel for a free port (the tests' choice; `status` shows the one taken)."""
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:9787), got {value!r}")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"an IPv6 host goes in brackets, e.g. [::1]:9787; got {value!r}")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 host goes in brackets, e.g. [::1]:9787; got {value!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"the port must be a number from 1 to 65535, got {port_text!r}")
    if not re.fullmatch(r"[A-Za-z0-9.:_-]+", host):
        raise ValueError(f"not a host name or address: {host!r}")
    return host, int(port_text)


INSTANCE_MAX = 255
INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")


def host_name() -> str:
    """SPEC §1: `instance` defaults to the host name, as `hostname` prints it."""
    import socket

    name = socket.gethostname()
    return name if INSTANCE_NAME.fullmatch(name) else "localhost"


def _anchor(value: Path, info: ValidationInfo) -> Path:
    """Join a relative path onto the config folder, lexically (symlinks stay as written)."""
    if not value.is_absolute():
        config_path = info.data.get("config_path")
        if not isinstance(config_path, Path):
            return value  # config_path itself failed; its error is already reported
        value = config_path.parent / value
    return Path(os.path.normpath(value))


def _parse_url(value: str) -> URL:
    if not value.strip():
        raise ValueError("must not be empty")
    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError(f"not a SQLAlchemy database URL: {value!r}") from None
    try:
        url.get_dialect()
    except NoSuchModuleError:
        raise ValueError(f"unknown database backend {url.drivername!r}") from None
    return url


def _relative_sqlite_file(url: URL) -> Path | None:
    """`sqlite://` and `:memory:` are in memory; `file:` URIs are the driver's business."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database:
        return None
    if database == ":memory:" or database.startswith("file:"):
        return None
    return None if Path(database).is_absolute() else Path(database)


# Keys an operator may set: everything but `config_path`, which is where they set them.
CONFIG_KEYS: tuple[str, ...] = tuple(
    name for name in Settings.model_fields if name != "config_path"
)


def env_var_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def load_settings(path: Path, environ: Mapping[str, str]) -> Settings:
    """Read the file, apply environment overrides, and report every problem in one ConfigError."""
    path = Path(os.path.abspath(path))
    attempt = _attempt(path, _read_toml(path), environ, frozenset())
    if attempt.errors or attempt.settings is None:
        raise ConfigError(attempt.errors)
    return attempt.settings


@dataclass(frozen=True)
class Lenient:
    """Settings for a tool that must go on despite errors: each bad key at its default."""

    settings: Settings
    errors: list[str]  # what `load_settings` would have raised (empty: the file is valid)
    defaulted: frozenset[str]  # the keys whose value was bad and replaced by the default


def load_settings_lenient(
    path: Path, environ: Mapping[str, str], check_urls: bool = True
) -> Lenient:
    """SPEC §11: a config error that does not stop `backupwatchctl` from reaching the database
    is a warning, not a dead tool. Raises ConfigError only when no settings can be made."""
    path = Path(os.path.abspath(path))
    try:
        document = _read_toml(path)
        unreadable: list[str] = []
    except ConfigError as exc:
        document, unreadable = {}, exc.errors
    first = _attempt(path, document, environ, frozenset(), check_urls)
    if not first.errors and first.settings is not None:
        return Lenient(first.settings, unreadable, frozenset())
    second = _attempt(path, document, environ, first.bad_keys, check_urls)
    if second.settings is None:
        raise ConfigError([*unreadable, *first.errors, *second.errors])
    return Lenient(second.settings, [*unreadable, *first.errors], first.bad_keys)


@dataclass(frozen=True)
class _Attempt:
    settings: Settings | None
    errors: list[str]
    bad_keys: frozenset[str]


def _attempt(
    path: Path,
    document: Mapping[str, Any],
    environ: Mapping[str, str],
    skip: frozenset[str],
    check_urls: bool = True,
) -> _Attempt:
    """One validation of `document` and the environment, leaving out the keys in `skip`."""
    errors: list[str] = []
    bad: set[str] = set()
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for key in CONFIG_KEYS:
        name = env_var_name(key)
        if name in environ and key not in skip:
            values[key] = environ[name]
            origins[key] = f"environment {name}"
    for key, value in document.items():
        if key in origins or key in skip:
            continue  # overridden: only the value in effect is checked (an unknown key never is)
        problem = _file_value_problem(key, value)
        if problem is not None:
            errors.append(f"{path}: {key}: {problem}")
            bad.add(key)
            continue
        values[key] = value
        origins[key] = f"{path}: {key}"
    settings = None
    try:
        settings = Settings.model_validate(
            {"config_path": path, **values}, context={"check_urls": check_urls}
        )
    except ValidationError as exc:
        errors.extend(_describe(exc, origins, path))
        bad.update(str(e["loc"][0]) for e in exc.errors() if e["loc"])
    return _Attempt(settings, errors, frozenset(bad))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc}"]) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from exc


def _file_value_problem(key: str, value: object) -> str | None:
    """TOML has types: `"60"` for a number is a typo to report, not a string to coerce.

    Pydantic's lax mode is kept for the environment, where every value is a string.
    """
    if key not in CONFIG_KEYS:
        return "unknown key"
    annotation = Settings.model_fields[key].annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        ok = isinstance(value, dict)
        expected = "a table"
    elif annotation is bool:
        ok = isinstance(value, bool)
        expected = "a boolean"
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    elif annotation is bool:
        ok = isinstance(value, bool)
        expected = "a boolean"
    elif annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        expected = "a number"
    else:
        ok = isinstance(value, str)
        expected = "a string"
    if ok:
        return None
    return f"expected {expected}, got {_toml_type(value)} ({_show(value)})"


def _toml_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names |= {list: "an array", dict: "a table"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a date/time"


def _show(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _loc_part(part: int | str) -> str:
    return f"[{part}]" if isinstance(part, int) else f".{part}"


def _describe(exc: ValidationError, origins: Mapping[str, str], path: Path) -> Iterator[str]:
    for error in exc.errors(include_url=False):
        key = str(error["loc"][0]) if error["loc"] else "?"
        where = origins.get(key, f"{path}: {key}")
        if len(error["loc"]) > 1:  # inside a table: `alerts.channels.ops.urls`
            where += "".join(_loc_part(part) for part in error["loc"][1:])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] != "value_error":
            message += f" (got {_show(error['input'])})"
        yield f"{where}: {message}"
