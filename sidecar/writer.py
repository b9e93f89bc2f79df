"""The client writer: a thin asyncio loop that writes what `StreamCore.next_write` says.

One writer per client connection to a stream. It may start behind the replay buffer (a resume
with an old id): then the missing events are first fetched again from the upstream and written
under their original ids (`_catch_up`). A slow client is bounded by `client_write_timeout`;
one that fell behind the buffer is closed so it resumes.

Rules (issue 16: each costs nothing per event that does not need it):
1. A write to a client needs a timeout only when it can wait: when the client's writing is not
   paused and the transport's buffer plus the write stays within its high-water mark, the
   transport does not pause the protocol, so aiohttp's drain (its only wait in a write)
   returns at once (`Room`).
2. Anything unknown (no transport, one without buffer limits) counts as "may wait".
3. A keep-alive goes out when nothing was written to the client for `heartbeat_interval`,
   timed by one timer per writer that re-arms itself lazily (`Beat`), not by a timer armed on
   every wait and cancelled on every event.
4. Write-through: the only writer of a stream, parked with its client caught up, leaves a
   `Follower`; the pump hands it what it relays and writes it at once, in the relay's own
   call, when the write cannot wait (rule 1): no wake of the writer per event. Anything else
   (a write that may wait, the stream's end, a second client, a broken connection) wakes the
   writer, which first takes back the follower's position, so every event is written once,
   in order, by one of the two, never both: they run on one thread, and the follower exists
   only while the writer is parked.
5. What a response starts with goes out in one write: the headers, a resume's marker, the
   priming event and the first events the core has by then (`HeadFirst`, `_follow`'s `head`);
   and its end goes with its last events, when the writer writes them. A short answer (the
   headers, priming, the result, the end of the chunked body) costs the client one wake-up
   and the sidecar one send instead of four. A response that starts with nothing to write (a
   GET stream without priming) sends its headers at once: its client waits for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import aiohttp
from aiohttp import web

from sidecar.config import SidecarConfig
from sidecar.headers import is_sse
from sidecar.metrics import Metrics, ResumeClock
from sidecar.sse import encode_comment
from sidecar.stream_core import CLOSE, Behind, CatchUp, Close, Send
from sidecar.streams import LiveStream, Registry, Signal
from sidecar.tracker import StreamKind
from sidecar.upstream import UPSTREAM_ERRORS, Upstream

log = logging.getLogger("tether.sidecar.writer")

KEEPALIVE = b": keepalive\n\n"
PRIMING_GRACE = 0.25
"""Seconds a new POST stream's priming event waits for the upstream's own (see `write`)."""


class HeadFirst(web.StreamResponse):
    """A response whose headers wait for its first write and go out with it (rule 5).

    aiohttp (3.12+) sends a `StreamResponse`'s headers alone at `prepare` unless
    `_send_headers_immediately` is False, as it is for its own `Response`; an aiohttp without
    the attribute ignores it and sends them alone, as before."""

    _send_headers_immediately = False


FRAMING = 64
"""Bytes a chunked write may add around the data (size line, CRLFs), rounded up."""


class Room:
    """Whether a write to one client can wait for it (rules 1 and 2): only then does it need
    a timeout, whose set-up cost as much as the rest of a small event's write."""

    __slots__ = ("_high", "_protocol", "_transport")

    def __init__(self, request: web.BaseRequest) -> None:
        self._transport = request.transport
        self._protocol = request.protocol
        limits = getattr(self._transport, "get_write_buffer_limits", None)
        self._high = limits()[1] if limits is not None else -1

    def fits(self, size: int) -> bool:
        transport, protocol = self._transport, self._protocol
        return (
            transport is not None
            and protocol is not None
            and not protocol.writing_paused
            and transport.get_write_buffer_size() + size + FRAMING <= self._high
        )


