"""A loopback connection-level load balancer over two or more backends, like a Service's
kube-proxy: each NEW TCP connection goes to the next backend, round robin; the bytes are not
touched. Optionally it cuts a connection once it has carried `cut_after_events` SSE events
downstream, so a client's stream breaks mid-response and it must resume (Last-Event-ID) on a
new connection, which lands on another backend: a client moving between sidecars. (Round
robin alone would sometimes send the resume back where it was cut, when another connection of
the client's, its GET stream, took the other backend in between: a request whose
Last-Event-ID is the last id of a cut connection goes to a backend other than that one's.)

Counting is deliberately crude (the real network does not parse HTTP either): in the
backend-to-client bytes of a response whose headers say `text/event-stream`, each `\\n\\n` ends
one event, and an event counts when it carries data (a message): priming events and the
markers of resumed streams (an id, no data) carry none, so every connection still carries N
messages. The cut happens right after the Nth message's terminator has been forwarded, so the
client holds exactly N whole messages; the connection then drops mid-response (the chunked
body never ends): a broken path, not a server's clean end of stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from dataclasses import dataclass

from tests.support.relay import run_pair
from tether.tasks import cancel_and_wait, spawn

_HEADER_END = b"\r\n\r\n"
_EVENT_END = b"\n\n"
_DATA_LINE = re.compile(rb"^data: ?\S", re.M)
_ID_LINE = re.compile(rb"^id: ?(\S+)", re.M)
_LAST_EVENT_ID = re.compile(rb"\r\nlast-event-id: ?([^\r]+)\r\n", re.I)


class EventCutter:
    """Sans-IO: fed the backend-to-client bytes of one connection, says what to forward and
    whether to cut the connection after it.

    `feed(chunk)` returns `(forward, cut)`: forward `forward`, then drop the connection if
    `cut`. A connection carries one response (clients here do not keep connections alive);
    its message count starts after its headers if they say `text/event-stream`, and other
    responses pass untouched.

    A broken cut (the default) forwards a prefix of the bytes: the response just stops, as
    when a path breaks. A clean cut (`clean=True`) ends the response properly after the Nth
    message, as a server or proxy closing the stream does (MCP allows a server to close an
    SSE stream at any event; clients resume it): the chunked body is re-framed, one chunk per
    piece forwarded, and the cut piece is followed by the last chunk.
    """

    def __init__(self, cut_after_events: int | None, *, clean: bool = False) -> None:
        self.cut_after_events = cut_after_events
        self.clean = clean
        self.events = 0
        self._head = b""
        self._is_sse: bool | None = None  # None: headers not complete yet
        self._event = b""  # the bytes of the event not yet ended
        self._chunked = _Dechunker()
        self.last_id: bytes | None = None
        """The id of the last message that counted (what the client resumes from)."""

    def feed(self, chunk: bytes) -> tuple[bytes, bool]:
        if self.cut_after_events is None:
            return chunk, False
        head = b""
        if self._is_sse is None:
            self._head += chunk
            end = self._head.find(_HEADER_END)
            if end < 0:
                return chunk, False
            headers = self._head[:end].lower()
            self._is_sse = b"content-type: text/event-stream" in headers
            if self.clean and b"transfer-encoding: chunked" not in headers:
                self._is_sse = False  # nothing to end cleanly: leave it alone
            body_start = len(chunk) - (len(self._head) - end - len(_HEADER_END))
            head, chunk = chunk[:body_start], chunk[body_start:]
            self._head = b""
        if not self._is_sse:
            return head + chunk, False
        body = self._chunked.feed(chunk) if self.clean else chunk
        upto = self._count(body)
        if not self.clean:
            return head + (chunk if upto is None else chunk[:upto]), upto is not None
        if upto is None:
            last = b"0\r\n\r\n" if self._chunked.ended else b""  # the backend's own end
            return head + _chunk(body) + last, False
        return head + _chunk(body[:upto]) + b"0\r\n\r\n", True

    def _count(self, body: bytes) -> int | None:
        """Count the messages ending in `body`; the offset in `body` right after the one that
        reaches the limit, or None."""
        assert self.cut_after_events is not None
        data = self._event + body
        offset = len(self._event)  # data index of body[0]
        pos = 0
        while (found := data.find(_EVENT_END, pos)) >= 0:
            event, pos = data[pos:found], found + len(_EVENT_END)
            if _DATA_LINE.search(event):
                self.events += 1
                if found_id := _ID_LINE.search(event):
                    self.last_id = found_id.group(1)
                if self.events >= self.cut_after_events:
                    return pos - offset
        self._event = data[pos:]
        return None


def _chunk(piece: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(piece), piece) if piece else b""


class _Dechunker:
    """The payload of an HTTP/1.1 chunked body, fed in arbitrary pieces (extensions and
    trailers ignored: the sidecars send neither)."""

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0  # payload bytes still to come in the current chunk
        self._crlf = 0  # bytes of the CRLF after a chunk's payload still to skip
        self.ended = False  # the last chunk came

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while self._buf and not self.ended:
            if self._crlf:
                skip = min(self._crlf, len(self._buf))
                self._buf, self._crlf = self._buf[skip:], self._crlf - skip
            elif self._left:
                take = self._buf[: self._left]
                out += take
                self._buf, self._left = self._buf[len(take) :], self._left - len(take)
                if not self._left:
                    self._crlf = 2
            else:
                line_end = self._buf.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(self._buf[:line_end].split(b";")[0], 16)
                self._buf = self._buf[line_end + 2 :]
                if size == 0:
                    self._buf = b""  # trailers, if any, are dropped
                    self.ended = True
                    break
                self._left = size
        return bytes(out)


@dataclass
class _Times:
    """When a proxied connection last carried bytes each way."""

    up: float = 0.0
    down: float = 0.0


class Balancer:
    """Listens on 127.0.0.1:<port>; each new connection goes to the next of `backends`.

    `cut_after_events`: drop a connection once it has carried that many SSE messages to the
    client (None: never); `clean_cuts`: end the response properly first (see `EventCutter`).
    `connections` counts connections per backend port; `cuts` how many connections were cut.
    """

    def __init__(
        self,
        backends: list[int],
        *,
        cut_after_events: int | None = None,
        clean_cuts: bool = False,
    ) -> None:
        assert backends, "at least one backend"
        self.backends = list(backends)
        self.cut_after_events = cut_after_events
        self.clean_cuts = clean_cuts
        self.port = 0
        self.connections: Counter[int] = Counter()
        self.cuts = 0
        self.unanswered: list[tuple[int, float]] = []
        """(backend, when) of each connection the backend closed while the client's last
        request on it had no answer yet: a request lost to a closing connection."""
        self.downstream: list[tuple[int, bytearray]] = []
        self._next = 0
        self._cut_at: dict[bytes, int] = {}
        """The last event id of each cut connection -> its backend (until resumed)."""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Balancer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        await cancel_and_wait(*self._tasks)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def remove(self, port: int) -> None:
        """Take a backend out of rotation, as a Service drops a terminating pod's endpoint:
        new connections go elsewhere; open ones carry on (kube-proxy leaves them alone)."""
        self.backends.remove(port)

    def add(self, port: int) -> None:
        """Put a backend (a new pod, once ready) into rotation."""
        self.backends.append(port)

    def _pick(self) -> int:
        port = self.backends[self._next % len(self.backends)]
        self._next += 1
        return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(_HEADER_END)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.transport.abort()
            return
        resumed = _LAST_EVENT_ID.search(head)
        cut_at = self._cut_at.pop(resumed.group(1), None) if resumed else None
        backend = self._pick()
        if backend == cut_at:
            backend = self._pick()
        self.connections[backend] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        cutter = EventCutter(self.cut_after_events, clean=self.clean_cuts)
        sent = bytearray()
        self.downstream.append((backend, sent))
        up_writer.write(head)
        times = _Times(up=time.monotonic())
        a = spawn(self._pipe_up(reader, up_writer, times), name="balancer-up")
        b = spawn(
            self._pipe_down(up_reader, writer, cutter, sent, backend, times=times),
            name="balancer-down",
        )
        await run_pair(a, b, (writer, up_writer), writers=self._writers, tasks=self._tasks)
        if a.cancelled() and not b.cancelled() and times.up > times.down:
            # The backend closed while the client's last bytes were unanswered.
            self.unanswered.append((backend, time.monotonic()))

    async def _pipe_up(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, times: _Times
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                times.up = time.monotonic()
                writer.write(data)
                await writer.drain()

    async def _pipe_down(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cutter: EventCutter,
        sent: bytearray,
        backend: int,
        *,
        times: _Times,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                times.down = time.monotonic()
                forward, cut = cutter.feed(data)
                sent += forward
                writer.write(forward)
                await writer.drain()
                if cut:
                    # Everything up to the cut reaches the client before the connection
                    # drops (the cut is then a close, FIN after the last whole event: an
                    # abort could make the client's kernel discard the unread tail).
                    writer.transport.set_write_buffer_limits(high=0)
                    await writer.drain()
                    self.cuts += 1
                    if cutter.last_id is not None:
                        self._cut_at[cutter.last_id] = backend
                    return
