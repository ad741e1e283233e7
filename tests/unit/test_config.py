"""SPEC §1: backupwatch.toml, its environment overrides, and errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from backupwatch.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    Settings,
    default_config_path,
    load_settings,
)


def write_config(folder: Path, text: str = "") -> Path:
    path = folder / "backupwatch.toml"
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ or {})
    return caught.value.errors


# ----------------------------------------------------------------- default_config_path


def test_config_path_from_cli_wins() -> None:
    environ = {"BACKUPWATCH_CONFIG": "/from/env.toml"}
    assert default_config_path(Path("cli.toml"), environ) == Path("cli.toml")


def test_config_path_from_environment() -> None:
    environ = {"BACKUPWATCH_CONFIG": "/from/env.toml"}
    assert default_config_path(None, environ) == Path("/from/env.toml")


@pytest.mark.parametrize("environ", [{}, {"BACKUPWATCH_CONFIG": ""}])
def test_config_path_default(environ: dict[str, str]) -> None:
    assert default_config_path(None, environ) == DEFAULT_CONFIG_PATH
    assert Path("/etc/backupwatch/backupwatch.toml") == DEFAULT_CONFIG_PATH


# ----------------------------------------------------------------------------- defaults


def test_empty_file_gives_the_documented_defaults(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path), {})
    assert settings == Settings(
        config_path=tmp_path / "backupwatch.toml",
        backup_storage_root=Path("/srv/backupwatch/deposit"),
        validated_backups_base_path=Path("/srv/backupwatch/validated"),
        scanner_report_collection_window_minutes=60,
        max_status_file_age_days=1,
        database_url="sqlite:////var/lib/backupwatch/backupwatch.db",
        jobs_path=Path("/etc/backupwatch/jobs.d"),
        control_socket=Path("/run/backupwatch/control.sock"),
        rescan_interval_minutes=10,
        report_max_bytes=1048576,
        report_settle_seconds=120,
    )
    assert isinstance(settings.max_status_file_age_days, float)
    assert isinstance(settings.rescan_interval_minutes, float)


def test_file_values_are_used(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        backup_storage_root = "/data/deposit"
        validated_backups_base_path = "/data/validated"
        scanner_report_collection_window_minutes = 30
        max_status_file_age_days = 2.5
        database_url = "postgresql+psycopg2://bw:secret@db.example/bw"
        jobs_path = "/etc/bw/jobs.toml"
        control_socket = "/run/bw.sock"
        rescan_interval_minutes = 1
        report_max_bytes = 4096
        """,
    )
    settings = load_settings(path, {})
    assert settings.backup_storage_root == Path("/data/deposit")
    assert settings.validated_backups_base_path == Path("/data/validated")
    assert settings.scanner_report_collection_window_minutes == 30
    assert settings.max_status_file_age_days == 2.5
    assert settings.database_url == "postgresql+psycopg2://bw:secret@db.example/bw"
    assert settings.jobs_path == Path("/etc/bw/jobs.toml")
    assert settings.control_socket == Path("/run/bw.sock")
    assert settings.rescan_interval_minutes == 1.0
    assert settings.report_max_bytes == 4096


def test_settings_are_frozen_and_closed(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path), {})
    with pytest.raises(ValidationError):
        settings.report_max_bytes = 1  # type: ignore[misc]  # frozen: what this test checks
    with pytest.raises(ValidationError):
        Settings(config_path=tmp_path / "x.toml", colour="blue")  # type: ignore[call-arg]  # closed


# ---------------------------------------------------------------- relative paths


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = write_config(
        folder,
        """
        backup_storage_root = "deposit"
        validated_backups_base_path = "../validated"
        jobs_path = "./jobs.d"
        control_socket = "run/control.sock"
        """,
    )
    settings = load_settings(path, {})
    assert settings.backup_storage_root == folder / "deposit"
    assert settings.validated_backups_base_path == tmp_path / "validated"
    assert settings.jobs_path == folder / "jobs.d"
    assert settings.control_socket == folder / "run" / "control.sock"


