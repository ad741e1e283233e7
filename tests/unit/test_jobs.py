"""SPEC §2: job files, their defaults, templates, and errors gathered across every file."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from pyfakefs.fake_filesystem import FakeFilesystem

from backupwatch.config import ConfigError, Settings
from backupwatch.enums import BackupFrequency
from backupwatch.jobfiles import JobReader
from backupwatch.jobrecord import JobRecord
from backupwatch.jobs import (
    JobSpec,
    final_relpath,
    read_jobs,
    render_template,
    unread_job_files,
)
from backupwatch.jobs import load_jobs as reference_load_jobs
from backupwatch.schedule import Schedule

SITE = 'company_name = "ACME"\ncity = "Lyon"\nneighborhood = "Part-Dieu"\n'
SALES = SITE + 'database_name = "sales"\n'
FIELDS = {
    "company_name": "ACME",
    "city": "Lyon",
    "neighborhood": "Part-Dieu",
    "database_name": "sales",
    "agent_id": "ACME_Lyon_Part-Dieu",
}
CYCLE = datetime(2026, 3, 4, 5, 6, tzinfo=UTC)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")  # TOML allows indentation
    return path


def load_jobs(settings: Settings) -> list[JobSpec]:
    """`jobs.load_jobs`, held to agreeing with the daemon's `JobReader`: every case of this
    file checks both, the reader's shortcuts and its fallback to `JobSpec` alike."""
    read = JobReader().read(settings)
    specs, errors = read_jobs(settings)
    assert read.errors == errors
    assert read.records == [JobRecord.of(spec) for spec in specs]
    return reference_load_jobs(settings)


def settings_for(jobs_path: Path) -> Settings:
    return Settings(config_path=jobs_path.parent / "backupwatch.toml", jobs_path=jobs_path)


def jobs_in(folder: Path) -> list[JobSpec]:
    return load_jobs(settings_for(folder))


