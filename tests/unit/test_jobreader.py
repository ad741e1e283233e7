"""The daemon's job reader: its shortcuts give what tomllib and `JobSpec` give, and a reload
reads again exactly the files and tables that changed (test_jobs.py runs every one of its cases
through both readers as well)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from backupwatch import jobfiles
from backupwatch.config import Settings
from backupwatch.jobfiles import JobReader
from backupwatch.jobrecord import JobRecord, Shapes, quick_record
from backupwatch.jobs import JOB_KEYS, JobSpec, _effective_values, read_jobs
from backupwatch.jobtext import parse_table, split_jobs

SITE = 'company_name = "ACME"\ncity = "Lyon"\n'


def settings_for(jobs_path: Path) -> Settings:
    return Settings(config_path=jobs_path.parent / "backupwatch.toml", jobs_path=jobs_path)


def jobs_text(count: int, extra: str = "") -> str:
    tables = [
        f'[[job]]\n{SITE}neighborhood = "N{n // 2}"\ndatabase_name = "db{n % 2}"\n{extra}'
        for n in range(count)
    ]
    return '[defaults]\nfrequency = "HOURLY"\n\n' + "\n".join(tables)


def same_as_reference(settings: Settings, reader: JobReader) -> list[JobRecord]:
    read = reader.read(settings)
    specs, errors = read_jobs(settings)
    assert read.errors == errors
    assert read.records == [JobRecord.of(spec) for spec in specs]
    return read.records


@pytest.fixture
def trusting(monkeypatch: pytest.MonkeyPatch) -> None:
    """No racy window: a file's stat is trusted at once (a test cannot wait for its ctime to
    age); test_a_file_written_just_now_is_read_again keeps the window."""
    monkeypatch.setattr(jobfiles, "RACY_NS", 0)


# ------------------------------------------------------------------ the plain TOML subset

toml_lines = st.one_of(
    st.sampled_from(["", "  ", "# note", "\t# é", "x = 1 # c", "[job.sub]", "a.b = 1", '"q" = 1']),
    st.builds(
        lambda key, value: f"{key} = {value}",
        st.sampled_from(["city", "neighborhood", "days_of_week", "active", "city"]),
        st.one_of(
            st.text(alphabet="ab \"\\\t\x01#,[]'", max_size=6).map(lambda t: f'"{t}"'),
            st.text(alphabet="ab \"'\\", max_size=4).map(lambda t: f"'{t}'"),
            st.sampled_from(["0", "13", "-4", "+5", "01", "1_0", "1.5", "true", "false", "True"]),
            st.sampled_from(['["MO", "FR"]', "[]", "[,]", '["a",]', "['a' , \"b\"]", '["a,b"]']),
            st.sampled_from(['["a"', '"""x"""', "1979-05-27", "{a = 1}", "[1, 2]"]),
        ),
    ),
)


@settings(max_examples=400)
@given(st.lists(toml_lines, max_size=6), st.sampled_from(["\n", "\r\n"]))
def test_a_plain_table_reads_as_tomllib_reads_it(lines: list[str], newline: str) -> None:
    body = newline + newline.join(lines)
    table = parse_table(body)
    if table is None:
        return  # left to tomllib
    assert tomllib.loads("[[job]]" + body) == {"job": [table]}


def test_cutting_inside_a_multiline_string_falls_back() -> None:
    text = b'x = """\n[[job]]\n"""\n[[job]]\ncity = "a"\n'
    cut = split_jobs(text)
    assert parse_table(next(cut.tables).decode()) is None  # the string's end, cut from its start


# ------------------------------------------------------------------ validation without pydantic

values_strategy = st.fixed_dictionaries(
    {
        "company_name": st.sampled_from(["ACME", "", " A", "a/b", "..", "x\x01"]),
        "city": st.sampled_from(["Lyon", "Ly on"]),
        "neighborhood": st.sampled_from(["P", ".", "N-1"]),
        "database_name": st.sampled_from(["sales", "..", 7]),
    },
    optional={
        "frequency": st.sampled_from(["DAILY", "hourly", " WEEKLY", "MONTHLY", "ONCE", "x", 1]),
        "expected_hour_utc": st.sampled_from([0, 13, 23, 24, -1, True, "13"]),
        "expected_minute_utc": st.sampled_from([0, 59, 60, False]),
        "days_of_week": st.sampled_from([["MO"], [" fr", "MO"], [], [0], ["XX"], "MO"]),
        "day_of_month": st.sampled_from([1, 31, 32, 0]),
        "expected_date": st.sampled_from(["2026-01-02", "2026-02-30", "x"]),
        "collection_window_minutes": st.sampled_from([1, 0, 60, 10**9]),
        "agent_id": st.sampled_from(["{company_name}-{city}", "lit", "{x}", " ", "{city:>6}"]),
        "agent_deposit_path_template": st.sampled_from(
            ["{agent_id}", "a/{neighborhood}", "/abs", "{agent_id}/..", "./{city}//x/", "{y}"]
        ),
        "final_storage_path_template": st.sampled_from(
            [
                "{database_name}/{cycle}_{staged_file_name}",
                "{year}/{month}/{day}",
                "{cycle:%Y}",
                "../{city}",
                "{city}{{x}}",
                "{database_name}",
                "{cycle:%d/..}",
            ]
        ),
        "active": st.sampled_from([True, False, 1]),
        "alert_channels": st.sampled_from([["ops"], [], [""], "ops", ["a", 1]]),
        "archive_test": st.sampled_from([True, None, 0]),
        "keep_daily": st.sampled_from([0, 7, 100_001, True]),
    },
)


@settings(max_examples=600)
@given(values_strategy)
def test_quick_validation_vouches_only_for_what_jobspec_accepts(values: dict[str, Any]) -> None:
    quick = quick_record(values, "f: job #1")
    try:
        spec = JobSpec.model_validate({**values, "source": "f: job #1"})
    except ValidationError:
        assert quick is None
        return
    if quick is not None:
        assert quick == JobRecord.of(spec)


@settings(max_examples=400)
@given(
    st.lists(st.tuples(values_strategy, st.sets(st.sampled_from(sorted(JOB_KEYS)))), max_size=4),
    values_strategy,
)
def test_shapes_vouch_only_for_what_jobspec_accepts_of_a_file(
    tables: list[tuple[dict[str, Any], set[str]]], defaults: dict[str, Any]
) -> None:
    """A file's jobs read through one `Shapes` (its options checked once per shape, the
    `[defaults]` merged in): each record is the one `JobSpec` makes of its effective values.
    Each table keeps some of its keys only, the others coming from the defaults."""
    shapes = Shapes(defaults)
    for number, (values, kept) in enumerate(tables, start=1):
        raw = {key: value for key, value in values.items() if key in kept}
        quick = shapes.record(raw, "f", number)
        try:
            spec = JobSpec.model_validate(
                {**_effective_values(defaults, raw), "source": f"f: job #{number}"}
            )
        except ValidationError:
            assert quick is None
            continue
        if quick is not None:
            assert quick == JobRecord.of(spec)


# ------------------------------------------------------------------ reading again


def test_a_reload_reads_only_what_changed(tmp_path: Path, trusting: None) -> None:
    folder = tmp_path / "jobs.d"
    folder.mkdir()
    (folder / "a.toml").write_text(jobs_text(6))
    (folder / "b.toml").write_text(jobs_text(1).replace('"ACME"', '"B\\u0041"'))  # an escape
    settings_ = settings_for(folder)
    reader = JobReader()
    first = same_as_reference(settings_, reader)
    assert reader.read(settings_).files_read == 0  # nothing changed: nothing opened
    text = (folder / "a.toml").read_text()
    (folder / "a.toml").write_text(text.replace('"N1"', '"N9"', 1))
    second = same_as_reference(settings_, reader)
    assert [r.neighborhood for r in second].count("N9") == 1
    assert sum(a is b for a, b in zip(first, second, strict=True)) == len(first) - 1


def test_an_edit_with_the_same_size_and_mtime_is_seen(tmp_path: Path, trusting: None) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(jobs_text(2, "expected_minute_utc = 1\n"))
    reader = JobReader()
    assert {r.expected_minute_utc for r in same_as_reference(settings_for(path), reader)} == {1}
    before = path.stat()
    path.write_text(jobs_text(2, "expected_minute_utc = 2\n"))  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same mtime, same inode
    assert path.stat().st_size == before.st_size
    assert {r.expected_minute_utc for r in same_as_reference(settings_for(path), reader)} == {2}


def test_a_file_written_just_now_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(jobs_text(2))
    reader = JobReader()
    same_as_reference(settings_for(path), reader)
    assert reader.read(settings_for(path)).files_read == 1  # too recent to trust its stat


def test_changed_defaults_reread_every_table_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(jobs_text(4))
    reader = JobReader()
    same_as_reference(settings_for(path), reader)
    path.write_text(jobs_text(4).replace('"HOURLY"', '"HOURLY"\ncollection_window_minutes = 5'))
    records = same_as_reference(settings_for(path), reader)
    assert {r.collection_window_minutes for r in records} == {5}


def test_added_removed_and_broken_files(tmp_path: Path) -> None:
    folder = tmp_path / "jobs.d"
    folder.mkdir()
    (folder / "a.toml").write_text(jobs_text(2))
    reader = JobReader()
    assert len(same_as_reference(settings_for(folder), reader)) == 2
    (folder / "b.toml").write_text(jobs_text(1).replace('"ACME"', '"B"'))
    assert len(same_as_reference(settings_for(folder), reader)) == 3
    (folder / "a.toml").unlink()
    assert len(same_as_reference(settings_for(folder), reader)) == 1
    (folder / "b.toml").write_text(jobs_text(1, "expected_minute_utc = 99\n"))
    assert reader.read(settings_for(folder)).errors  # the reference's message, checked below
    same_as_reference(settings_for(folder), reader)
    (folder / "b.toml").write_text(jobs_text(2).replace("db1", "db0"))  # a duplicate
    same_as_reference(settings_for(folder), reader)


def test_a_job_defined_twice_is_refused_at_every_read(tmp_path: Path, trusting: None) -> None:
    """Files read before are not opened again, and their jobs not compared again when the
    last read found no job twice; a duplicate found last time is found again."""
    folder = tmp_path / "jobs.d"
    folder.mkdir()
    (folder / "a.toml").write_text(jobs_text(2))
    (folder / "b.toml").write_text(jobs_text(1))  # a.toml's first job again
    reader = JobReader()
    for _ in range(2):
        read = reader.read(settings_for(folder))
        assert [error for error in read.errors if "duplicates" in error]
    (folder / "b.toml").write_text(jobs_text(1).replace('"ACME"', '"B"'))
    assert reader.read(settings_for(folder)).errors == []
    again = reader.read(settings_for(folder))
    assert (again.errors, again.files_read, len(again.records)) == ([], 0, 3)


@pytest.mark.parametrize(
    "text",
    [b"", b"[[job]]", b"[defaults]\n", b"\n[[job]]\na = 1\n[[job]]\n", b"x\n[[job]]\n[[job]]"],
)
def test_cutting_gives_every_table_as_splitting_would(text: bytes) -> None:
    cut = split_jobs(text)
    pieces = (b"\n" + text).split(b"\n[[job]]")
    assert (cut.preamble, list(cut.tables)) == (pieces[0][1:], pieces[1:])


@pytest.mark.parametrize(
    "source", ["f: job #1", "/a/b.toml: job #120000", "f: job #0", "f: job #01", "f", ""]
)
def test_a_records_source_is_the_one_its_jobspec_names(source: str) -> None:
    """A record keeps its file and number apart (one path string per file), and says its
    source exactly as the `JobSpec` it stands for: error messages and `config_source` name it."""
    values = {"company_name": "C", "city": "T", "neighborhood": "N", "database_name": "d"}
    values["frequency"] = "HOURLY"
    spec = JobSpec.model_validate({**values, "source": source})
    record = JobRecord.of(spec)
    assert record.source == spec.source
    assert quick_record(values, source) == record
