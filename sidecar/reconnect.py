"""When to reconnect a broken upstream SSE stream: a pure policy fed outcomes and the clock.

Rules the policy keeps:
1. A failure (connect error, 5xx, a body cut mid-stream) waits with exponential backoff and
   "equal" jitter (half the ceiling, plus a random part up to the other half), the ceiling
   capped at `max_delay`; a server `retry:` hint raises the floor of that wait. Half is fixed so
   that `max_attempts` attempts always span at least half their ceilings (about 6.6 s for the
   default ten): full jitter could spend all ten in well under a second, less than a server
   takes to restart, and give up on a request or a listen that a moment more would have saved.
2. A clean close after the server gave a `retry:` hint is the MCP 2025-11-25 polling pattern, not a
   failure: the next poll waits exactly the hint and does not count as a failed attempt.
3. Progress (an event delivered) resets the failure count and the outage clock.
4. The policy gives up after `max_attempts` consecutive failures or once the outage has lasted
   `max_elapsed` seconds, whichever comes first; the caller then ends the client stream.

The policy never sleeps and never reads a clock itself: callers pass `now` and a random source,
so tests drive it with fake time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

_JITTER = random.Random()
"""The default source of jitter, one per process: seeding a `random.Random()` from the OS for
each policy cost 17-27 us, and a policy is made for every request that may be re-issued and
every stream."""


@dataclass(frozen=True, slots=True)
class ReconnectConfig:
    initial_delay: float = 0.1
    max_delay: float = 5.0
    multiplier: float = 2.0
    max_attempts: int = 10
    max_elapsed: float = 60.0

    def __post_init__(self) -> None:
        if self.initial_delay < 0 or self.max_delay < self.initial_delay:
            raise ValueError("reconnect delays must satisfy 0 <= initial_delay <= max_delay")
        if self.multiplier < 1:
            raise ValueError("reconnect multiplier must be >= 1")
        if self.max_attempts < 1 or self.max_elapsed <= 0:
            raise ValueError("reconnect max_attempts and max_elapsed must be positive")


class Outcome(Enum):
    """How the previous upstream connection ended."""

    FAILED = "failed"
    """Connect error, bad status, or the body broke before the response was complete."""
    CLOSED = "closed"
    """The server ended the body cleanly before the response was complete (polling)."""


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float
    attempt: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


class ReconnectPolicy:
    """Decides, after each broken upstream connection, whether and when to try again."""

    def __init__(self, config: ReconnectConfig, *, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng or _JITTER
        self._failures = 0
        self._outage_started: float | None = None

    @property
    def failures(self) -> int:
        return self._failures

    def progress(self) -> None:
        """An event got through: the stream is healthy again."""
        self._failures = 0
        self._outage_started = None

    def next(self, outcome: Outcome, *, now: float, retry_ms: int | None) -> Retry | GiveUp:
        """Return the decision after a connection ended with `outcome` at time `now`."""
        cfg = self._config
        if self._outage_started is None:
            self._outage_started = now
        elapsed = now - self._outage_started
        hint = retry_ms / 1000.0 if retry_ms is not None else None

        if outcome is Outcome.CLOSED and hint is not None:
            # Server-driven polling: wait what the server asked, bounded by the outage clock.
            if elapsed + hint > cfg.max_elapsed:
                return GiveUp(f"no progress for {elapsed:.1f}s while polling")
            return Retry(delay=hint, attempt=self._failures)

        self._failures += 1
        if self._failures > cfg.max_attempts:
            return GiveUp(f"{cfg.max_attempts} reconnect attempts failed")
        # The exponent is capped so a long outage (huge max_attempts) cannot overflow a float.
        exponent = min(self._failures - 1, 64)
        ceiling = min(cfg.max_delay, cfg.initial_delay * cfg.multiplier**exponent)
        delay = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        if hint is not None:
            delay = max(delay, hint)
        if elapsed + delay > cfg.max_elapsed:
            return GiveUp(f"upstream unreachable for {elapsed:.1f}s")
        return Retry(delay=delay, attempt=self._failures)