def errors_in(folder: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_jobs(settings_for(folder))
    return caught.value.errors


def job_file(tmp_path: Path, body: str, *, name: str = "jobs.toml") -> Path:
    """A one-file jobs_path holding `body` (TOML)."""
    return write(tmp_path, name, body)


def one_job(tmp_path: Path, extra: str) -> JobSpec:
    [spec] = load_jobs(settings_for(job_file(tmp_path, f"[[job]]\n{SALES}{extra}")))
    return spec


def one_error(tmp_path: Path, extra: str, body: str = SALES) -> str:
    path = job_file(tmp_path, f"[[job]]\n{body}{extra}")
    [error] = errors_in(path)
    return error


def make_spec(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "company_name": "ACME",
        "city": "Lyon",
        "neighborhood": "Part-Dieu",
        "database_name": "sales",
        "expected_hour_utc": 13,
    }
    return JobSpec.model_validate(values | overrides)


# --------------------------------------------------------------------------- defaults


def test_minimal_job_gets_every_default(tmp_path: Path) -> None:
    path = job_file(tmp_path, f"[[job]]\n{SALES}expected_hour_utc = 13\n")
    [spec] = load_jobs(settings_for(path))
    assert spec.frequency is BackupFrequency.DAILY
    assert (spec.expected_hour_utc, spec.expected_minute_utc) == (13, 0)
    assert spec.days_of_week is None
    assert spec.day_of_month is None
    assert spec.expected_date is None
    assert spec.collection_window_minutes is None
    assert spec.agent_id == "ACME_Lyon_Part-Dieu"
    assert spec.agent_deposit_path_template == "{agent_id}"
    assert spec.final_storage_path_template == (
        "{company_name}/{city}/{neighborhood}/{database_name}/"
        "{cycle:%Y%m%dT%H%MZ}_{staged_file_name}"
    )
    assert spec.active is True
    assert spec.source == f"{path}: job #1"
    assert spec.key == ("ACME", "Lyon", "Part-Dieu", "sales")
    assert spec.fields == FIELDS
    assert spec.deposit_relpath == PurePosixPath("ACME_Lyon_Part-Dieu")


def test_agent_id_may_be_literal_or_a_template(tmp_path: Path) -> None:
    assert one_job(tmp_path, 'expected_hour_utc = 1\nagent_id = "lyon-01"').agent_id == "lyon-01"
    spec = one_job(tmp_path, 'expected_hour_utc = 1\nagent_id = "{city}-{database_name}"')
    assert spec.agent_id == "Lyon-sales"
    assert spec.deposit_relpath == PurePosixPath("Lyon-sales")


def test_deposit_template_renders_relative_path(tmp_path: Path) -> None:
    spec = one_job(
        tmp_path,
        'expected_hour_utc = 1\nagent_deposit_path_template = "{company_name}//{city}/./in"',
    )
    assert spec.deposit_relpath == PurePosixPath("ACME/Lyon/in")


def test_spec_is_frozen_and_source_is_not_part_of_equality() -> None:
    first = make_spec(source="a.toml: job #1")
    moved = make_spec(source="b.toml: job #7")
    assert first == moved
    assert hash(first) == hash(moved)
    assert first != make_spec(expected_hour_utc=14)
    assert "source" not in first.model_dump()
    with pytest.raises(ValidationError):
        first.city = "Paris"  # type: ignore[misc]  # frozen: what this test checks


def test_spec_round_trips_through_its_python_dump() -> None:
    spec = make_spec(frequency="weekly", days_of_week=["fr", "MO"])
    assert spec.days_of_week == (0, 4)
    assert JobSpec.model_validate(spec.model_dump()) == spec


# ------------------------------------------------------------------ frequency rules


@pytest.mark.parametrize("text", ["DAILY", "daily", "Daily", " hourly "])
def test_frequency_is_case_insensitive(text: str) -> None:
    spec = make_spec(frequency=text, expected_hour_utc=None if "hourly" in text else 1)
    assert spec.frequency is BackupFrequency(text.strip().upper())


@pytest.mark.parametrize(
    ("extra", "schedule"),
    [
        (
            "expected_hour_utc = 13\nexpected_minute_utc = 30",
            Schedule(BackupFrequency.DAILY, 13, 30, window=timedelta(minutes=60)),
        ),
        (
            'frequency = "DAILY"\nexpected_hour_utc = 2\ndays_of_week = ["sa", "SU"]',
            Schedule(BackupFrequency.DAILY, 2, 0, frozenset({5, 6}), window=timedelta(hours=1)),
        ),
        (
            'frequency = "WEEKLY"\nexpected_hour_utc = 2\ndays_of_week = ["WE", "mo", "WE"]',
            Schedule(BackupFrequency.WEEKLY, 2, 0, frozenset({0, 2}), window=timedelta(hours=1)),
        ),
        (
            'frequency = "HOURLY"\nexpected_minute_utc = 15\ndays_of_week = ["MO"]',
            Schedule(BackupFrequency.HOURLY, None, 15, frozenset({0}), window=timedelta(hours=1)),
        ),
        (
            'frequency = "MONTHLY"\nexpected_hour_utc = 3\nday_of_month = 31',
            Schedule(BackupFrequency.MONTHLY, 3, 0, day_of_month=31, window=timedelta(hours=1)),
        ),
        (
            'frequency = "ONCE"\nexpected_hour_utc = 4\nexpected_date = 2026-12-01',
            Schedule(
                BackupFrequency.ONCE,
                4,
                0,
                expected_date=date(2026, 12, 1),
                window=timedelta(hours=1),
            ),
        ),
        (
            'frequency = "ONCE"\nexpected_hour_utc = 4\nexpected_date = "2026-12-01"',
            Schedule(
                BackupFrequency.ONCE,
                4,
                0,
                expected_date=date(2026, 12, 1),
                window=timedelta(hours=1),
            ),
        ),
        (
            "expected_hour_utc = 5\ncollection_window_minutes = 15",
            Schedule(BackupFrequency.DAILY, 5, 0, window=timedelta(minutes=15)),
        ),
    ],
)
def test_each_frequency_builds_its_schedule(tmp_path: Path, extra: str, schedule: Schedule) -> None:
    assert one_job(tmp_path, extra).schedule(default_window_minutes=60) == schedule


def test_days_of_week_are_stored_monday_first(tmp_path: Path) -> None:
    spec = one_job(tmp_path, 'expected_hour_utc = 1\ndays_of_week = ["SU", "tu", "Mo"]')
    assert spec.days_of_week == (0, 1, 6)


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        ("", "expected_hour_utc", "required for DAILY jobs"),
        ('frequency = "WEEKLY"\ndays_of_week = ["MO"]', "expected_hour_utc", "required for WEEKLY"),
        ('frequency = "WEEKLY"\nexpected_hour_utc = 1', "days_of_week", "required for WEEKLY"),
        ('frequency = "MONTHLY"\nexpected_hour_utc = 1', "day_of_month", "required for MONTHLY"),
        ('frequency = "ONCE"\nexpected_hour_utc = 1', "expected_date", "required for ONCE"),
        ('frequency = "HOURLY"\nexpected_hour_utc = 1', "expected_hour_utc", "not used by HOURLY"),
        ("expected_hour_utc = 1\nday_of_month = 1", "day_of_month", "not used by DAILY"),
        ("expected_hour_utc = 1\nexpected_date = 2026-01-01", "expected_date", "not used by DAILY"),
        (
            'frequency = "MONTHLY"\nexpected_hour_utc = 1\nday_of_month = 1\ndays_of_week = ["MO"]',
            "days_of_week",
            "not used by MONTHLY jobs (only by DAILY, WEEKLY, HOURLY)",
        ),
        (
            'frequency = "ONCE"\nexpected_hour_utc = 1\nexpected_date = 2026-01-01\n'
            "day_of_month = 3",
            "day_of_month",
            "not used by ONCE jobs (only by MONTHLY)",
        ),
        ('frequency = "YEARLY"\nexpected_hour_utc = 1', "frequency", "unknown frequency 'YEARLY'"),
        ("frequency = 1\nexpected_hour_utc = 1", "frequency", "unknown frequency 1"),
    ],
)
def test_frequency_specific_keys(tmp_path: Path, extra: str, key: str, message: str) -> None:
    error = one_error(tmp_path, extra)
    assert f": job #1 (ACME/Lyon/Part-Dieu/sales): {key}: " in error
    assert message in error


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        ("expected_hour_utc = 24", "expected_hour_utc", "less than or equal to 23"),
        ("expected_hour_utc = -1", "expected_hour_utc", "greater than or equal to 0"),
        ('expected_hour_utc = "13"', "expected_hour_utc", "valid integer"),
        ("expected_hour_utc = true", "expected_hour_utc", "valid integer"),
        ("expected_hour_utc = 13.0", "expected_hour_utc", "valid integer"),
        ("expected_hour_utc = 1\nexpected_minute_utc = 60", "expected_minute_utc", "59"),
        (
            "expected_hour_utc = 1\ncollection_window_minutes = 0",
            "collection_window_minutes",
            "greater than 0",
        ),
        ("expected_hour_utc = 1\nactive = 1", "active", "valid boolean"),
        ('expected_hour_utc = 1\nactive = "yes"', "active", "valid boolean"),
        ("expected_hour_utc = 1\ndays_of_week = []", "days_of_week", "at least one day"),
        ('expected_hour_utc = 1\ndays_of_week = ["MON"]', "days_of_week", "unknown day 'MON'"),
        ("expected_hour_utc = 1\ndays_of_week = [0, 1]", "days_of_week", "unknown day 0, 1"),
        ('expected_hour_utc = 1\ndays_of_week = "MO"', "days_of_week", "expected a list"),
        ("expected_hour_utc = 1\nunknown = 1", "unknown", "unknown key"),
        ('expected_hour_utc = 1\nsource = "x"', "source", "unknown key"),
    ],
)
def test_values_out_of_range_or_of_the_wrong_type(
    tmp_path: Path, extra: str, key: str, message: str
) -> None:
    error = one_error(tmp_path, extra)
    assert f"(ACME/Lyon/Part-Dieu/sales): {key}: " in error
    assert message in error


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "greater than or equal to 1"),
        ("32", "less than or equal to 31"),
    ],
)
def test_day_of_month_range(tmp_path: Path, value: str, message: str) -> None:
    error = one_error(
        tmp_path, f'frequency = "MONTHLY"\nexpected_hour_utc = 1\nday_of_month = {value}'
    )
    assert ": day_of_month: " in error
    assert message in error


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"2026-02-30"', "not a calendar date"),
        ('"01/12/2026"', "expected a date YYYY-MM-DD"),
        ("2026-12-01T10:00:00Z", "expected a date YYYY-MM-DD"),
        ("20261201", "expected a date YYYY-MM-DD"),
    ],
)
def test_expected_date_must_be_a_calendar_date(tmp_path: Path, value: str, message: str) -> None:
    error = one_error(
        tmp_path, f'frequency = "ONCE"\nexpected_hour_utc = 1\nexpected_date = {value}'
    )
    assert ": expected_date: " in error
    assert message in error


