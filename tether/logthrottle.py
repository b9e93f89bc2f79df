"""Rate-limited log lines: the first few occurrences of a kind of line, then one summary.

A caller that logs once per bad request lets a flood of bad requests write a flood of lines
(a million unknown-session reports wrote a million warnings). `LogThrottle` is the sans-IO
core: fed `(key, now)` it decides whether this occurrence is logged in full, and it hands back
summaries of what it held back. `ThrottledLog` is the thin wrapper that writes the lines to a
`logging.Logger` with a clock. Keys are whatever names a kind of line, e.g.
`("unknown session", peer)` or `("permission denied", principal, method)`.

It is the one rate limiter of the project: the control plane's refusal, denial and rejection
lines, the sidecar's reporter and the proxied port's per-request warnings all go through it, so
every flood is summarised the same way ("N more ... in the last S s, e.g. ...").

Rules:
  1. Per key, a window opens at the key's first occurrence and lasts `interval` seconds. The
     first `burst` occurrences in a window are logged in full; later ones are counted, and the
     first of them is kept (as text) as the summary's example.
  2. When a window ends with occurrences held back, one summary is due: how many, the key's
     noun phrase, the window's length and the example. A window that held nothing back ends
     silently. The key's next occurrence opens a new window (with a new burst).
  3. Summaries are handed out by `due(now)` (the wrapper polls it on every occurrence and on
     `flush()`), so a summary is late by at most the time until the next occurrence of any key
     or the next flush; nothing held back is ever dropped without a summary.
  4. Memory: at most `max_keys` open windows. Opening one more closes the oldest early, with
     its summary if it held anything back (rule 2), so counts are never lost, only summarised
     sooner. Each window holds its counters and one example string.
  5. Cost per occurrence: O(1) amortised (windows are kept in the order they opened, which is
     the order they end, since every window has the same length).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

DEFAULT_BURST = 5
DEFAULT_INTERVAL = 10.0
DEFAULT_MAX_KEYS = 1024


@dataclass(frozen=True, slots=True)
class Summary:
    """Occurrences of one key held back during one window (rule 2)."""

    key: Hashable
    what: str
    """The noun phrase given with the occurrences, e.g. "reports for unknown sessions"."""
    held_back: int
    seconds: float
    """The window's length as it ran: `interval`, or less if it was closed early (rule 4)."""
    example: str
    level: int

    def line(self) -> str:
        return (
            f"{self.held_back} more {self.what} in the last {self.seconds:.0f} s, "
            f"e.g. {self.example}"
        )


@dataclass(slots=True)
class _Window:
    opened: float
    what: str
    level: int
    logged: int = 0
    held_back: int = 0
    example: str = ""


class LogThrottle:
    """Decides which occurrences are logged in full and which are summarised (no I/O)."""

    def __init__(
        self,
        *,
        burst: int = DEFAULT_BURST,
        interval: float = DEFAULT_INTERVAL,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if burst < 0 or interval <= 0 or max_keys < 1:
            raise ValueError("burst >= 0, interval > 0 and max_keys >= 1 are required")
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._windows: OrderedDict[Hashable, _Window] = OrderedDict()

    def __len__(self) -> int:
        """Open windows (at most `max_keys`)."""
        return len(self._windows)

    def occurrence(
        self,
        key: Hashable,
        now: float,
        *,
        what: str,
        level: int = logging.WARNING,
        example: Callable[[], str] | None = None,
    ) -> tuple[bool, list[Summary]]:
        """Count one occurrence of `key`: whether to log it in full, and the summaries due
        now (rules 2-4). `example` renders the occurrence's text; it is called only for the
        first occurrence held back in a window, so the caller pays formatting once."""
        summaries = self.due(now)
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= self.max_keys:
                old_key, old = self._windows.popitem(last=False)
                summary = _summary(old_key, old, now)
                if summary is not None:
                    summaries.append(summary)
            window = self._windows[key] = _Window(now, what, level)
        if window.logged < self.burst:
            window.logged += 1
            return True, summaries
        window.held_back += 1
        if window.held_back == 1 and example is not None:
            window.example = example()
        return False, summaries

    def due(self, now: float) -> list[Summary]:
        """Close every window that has lasted `interval`; the summaries of those that held
        something back."""
        out: list[Summary] = []
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if now - window.opened < self.interval:
                break
            del self._windows[key]
            summary = _summary(key, window, window.opened + self.interval)
            if summary is not None:
                out.append(summary)
        return out

    def close_all(self, now: float) -> list[Summary]:
        """Close every window now (shutdown): the summaries of those that held back."""
        out = [s for k, w in self._windows.items() if (s := _summary(k, w, now)) is not None]
        self._windows.clear()
        return out


def _summary(key: Hashable, window: _Window, closed: float) -> Summary | None:
    if window.held_back == 0:
        return None
    seconds = closed - window.opened
    return Summary(key, window.what, window.held_back, seconds, window.example, window.level)


class ThrottledLog:
    """A logger's lines, rate-limited per key by a `LogThrottle` (the I/O half).

    `log(key, what, level, msg, *args)` logs `msg % args` in full within the key's burst and
    counts it otherwise; summary lines go to the same logger at the key's level. Call
    `flush()` when the owner stops, so the last window's summary is written.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = DEFAULT_BURST,
        interval: float = DEFAULT_INTERVAL,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.core = LogThrottle(burst=burst, interval=interval, max_keys=max_keys)
        self._clock = clock

    def log(
        self,
        key: Hashable,
        what: str,
        level: int,
        msg: str,
        *args: object,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        """`extra`: structured fields of the line (`tether.logsetup`), as for `Logger.log`.
        Nothing is formatted when the logger would drop the line anyway."""
        if not self.logger.isEnabledFor(level):
            return
        full, summaries = self.core.occurrence(
            key, self._clock(), what=what, level=level, example=lambda: msg % args
        )
        self._write(summaries)
        if full:
            # The caller's line, not ours.
            self.logger.log(level, msg, *args, extra=extra, stacklevel=2)

    def poll(self) -> None:
        """Write the summaries that are due now (a caller with its own timer may call it)."""
        self._write(self.core.due(self._clock()))

    def flush(self) -> None:
        """Write every pending summary now."""
        self._write(self.core.close_all(self._clock()))

    def _write(self, summaries: list[Summary]) -> None:
        for s in summaries:
            self.logger.log(s.level, "%s", s.line())