def test_relative_config_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, 'jobs_path = "jobs.d"')
    monkeypatch.chdir(tmp_path)
    settings = load_settings(Path("backupwatch.toml"), {})
    assert settings.config_path == tmp_path / "backupwatch.toml"
    assert settings.jobs_path == tmp_path / "jobs.d"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///var/x.db", "sqlite:///{dir}/var/x.db"),
        ("sqlite:///x.db?timeout=5", "sqlite:///{dir}/x.db?timeout=5"),
        ("sqlite+pysqlite:///../x.db", "sqlite+pysqlite:///{parent}/x.db"),
        ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
        ("sqlite://", "sqlite://"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("postgresql+psycopg2://u:p@host:5432/db", "postgresql+psycopg2://u:p@host:5432/db"),
        ("postgresql+psycopg2://u@/db?host=/run/pg", "postgresql+psycopg2://u@/db?host=/run/pg"),
    ],
)
def test_database_url_relative_sqlite_paths(tmp_path: Path, url: str, expected: str) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    settings = load_settings(write_config(folder, f'database_url = "{url}"'), {})
    assert settings.database_url == expected.format(dir=folder, parent=tmp_path)


def test_settings_built_directly_resolve_too(tmp_path: Path) -> None:
    settings = Settings(config_path=tmp_path / "c.toml", jobs_path=Path("jobs"))
    assert settings.jobs_path == tmp_path / "jobs"


# --------------------------------------------------------------------- environment


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "report_max_bytes = 10\nrescan_interval_minutes = 3")
    environ = {
        "BACKUPWATCH_REPORT_MAX_BYTES": "2048",
        "BACKUPWATCH_RESCAN_INTERVAL_MINUTES": "0.5",
        "BACKUPWATCH_MAX_STATUS_FILE_AGE_DAYS": "3",
        "BACKUPWATCH_SCANNER_REPORT_COLLECTION_WINDOW_MINUTES": "15",
        "BACKUPWATCH_DATABASE_URL": "sqlite:///state.db",
        "BACKUPWATCH_JOBS_PATH": "jobs.toml",
        "BACKUPWATCH_BACKUP_STORAGE_ROOT": "/elsewhere",
    }
    settings = load_settings(path, environ)
    assert settings.report_max_bytes == 2048
    assert settings.rescan_interval_minutes == 0.5
    assert settings.max_status_file_age_days == 3.0
    assert settings.scanner_report_collection_window_minutes == 15
    assert settings.database_url == f"sqlite:///{tmp_path}/state.db"
    assert settings.jobs_path == tmp_path / "jobs.toml"
    assert settings.backup_storage_root == Path("/elsewhere")


def test_unrelated_environment_variables_are_ignored(tmp_path: Path) -> None:
    environ = {
        "BACKUPWATCH_CONFIG": "/somewhere/else.toml",
        "BACKUPWATCH_COLOUR": "blue",
        "BACKUPWATCH_TEST_POSTGRES_URL": "postgresql://x/y",
        "backupwatch_report_max_bytes": "not used: names are upper case",
    }
    assert load_settings(write_config(tmp_path), environ).report_max_bytes == 1048576


def test_wrong_type_from_environment_names_the_variable(tmp_path: Path) -> None:
    environ = {
        "BACKUPWATCH_REPORT_MAX_BYTES": "lots",
        "BACKUPWATCH_RESCAN_INTERVAL_MINUTES": "-1",
    }
    errors = errors_of(write_config(tmp_path), environ)
    assert len(errors) == 2
    assert errors[0].startswith("environment BACKUPWATCH_RESCAN_INTERVAL_MINUTES: ")
    assert "greater than 0" in errors[0]
    assert errors[1].startswith("environment BACKUPWATCH_REPORT_MAX_BYTES: ")
    assert "'lots'" in errors[1]


def test_environment_override_replaces_a_bad_file_value(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'report_max_bytes = "big"')
    settings = load_settings(path, {"BACKUPWATCH_REPORT_MAX_BYTES": "100"})
    assert settings.report_max_bytes == 100


def test_unknown_file_key_is_reported_even_with_an_environment_override(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, "colour = 1")
    errors = errors_of(path, {"BACKUPWATCH_COLOUR": "2"})
    assert errors == [f"{path}: colour: unknown key"]