def test_missing_identity_keys_are_reported_without_a_label(tmp_path: Path) -> None:
    path = job_file(tmp_path, '[[job]]\ncompany_name = "ACME"\ncity = 3\nexpected_hour_utc = 1\n')
    assert errors_in(path) == [
        f"{path}: job #1: city: Input should be a valid string (got 3)",
        f"{path}: job #1: neighborhood: required key is missing",
        f"{path}: job #1: database_name: required key is missing",
    ]


@pytest.mark.parametrize("name", ["", "A/B", " ACME", "ACME\t", "a\nb"])
def test_identity_names_must_be_usable_in_paths(tmp_path: Path, name: str) -> None:
    body = SITE.replace('"ACME"', f'"{name.encode("unicode_escape").decode()}"')
    error = one_error(tmp_path, 'database_name = "sales"\nexpected_hour_utc = 1', body=body)
    assert ": company_name: " in error


def test_direct_construction_enforces_the_same_rules() -> None:
    with pytest.raises(ValidationError) as caught:
        make_spec(frequency="WEEKLY", final_storage_path_template="/x")
    fields = {error["loc"][0] for error in caught.value.errors()}
    assert fields == {"days_of_week", "final_storage_path_template"}


def test_stored_days_round_trip_but_must_be_weekdays() -> None:
    assert make_spec(days_of_week=(6, 0)).days_of_week == (0, 6)
    with pytest.raises(ValidationError, match="stored day 7"):
        make_spec(days_of_week=(7,))


