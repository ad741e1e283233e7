"""A database outage is three kinds of log line, not one per retry (issue 11 item 10)."""

from __future__ import annotations

import structlog

from backupwatch.outage import SUMMARY_EVERY, OutageLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_line_down_a_summary_a_minute_one_line_back() -> None:
    clock = Clock()
    outage = OutageLog(clock)
    error = ConnectionError("connection refused\nDETAIL: more")
    with structlog.testing.capture_logs() as logs:
        for _ in range(3 * 60):  # every worker and the timer, every second, for 3 minutes
            outage.failed(error, report="STATUS.json")
            clock.now += 1.0
        outage.ok()
        outage.ok()
    events = [entry["event"] for entry in logs]
    assert events == [
        "database.unreachable",
        "database.still_unreachable",
        "database.still_unreachable",
        "database.back",
    ]
    assert logs[0]["error"] == "connection refused"
    assert logs[0]["report"] == "STATUS.json"
    assert logs[1]["down_s"] == SUMMARY_EVERY
    assert logs[-1]["failed_attempts"] == 180
    assert not outage.down


def test_success_without_an_outage_says_nothing() -> None:
    with structlog.testing.capture_logs() as logs:
        OutageLog().ok()
    assert logs == []
