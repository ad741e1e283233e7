"""STATUS.json v1 (SPEC §3): parsing, schema, freshness and the incomplete-write heuristic."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupwatch.report import (
    MAX_LISTED_ERRORS,
    DatabaseReport,
    ProcessStep,
    ReportRejected,
    StatusReport,
    check_freshness,
    parse_report,
)

SHA = "ab" * 32
NOW = datetime(2026, 11, 24, 13, 10, tzinfo=UTC)


def sample() -> dict[str, Any]:
    """The SPEC §3 example with its elisions filled in."""
    return {
        "agent_id": "ACME_Lyon_Part-Dieu",
        "operation_start_time": "2026-11-24T12:50:00Z",
        "operation_timestamp": "2026-11-24T13:10:00Z",
        "overall_status": "completed",
        "databases": {
            "sales": {
                "backup_process": {
                    "status": True,
                    "backup_process_start_time": "2026-11-24T12:50:00Z",
                    "timestamp": "2026-11-24T12:55:00Z",
                    "sha256_checksum": "cd" * 32,
                    "size_bytes": 52000,
                },
                "compress_process": {
                    "status": True,
                    "compress_process_start_time": "2026-11-24T12:55:00Z",
                    "timestamp": "2026-11-24T13:00:00Z",
                    "sha256_checksum": SHA,
                    "size_bytes": 12345,
                },
                "transfer_process": {
                    "status": True,
                    "transfer_process_start_time": "2026-11-24T13:00:00Z",
                    "timestamp": "2026-11-24T13:05:00Z",
                    "error_message": None,
                },
                "staged_file_name": "database/sales.sql.gz",
                "logs_summary": "Sauvegarde réussie \u2014 3 étapes",
            }
        },
    }


def encode(document: Any) -> bytes:
    return json.dumps(document).encode()


def rejection(document: Any) -> str:
    with pytest.raises(ReportRejected) as info:
        parse_report(encode(document))
    return info.value.reason


def with_value(path: str, value: Any) -> dict[str, Any]:
    """The sample with the field at a dotted path set to `value`."""
    document = sample()
    *parents, leaf = path.split(".")
    node = document
    for key in parents:
        node = node[key]
    node[leaf] = value
    return document


def without(path: str) -> dict[str, Any]:
    document = sample()
    *parents, leaf = path.split(".")
    node = document
    for key in parents:
        node = node[key]
    del node[leaf]
    return document


def failed_database(step: str) -> dict[str, Any]:
    """A database whose `step` failed and that says nothing about a staged file."""
    return {
        "backup_process": {"status": step != "backup_process"},
        "compress_process": {"status": step != "compress_process"},
        "transfer_process": {"status": step != "transfer_process", "error_message": "timeout"},
    }


# --- the valid sample ----------------------------------------------------------------------


def test_sample_parses_into_aware_utc_models() -> None:
    report = parse_report(encode(sample()))

    assert report.agent_id == "ACME_Lyon_Part-Dieu"
    assert report.operation_timestamp == NOW
    assert report.operation_start_time == datetime(2026, 11, 24, 12, 50, tzinfo=UTC)
    assert report.overall_status == "completed"
    sales = report.databases["sales"]
    assert sales.all_steps_ok
    assert sales.backup_process.start_time == datetime(2026, 11, 24, 12, 50, tzinfo=UTC)
    assert sales.compress_process.start_time == datetime(2026, 11, 24, 12, 55, tzinfo=UTC)
    assert sales.transfer_process.start_time == datetime(2026, 11, 24, 13, 0, tzinfo=UTC)
    assert sales.compress_process.sha256_checksum == SHA
    assert sales.compress_process.size_bytes == 12345
    assert sales.transfer_process.error_message is None
    assert sales.staged_file_name == "database/sales.sql.gz"
    assert sales.logs_summary == "Sauvegarde réussie \u2014 3 étapes"


def test_dumped_report_parses_back_equal() -> None:
    report = parse_report(encode(sample()))

    again = parse_report(report.model_dump_json().encode())

    assert again == report


def test_models_can_be_built_in_python_with_naive_times_as_utc() -> None:
    step = ProcessStep(status=True, start_time=datetime(2026, 1, 1), size_bytes=1)
    database = DatabaseReport(
        backup_process=step,
        compress_process=ProcessStep(status=False),
        transfer_process=step,
    )
    report = StatusReport(operation_timestamp=datetime(2026, 1, 1), databases={"x": database})

    assert step.start_time == datetime(2026, 1, 1, tzinfo=UTC)
    assert report.operation_timestamp.tzinfo is UTC
    assert not database.all_steps_ok


def test_utf8_bom_is_tolerated() -> None:
    assert parse_report(b"\xef\xbb\xbf" + encode(sample())).agent_id == "ACME_Lyon_Part-Dieu"


def test_unknown_fields_are_ignored_at_every_level() -> None:
    document = sample()
    document["version"] = 1
    document["extra"] = {"deep": [1, 2, {"x": None}]}
    document["databases"]["sales"]["host"] = "db1"
    document["databases"]["sales"]["compress_process"]["algorithm"] = "gzip"

    report = parse_report(encode(document))

    assert report == parse_report(encode(sample()))


def test_optional_fields_may_be_absent_or_null() -> None:
    document = {
        "operation_timestamp": "2026-11-24T13:10:00Z",
        "agent_id": None,
        "overall_status": None,
        "databases": {"sales": failed_database("backup_process")},
    }

    report = parse_report(encode(document))

    assert report.agent_id is None
    assert report.operation_start_time is None
    assert report.databases["sales"].staged_file_name is None


# --- times ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-24T13:10:00", datetime(2026, 11, 24, 13, 10, tzinfo=UTC)),
        ("2026-11-24 13:10:00", datetime(2026, 11, 24, 13, 10, tzinfo=UTC)),
        ("2026-11-24T13:10:00Z", datetime(2026, 11, 24, 13, 10, tzinfo=UTC)),
        ("2026-11-24T15:10:00+02:00", datetime(2026, 11, 24, 13, 10, tzinfo=UTC)),
        ("2026-11-24T08:10:00.250-05:00", datetime(2026, 11, 24, 13, 10, 0, 250000, tzinfo=UTC)),
        ("2026-11-25T01:10:00+12:00", datetime(2026, 11, 24, 13, 10, tzinfo=UTC)),
    ],
)
def test_times_are_stored_as_aware_utc(text: str, expected: datetime) -> None:
    document = with_value("operation_timestamp", text)
    document["databases"]["sales"]["backup_process"]["timestamp"] = text

    report = parse_report(encode(document))

    assert report.operation_timestamp == expected
    assert report.operation_timestamp.utcoffset() == timedelta(0)
    assert report.databases["sales"].backup_process.timestamp == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (1764000000, "must be an ISO 8601 time string, got number 1764000000"),
        ("yesterday", 'must be an ISO 8601 time, got string "yesterday"'),
        ("2026-11-24", "must be a time, not only a date"),
        ("2026-13-01T00:00:00", "must be an ISO 8601 time"),
        ("0001-01-01T00:00:00+05:00", "out of the representable range"),
        ("9999-12-31T23:00:00-05:00", "out of the representable range"),
        ("2026-11-24T13:10:00" + "0" * 100, "too long for an ISO 8601 time"),
        (None, "must be an ISO 8601 time string, got null"),
    ],
)
def test_bad_times_are_schema_errors(value: Any, fragment: str) -> None:
    reason = rejection(with_value("operation_timestamp", value))

    assert reason.startswith("operation_timestamp: ")
    assert fragment in reason


def test_bad_step_start_time_names_the_agents_key() -> None:
    path = "databases.sales.compress_process.compress_process_start_time"

    reason = rejection(with_value(path, "soon"))

    assert reason == f'{path}: must be an ISO 8601 time, got string "soon"'


# --- required fields -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "operation_timestamp",
        "databases",
        "databases.sales.backup_process",
        "databases.sales.compress_process",
        "databases.sales.transfer_process",
        "databases.sales.backup_process.status",
        "databases.sales.compress_process.status",
        "databases.sales.transfer_process.status",
    ],
)
def test_each_required_field_missing_is_named(path: str) -> None:
    assert rejection(without(path)) == f"{path}: required"


def test_empty_databases_is_rejected() -> None:
    reason = rejection(with_value("databases", {}))

    assert reason == "databases: must contain at least one database"


@pytest.mark.parametrize(
    "path",
    [
        "databases.sales.compress_process.sha256_checksum",
        "databases.sales.compress_process.size_bytes",
        "databases.sales.staged_file_name",
    ],
)
def test_all_steps_ok_requires_checksum_size_and_name(path: str) -> None:
    assert rejection(without(path)) == f"{path}: required when all three steps succeeded"


def test_all_steps_ok_with_nothing_to_verify_lists_all_three() -> None:
    document = sample()
    sales = document["databases"]["sales"]
    sales["compress_process"] = {"status": True}
    del sales["staged_file_name"]

    reason = rejection(document)

    assert reason.split("; ") == [
        "databases.sales.compress_process.sha256_checksum: required when all three steps succeeded",
        "databases.sales.compress_process.size_bytes: required when all three steps succeeded",
        "databases.sales.staged_file_name: required when all three steps succeeded",
    ]


@pytest.mark.parametrize("step", ["backup_process", "compress_process", "transfer_process"])
def test_failed_database_needs_no_checksum_size_or_name(step: str) -> None:
    report = parse_report(encode(with_value("databases.sales", failed_database(step))))

    sales = report.databases["sales"]
    assert not sales.all_steps_ok
    assert sales.compress_process.sha256_checksum is None
    assert sales.staged_file_name is None


# --- wrong types and values ----------------------------------------------------------------

STEP = "databases.sales.compress_process"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (f"{STEP}.status", "true", 'must be true or false, got string "true"'),
        (f"{STEP}.status", "yes", 'must be true or false, got string "yes"'),
        (f"{STEP}.status", 1, "must be true or false, got number 1"),
        (f"{STEP}.status", None, "must be true or false, got null"),
        (f"{STEP}.size_bytes", "12", 'must be a whole number, got string "12"'),
        (f"{STEP}.size_bytes", 1.5, "must be a whole number, got number 1.5"),
        (f"{STEP}.size_bytes", 12.0, "must be a whole number, got number 12.0"),
        (f"{STEP}.size_bytes", True, "must be a whole number, got true"),
        (f"{STEP}.size_bytes", -1, "must not be negative, got number -1"),
        (f"{STEP}.size_bytes", 2**63, "must be at most 9223372036854775807"),
        (f"{STEP}.sha256_checksum", "ab" * 31, "must be 64 hexadecimal digits"),
        (f"{STEP}.sha256_checksum", "zz" * 32, "must be 64 hexadecimal digits"),
        (f"{STEP}.sha256_checksum", SHA + "\n", "must be 64 hexadecimal digits"),
        (f"{STEP}.sha256_checksum", f"{SHA}  sales.sql.gz", "must be 64 hexadecimal digits"),
        (f"{STEP}.sha256_checksum", 12, "must be a string, got number 12"),
        ("databases.sales.backup_process", [], "must be an object, got an array"),
        ("databases.sales.backup_process", "ok", 'must be an object, got string "ok"'),
        ("databases.sales", None, "must be an object, got null"),
        ("databases", ["sales"], "must be an object, got an array"),
        ("agent_id", 7, "must be a string, got number 7"),
        ("overall_status", False, "must be a string, got false"),
        ("agent_id", "x" * 4097, "longer than 4096 characters"),
        ("databases.sales.logs_summary", "x" * 65537, "longer than 65536 characters"),
        ("databases.sales.logs_summary", "a\x00b", "must not contain a NUL character"),
        ("agent_id", "\ud800", "must not contain an unpaired \\u surrogate escape"),
        (
            "databases.sales.transfer_process.error_message",
            {"code": 5},
            "must be a string, got an object",
        ),
    ],
)
def test_wrong_types_and_values_are_schema_errors(path: str, value: Any, message: str) -> None:
    reason = rejection(with_value(path, value))

    assert reason.startswith(f"{path}: {message}")


def test_sha256_is_normalised_to_lower_case() -> None:
    report = parse_report(encode(with_value(f"{STEP}.sha256_checksum", SHA.upper())))

    assert report.databases["sales"].compress_process.sha256_checksum == SHA


def test_size_bytes_zero_and_int64_max_are_accepted() -> None:
    for size in (0, 2**63 - 1):
        report = parse_report(encode(with_value(f"{STEP}.size_bytes", size)))
        assert report.databases["sales"].compress_process.size_bytes == size


def test_long_free_text_is_accepted() -> None:
    report = parse_report(encode(with_value("databases.sales.logs_summary", "x" * 65536)))

    assert len(report.databases["sales"].logs_summary or "") == 65536


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/srv/backupwatch/validated/x.gz", "must be a path relative to the deposit folder"),
        ("../other_site/sales.sql.gz", "must not contain a '..' component"),
        ("database/../../etc/passwd", "must not contain a '..' component"),
        ("database/..", "must not contain a '..' component"),
        ("..", "must not contain a '..' component"),
        ("", "must not be empty"),
        (".", "must name a file inside the deposit folder"),
        ("./", "must name a file inside the deposit folder"),
        ("database\\sales.sql.gz", "must use '/' as separator"),
        ("sales\x00.sql.gz", "must not contain a NUL character"),
        ("sales\n.sql.gz", "must not contain control characters"),
    ],
)
def test_unsafe_staged_file_names_are_rejected(name: str, message: str) -> None:
    reason = rejection(with_value("databases.sales.staged_file_name", name))

    assert reason.startswith(f"databases.sales.staged_file_name: {message}")


@pytest.mark.parametrize("name", ["sales.sql.gz", "./database/sales.sql.gz", "a..b/c...gz"])
def test_relative_staged_file_names_are_kept_as_written(name: str) -> None:
    report = parse_report(encode(with_value("databases.sales.staged_file_name", name)))

    assert report.databases["sales"].staged_file_name == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", 'databases."": database name must not be empty, got string ""'),
        ("a/b", "databases.a/b: database name must not contain '/', got string \"a/b\""),
        (
            "a\x00b",
            'databases."a\\u0000b": must not contain a NUL character, got string "a\\u0000b"',
        ),
        (
            "x.y\n",
            'databases."x.y\\n": database name must not contain control characters, '
            'got string "x.y\\n"',
        ),
    ],
)
def test_bad_database_names_are_rejected(name: str, reason: str) -> None:
    document = sample()
    document["databases"] = {name: failed_database("backup_process")}

    assert rejection(document) == reason


def test_all_schema_errors_are_reported_in_one_line() -> None:
    document = sample()
    document["operation_timestamp"] = "later"
    document["databases"]["sales"]["backup_process"]["status"] = "true"
    document["databases"]["sales"]["staged_file_name"] = "/etc/passwd"
    document["databases"]["hr\nx"] = {"backup_process": {"status": True}}

    reason = rejection(document)

    assert reason.split("; ") == [
        'operation_timestamp: must be an ISO 8601 time, got string "later"',
        'databases.sales.backup_process.status: must be true or false, got string "true"',
        "databases.sales.staged_file_name: must be a path relative to the deposit folder, "
        'got string "/etc/passwd"',
        'databases."hr\\nx": database name must not contain control characters, '
        'got string "hr\\nx"',
        'databases."hr\\nx".compress_process: required',
        'databases."hr\\nx".transfer_process: required',
    ]


def test_a_flood_of_errors_is_capped() -> None:
    document = sample()
    document["databases"] = {f"db{i}": {} for i in range(100)}

    reason = rejection(document)

    assert len(reason.split("; ")) == MAX_LISTED_ERRORS + 1
    assert reason.endswith(f"and {300 - MAX_LISTED_ERRORS} more errors")


def test_long_bad_values_are_shortened_in_the_reason() -> None:
    reason = rejection(with_value(f"{STEP}.sha256_checksum", "g" * 5000))

    assert len(reason) < 200
    assert '"' + "g" * 40 + '..."' in reason


# --- not JSON at all -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not valid JSON: the file is empty"),
        (b" \n", "not valid JSON: the file is empty"),
        (b"hello", "not valid JSON: line 1 column 1: Expecting value"),
        (b'{\n "a": 1\n "b": 2}', "not valid JSON: line 3 column 2: Expecting ',' delimiter"),
        (b'{"a": 1}}', "not valid JSON: line 1 column 9: Extra data"),
        (b"\xff\xfe{}", "not valid UTF-8: byte 0xff at offset 0"),
        (b'{"a": "caf\xe9"}', "not valid UTF-8: byte 0xe9 at offset 10"),
        (b"[1, 2]", "top level must be a JSON object, got an array"),
        (b'"report"', 'top level must be a JSON object, got string "report"'),
        (b"null", "top level must be a JSON object, got null"),
        (b"42", "top level must be a JSON object, got number 42"),
        (b"[" * 100_000, "JSON not accepted: nested too deeply"),
    ],
)
def test_unreadable_documents_are_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(ReportRejected) as info:
        parse_report(data)

    assert info.value.reason == reason
    assert str(info.value) == reason


def test_truncated_json_says_so() -> None:
    data = encode(sample())[:-30]

    with pytest.raises(ReportRejected) as info:
        parse_report(data)

    assert info.value.reason.startswith("not valid JSON: line 1 column ")
    assert "the file is cut short" in info.value.reason


def test_huge_integer_is_rejected_not_crashing() -> None:
    with pytest.raises(ReportRejected, match="JSON not accepted: Exceeds the limit"):
        parse_report(b'{"x": ' + b"9" * 5000 + b"}")


def test_reason_is_forced_to_one_line() -> None:
    exc = ReportRejected("first\nsecond\u2028third")

    assert exc.reason == "first second third"
    assert str(exc) == exc.reason


# --- freshness -----------------------------------------------------------------------------


def report_at(stamp: datetime) -> StatusReport:
    return parse_report(encode(with_value("operation_timestamp", stamp.isoformat())))


def test_fresh_report_passes() -> None:
    check_freshness(report_at(NOW - timedelta(hours=3)), NOW, timedelta(days=1))


def test_report_exactly_max_age_old_passes() -> None:
    check_freshness(report_at(NOW - timedelta(days=1)), NOW, timedelta(days=1))


def test_report_older_than_max_age_is_rejected() -> None:
    report = report_at(NOW - timedelta(days=1, microseconds=1))

    with pytest.raises(ReportRejected) as info:
        check_freshness(report, NOW, timedelta(days=1))

    assert info.value.reason.startswith(
        "operation_timestamp 2026-11-23T13:09:59Z is older than 1 day(s)"
    )
    assert "server time 2026-11-24T13:10:00Z" in info.value.reason


def test_fractional_max_age_is_shown_as_given() -> None:
    with pytest.raises(ReportRejected, match=r"is older than 0\.5 day\(s\)"):
        check_freshness(report_at(NOW - timedelta(hours=13)), NOW, timedelta(hours=12))


def test_report_exactly_at_future_tolerance_passes() -> None:
    check_freshness(report_at(NOW + timedelta(minutes=5)), NOW, timedelta(days=1))


def test_report_beyond_future_tolerance_is_rejected() -> None:
    report = report_at(NOW + timedelta(minutes=5, microseconds=1))

    with pytest.raises(ReportRejected) as info:
        check_freshness(report, NOW, timedelta(days=1))

    assert info.value.reason.startswith(
        "operation_timestamp 2026-11-24T13:15:00Z is more than 5 minutes in the future"
    )


def test_future_tolerance_is_a_parameter() -> None:
    report = report_at(NOW + timedelta(minutes=2))

    with pytest.raises(ReportRejected, match="more than 1 minutes in the future"):
        check_freshness(report, NOW, timedelta(days=1), future_tolerance=timedelta(minutes=1))


def test_freshness_compares_instants_across_offsets() -> None:
    paris = timezone(timedelta(hours=1))
    report = report_at(datetime(2026, 11, 24, 14, 14, tzinfo=paris))

    check_freshness(report, NOW, timedelta(days=1))
    check_freshness(report, NOW.astimezone(paris), timedelta(days=1))


# --- incomplete writes ---------------------------------------------------------------------


def varied_document() -> dict[str, Any]:
    """Every JSON token kind an agent might be cut off in the middle of."""
    document = sample()
    document["extra"] = {
        "numbers": [-12, 3.25, 1.5e-7, 2e10, 0],
        "literals": [True, False, None],
        "escapes": 'tab\t quote" slash\\ \u00e9 \U0001f600',
    }
    return document


def is_incomplete(data: bytes) -> bool:
    """What the daemon asks: are these bytes not yet a JSON document (maybe still written)?"""
    try:
        parse_report(data)
    except ReportRejected as exc:
        return exc.incomplete
    return False


def all_prefixes_are_incomplete(data: bytes) -> None:
    for end in range(len(data)):
        assert is_incomplete(data[:end]), data[:end]


@pytest.mark.parametrize(
    "data",
    [
        json.dumps(varied_document()).encode(),
        json.dumps(varied_document(), indent=2).encode(),
        json.dumps(varied_document(), ensure_ascii=False).encode(),
        b"\xef\xbb\xbf" + json.dumps(sample(), ensure_ascii=False).encode(),
    ],
)
def test_every_prefix_of_a_report_looks_incomplete(data: bytes) -> None:
    all_prefixes_are_incomplete(data)
    assert not is_incomplete(data)


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,  # issue 11 item 9: rejected at once, never waited for
        b"[1, 2]",
        b"{}",
        b'{"operation_timestamp": 5}',
    ],
)
def test_whole_documents_with_errors_are_not_incomplete(data: bytes) -> None:
    """Nothing a writer appends to a whole JSON document can make it valid: reject at once."""
    assert not is_incomplete(data)


@pytest.mark.parametrize("data", [b"hello", b"{]", b'{"a": 1} trailing', b"\xff\xfe{}"])
def test_bytes_that_are_not_json_are_incomplete_until_the_writer_is_done(data: bytes) -> None:
    """SPEC §3: not valid JSON is rejected only once its writer has closed it."""
    assert is_incomplete(data)


# --- properties ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=30,
)

FIELD_PATHS = [
    "agent_id",
    "operation_start_time",
    "operation_timestamp",
    "overall_status",
    "databases",
    "databases.sales",
    "databases.sales.staged_file_name",
    "databases.sales.logs_summary",
    *(
        f"databases.sales.{step}{field}"
        for step in ("backup_process", "compress_process", "transfer_process")
        for field in (
            "",
            ".status",
            f".{step}_start_time",
            ".timestamp",
            ".sha256_checksum",
            ".size_bytes",
            ".error_message",
        )
    ),
]
time_like = st.datetimes(timezones=st.none() | st.timezones()).map(datetime.isoformat)
field_values = json_values | time_like | st.text(alphabet="0123456789abcdefABCDEF./", max_size=70)

PROPERTY_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(data: bytes) -> StatusReport | ReportRejected:
    try:
        return parse_report(data)
    except ReportRejected as exc:
        return exc


def assert_parses_or_rejects(data: bytes) -> None:
    result = outcome(data)
    if isinstance(result, ReportRejected):
        assert result.reason
        assert result.reason == " ".join(result.reason.splitlines())
    else:
        assert result.operation_timestamp.utcoffset() == timedelta(0)
        assert result.databases


@PROPERTY_SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_report_rejected(data: bytes) -> None:
    assert_parses_or_rejects(data)


@PROPERTY_SETTINGS
@given(json_values)
def test_arbitrary_json_only_ever_raises_report_rejected(value: Any) -> None:
    assert_parses_or_rejects(encode(value))


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(st.sampled_from(FIELD_PATHS), st.none() | field_values), max_size=4))
def test_mutated_reports_only_ever_raise_report_rejected(
    changes: list[tuple[str, Any]],
) -> None:
    document = sample()
    for path, value in changes:
        *parents, leaf = path.split(".")
        node: Any = document
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[leaf] = copy.deepcopy(value)
    assert_parses_or_rejects(encode(document))


@PROPERTY_SETTINGS
@given(st.data())
def test_any_prefix_of_a_valid_report_is_incomplete(data: st.DataObject) -> None:
    document = sample()
    document["databases"]["sales"]["logs_summary"] = data.draw(st.text(max_size=40))
    raw = json.dumps(document, ensure_ascii=data.draw(st.booleans())).encode()
    end = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))

    assert is_incomplete(raw[:end])
