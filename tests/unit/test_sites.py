"""SPEC §3: which deposit folder a path belongs to, and whether it is a report (pure, no I/O)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path, PurePosixPath

import pytest

from backupwatch.enums import BackupFrequency
from backupwatch.schedule import Schedule
from backupwatch.sites import JobRef, PathKind, Registry, Site, report_folders

ROOT = Path("/srv/deposit")
SCHEDULE = Schedule(BackupFrequency.DAILY, hour=13, window=timedelta(minutes=60))


def job(ident: int, agent_id: str, database_name: str) -> JobRef:
    return JobRef(
        id=ident,
        company_name="ACME",
        city="Lyon",
        neighborhood=agent_id,
        database_name=database_name,
        agent_id=agent_id,
        schedule=SCHEDULE,
        final_storage_path_template="{agent_id}/{database_name}/{staged_file_name}",
    )


SALES = job(1, "ACME_Lyon_Part-Dieu", "sales")
HR = job(2, "ACME_Lyon_Part-Dieu", "hr")
SHARED_A = job(3, "agent-a", "db")
SHARED_B = job(4, "agent-b", "db")
OUTER = job(5, "outer", "db")
INNER = job(6, "inner", "db")

REGISTRY = Registry.build(
    ROOT,
    [
        (PurePosixPath("ACME_Lyon_Part-Dieu"), SALES),
        (PurePosixPath("ACME_Lyon_Part-Dieu/"), HR),  # the same folder, spelt differently
        (PurePosixPath("shared"), SHARED_A),
        (PurePosixPath("./shared"), SHARED_B),
        (PurePosixPath("outer"), OUTER),
        (PurePosixPath("outer/inner"), INNER),
    ],
)
D = ROOT / "ACME_Lyon_Part-Dieu"


def test_build_groups_the_jobs_that_resolve_to_one_folder() -> None:
    assert set(REGISTRY.sites) == {D, ROOT / "shared", ROOT / "outer", ROOT / "outer/inner"}
    assert REGISTRY.sites[D].jobs == (SALES, HR)
    assert REGISTRY.sites[ROOT / "shared"].jobs == (SHARED_A, SHARED_B)
    assert REGISTRY.site_of_folder(Path(f"{D}/log/..")) is REGISTRY.sites[D]
    assert REGISTRY.site_of_folder(ROOT / "nowhere") is None


@pytest.mark.parametrize(
    ("path", "site"),
    [
        (D / "STATUS.json", D),
        (D / "log" / "STATUS.json", D),
        (D / "any-name.json", D),
        (Path(f"{D}/./log/../STATUS.json"), D),  # normalised lexically
        (ROOT / "outer" / "STATUS.json", ROOT / "outer"),
        (ROOT / "outer" / "log" / "STATUS.json", ROOT / "outer"),
        (ROOT / "outer" / "inner" / "STATUS.json", ROOT / "outer/inner"),  # nested sites
        (ROOT / "outer" / "inner" / "log" / "STATUS.json", ROOT / "outer/inner"),
    ],
)
def test_reports_of_a_site(path: Path, site: Path) -> None:
    classified = REGISTRY.classify(path)
    assert classified.kind is PathKind.REPORT
    assert classified.site is REGISTRY.sites[site]


@pytest.mark.parametrize(
    "path",
    [
        D / ".STATUS.json",  # a writer at work
        D / ".STATUS.json.part",
        D / "log" / ".STATUS.json",
        D / "STATUS.json.part",
        D / "STATUS.JSON.tmp",
        D / "database" / "sales.sql.gz",
        D / "_archive" / "STATUS.json",
        D / "_rejected" / "STATUS.json",
        D / "log" / "_archive" / "STATUS.json",
        D / "database" / "STATUS.json",  # staged data inside D, not a report
        D / "database" / "log" / "STATUS.json",
        D / "log" / "old" / "STATUS.json",
        D / ".cache" / "STATUS.json",
        ROOT / "outer" / "inner" / "data" / "dump.json",
        ROOT / "outer" / "other" / "dump.json",
        ROOT / "Unknown" / "_rejected" / "STATUS.json",  # a stray already rejected
        ROOT / "Unknown" / "_archive" / "STATUS.json",
        ROOT / ".hidden" / "STATUS.json",
        ROOT / "Unknown",
        Path("/elsewhere/STATUS.json"),  # outside the root
        Path("/srv/deposit-other/STATUS.json"),  # a sibling sharing the root's prefix
        Path("/srv/deposit/../STATUS.json"),
        Path(f"{D}/../../STATUS.json"),
        ROOT,
    ],
)
def test_ignored_paths(path: Path) -> None:
    assert REGISTRY.classify(path).kind is PathKind.IGNORED
    assert REGISTRY.classify(path).site is None


@pytest.mark.parametrize(
    "path",
    [
        ROOT / "STATUS.json",
        ROOT / "Unknown_Site" / "STATUS.json",
        ROOT / "Unknown_Site" / "log" / "STATUS.json",
        ROOT / "a" / "b" / "c" / "STATUS.json",
        ROOT / "ACME_Lyon" / "STATUS.json",  # a prefix of a site's name is another folder
    ],
)
def test_stray_reports_outside_any_site(path: Path) -> None:
    assert REGISTRY.classify(path).kind is PathKind.STRAY
    assert REGISTRY.classify(path).site is None


def test_an_empty_registry_makes_every_report_a_stray() -> None:
    empty = Registry.build(ROOT, [])
    assert empty.classify(D / "STATUS.json").kind is PathKind.STRAY
    assert empty.classify(D / ".STATUS.json").kind is PathKind.IGNORED


def test_job_for_picks_the_database_and_breaks_ties_by_agent() -> None:
    site = REGISTRY.sites[D]
    assert site.job_for("sales", None) is SALES
    assert site.job_for("hr", "ACME_Lyon_Part-Dieu") is HR
    assert site.job_for("unknown", None) is None
    shared = REGISTRY.sites[ROOT / "shared"]
    assert shared.job_for("db", "agent-b") is SHARED_B
    assert shared.job_for("db", "agent-a") is SHARED_A
    assert shared.job_for("db", None) is SHARED_A
    assert shared.job_for("db", "stranger") is SHARED_A


def test_site_names_and_agents() -> None:
    assert REGISTRY.sites[D].name == "ACME_Lyon_Part-Dieu"
    assert REGISTRY.sites[D].agent_ids == {"ACME_Lyon_Part-Dieu"}
    shared = REGISTRY.sites[ROOT / "shared"]
    assert shared.agent_ids == {"agent-a", "agent-b"}
    assert shared.name == str(ROOT / "shared")


def test_report_folders_are_d_and_d_log() -> None:
    site = Site(D, (SALES,))
    assert report_folders(site) == (D, D / "log")


@pytest.mark.parametrize(
    ("relative", "why"),
    [
        ("ACME_Lyon_Part-Dieu/STATUS.JSON", "lower-case '.json'"),
        ("ACME_Lyon_Part-Dieu/log/status.Json", "lower-case '.json'"),
        ("ACME_Lyon_Part-Dieu/Log/STATUS.json", "only directly in"),
        ("ACME_Lyon_Part-Dieu/reports/STATUS.json", "only directly in"),
        ("ACME_Lyon_Part-Dieu/LOGS/STATUS.JSON", "only directly in"),
    ],
)
def test_reports_an_agent_put_where_they_are_never_read_are_misplaced(
    relative: str, why: str
) -> None:
    """Issue 6 item 10: these were ignored without a word, even on rescan."""
    classified = REGISTRY.classify(ROOT / relative)
    assert classified.kind is PathKind.MISPLACED
    assert classified.why is not None
    assert why in classified.why


@pytest.mark.parametrize(
    "relative",
    [
        "ACME_Lyon_Part-Dieu/database/export.json",  # a database dumped as JSON: staged data
        "ACME_Lyon_Part-Dieu/_archive/STATUS.JSON",
        "ACME_Lyon_Part-Dieu/.STATUS.JSON.part",
        "ACME_Lyon_Part-Dieu/reports/deep/STATUS.json",
        "elsewhere/STATUS.JSON",
    ],
)
def test_staged_data_and_writers_temp_files_are_not_misplaced_reports(relative: str) -> None:
    assert REGISTRY.classify(ROOT / relative).kind is PathKind.IGNORED
