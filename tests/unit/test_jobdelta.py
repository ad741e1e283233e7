"""A reload syncs only what changed since the last sync (jobdelta.resync), and leaves the
database and the registry as a full sync and a fresh registry would."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from random import Random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from support import write_config

from backupwatch import jobfiles
from backupwatch.config import load_settings
from backupwatch.jobdelta import Synced, delta_since, resync, synced
from backupwatch.jobfiles import JobReader
from backupwatch.jobrecord import JobRecord, quick_record
from backupwatch.pipeline import registry_after_sync, registry_of
from backupwatch.sites import Registry
from backupwatch.store import ExpectedBackupJob, Store

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)


def jobs_text(sites: Sequence[int], minutes: dict[int, int] | None = None) -> str:
    minutes = minutes or {}
    tables = [
        f'[[job]]\ncompany_name = "A"\ncity = "C"\nneighborhood = "N{n}"\n'
        f'database_name = "db"\nexpected_minute_utc = {minutes.get(n, 0)}\n'
        for n in sites
    ]
    return '[defaults]\nfrequency = "HOURLY"\n' + "\n".join(tables)


def shape(registry: Registry) -> dict[Path, list[tuple[Any, ...]]]:
    """What the workers see of a registry, comparable across two builds."""
    return {
        folder: sorted(
            (job.id, job.names, job.agent_id, job.schedule, job.final_storage_path_template)
            for job in site.jobs
        )
        for folder, site in registry.sites.items()
    }


def rows(store: Store) -> list[tuple[Any, ...]]:
    j = ExpectedBackupJob
    with store.engine.connect() as connection:
        query = select(j.id, j.neighborhood, j.active, j.expected_minute_utc, j.config_source)
        return sorted(tuple(row) for row in connection.execute(query))


@pytest.fixture(autouse=True)
def trusting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobfiles, "RACY_NS", 0)


def test_a_reload_syncs_only_the_changed_jobs(tmp_path: Path, database_url: str) -> None:
    config = write_config(tmp_path, database_url, jobs_text(range(6)), instance="here")
    settings = load_settings(config, {})
    store = Store(settings.database_url)
    store.instance = "here"
    store.migrate()
    reader = JobReader()
    records = reader.load(settings)
    result = store.sync_jobs(records, 60, NOW)
    last = synced(records, 60, settings.archive_test, result.conflict_keys)
    registry = registry_of(settings, store)
    # one edited (N2), one removed (N5), one added (N9)
    edited = jobs_text([0, 1, 2, 3, 4, 9], minutes={2: 7})
    (tmp_path / "jobs.d" / "jobs.toml").write_text(edited)
    records = reader.load(settings)
    delta = delta_since(last, records, 60, settings.archive_test)
    assert delta is not None
    assert sorted(r.neighborhood for r in delta.changed) == ["N2", "N9"]
    assert delta.gone == [("A", "C", "N5", "db")]
    later = NOW + timedelta(minutes=5)
    partial = resync(store, settings, records, last, registry, later)
    assert (partial.result.added, partial.result.changed, partial.result.deactivated) == (1, 1, 1)
    assert partial.folders is not None
    assert sorted(f.name for f in partial.folders) == ["A_C_N2", "A_C_N5", "A_C_N9"]
    assert shape(partial.registry) == shape(registry_of(settings, store))
    after_partial = rows(store)
    full = store.sync_jobs(records, 60, later)  # a full sync finds nothing left to do
    assert (full.added, full.changed, full.deactivated) == (0, 0, 0)
    assert rows(store) == after_partial
    store.dispose()


def test_a_full_sync_when_the_comparison_would_not_hold(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'db'}", jobs_text(range(2)))
    settings = load_settings(config, {})
    records = JobReader().load(settings)
    last = Synced(records, 60, False)
    assert delta_since(last, records, 60, False) is not None
    assert delta_since(last, records, 30, False) is None  # the default window changed
    assert delta_since(last, records, 60, True) is None  # the default archive test changed
    assert delta_since(None, records, 60, False) is None  # the daemon started from JobSpecs
    conflicted = Synced(records, 60, False, frozenset({records[1].key}))
    delta = delta_since(conflicted, records, 60, False)
    assert delta is not None
    assert delta.changed == [records[1]]  # another instance's: asked about again


def test_a_full_syncs_registry_is_made_of_the_records_as_the_table_would_give_it(
    tmp_path: Path, database_url: str
) -> None:
    """`registry_after_sync` takes the jobs the sync left alone from their records (with the
    id and previous schedules it read) and reads only the rest: the same registry, in the same
    order, as `registry_of` reading the whole table."""
    own = (
        '[[job]]\ncompany_name = "A"\ncity = "C"\nneighborhood = "N1"\ndatabase_name = "w"\n'
        'frequency = "WEEKLY"\nexpected_hour_utc = 3\ndays_of_week = ["FR", "MO"]\n'
        "collection_window_minutes = 90\narchive_test = false\n"
        '\n[[job]]\ncompany_name = "A"\ncity = "C"\nneighborhood = "N1"\ndatabase_name = "off"\n'
        "active = false\n"
    )
    config = write_config(tmp_path, database_url, jobs_text(range(4)) + own, instance="here")
    settings = load_settings(config, {})
    store = Store(settings.database_url)
    store.instance = "here"
    store.migrate()
    reader = JobReader()
    jobs = tmp_path / "jobs.d" / "jobs.toml"
    store.sync_jobs(reader.load(settings), 60, NOW)
    # N2's schedule changes while cycles of the old one are owed (no timer ran): its row
    # holds the previous schedule
    jobs.write_text(jobs_text(range(4), minutes={2: 7}) + own)
    store.sync_jobs(reader.load(settings), 60, NOW + timedelta(hours=3))
    # then N3 changes, N0 goes, N8 comes: the full sync writes those and leaves N1, N2 alone
    jobs.write_text(jobs_text([1, 2, 3, 8], minutes={2: 7, 3: 9}) + own)
    records = reader.load(settings)
    result = store.sync_jobs(records, 60, NOW + timedelta(hours=3, minutes=10))
    assert (result.added, result.changed, result.deactivated) == (1, 1, 1)
    assert sorted(spec.key[2:] for spec in result.unchanged.specs) == [
        ("N1", "db"),
        ("N1", "w"),
        ("N2", "db"),
    ]
    assert len(result.unchanged.previous) == 1  # N2's previous schedule
    made = registry_after_sync(settings, store, records, result.unchanged)
    assert made == registry_of(settings, store)
    assert {job.names[2:] for site in made.sites.values() for job in site.jobs} == {
        ("N1", "db"),
        ("N1", "w"),
        ("N2", "db"),
        ("N3", "db"),
        ("N8", "db"),
    }
    store.dispose()


def naive_delta(last: Synced, records: Sequence[JobRecord]) -> tuple[list[Any], list[Any]]:
    """`delta_since` as it was written first: two sets of every record."""
    before = {id(record) for record in last.records}
    changed = [r for r in records if id(r) not in before or r.key in last.conflicts]
    now = {record.key for record in records}
    return changed, [record.key for record in last.records if record.key not in now]


def a_record(n: int, minute: int = 0) -> JobRecord:
    values = {
        "company_name": "A",
        "city": "C",
        "neighborhood": f"N{n}",
        "database_name": "db",
        "frequency": "HOURLY",
        "expected_minute_utc": minute,
    }
    record = quick_record(values, f"f: job #{n}")
    assert record is not None
    return record


@settings(max_examples=300)
@given(
    st.lists(st.integers(0, 30), unique=True, max_size=25),
    st.lists(st.tuples(st.sampled_from(["keep", "edit", "drop"]), st.integers(0, 30))),
    st.lists(st.integers(31, 40), unique=True, max_size=3),
    st.randoms(use_true_random=False),
    st.sets(st.integers(0, 40), max_size=3),
)
def test_the_delta_compares_only_what_lies_between_the_common_head_and_tail(
    first: list[int],
    edits: list[tuple[str, int]],
    added: list[int],
    rng: Random,
    conflicted: set[int],
) -> None:
    """`delta_since` skips the records both lists share at their head and tail: it finds what
    comparing every record finds, whatever the reload moved, edited, added or removed."""
    old = [a_record(n) for n in first]
    new = list(old)
    for action, n in edits:
        at = next((i for i, r in enumerate(new) if r.neighborhood == f"N{n}"), None)
        if at is None:
            continue
        if action == "edit":
            new[at] = a_record(n, minute=7)
        elif action == "drop":
            del new[at]
    for n in added:
        new.insert(rng.randint(0, len(new)), a_record(n))
    if rng.random() < 0.3:
        rng.shuffle(new)
    last = Synced(old, 60, False, frozenset(("A", "C", f"N{n}", "db") for n in conflicted))
    delta = delta_since(last, new, 60, False)
    assert delta is not None
    assert (delta.changed, delta.gone) == naive_delta(last, new)