class Beat:
    """A writer's keep-alive clock (rule 3): a write notes its time; the timer, when it fires
    before `interval` has passed since the last write, moves itself to that time."""

    __slots__ = ("_handle", "_interval", "_loop", "_signal", "last")

    def __init__(self, signal: Signal, interval: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._signal = signal
        self._interval = interval
        self.last = self._loop.time()
        self._handle = self._loop.call_at(self.last + interval, self._fire)

    def wrote(self) -> None:
        self.last = self._loop.time()

    @property
    def due(self) -> bool:
        return self._loop.time() - self.last >= self._interval

    def _fire(self) -> None:
        at = self.last + self._interval
        now = self._loop.time()
        if now >= at:
            self._signal.notify()  # the writer wakes, finds nothing to send, sends a keep-alive
            at = now + self._interval
        self._handle = self._loop.call_at(at, self._fire)

    def cancel(self) -> None:
        self._handle.cancel()


class Follower:
    """A parked writer's stand-in for write-through (rule 4)."""

    __slots__ = ("_beat", "_chunk", "_metrics", "_on_sent", "_room", "position", "sent")

    def __init__(
        self,
        chunk: Callable[[bytes], None],
        position: int,
        *,
        room: Room,
        beat: Beat,
        metrics: Metrics,
        on_sent: Callable[[], None] | None,
    ) -> None:
        self._chunk = chunk
        self._metrics = metrics
        self.position = position
        self._room = room
        self._beat = beat
        self._on_sent = on_sent
        self.sent = 0
        """Events written through this follower."""

    def offer(self, stream: LiveStream) -> bool:
        """Write what the stream has after `position` if that cannot wait; False leaves it to
        the writer (wake it)."""
        step = stream.core.next_write(self.position)
        if not isinstance(step, Send) or not self._room.fits(len(step.data)):
            return False
        try:
            self._chunk(step.data)
        except ConnectionError:
            return False  # the writer meets it on its own write, and ends
        self.position = step.upto
        self.sent += step.count
        self._metrics.events_out.inc(step.count)
        self._beat.wrote()
        stream.sent(step.upto)
        if self._on_sent is not None:
            self._on_sent()
        return True


def chunk_writer(out: web.StreamResponse) -> Callable[[bytes], None] | None:
    """A synchronous chunked write of `out`'s body, through aiohttp's own payload writer (its
    byte counts stay right), once the headers are out; None where that writer is not the plain
    chunked one this relies on (rule 4 is then off: every event wakes the writer)."""
    writer = getattr(out, "_payload_writer", None)
    write = getattr(writer, "_write_chunked_payload", None)
    if (
        write is None
        or not getattr(writer, "chunked", False)
        or getattr(writer, "_compress", None) is not None
        or getattr(writer, "_headers_buf", None) is not None
    ):
        return None
    return cast("Callable[[bytes], None]", write)


class Writer:
    def __init__(
        self, *, config: SidecarConfig, metrics: Metrics, upstream: Upstream, registry: Registry
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.upstream = upstream
        self.registry = registry
        self.active = 0
        """SSE responses being written to clients now (bounded by `max_streams`)."""
        self.written_through = 0
        """Events written to clients by write-through (rule 4), not by their writers."""

    async def write(
        self,
        request: web.Request,
        stream: LiveStream,
        *,
        after_seq: int,
        priming: bool,
        first: bytes | None = None,
        catch_up_cursor: str | None = None,
        resume: ResumeClock | None = None,
    ) -> web.StreamResponse:
        """Write the stream's events after `after_seq` to the client, then live ones;
        `first` (a resumed stream's marker) before anything else; `resume` times a resume
        until the client has its first missed event."""
        starts = first is not None or priming  # rule 5
        kind = HeadFirst if starts else web.StreamResponse
        out = kind(status=200, headers=stream.response_headers)
        out.headers["Cache-Control"] = "no-cache"
        out.headers["X-Accel-Buffering"] = "no"
        stream.attach()
        self.registry.unlinger(stream)
        self.active += 1
        position = after_seq
        head = first or b""
        try:
            await out.prepare(request)
            if priming:
                event, position = await self._priming(stream)
                head += event
            if catch_up_cursor is not None:
                if head:
                    await out.write(head)
                    head = b""
                caught_up = await self._catch_up(out, stream, position, catch_up_cursor, resume)
                if caught_up is None:
                    await out.write(encode_comment("tether: could not replay older events"))
                    async with asyncio.timeout(self.config.client_write_timeout):
                        await out.write_eof()  # aiohttp's write_eof always drains
                    return out
                position = caught_up
            if not await self._follow(request, out, stream, position, resume, head=head):
                async with asyncio.timeout(self.config.client_write_timeout):
                    await out.write_eof()  # aiohttp's write_eof always drains: a stuck client waits
        except (ConnectionError, TimeoutError) as exc:
            log.info("stream %s: client went away (%s)", stream.stream_id, type(exc).__name__)
            if isinstance(exc, TimeoutError) and request.transport is not None:
                # A stuck client: aiohttp ending the response itself would wait on it again,
                # without a bound. Its connection is cut; it resumes with Last-Event-ID.
                request.transport.abort()
        finally:
            stream.detach()
            self.registry.client_left(stream)
            self.active -= 1
            if stream.ended:  # its client was the last thing keeping it in full
                self.registry.trim_lingering(self.config.linger_max_bytes, stream)
        return out

    async def _priming(self, stream: LiveStream) -> tuple[bytes, int]:
        """The priming event, and the position it stands for."""
        core = stream.core
        if core.kind is StreamKind.POST and core.tracker.seq == core.tracker.start_seq:
            # A resumable upstream primes its response at once: wait a moment for it, so the
            # client's first id already carries the upstream cursor.
            await stream.signal.wait(PRIMING_GRACE)
        return core.priming(self.config.client_retry_ms)

    async def _follow(
        self,
        request: web.Request,
        out: web.StreamResponse,
        stream: LiveStream,
        position: int,
        resume: ResumeClock | None = None,
        *,
        head: bytes = b"",
    ) -> bool:
        """Write what the core says, from `position`, until the stream closes for this client;
        `head` (what the response starts with, rule 5) in the same write as the first step's
        bytes. True if the response was ended here, with its last bytes (rule 5)."""
        core = stream.core
        write_timeout = self.config.client_write_timeout
        room = Room(request)
        beat = Beat(stream.signal, self.config.heartbeat_interval)
        try:
            while True:
                step = core.next_write(position)
                if isinstance(step, Send):
                    data = head + step.data if head else step.data
                    head = b""
                    last = core.ended and core.next_write(step.upto) == CLOSE
                    if last:  # rule 5: the end of the response goes with its last events
                        async with asyncio.timeout(write_timeout):
                            await out.write_eof(data)  # aiohttp's write_eof always drains
                    elif room.fits(len(data)):
                        await out.write(data)  # rule 1: it cannot wait, so needs no timeout
                    else:
                        async with asyncio.timeout(write_timeout):
                            await out.write(data)
                    beat.wrote()
                    position = step.upto
                    stream.sent(position)
                    self.metrics.events_out.inc(step.count)
                    if resume is not None:
                        resume.caught_up()
                    if last:
                        return True
                    continue
                if isinstance(step, Close):
                    async with asyncio.timeout(write_timeout):
                        await out.write_eof(head + (step.comment or b""))
                    return True
                if head:  # the response's start goes out before a break or a wait
                    await out.write(head)
                    head = b""
                    beat.wrote()
                if isinstance(step, Behind):
                    log.warning(
                        "stream %s: client fell behind the replay buffer (at %d, oldest %d);"
                        " closing it so it resumes",
                        stream.stream_id,
                        position,
                        step.oldest_seq,
                    )
                    self.metrics.slow_clients.inc()
                    return False
                position = await self._park(
                    out, stream, position, room=room, beat=beat, resume=resume
                )
        finally:
            beat.cancel()

    async def _park(
        self,
        out: web.StreamResponse,
        stream: LiveStream,
        position: int,
        *,
        room: Room,
        beat: Beat,
        resume: ResumeClock | None,
    ) -> int:
        """Nothing to write: wait for the stream to move, the only writer leaving a follower
        meanwhile (rule 4), then keep the client's connection alive if it is due (rule 3).
        Returns the position to go on from."""
        if resume is not None and not resume.waits_for_event:
            resume.caught_up()  # nothing was missed: the client is live again
        chunk = chunk_writer(out) if stream.clients == 1 and stream.follower is None else None
        if chunk is None:
            await stream.signal.wait()
        else:
            on_sent = resume.caught_up if resume else None
            follower = Follower(
                chunk, position, room=room, beat=beat, metrics=self.metrics, on_sent=on_sent
            )
            stream.follower = follower
            try:
                await stream.signal.wait()
            finally:
                if stream.follower is follower:
                    stream.follower = None
                self.written_through += follower.sent
            position = follower.position
        if beat.due:
            async with asyncio.timeout(self.config.client_write_timeout):
                await out.write(KEEPALIVE)
            beat.wrote()
        return position

    async def _catch_up(
        self,
        out: web.StreamResponse,
        stream: LiveStream,
        after_seq: int,
        cursor: str,
        resume: ResumeClock | None = None,
    ) -> int | None:
        """Re-fetch events older than the replay buffer from the upstream and write them with
        their original client-facing ids; returns the seq where the buffer takes over, or None
        if the upstream could not supply them."""
        try:
            resp = await self.upstream.get_stream(
                stream.upstream_path, stream.upstream_headers, cursor
            )
        except UPSTREAM_ERRORS as exc:
            log.warning("stream %s: catch-up request failed: %s", stream.stream_id, exc)
            return None
        catch_up = CatchUp(stream.tracker, after_seq, max_event_bytes=self.config.max_event_bytes)
        try:
            if not is_sse(resp.status, resp.headers.get("Content-Type", "")):
                log.warning("stream %s: catch-up answered %d", stream.stream_id, resp.status)
                return None
            async for chunk in resp.content.iter_any():
                batch = catch_up.feed(chunk)
                if batch:
                    async with asyncio.timeout(self.config.client_write_timeout):
                        await out.write(b"".join(batch))
                    self.metrics.events_out.inc(len(batch))
                    if resume is not None:
                        resume.caught_up()
                if catch_up.failed is not None:
                    log.warning("stream %s: catch-up: %s", stream.stream_id, catch_up.failed)
                    return None
                if catch_up.done:
                    return catch_up.position
            return None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            log.warning("stream %s: catch-up broke: %s", stream.stream_id, exc)
            return None
        finally:
            resp.release()