# --------------------------------------------------------------------- [defaults]


def test_defaults_are_inherited_and_overridden(tmp_path: Path) -> None:
    path = job_file(
        tmp_path,
        f"""
        [defaults]
        frequency = "weekly"
        expected_hour_utc = 13
        days_of_week = ["MO"]
        agent_deposit_path_template = "{{company_name}}/{{city}}"

        [[job]]
        {SALES}
        [[job]]
        {SITE}
        database_name = "hr"
        days_of_week = ["FR"]
        expected_hour_utc = 20
        """,
    )
    sales, hr = load_jobs(settings_for(path))
    assert (sales.frequency, sales.expected_hour_utc, sales.days_of_week) == ("WEEKLY", 13, (0,))
    assert (hr.frequency, hr.expected_hour_utc, hr.days_of_week) == ("WEEKLY", 20, (4,))
    assert sales.deposit_relpath == hr.deposit_relpath == PurePosixPath("ACME/Lyon")


def test_defaults_belong_to_their_own_file(tmp_path: Path) -> None:
    folder = tmp_path / "jobs.d"
    folder.mkdir()
    write(folder, "a.toml", f"[defaults]\nexpected_hour_utc = 13\n[[job]]\n{SALES}")
    write(folder, "b.toml", f'[[job]]\n{SITE}database_name = "hr"\n')
    assert errors_in(folder) == [
        f"{folder / 'b.toml'}: job #1 (ACME/Lyon/Part-Dieu/hr): expected_hour_utc: "
        "required for DAILY jobs"
    ]


