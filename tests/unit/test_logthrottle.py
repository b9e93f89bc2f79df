"""The log throttle's rules (tether/logthrottle.py), with an injected clock: no sleeps."""

from __future__ import annotations

import logging

import pytest

from tether.logthrottle import LogThrottle, Summary, ThrottledLog

WHAT = "reports for unknown sessions from 10.0.0.1"


def feed(t: LogThrottle, key: object, now: float, n: int) -> tuple[int, list[Summary]]:
    """`n` occurrences at `now`: how many were logged in full, and the summaries handed out."""
    full = 0
    out: list[Summary] = []
    for i in range(n):
        logged, due = t.occurrence(key, now, what=WHAT, example=f"ghost-{i}".__str__)
        full += logged
        out += due
    return full, out


def test_burst_then_one_summary_per_window() -> None:
    t = LogThrottle(burst=3, interval=10.0)
    full, due = feed(t, "k", 0.0, 1000)
    assert (full, due) == (3, [])  # rule 1: three in full, the rest counted
    assert t.due(9.99) == []
    (summary,) = t.due(10.0)  # rule 2
    assert summary.held_back == 997
    assert summary.example == "ghost-3"  # the first held back
    assert summary.line() == f"997 more {WHAT} in the last 10 s, e.g. ghost-3"
    assert len(t) == 0
    # The next occurrence opens a new window with a new burst.
    assert feed(t, "k", 12.0, 4)[0] == 3


def test_a_quiet_window_ends_silently() -> None:
    t = LogThrottle(burst=5, interval=10.0)
    assert feed(t, "k", 0.0, 5) == (5, [])
    assert t.due(100.0) == []
    assert len(t) == 0


def test_keys_are_counted_apart() -> None:
    t = LogThrottle(burst=1, interval=10.0)
    assert feed(t, ("unknown", "a"), 0.0, 3)[0] == 1
    assert feed(t, ("unknown", "b"), 1.0, 3)[0] == 1
    due = t.due(10.5)  # only the first window has ended
    assert [(s.key, s.held_back) for s in due] == [(("unknown", "a"), 2)]
    due = t.due(11.0)
    assert [(s.key, s.held_back) for s in due] == [(("unknown", "b"), 2)]


def test_summaries_come_out_on_the_next_occurrence() -> None:
    t = LogThrottle(burst=1, interval=10.0)
    feed(t, "a", 0.0, 5)
    logged, due = t.occurrence("b", 30.0, what=WHAT)
    assert logged
    assert [(s.key, s.held_back, s.seconds) for s in due] == [("a", 4, 10.0)]


def test_keys_are_capped_and_the_evicted_window_is_summarised() -> None:
    t = LogThrottle(burst=1, interval=10.0, max_keys=100)
    evicted: list[Summary] = []
    for i in range(10_000):
        evicted += feed(t, i, i * 0.0001, 2)[1]
        assert len(t) <= 100  # rule 4
    # Every window but the last 100 was closed early, each with its one held-back line.
    assert len(evicted) == 10_000 - 100
    assert all(s.held_back == 1 for s in evicted)
    rest = t.close_all(5.0)
    assert len(rest) == 100
    assert len(t) == 0


def test_no_example_is_rendered_beyond_the_first_held_back() -> None:
    t = LogThrottle(burst=0, interval=10.0)
    rendered: list[int] = []

    def example() -> str:
        rendered.append(1)
        return "x"

    for _ in range(50):
        t.occurrence("k", 0.0, what=WHAT, example=example)
    assert rendered == [1]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="required"):
        LogThrottle(interval=0)
    with pytest.raises(ValueError, match="required"):
        LogThrottle(max_keys=0)


def test_throttled_log_writes_lines_and_summaries(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    logger = logging.getLogger("tests.logthrottle")
    tlog = ThrottledLog(logger, burst=2, interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger=logger.name):
        for i in range(500):
            tlog.log("k", WHAT, logging.WARNING, "report for unknown session %s", f"s{i}")
        assert [r.getMessage() for r in caplog.records] == [
            "report for unknown session s0",
            "report for unknown session s1",
        ]
        now[0] = 11.0
        tlog.poll()
        assert caplog.records[-1].getMessage() == (
            f"498 more {WHAT} in the last 10 s, e.g. report for unknown session s2"
        )
        assert caplog.records[-1].levelno == logging.WARNING
        tlog.log("k", WHAT, logging.INFO, "fenced %s", "s9")
        tlog.log("k", WHAT, logging.INFO, "fenced %s", "s9")
        tlog.log("k", WHAT, logging.INFO, "fenced %s", "s10")
        now[0] = 12.0
        tlog.flush()
        assert caplog.records[-1].getMessage() == (
            f"1 more {WHAT} in the last 1 s, e.g. fenced s10"
        )
        assert len(caplog.records) == 6


def test_fields_go_with_the_line_and_a_disabled_level_costs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    logger = logging.getLogger("tests.logthrottle.fields")
    tlog = ThrottledLog(logger, burst=1, interval=10.0, clock=lambda: now[0])
    formatted: list[int] = []

    class Loud:
        def __str__(self) -> str:
            formatted.append(1)
            return "loud"

    with caplog.at_level(logging.INFO, logger=logger.name):
        tlog.log("k", WHAT, logging.DEBUG, "quiet %s", Loud())  # below the level
        assert len(tlog.core) == 0  # not even counted
        tlog.log("k", WHAT, logging.WARNING, "refused %s", "s1", extra={"session": "s1"})
    assert formatted == []
    [record] = caplog.records
    assert record.getMessage() == "refused s1"
    assert record.__dict__["session"] == "s1"
    assert record.funcName == "test_fields_go_with_the_line_and_a_disabled_level_costs_nothing"
