"""SPEC §10's configuration: `[alerts]`, named channels, a job's `alert_channels`."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import job_block, write_config

from backupwatch.config import ConfigError, load_settings, load_settings_lenient, masked
from backupwatch.jobs import load_jobs

JOBS = job_block("ACME", "Lyon", "Part-Dieu", "sales", alert_channels=["acme-team"])


def config(tmp_path: Path, alerts: str, jobs: str = JOBS) -> Path:
    return write_config(tmp_path, f"sqlite:///{tmp_path}/db.sqlite", jobs, extra_toml=alerts)


def test_channels_and_routing_load(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        """
[alerts]
urls = ["mailtos://bot:secret@smtp.example.com?to=oncall@example.com", "json://127.0.0.1:8080/hook"]
on = ["missing", "FAILED"]
repeat_hours = 0
digest_hour_utc = 7

[alerts.channels.acme-team]
urls = ["ntfy://acme-backups"]
""",
    )
    settings = load_settings(path, {})
    assert settings.alerts.on == ["MISSING", "FAILED"]
    assert settings.alerts.repeat_hours == 0
    assert settings.alerts.digest_hour_utc == 7
    assert sorted(settings.alerts.channel_urls()) == ["acme-team", "default"]
    (job,) = load_jobs(settings)
    assert job.alert_channels == ("acme-team",)


def test_an_invalid_url_names_the_file_and_the_key_and_hides_the_password(
    tmp_path: Path,
) -> None:
    path = config(
        tmp_path,
        """
[alerts]
urls = ["json://127.0.0.1/ok", "nosuchservice://user:hunter2@host"]
[alerts.channels.acme-team]
urls = ["bogus"]
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    text = str(caught.value)
    assert f"{path}: alerts.urls: not a valid Apprise URL" in text
    assert "urls[1]" in text
    assert f"{path}: alerts.channels.acme-team.urls: not a valid Apprise URL" in text
    assert "hunter2" not in text


@pytest.mark.parametrize(
    ("alerts", "key"),
    [
        ("[alerts]\nrepeat_hours = '24'\n", "alerts.repeat_hours"),
        ("[alerts]\ndigest_hour_utc = 24\n", "alerts.digest_hour_utc"),
        ("[alerts]\non = ['MISSING', 'LATE']\n", "alerts.on"),
        ("[alerts]\nurl = []\n", "alerts.url"),
        ("[alerts.channels.default]\nurls = ['json://h/x']\n", "alerts.channels"),
        ("[alerts.channels.x]\nurls = []\n", "alerts.channels.x.urls"),
        ("alerts = 3\n", "alerts"),
    ],
)
def test_alert_settings_errors_name_the_key(tmp_path: Path, alerts: str, key: str) -> None:
    path = config(tmp_path, alerts, jobs=job_block("A", "B", "C", "d"))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert f"{path}: {key}" in str(caught.value)


def test_an_unknown_channel_names_the_job_file(tmp_path: Path) -> None:
    path = config(tmp_path, "[alerts]\nurls = ['json://127.0.0.1/x']\n")
    with pytest.raises(ConfigError) as caught:
        load_jobs(load_settings(path, {}))
    text = str(caught.value)
    assert "jobs.d/jobs.toml: job #1 (ACME/Lyon/Part-Dieu/sales): alert_channels" in text
    assert "unknown channel 'acme-team'" in text


def test_a_lenient_load_drops_a_bad_alerts_table_and_keeps_the_rest(tmp_path: Path) -> None:
    path = config(tmp_path, "[alerts]\nurls = ['bogus']\n")
    lenient = load_settings_lenient(path, {})
    assert lenient.defaulted == frozenset({"alerts"})
    assert lenient.settings.alerts.urls == []
    assert lenient.settings.database_url.endswith("db.sqlite")
    assert any("alerts.urls" in error for error in lenient.errors)


def test_masked_hides_only_the_password() -> None:
    assert masked("mailtos://bot:s3cr3t@smtp.example.com?to=a@b") == (
        "mailtos://bot:***@smtp.example.com?to=a@b"
    )
    assert masked("json://127.0.0.1:8080/hook") == "json://127.0.0.1:8080/hook"