def test_defaults_that_a_frequency_does_not_use_are_not_inherited(tmp_path: Path) -> None:
    path = job_file(
        tmp_path,
        f"""[defaults]
expected_hour_utc = 13
day_of_month = 1
days_of_week = ["MO"]
[[job]]
{SALES}frequency = "HOURLY"
[[job]]
{SITE}database_name = "hr"
frequency = "MONTHLY"
""",
    )
    hourly, monthly = load_jobs(settings_for(path))
    assert (hourly.expected_hour_utc, hourly.days_of_week, hourly.day_of_month) == (
        None,
        (0,),
        None,
    )
    assert (monthly.expected_hour_utc, monthly.days_of_week, monthly.day_of_month) == (13, None, 1)


def test_bad_inherited_value_says_it_is_inherited(tmp_path: Path) -> None:
    path = job_file(tmp_path, f"[defaults]\nexpected_hour_utc = 25\n[[job]]\n{SALES}")
    [error] = errors_in(path)
    assert error.endswith("(got 25) (inherited from [defaults])")


def test_identity_keys_may_come_from_defaults(tmp_path: Path) -> None:
    path = job_file(
        tmp_path,
        f"[defaults]\n{SITE}expected_hour_utc = 1\n"
        '[[job]]\ndatabase_name = "sales"\n[[job]]\ndatabase_name = "hr"\n',
    )
    assert [spec.key[3] for spec in load_jobs(settings_for(path))] == ["sales", "hr"]


def test_file_structure_errors(tmp_path: Path) -> None:
    path = job_file(
        tmp_path,
        f"colour = 1\n[defaults]\nbogus = 2\nexpected_hour_utc = 3\n[[job]]\n{SALES}\n"
        "[jobs]\nx = 1\n",
    )
    assert errors_in(path) == [
        f"{path}: colour: unknown key (a job file holds [defaults] and [[job]])",
        f"{path}: jobs: unknown key (a job file holds [defaults] and [[job]])",
        f"{path}: [defaults]: bogus: unknown key",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("defaults = 1", "defaults: expected a table [defaults]"),
        ("job = 1", "job: expected an array of tables [[job]]"),
        ("job = [1, {}]", "job #1: expected a table [[job]]"),
    ],
)
def test_malformed_sections(tmp_path: Path, text: str, message: str) -> None:
    path = job_file(tmp_path, text)
    assert f"{path}: {message}" in errors_in(path)


# ------------------------------------------------------------------- files and folders


def test_folder_is_read_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "jobs.d"
    folder.mkdir()
    for name, database in [("b.toml", "b"), ("10-x.toml", "10"), ("a.toml", "a")]:
        write(folder, name, f'[[job]]\n{SITE}database_name = "{database}"\nexpected_hour_utc = 1\n')
    write(folder, ".#editor.toml", "not toml at all [")
    write(folder, "notes.txt", "not toml at all [")
    write(folder, "a.toml.bak", "not toml at all [")
    (folder / "sub.toml").mkdir()
    assert [spec.database_name for spec in jobs_in(folder)] == ["10", "a", "b"]


def test_empty_folder_and_empty_file_mean_no_jobs(tmp_path: Path) -> None:
    folder = tmp_path / "jobs.d"
    folder.mkdir()
    assert jobs_in(folder) == []
    assert load_jobs(settings_for(write(folder, "empty.toml", ""))) == []


