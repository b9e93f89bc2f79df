"""Live streams and sessions: the asyncio state around the pure trackers.

A `LiveStream` outlives the client connection that started it: its upstream pump keeps reading
(and buffering) while the client is away, so a client that reconnects with `Last-Event-ID` gets
what it missed even when the upstream keeps no event store. The janitor ends streams nobody came
back for, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDict

from sidecar.jsonrpc import RequestId
from sidecar.reconnect import ReconnectConfig
from sidecar.stream_core import Rewrite, StreamCore
from sidecar.tracker import StreamKind, StreamTracker, TrackerLimits, new_stream_id
from tether.model import StreamId, StreamPosition

log = logging.getLogger("tether.sidecar.streams")


class Signal:
    """Wakes every waiter on the next `notify()`; a waiter re-checks state before waiting.

    One future per waiter and one timer per bounded wait, nothing else: a wake happens for
    every event a stream relays, and `wait_for(shield(...))` cost 2.5x as much (issue 16).

    1. A waiter owns its future: cancelling the waiting task cancels nothing another waiter
       is waiting on.
    2. A waiter that stops waiting (timeout, cancellation) is no longer listed: an idle
       stream's heartbeat waits leave nothing behind.
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[bool]] = []

    def notify(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(True)

    async def wait(self, patience: float | None = None) -> bool:
        """Wait for the next notify, at most `patience` seconds; False if none came."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_later(patience, _expire, fut) if patience is not None else None
        try:
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
            # Rule 2; a notify took it off already. Not done: the coroutine was closed.
            if not fut.done() or fut.cancelled() or not fut.result():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    @property
    def waiting(self) -> int:
        """Waiters listed now."""
        return len(self._waiters)


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class Sink(Protocol):
    """Where `LiveStream.publish` hands new events first (`sidecar.writer.Follower`)."""

    def offer(self, stream: LiveStream) -> bool:
        """Write what `stream` has now; False if it was left to the stream's writers."""
        ...


@dataclass(eq=False)
class LiveStream:
    """One client-facing SSE stream: its `StreamCore` plus the asyncio state around it
    (wake-ups, the pump task, attached clients)."""

    core: StreamCore
    session_id: str | None
    upstream_path: str
    """Path and query the stream came from; reconnects GET this (Streamable HTTP: the endpoint)."""
    upstream_headers: CIMultiDict[str]
    """Request headers to reuse for reconnects (session, auth, protocol version)."""
    response_headers: CIMultiDict[str]
    """Headers for client responses of this stream (content type, session id...)."""
    legacy_session: str | None = None
    """The upstream's session name in a legacy `endpoint` URL."""
    credential_fingerprint: str | None = None
    """For a legacy stream (it has no Mcp-Session-Id): the credential that opened it."""
    signal: Signal = field(default_factory=Signal)
    """Notified when events arrive or the stream ends (writers wait on it)."""
    room: Signal = field(default_factory=Signal)
    """Notified when a writer sent more (a paused pump waits on it)."""
    finished: bool = False
    """True once the stream left OPEN (settled); False again if a returning client revives it.
    A flag, not an `asyncio.Event`: nothing waits on it, and every open call paid an Event's
    waiter deque (issue 16)."""
    clients: int = 0
    follower: Sink | None = None
    """Its only writer, parked with its client caught up (`sidecar.writer` rule 4)."""
    idle_since: float = field(default_factory=time.monotonic)
    pump: asyncio.Task[None] | None = None

    @property
    def tracker(self) -> StreamTracker:
        return self.core.tracker

    @property
    def kind(self) -> StreamKind:
        return self.core.kind

    @property
    def stream_id(self) -> StreamId:
        return self.core.tracker.stream_id

    @property
    def ended(self) -> bool:
        return self.core.ended

    def publish(self) -> None:
        """New events are in the tracker: the parked only writer's follower writes them if it
        can (`sidecar.writer` rule 4); else wake the client writers."""
        follower = self.follower
        if follower is None or self.clients != 1 or not follower.offer(self):
            self.signal.notify()

    def end(self, reason: str) -> None:
        """Stop the stream from outside; writers drain the buffer and close."""
        self.core.stop(reason)
        self.settle()

    def settle(self) -> None:
        """After the core left OPEN: mark the stream finished and wake everyone."""
        if self.core.ended and not self.finished:
            self.idle_since = time.monotonic()
            self.finished = True
            self.signal.notify()
            self.room.notify()

    def revive(self) -> bool:
        """A client is back for a failed or stopped stream; True if it is OPEN again."""
        if not self.core.revive():
            return False
        self.finished = False
        return True

    def sent(self, seq: int) -> None:
        """A writer handed events up to `seq` to its client: the pump may read on."""
        if self.core.sent(seq):
            self.room.notify()

    def attach(self) -> None:
        self.clients += 1

    def detach(self) -> None:
        self.clients -= 1
        if self.clients == 0:
            self.idle_since = time.monotonic()


@dataclass(eq=False)
class Session:
    """What the sidecar knows of one MCP session (client-facing id)."""

    session_id: str
    upstream_session_id: str
    protocol_version: str | None = None
    initialize_request: bytes | None = None
    streams: dict[StreamId, LiveStream] = field(default_factory=dict)
    standalone: StreamId | None = None
    last_active: float = field(default_factory=time.monotonic)
    owner_epoch: int = 1
    """This sidecar's fencing token for the session (raised when it adopts the session)."""
    init_path: str = "/mcp"
    """Where the `initialize` request went; a re-initialize posts there again."""
    reported: bool = False
    """The control plane has (or is being sent) this session's record."""
    persisted_streams: dict[StreamId, StreamPosition] = field(default_factory=dict)
    """Stream positions from the control plane when the session was adopted."""
    credential_fingerprint: str | None = None
    """SHA-256 of the Authorization header that created the session ("" for none); None
    until the sidecar has seen it."""


TAKEN_OVER = "session taken over by another sidecar"
"""Why a stream of a session another sidecar claimed ends (the comment its client sees)."""


class Registry:
    """All sessions and streams of this sidecar, with the janitor rules that bound them."""

    def __init__(
        self, limits: TrackerLimits, *, reconnect: ReconnectConfig, max_event_bytes: int
    ) -> None:
        self.limits = limits
        self.reconnect = reconnect
        self.max_event_bytes = max_event_bytes
        self.sessions: dict[str, Session] = {}
        self.streams: dict[StreamId, LiveStream] = {}
        self.legacy_sessions: dict[str, LiveStream] = {}
        """Legacy (HTTP+SSE) session name -> the stream that carries it."""
        self.finishing: set[LiveStream] = set()
        """Streams of sessions no longer served here, left to finish a response in flight
        (continuity invariant 10); each leaves the set when its pump ends."""
        self._lingering: dict[LiveStream, int] = {}
        """Finished streams without a client, kept for late resumes, oldest first, with the
        replay bytes each held when it began to linger: `trim_lingering` pops from the front
        instead of scanning every stream each time one ends (that scan made a session's
        every call cost more than the last)."""
        self._lingering_bytes = 0
        self.session_ended: list[Callable[[str], None]] = []
        """Called with the id of every session let go (dropped or expired), so that what
        others keep per session (the reporter's) is freed with it. Must not raise."""

    def client_left(self, stream: LiveStream) -> None:
        """A writer of `stream` detached: a finishing stream without clients has nobody left
        to finish for, so it ends here and its pump (its upstream connection) is cancelled
        (continuity invariant 10)."""
        if stream.clients or stream not in self.finishing:
            return
        self.finishing.discard(stream)
        stream.end(TAKEN_OVER)
        if stream.pump is not None:
            stream.pump.cancel()

    def session(self, session_id: str) -> Session:
        sess = self.sessions.get(session_id)
        if sess is None:
            sess = Session(session_id=session_id, upstream_session_id=session_id)
            self.sessions[session_id] = sess
        sess.last_active = time.monotonic()
        return sess

    def new_stream(
        self,
        *,
        kind: StreamKind,
        session_id: str | None,
        upstream_path: str,
        upstream_headers: CIMultiDict[str],
        response_headers: CIMultiDict[str],
        tracker: StreamTracker | None = None,
        request_ids: Iterable[RequestId] = (),
        rewrite: Rewrite | None = None,
    ) -> LiveStream:
        """Register a stream; a fresh id is minted unless an adopted stream's tracker is
        given."""
        adopted = tracker is not None
        if tracker is None:
            stream_id = new_stream_id(kind)
            while stream_id in self.streams:
                stream_id = new_stream_id(kind)
            sess = self.sessions.get(session_id) if session_id is not None else None
            epoch = sess.owner_epoch if sess is not None else 1
            tracker = StreamTracker(stream_id, limits=self.limits, epoch=epoch)
        core = StreamCore(
            tracker,
            kind,
            reconnect=self.reconnect,
            max_event_bytes=self.max_event_bytes,
            request_ids=request_ids,
            rewrite=rewrite,
            adopted=adopted,
        )
        stream = LiveStream(
            core=core,
            session_id=session_id,
            upstream_path=upstream_path,
            upstream_headers=upstream_headers,
            response_headers=response_headers,
        )
        self.streams[tracker.stream_id] = stream
        if session_id is not None:
            self.session(session_id).streams[tracker.stream_id] = stream
        return stream

    def remove_stream(self, stream: LiveStream) -> None:
        self.streams.pop(stream.stream_id, None)
        self.unlinger(stream)
        if stream.legacy_session and self.legacy_sessions.get(stream.legacy_session) is stream:
            del self.legacy_sessions[stream.legacy_session]
        if stream.session_id is not None:
            sess = self.sessions.get(stream.session_id)
            if sess is not None:
                sess.streams.pop(stream.stream_id, None)
                if sess.standalone == stream.stream_id:
                    sess.standalone = None

    def drop_session(self, session_id: str) -> list[LiveStream]:
        """Forget a session (DELETE or expiry); returns its streams so callers stop them."""
        sess = self.sessions.pop(session_id, None)
        if sess is None:
            return []
        streams = list(sess.streams.values())
        for s in streams:
            self.streams.pop(s.stream_id, None)
            self.unlinger(s)
        self._ended(session_id)
        return streams

    def sweep(
        self, *, now: float, orphan_timeout: float, linger: float, session_idle: float
    ) -> list[LiveStream]:
        """Apply the bounds; returns live streams whose pumps the caller must stop."""
        to_stop: list[LiveStream] = []
        for stream in list(self.streams.values()):
            if stream.clients:
                continue
            idle = now - stream.idle_since
            if stream.ended and idle > linger:
                self.remove_stream(stream)
            elif not stream.ended and idle > orphan_timeout:
                log.info(
                    "stream %s: no client for %.0fs, closing its upstream",
                    stream.stream_id,
                    idle,
                )
                stream.end("no client came back")
                to_stop.append(stream)
        for sid, sess in list(self.sessions.items()):
            if not sess.streams and now - sess.last_active > session_idle:
                del self.sessions[sid]
                self._ended(sid)
        return to_stop

    def trim_lingering(self, budget: int, stream: LiveStream | None = None) -> int:
        """Bound the memory of finished streams kept for late resumes: `stream`, if it now
        lingers (finished, no client), is counted; then, while lingering streams hold more
        than `budget` replay bytes, the longest-lingering are forgotten (a client resuming one
        later gets 410 and starts anew). Returns how many were forgotten. Each call costs
        what it forgets, not the number of streams."""
        if (
            stream is not None
            and stream.ended
            and not stream.clients
            and self.streams.get(stream.stream_id) is stream
        ):
            self.unlinger(stream)
            held = stream.tracker.buffered_bytes
            self._lingering[stream] = held
            self._lingering_bytes += held
        dropped = 0
        while self._lingering_bytes > budget and self._lingering:
            oldest = next(iter(self._lingering))
            self.unlinger(oldest)
            self.remove_stream(oldest)
            dropped += 1
        return dropped

    def unlinger(self, stream: LiveStream) -> None:
        """`stream` no longer lingers: a client is back, or it is gone."""
        held = self._lingering.pop(stream, None)
        if held is not None:
            self._lingering_bytes -= held

    def serving(self, *, now: float, active_within: float) -> list[str]:
        """Sessions this sidecar serves: a client attached or a stream open, or a request
        within the last `active_within` seconds (their ownership lease is renewed)."""
        return [
            sid
            for sid, sess in self.sessions.items()
            if now - sess.last_active < active_within
            or any(s.clients or not s.ended for s in sess.streams.values())
        ]

    def _ended(self, session_id: str) -> None:
        for listener in self.session_ended:
            listener(session_id)
