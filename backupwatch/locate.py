"""Where the config file and the control socket are, read without validating anything.

`backupwatchctl status` must answer in well under a second (SPEC §11), and importing pydantic
and SQLAlchemy alone takes most of a second here. When the daemon is up, all the control tool
needs is the socket's path: this module finds it with the standard library only, by the same
rules as `config.py` (the `--config` option, `$BACKUPWATCH_CONFIG`, the packaged default; the
`BACKUPWATCH_CONTROL_SOCKET` override; a relative path anchored on the config file's folder).
It never raises: a file it cannot read yields the default, and the full validation (which the
daemon runs on its own file, see `daemon._handle_status`) says what is wrong.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

DEFAULT_CONFIG_PATH = Path("/etc/backupwatch/backupwatch.toml")
DEFAULT_CONTROL_SOCKET = Path("/run/backupwatch/control.sock")
ENV_PREFIX = "BACKUPWATCH_"
CONFIG_ENV_VAR = "BACKUPWATCH_CONFIG"


class ConfigError(Exception):
    """Every problem of a configuration, reported together so one edit can fix them all.

    Defined here, not in `config.py`, so that the control tool can catch it without importing
    pydantic; `config.ConfigError` is this class.
    """

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def default_config_path(cli: Path | None, environ: Mapping[str, str]) -> Path:
    """SPEC §1: `--config`, else `$BACKUPWATCH_CONFIG`, else the packaged default."""
    if cli is not None:
        return cli
    from_env = environ.get(CONFIG_ENV_VAR, "")
    return Path(from_env) if from_env else DEFAULT_CONFIG_PATH


def control_socket(config_path: Path, environ: Mapping[str, str]) -> Path:
    """The control socket the file (or the environment) names; the default otherwise."""
    config_path = Path(os.path.abspath(config_path))
    value: object = environ.get(ENV_PREFIX + "CONTROL_SOCKET")
    if value is None:
        try:
            value = tomllib.loads(config_path.read_text("utf-8")).get("control_socket")
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            value = None
    if not isinstance(value, str) or not value.strip():
        return DEFAULT_CONTROL_SOCKET
    return Path(os.path.normpath(config_path.parent / value))


def overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """The `BACKUPWATCH_*` variables of this environment (the config path itself aside)."""
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX) and k != CONFIG_ENV_VAR}