def test_missing_jobs_path_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.d"
    [error] = errors_in(path)
    assert error.startswith(f"{path}: ")
    assert "missing" in error


def test_invalid_toml_names_the_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "jobs.d"
    folder.mkdir()
    write(folder, "a.toml", "[[job]]\ncity = 'x'\ncity = 'y'\n")
    write(folder, "b.toml", f"[[job]]\n{SALES}expected_hour_utc = 99\n")
    errors = errors_in(folder)
    assert len(errors) == 2
    assert errors[0].startswith(f"{folder / 'a.toml'}: invalid TOML: ")
    assert "line 3" in errors[0]
    assert errors[1].startswith(f"{folder / 'b.toml'}: job #1 (ACME/Lyon/Part-Dieu/sales): ")


def test_every_error_of_every_file_is_reported_together(tmp_path: Path) -> None:
    folder = tmp_path / "jobs.d"
    folder.mkdir()
    write(
        folder,
        "a.toml",
        f"""[[job]]
{SALES}expected_hour_utc = 30
expected_minute_utc = -1
colour = "red"
[[job]]
{SITE}database_name = "hr"
frequency = "MONTHLY"
expected_hour_utc = 1
""",
    )
    write(folder, "b.toml", '[[job]]\ncompany_name = "X"\nexpected_hour_utc = 1\n')
    a, b = folder / "a.toml", folder / "b.toml"
    errors = errors_in(folder)
    assert [error.split(": ")[:3] for error in errors] == [
        [str(a), "job #1 (ACME/Lyon/Part-Dieu/sales)", "colour"],
        [str(a), "job #1 (ACME/Lyon/Part-Dieu/sales)", "expected_hour_utc"],
        [str(a), "job #1 (ACME/Lyon/Part-Dieu/sales)", "expected_minute_utc"],
        [str(a), "job #2 (ACME/Lyon/Part-Dieu/hr)", "day_of_month"],
        [str(b), "job #1", "city"],
        [str(b), "job #1", "neighborhood"],
        [str(b), "job #1", "database_name"],
    ]


def test_duplicate_across_two_files_names_both_places(tmp_path: Path) -> None:
    folder = tmp_path / "jobs.d"
    folder.mkdir()
    write(
        folder,
        "a.toml",
        f'[[job]]\n{SITE}database_name = "hr"\nexpected_hour_utc = 1\n'
        f"[[job]]\n{SALES}expected_hour_utc = 1\n",
    )
    write(folder, "b.toml", f"[[job]]\n{SALES}expected_hour_utc = 2\n")
    assert errors_in(folder) == [
        f"{folder / 'b.toml'}: job #1 duplicates {folder / 'a.toml'}: job #2 "
        "(ACME/Lyon/Part-Dieu/sales)"
    ]


def test_duplicate_within_one_file(tmp_path: Path) -> None:
    path = job_file(
        tmp_path, f"[[job]]\n{SALES}expected_hour_utc = 1\n[[job]]\n{SALES}expected_hour_utc = 1\n"
    )
    assert errors_in(path) == [
        f"{path}: job #2 duplicates {path}: job #1 (ACME/Lyon/Part-Dieu/sales)"
    ]


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("../{agent_id}", "contains '..'"),
        ("{agent_id}/../..", "contains '..'"),
        ("/srv/{agent_id}", "is absolute"),
        ("", "is empty"),
        (".", "is empty"),
        ("{agent_id}/{staged_file_name}", "unknown placeholder {staged_file_name}"),
        ("{site}", "unknown placeholder {site}"),
        ("{agent_id.upper}", "unknown placeholder {agent_id.upper}"),
        ("{city!r}", "unsupported placeholder"),
        ("{}", "empty placeholder"),
        ("{city", "malformed template"),
        ("{city:d}", "cannot format {city:d}"),
    ],
)
def test_bad_deposit_templates(tmp_path: Path, template: str, message: str) -> None:
    error = one_error(
        tmp_path, f"expected_hour_utc = 1\nagent_deposit_path_template = '{template}'"
    )
    assert ": agent_deposit_path_template: " in error
    assert message in error


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("../{staged_file_name}", "contains '..'"),
        ("{company_name}/../../x/{staged_file_name}", "contains '..'"),
        ("/abs/{staged_file_name}", "is absolute"),
        ("{cycle:/%Y}/{staged_file_name}", "is absolute"),
        ("{cycle:%Y}/../..", "contains '..'"),
        ("{hour}/{staged_file_name}", "unknown placeholder {hour}"),
        ("{cycle.year}", "unknown placeholder {cycle.year}"),
        ("{cycle:{city}}", "unsupported placeholder"),
    ],
)
def test_bad_final_templates(tmp_path: Path, template: str, message: str) -> None:
    error = one_error(
        tmp_path, f"expected_hour_utc = 1\nfinal_storage_path_template = '{template}'"
    )
    assert ": final_storage_path_template: " in error
    assert message in error


