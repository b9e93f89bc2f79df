"""A loopback connection-level load balancer over two or more backends, like a Service's
kube-proxy: each NEW TCP connection goes to the next backend, round robin; the bytes are not
touched. Optionally it cuts a connection once it has carried `cut_after_events` SSE events
downstream, so a client's stream breaks mid-response and it must resume (Last-Event-ID) on a
new connection, which lands on the next backend: a client moving between sidecars.

Counting is deliberately crude (the real network does not parse HTTP either): in the
backend-to-client bytes of a response whose headers say `text/event-stream`, each `\\n\\n` ends
one event. The cut happens right after the Nth terminator has been forwarded, so the client
holds exactly N whole events; the connection then drops mid-response (the chunked body never
ends): a broken path, not a server's clean end of stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from tests.support.relay import pipe, run_pair
from tether.tasks import cancel_and_wait, spawn

_HEADER_END = b"\r\n\r\n"
_EVENT_END = b"\n\n"


class EventCutter:
    """Sans-IO: fed the backend-to-client bytes of one connection, says how much of each chunk
    to forward and whether to cut the connection after it.

    `feed(chunk)` returns `(forward, cut)`: forward `forward` (a prefix of `chunk`), then drop
    the connection if `cut`. A connection carries one response (clients here do not keep
    connections alive); its event count starts after its headers if they say
    `text/event-stream`, and other responses pass untouched.
    """

    def __init__(self, cut_after_events: int | None) -> None:
        self.cut_after_events = cut_after_events
        self.events = 0
        self._head = b""
        self._is_sse: bool | None = None  # None: headers not complete yet
        self._tail = b""  # the last byte, for a terminator split across chunks

    def feed(self, chunk: bytes) -> tuple[bytes, bool]:
        if self.cut_after_events is None:
            return chunk, False
        body_start = 0
        if self._is_sse is None:
            self._head += chunk
            end = self._head.find(_HEADER_END)
            if end < 0:
                return chunk, False
            headers = self._head[:end].lower()
            self._is_sse = b"content-type: text/event-stream" in headers
            body_start = len(chunk) - (len(self._head) - end - len(_HEADER_END))
            self._head = b""
        if not self._is_sse:
            return chunk, False
        data = self._tail + chunk[body_start:]
        offset = len(self._tail)  # data index of chunk[body_start]
        pos = 0
        while (found := data.find(_EVENT_END, pos)) >= 0:
            self.events += 1
            pos = found + len(_EVENT_END)
            if self.events >= self.cut_after_events:
                return chunk[: body_start + pos - offset], True
        self._tail = data[-1:]
        return chunk, False


class Balancer:
    """Listens on 127.0.0.1:<port>; each new connection goes to the next of `backends`.

    `cut_after_events`: drop a connection once it has carried that many SSE events to the
    client (None: never). `connections` counts connections per backend port; `cuts` how many
    connections were cut.
    """

    def __init__(self, backends: list[int], *, cut_after_events: int | None = None) -> None:
        assert backends, "at least one backend"
        self.backends = backends
        self.cut_after_events = cut_after_events
        self.port = 0
        self.connections: Counter[int] = Counter()
        self.cuts = 0
        self.downstream: list[tuple[int, bytearray]] = []
        self._next = 0
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

    def _pick(self) -> int:
        port = self.backends[self._next % len(self.backends)]
        self._next += 1
        return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = self._pick()
        self.connections[backend] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        cutter = EventCutter(self.cut_after_events)
        sent = bytearray()
        self.downstream.append((backend, sent))
        a = spawn(pipe(reader, up_writer), name="balancer-up")
        b = spawn(self._pipe_down(up_reader, writer, cutter, sent), name="balancer-down")
        await run_pair(a, b, (writer, up_writer), writers=self._writers, tasks=self._tasks)

    async def _pipe_down(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cutter: EventCutter,
        sent: bytearray,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
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
                    return