@pytest.fixture(scope="module")
def empty_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Module-scoped, so that hypothesis may reuse it across examples."""
    return write_config(tmp_path_factory.mktemp("config"))


@given(value=st.integers(min_value=1, max_value=2**62))
def test_any_positive_integer_from_the_environment(empty_config: Path, value: int) -> None:
    settings = load_settings(empty_config, {"BACKUPWATCH_REPORT_MAX_BYTES": str(value)})
    assert settings.report_max_bytes == value


# ------------------------------------------------------------------------- errors


def test_every_error_of_the_file_is_reported_together(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        colour = "blue"
        report_max_bytes = "12"
        scanner_report_collection_window_minutes = 0
        max_status_file_age_days = -1
        rescan_interval_minutes = true
        database_url = "not a url"
        jobs_path = 5
        """,
    )
    errors = errors_of(path)
    assert len(errors) == 7
    assert all(error.startswith(f"{path}: ") for error in errors)
    keys = {error.removeprefix(f"{path}: ").split(":")[0] for error in errors}
    assert keys == {
        "colour",
        "report_max_bytes",
        "scanner_report_collection_window_minutes",
        "max_status_file_age_days",
        "rescan_interval_minutes",
        "database_url",
        "jobs_path",
    }
    assert f"{path}: colour: unknown key" in errors


def test_file_and_environment_errors_come_together(tmp_path: Path) -> None:
    path = write_config(tmp_path, "report_max_bytes = 0")
    errors = errors_of(path, {"BACKUPWATCH_MAX_STATUS_FILE_AGE_DAYS": "soon"})
    assert len(errors) == 2
    assert any(e.startswith(f"{path}: report_max_bytes: ") for e in errors)
    assert any(e.startswith("environment BACKUPWATCH_MAX_STATUS_FILE_AGE_DAYS: ") for e in errors)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("report_max_bytes = 0", "greater than 0"),
        ("report_max_bytes = 1.5", "expected an integer, got a number"),
        ("report_max_bytes = true", "expected an integer, got a boolean"),
        ('report_max_bytes = "100"', "expected an integer, got a string"),
        ("scanner_report_collection_window_minutes = -5", "greater than 0"),
        ("max_status_file_age_days = 0", "greater than 0"),
        ("max_status_file_age_days = nan", "finite number"),
        ("max_status_file_age_days = inf", "finite number"),
        ("max_status_file_age_days = 1e300", "less than or equal to"),
        ("rescan_interval_minutes = 0.0", "greater than 0"),
        ("rescan_interval_minutes = [1]", "expected a number, got an array"),
        ("jobs_path = 1", "expected a string, got an integer"),
        ('jobs_path = ""', "must not be empty"),
        ("backup_storage_root = { a = 1 }", "expected a string, got a table"),
        ("validated_backups_base_path = 2026-01-01", "expected a string, got a date/time"),
        ('database_url = ""', "must not be empty"),
        ('database_url = "var/x.db"', "not a SQLAlchemy database URL"),
        ('database_url = "nosuchdb://host/x"', "unknown database backend 'nosuchdb'"),
        (f'control_socket = "/run/{"s" * 120}.sock"', "too long for a Unix socket"),
    ],
)
def test_impossible_values(tmp_path: Path, line: str, message: str) -> None:
    path = write_config(tmp_path, line)
    key = line.split(" =")[0]
    [error] = errors_of(path)
    assert error.startswith(f"{path}: {key}: ")
    assert message in error


def test_missing_config_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    errors = errors_of(path)
    assert errors == [f"{path}: cannot read config file: No such file or directory"]


def test_invalid_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'report_max_bytes = 1\njobs_path = "unterminated\n')
    [error] = errors_of(path)
    assert error.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in error


def test_config_error_text_is_every_error_on_its_own_line() -> None:
    error = ConfigError(["a: b: c", "environment BACKUPWATCH_X: d"])
    assert error.errors == ["a: b: c", "environment BACKUPWATCH_X: d"]
    assert str(error) == "a: b: c\nenvironment BACKUPWATCH_X: d"