def test_agent_id_placeholders_are_the_identity_fields(tmp_path: Path) -> None:
    error = one_error(tmp_path, "expected_hour_utc = 1\nagent_id = '{agent_id}-x'")
    assert ": agent_id: unknown placeholder {agent_id}" in error


def test_names_that_escape_through_the_templates_are_caught(tmp_path: Path) -> None:
    body = 'company_name = ".."\ncity = ".."\nneighborhood = "n"\ndatabase_name = "d"\n'
    path = job_file(
        tmp_path,
        f"[[job]]\n{body}expected_hour_utc = 1\n"
        "agent_deposit_path_template = '{company_name}/{city}/x'\n",
    )
    errors = errors_in(path)
    assert [error.split(": ")[2] for error in errors] == [
        "agent_deposit_path_template",
        "final_storage_path_template",
    ]


def test_render_template_is_strict() -> None:
    assert render_template("{a}-{b:>3}", {"a": "x", "b": "y"}) == "x-  y"
    assert render_template("plain {{braces}}", {}) == "plain {braces}"
    with pytest.raises(ValueError, match=r"unknown placeholder \{c\}; allowed: \{a\}"):
        render_template("{a}{c}", {"a": "x"})
    with pytest.raises(ValueError, match="unknown placeholder"):
        render_template("{a.__class__}", {"a": "x"})
    with pytest.raises(ValueError, match="unknown placeholder"):
        render_template("{a[0]}", {"a": "x"})


def test_final_relpath_with_every_placeholder() -> None:
    template = (
        "{company_name}/{city}/{neighborhood}/{database_name}/{agent_id}/"
        "{year}/{month}/{day}/{cycle:%Y%m%d}/{cycle}/{cycle:%Y%m%dT%H%MZ}_{staged_file_name}"
    )
    path = final_relpath(template, FIELDS, CYCLE, "database/sales.sql.gz")
    assert path == PurePosixPath(
        "ACME/Lyon/Part-Dieu/sales/ACME_Lyon_Part-Dieu/2026/03/04/20260304/20260304T050600Z/"
        "20260304T0506Z_sales.sql.gz"
    )


def test_final_relpath_default_template() -> None:
    spec = make_spec()
    path = final_relpath(spec.final_storage_path_template, spec.fields, CYCLE, "sales.sql.gz")
    assert path == PurePosixPath("ACME/Lyon/Part-Dieu/sales/20260304T0506Z_sales.sql.gz")


def test_final_relpath_cycle_is_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    local = datetime(2026, 3, 4, 6, 6, tzinfo=paris)
    naive = datetime(2026, 3, 4, 5, 6)
    for cycle in (local, naive):
        assert final_relpath("{cycle}", FIELDS, cycle, "x") == PurePosixPath("20260304T050600Z")


