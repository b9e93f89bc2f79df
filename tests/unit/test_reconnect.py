"""The reconnect policy under fake time: backoff, jitter bounds, polling, and giving up."""

from __future__ import annotations

import random

import pytest

from sidecar.reconnect import GiveUp, Outcome, ReconnectConfig, ReconnectPolicy, Retry


def policy(**kw: float) -> ReconnectPolicy:
    return ReconnectPolicy(ReconnectConfig(**kw), rng=random.Random(7))  # type: ignore[arg-type]


def test_failures_back_off_exponentially_with_jitter_under_the_cap() -> None:
    p = policy(initial_delay=0.1, max_delay=1.0, multiplier=2.0, max_attempts=8, max_elapsed=100)
    now = 0.0
    for attempt in range(1, 9):
        d = p.next(Outcome.FAILED, now=now, retry_ms=None)
        assert isinstance(d, Retry)
        assert d.attempt == attempt
        ceiling = min(1.0, 0.1 * 2 ** (attempt - 1))
        assert ceiling / 2 <= d.delay <= ceiling  # rule 1: equal jitter
        now += d.delay
    assert isinstance(p.next(Outcome.FAILED, now=now, retry_ms=None), GiveUp)


def test_jitter_spreads_delays() -> None:
    delays = set()
    for seed in range(20):
        p = ReconnectPolicy(
            ReconnectConfig(initial_delay=1.0, max_delay=1.0), rng=random.Random(seed)
        )
        d = p.next(Outcome.FAILED, now=0, retry_ms=None)
        assert isinstance(d, Retry)
        delays.add(round(d.delay, 6))
    assert len(delays) == 20


def test_retry_hint_is_a_floor_for_failures() -> None:
    p = policy(initial_delay=0.01, max_delay=0.05)
    d = p.next(Outcome.FAILED, now=0, retry_ms=2000)
    assert isinstance(d, Retry)
    assert d.delay == pytest.approx(2.0)


def test_clean_close_with_retry_is_polling_not_failure() -> None:
    p = policy(max_attempts=2, max_elapsed=1000)
    for i in range(50):
        d = p.next(Outcome.CLOSED, now=i * 0.5, retry_ms=500)
        assert d == Retry(delay=0.5, attempt=0)
        p.progress()
    assert p.failures == 0


def test_clean_close_without_hint_counts_as_failure() -> None:
    p = policy(max_attempts=1)
    assert isinstance(p.next(Outcome.CLOSED, now=0, retry_ms=None), Retry)
    assert isinstance(p.next(Outcome.CLOSED, now=0.1, retry_ms=None), GiveUp)


def test_progress_resets_attempts_and_outage_clock() -> None:
    p = policy(max_attempts=2, max_elapsed=10)
    assert isinstance(p.next(Outcome.FAILED, now=0, retry_ms=None), Retry)
    assert isinstance(p.next(Outcome.FAILED, now=1, retry_ms=None), Retry)
    p.progress()
    assert isinstance(p.next(Outcome.FAILED, now=100, retry_ms=None), Retry)


def test_gives_up_when_the_outage_lasts_too_long() -> None:
    p = policy(initial_delay=0.1, max_delay=0.1, max_attempts=1000, max_elapsed=5)
    assert isinstance(p.next(Outcome.FAILED, now=0, retry_ms=None), Retry)
    decision = p.next(Outcome.FAILED, now=5.0, retry_ms=None)
    assert isinstance(decision, GiveUp)
    assert "unreachable" in decision.reason


def test_polling_is_bounded_by_the_outage_clock_too() -> None:
    p = policy(max_elapsed=2)
    assert isinstance(p.next(Outcome.CLOSED, now=0, retry_ms=1000), Retry)
    assert isinstance(p.next(Outcome.CLOSED, now=1.5, retry_ms=1000), GiveUp)


@pytest.mark.parametrize(
    "kw",
    [
        {"initial_delay": -1},
        {"initial_delay": 2, "max_delay": 1},
        {"multiplier": 0.5},
        {"max_attempts": 0},
        {"max_elapsed": 0},
    ],
)
def test_bad_config_is_rejected(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="reconnect"):
        ReconnectConfig(**kw)  # type: ignore[arg-type]


def test_a_very_long_outage_does_not_overflow() -> None:
    p = policy(initial_delay=0.1, max_delay=2.0, max_attempts=5000, max_elapsed=1e9)
    for i in range(3000):
        d = p.next(Outcome.FAILED, now=float(i), retry_ms=None)
        assert isinstance(d, Retry)
        assert d.delay <= 2.0
