"""Draining: the sidecar of a pod that is going away lets its work finish and sends its
clients elsewhere, so a rollout fails no tool call (issue #12).

Sans-IO: `DrainState` holds the state and makes the decisions; `sidecar.proxy` and
`sidecar.app` are the thin loops that count requests, end streams and wait.

Invariants:
1. A drain is one-way: once begun, the sidecar never reports ready again (its pod is going
   away; a new pod takes its place).
2. While draining, every response closes its connection (`Connection: close`), so a client's
   next request opens a new connection, which the Service sends to another pod. Requests that
   arrive meanwhile on open connections are still served.
3. A request is in flight from its arrival until its response is completely written, streamed
   POST responses included; standalone `GET` streams, legacy `GET /sse` streams and
   2026-07-28 `subscriptions/listen` streams are not: they never end on their own. Standalone
   and listen streams are ended instead, cleanly, so the client resumes them
   (`Last-Event-ID`) or listens again on another pod. (A legacy SSE session lives in its
   server and cannot move: its stream ends when the sidecar stops.)
4. Drained means: draining, nothing in flight and nothing arrived for `settle` seconds, or
   `timeout` seconds since the drain began, whichever comes first. The settle time is for
   connections whose response began before the drain: it went out saying keep-alive, so its
   client may send its next request on it right after; that request is served (with
   `Connection: close`) rather than met by a connection closed under it (HTTP/1.1 has no way
   to tell a client a kept-alive connection is closing but closing it).
5. From the drain's start until the sidecar stops, a connection is closed once it has been
   idle for `settle` seconds (one idle when the drain began counts from then). Never the moment
   a response ends: a client calling back to back sends its next request on the connection
   just freed, and a close crossing that request fails it (HTTP/1.1 gives a server no way to
   close a kept-alive connection but closing it); that request is served instead, with
   `Connection: close`. A connection left parked is where a crossing is least likely.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sidecar.tracker import EventId, StreamKind


def holds_drain(method: str, last_event_id: EventId | None) -> bool:
    """Rule 3: whether a request keeps a drain waiting. A `GET` opens or resumes a stream that
    never ends by itself, except the resume of a POST response stream (a call's answer)."""
    if method != "GET":
        return True
    return last_event_id is not None and StreamKind.of(last_event_id.stream) is StreamKind.POST


@dataclass
class DrainState:
    """The drain of one sidecar: begun or not, requests in flight, the deadline."""

    timeout: float
    """Longest drain, in seconds (`--drain-timeout`)."""
    settle: float = 0.5
    """Rule 4: how long nothing may have arrived before the drain is done."""
    in_flight: int = 0
    began_at: float | None = None
    last_activity: float = float("-inf")
    """When a request last started or finished."""

    @property
    def draining(self) -> bool:
        return self.began_at is not None

    @property
    def ready(self) -> bool:
        """Rule 1."""
        return self.began_at is None

    def begin(self, now: float) -> bool:
        """Start draining; False if a drain had already begun (its deadline stands)."""
        if self.began_at is not None:
            return False
        self.began_at = now
        return True

    def request_started(self, now: float) -> None:
        self.in_flight += 1
        self.last_activity = now

    def request_finished(self, now: float) -> None:
        if self.in_flight <= 0:
            raise RuntimeError("request_finished without request_started")
        self.in_flight -= 1
        self.last_activity = now

    def keep_alive(self) -> bool:
        """Rule 2: whether a response prepared now may leave its connection open."""
        return self.began_at is None

    def remaining(self, now: float) -> float:
        """Seconds left before the deadline (0 when passed; the timeout before a drain)."""
        if self.began_at is None:
            return self.timeout
        return max(0.0, self.began_at + self.timeout - now)

    def drained(self, now: float, *, upstream_busy: int = 0) -> bool:
        """Rule 4. `upstream_busy`: POST streams still reading their upstream with no client
        attached (the client will resume them here): in flight too."""
        if self.began_at is None:
            return False
        quiet = now - max(self.last_activity, self.began_at) >= self.settle
        idle = self.in_flight == 0 and upstream_busy == 0 and quiet
        return idle or self.remaining(now) == 0.0

    def timed_out(self, now: float, *, upstream_busy: int = 0) -> bool:
        """Drained by the deadline, with work still in flight."""
        return (
            self.began_at is not None
            and self.remaining(now) == 0.0
            and (self.in_flight > 0 or upstream_busy > 0)
        )


C = TypeVar("C", bound=Hashable)


@dataclass
class Parking(Generic[C]):
    """Rule 5: since when each idle connection has been idle, while draining. Entries live only
    as long as their connection (`to_close` forgets the rest), so the map is bounded by the
    connections open."""

    min_idle: float
    _since: dict[C, float] = field(default_factory=dict)

    def idle(self, connection: C, now: float) -> None:
        """A connection's last request finished."""
        self._since[connection] = now

    def to_close(self, live: Iterable[C], busy: Collection[object], now: float) -> list[C]:
        """The live connections idle for `min_idle` seconds; a live idle connection not seen
        before counts from now (the drain's start)."""
        since: dict[C, float] = {}
        out: list[C] = []
        for conn in live:
            if conn in busy:
                continue
            at = self._since.get(conn, now)
            since[conn] = at
            if now - at >= self.min_idle:
                out.append(conn)
        self._since = since
        return out