@pytest.mark.parametrize(
    ("template", "staged"),
    [
        ("{staged_file_name}", ".."),
        ("{staged_file_name}", ""),
        ("{staged_file_name}", "/"),
        ("x/../{staged_file_name}", "a"),
        ("/{staged_file_name}", "a"),
    ],
)
def test_final_relpath_refuses_paths_that_leave_the_root(template: str, staged: str) -> None:
    with pytest.raises(ValueError, match=r"absolute|'\.\.'|empty"):
        final_relpath(template, FIELDS, CYCLE, staged)


def test_staged_file_name_is_its_base_name() -> None:
    path = final_relpath("{staged_file_name}", FIELDS, CYCLE, "../../etc/passwd")
    assert path == PurePosixPath("passwd")


@given(st.text(alphabet=st.sampled_from("./abc\\ -_"), max_size=12))
def test_any_staged_name_stays_in_its_folder(staged: str) -> None:
    try:
        path = final_relpath("{company_name}/{cycle}_{staged_file_name}", FIELDS, CYCLE, staged)
    except ValueError:
        return
    assert path.parts[0] == "ACME"
    assert len(path.parts) == 2


_PIECES = [
    "{city}",
    "{cycle}",
    "{cycle:%Y/%m}",
    "{staged_file_name}",
    "/",
    "..",
    ".",
    "a",
    "{",
    "}",
]


@given(
    template=st.lists(st.sampled_from(_PIECES), max_size=8).map("".join),
    staged=st.sampled_from(["x.gz", "..", "", "a/..", "/"]),
)
def test_final_relpath_never_leaves_its_root(template: str, staged: str) -> None:
    try:
        path = final_relpath(template, FIELDS, CYCLE, staged)
    except ValueError:
        return
    assert not path.is_absolute()
    assert ".." not in path.parts
    assert path.parts


def test_files_in_the_jobs_folder_that_are_not_read_are_named(fs: FakeFilesystem) -> None:
    """Issue 6 item 10: `jobs.d/acme.tml` was ignored without a word (pyfakefs: pure listing)."""
    fs.create_file("/etc/bw/jobs.d/acme.toml")
    fs.create_file("/etc/bw/jobs.d/paris.tml")
    fs.create_file("/etc/bw/jobs.d/lyon.toml.dpkg-dist")
    fs.create_file("/etc/bw/jobs.d/.acme.toml.swp")
    fs.create_dir("/etc/bw/jobs.d/archive")
    folder = Path("/etc/bw/jobs.d")
    settings = Settings(config_path=Path("/etc/bw/backupwatch.toml"), jobs_path=folder)

    warnings = unread_job_files(settings)

    rest = f"not read: only *.toml files in {folder} hold jobs"
    assert warnings == [f"{folder}/lyon.toml.dpkg-dist: {rest}", f"{folder}/paris.tml: {rest}"]


@pytest.mark.parametrize(
    "template",
    [
        "{company_name}/{year}{month}{day}/{cycle}{cycle:%H}-{staged_file_name}",
        "{cycle:%Y}}}{{x}}/{database_name:>9}/{day:>4}{staged_file_name}",
        "{year:bad}/{staged_file_name}",
        "{company_name:bad}/{cycle:%Y}/{staged_file_name}",
        "lit/{cycle}",
    ],
)
def test_final_relpath_cycle_rendered_once_agrees_with_the_whole(template: str) -> None:
    """The cycle's placeholders rendered once per (template, cycle) (issue 10) give what the
    whole template rendered at once gives, and fail with the same error."""
    from backupwatch.jobs import _final_rendered, _final_rendered_whole

    try:
        expected = _final_rendered_whole(template, FIELDS, CYCLE, "database/sales.sql.gz")
    except ValueError as exc:
        with pytest.raises(ValueError, match=re.escape(str(exc))):
            _final_rendered(template, FIELDS, CYCLE, "database/sales.sql.gz")
        return
    for _ in range(2):  # the second time from the cache
        assert _final_rendered(template, FIELDS, CYCLE, "database/sales.sql.gz") == expected
