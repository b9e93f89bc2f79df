"""The benchmark's load client: SSE over raw asyncio sockets, counting events in C.

`SSEReader` is an `asyncio.Protocol` that sends one HTTP/1.1 request, parses the response
head, removes chunk framing when there is some (nginx and aiohttp re-chunk a close-delimited
upstream body) and counts events as occurrences of `data:` with `bytes.count` on whole reads
(asyncio reads up to 256 KiB at a time); every benchmark event has exactly one data line and
keep-alive comments have none. With `stamps=True` it also reads the `"t":<ns>` stamp of each
event and records `time.time_ns()` at arrival minus the stamp.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

DATA = b"data:"
_STAMP = re.compile(rb'"t":(\d+)')
_ID_LINE = re.compile(rb"^id: ?(.*)$", re.MULTILINE)


class IncompleteStreamError(RuntimeError):
    """A stream ended (or timed out) before delivering what it must."""


@dataclass
class Request:
    port: int
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def encode(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        if self.body or self.method == "POST":
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


class SSEReader(asyncio.Protocol):
    """Reads one SSE response; `done` resolves when the connection closes."""

    def __init__(self, request: bytes, *, stamps: bool = False, keep_ids: bool = False) -> None:
        self.request = request
        self.stamps = stamps
        self.keep_ids = keep_ids
        self.status = 0
        self.events = 0
        self.body_bytes = 0
        self.latencies_ns: list[int] = []
        self.ids: list[str] = []
        self.first_event_at = 0.0
        """`time.perf_counter()` when the first event's data arrived."""
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = loop.create_future()
        self.head_received: asyncio.Future[None] = loop.create_future()
        self.event_seen = asyncio.Event()
        self.transport: asyncio.Transport | None = None
        self._head = b""
        self._chunked = False
        self._chunk_left = 0
        self._chunk_buf = b""
        self._chunk_crlf = False
        self._tail = b""
        self._pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.head_received.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = b""
            self.status = int(head.split(b" ", 2)[1])
            self._chunked = b"transfer-encoding: chunked" in head.lower()
            self.head_received.set_result(None)
        if self._chunked:
            self._dechunk(data)
        elif data:
            self._payload(data)

    def _dechunk(self, data: bytes) -> None:
        buf = self._chunk_buf + data if self._chunk_buf else data
        pos = 0
        end = len(buf)
        while pos < end:
            if self._chunk_left:
                take = min(self._chunk_left, end - pos)
                self._payload(buf if pos == 0 and take == end else buf[pos : pos + take])
                pos += take
                self._chunk_left -= take
                if self._chunk_left:
                    break
                self._chunk_crlf = True
            if self._chunk_crlf:
                if end - pos < 2:
                    break
                pos += 2
                self._chunk_crlf = False
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if size == 0:
                pos = end  # the last chunk; the connection closes next
                break
            self._chunk_left = size
        self._chunk_buf = buf[pos:]

    def _payload(self, data: bytes) -> None:
        self.body_bytes += len(data)
        # An occurrence split across two reads lies within their 4 + 4 boundary bytes.
        found = data.count(DATA) + (self._tail + data[:4]).count(DATA)
        self._tail = data[-4:]
        if found:
            if not self.events:
                self.first_event_at = time.perf_counter()
            self.events += found
            self.event_seen.set()
        if self.stamps or self.keep_ids:
            now = time.time_ns()
            self._pending += data
            cut = self._pending.rfind(b"\n\n")
            if cut >= 0:
                complete, self._pending = self._pending[: cut + 2], self._pending[cut + 2 :]
                if self.stamps:
                    self.latencies_ns += [now - int(t) for t in _STAMP.findall(complete)]
                if self.keep_ids:
                    self.ids += [i.decode().strip() for i in _ID_LINE.findall(complete)]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head_received.done():
            self.head_received.set_exception(
                IncompleteStreamError(f"connection closed before the response head ({exc})")
            )
            self.head_received.exception()  # seen here; callers check `status`
        if not self.done.done():
            self.done.set_result(None)
        self.event_seen.set()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_reader(
    request: Request, *, stamps: bool = False, keep_ids: bool = False
) -> SSEReader:
    loop = asyncio.get_running_loop()
    _, reader = await loop.create_connection(
        lambda: SSEReader(request.encode(), stamps=stamps, keep_ids=keep_ids),
        "127.0.0.1",
        request.port,
    )
    return reader


def mcp_headers(session_id: str, *, sse_get: bool = False) -> dict[str, str]:
    headers = {
        "Accept": "text/event-stream" if sse_get else "application/json, text/event-stream",
        "Mcp-Session-Id": session_id,
        # 2025-06-18: no priming event, so every event the client counts is a generator event.
        "MCP-Protocol-Version": "2025-06-18",
        "Connection": "close",
    }
    if not sse_get:
        headers["Content-Type"] = "application/json"
    return headers


TOOLS_CALL = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"gen"}}'
INITIALIZE = (
    b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18",'
    b'"capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}'
)


async def initialize(port: int) -> str:
    """A new MCP session through `port`, made as a client makes one: a sidecar with a control
    plane serves only sessions it saw made or can adopt."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Accept: application/json, text/event-stream\r\nConnection: close\r\n"
        f"Content-Length: {len(INITIALIZE)}\r\n\r\n"
    )
    writer.write(head.encode() + INITIALIZE)
    try:
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"mcp-session-id":
            return value.strip().decode()
    raise IncompleteStreamError(f"port {port}: initialize gave no session: {answer[:200]!r}")


@dataclass(frozen=True)
class StreamResult:
    events: int
    body_bytes: int
    seconds: float
    latencies_ns: tuple[int, ...] = ()


async def read_post_stream(
    port: int,
    *,
    n: int,
    size: int,
    session_id: str,
    rate: float | None = None,
    timeout: float = 300.0,
) -> StreamResult:
    """POST one `tools/call`, read its SSE answer to the end; check all n+1 events came."""
    path = f"/mcp?n={n}&size={size}" + (f"&rate={rate:g}" if rate else "")
    req = Request(port, "POST", path, mcp_headers(session_id), TOOLS_CALL)
    start = time.perf_counter()
    reader = await open_reader(req, stamps=rate is not None)
    try:
        async with asyncio.timeout(timeout):
            await reader.done
    finally:
        reader.close()
    elapsed = time.perf_counter() - start
    if reader.status != 200 or reader.events != n + 1:
        raise IncompleteStreamError(
            f"port {port}: status {reader.status}, {reader.events} of {n + 1} events"
        )
    if rate is not None and len(reader.latencies_ns) != n:
        raise IncompleteStreamError(f"port {port}: {len(reader.latencies_ns)} of {n} stamps")
    return StreamResult(n + 1, reader.body_bytes, elapsed, tuple(reader.latencies_ns))


async def open_idle_streams(
    port: int, count: int, *, parallel: int = 64, timeout: float = 120.0
) -> list[SSEReader]:
    """Open `count` standalone GET streams (one session each); return once every response
    head has arrived (`parallel` connection attempts at a time, so no listen queue overflows).
    """
    readers: list[SSEReader] = []
    gate = asyncio.Semaphore(parallel)

    async def one(i: int) -> None:
        async with gate:
            session = await initialize(port)
            req = Request(port, "GET", "/mcp", mcp_headers(session, sse_get=True))
            reader = await open_reader(req)
            readers.append(reader)
            await reader.head_received
            if reader.status != 200:
                raise IncompleteStreamError(f"idle stream {i}: status {reader.status}")

    try:
        async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
            for i in range(count):
                group.create_task(one(i), name=f"open-idle-{i}")
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


async def release_idle(generator_port: int) -> int:
    """Ask the generator to send one event on every idle stream; returns how many."""
    req = Request(generator_port, "POST", "/release", {"Connection": "close"})
    reader_r, writer = await asyncio.open_connection("127.0.0.1", generator_port)
    writer.write(req.encode())
    raw = await reader_r.read()
    writer.close()
    await writer.wait_closed()
    return int(raw.rsplit(b"\r\n\r\n", 1)[1])


async def wait_each_delivers(readers: list[SSEReader], events: int, timeout: float) -> int:
    """Wait until every reader has seen `events` events; return how many did."""

    async def one(r: SSEReader) -> None:
        while r.events < events and not r.done.done():
            r.event_seen.clear()
            await r.event_seen.wait()

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(one(r) for r in readers))
    except TimeoutError:
        pass
    return sum(1 for r in readers if r.events >= events)


# --- stateless (MCP 2026-07-28) requests on kept-alive connections ---------------------------

STATELESS_VERSION = "2026-07-28"
_RPC_ID = re.compile(rb'"id":\s*(\d+)')
_STATELESS_META = (
    b'"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",'
    b'"io.modelcontextprotocol/clientCapabilities":{}%s}'
)


@dataclass(frozen=True)
class StatelessKind:
    """One kind of stateless request: its JSON-RPC method (`tools/call` calls `noop`) and
    how the generator answers it: JSON when `progress` is 0, else an SSE body of `progress`
    progress notifications and the result."""

    method: str
    progress: int = 0

    @property
    def request(self) -> str:
        return "tools/call noop" if self.method == "tools/call" else self.method

    @property
    def answer(self) -> str:
        return f"SSE ({self.progress} progress + result)" if self.progress else "JSON"

    def encode(self, port: int, rpc_id: int) -> bytes:
        """The whole HTTP request: MCP 2026-07-28 headers and `_meta`, no session."""
        token = b',"progressToken":%d' % rpc_id if self.progress else b""
        meta = _STATELESS_META % token
        if self.method == "tools/call":
            params = b'{"name":"noop","arguments":{},%s}' % meta
        else:
            params = b"{%s}" % meta
        body = b'{"jsonrpc":"2.0","id":%d,"method":"%s","params":%s}' % (
            rpc_id,
            self.method.encode(),
            params,
        )
        path = f"/mcp?progress={self.progress}" if self.progress else "/mcp"
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": STATELESS_VERSION,
            "Mcp-Method": self.method,
        }
        if self.method == "tools/call":
            headers["Mcp-Name"] = "noop"
        return Request(port, "POST", path, headers, body).encode()


class KeepAliveReader(asyncio.Protocol):
    """One client connection used for request after request: `exchange` sends a request
    and returns the status and body of its response once the whole of it has arrived (a
    Content-Length body, or a chunked one up to its last chunk; the benchmark's bodies hold
    no CR, so the last chunk is the first CRLF 0 CRLF CRLF)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self._complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(
                IncompleteStreamError(f"connection closed mid-response ({exc}): {self.buf[:200]!r}")
            )

    def _complete(self) -> None:
        assert self.waiter is not None
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        start = end + 4
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            eol = head.find(b"\r\n", at + 2)
            stop = start + int(head[at + 17 : eol if eol >= 0 else len(head)])
            if len(self.buf) < stop:
                return
        elif b"\r\ntransfer-encoding: chunked" in head:
            if self.buf.startswith(b"0\r\n\r\n", start):
                stop = start + 5
            else:
                last = self.buf.find(b"\r\n0\r\n\r\n", start)
                if last < 0:
                    return
                stop = last + 7
        else:
            self.waiter.set_exception(IncompleteStreamError(f"no length: {head[:300]!r}"))
            return
        body = bytes(self.buf[start:stop])
        del self.buf[:stop]
        status = int(head.split(b" ", 2)[1])
        self.waiter.set_result((status, body, b"\r\nconnection: close" in head))

    async def exchange(self, request: bytes) -> tuple[int, bytes, bool]:
        """Send one request; its status, body, and whether the server closes after it."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_keepalive(port: int) -> KeepAliveReader:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(KeepAliveReader, "127.0.0.1", port)
    return conn


@dataclass(frozen=True)
class StatelessResult:
    latencies_s: tuple[float, ...]
    """Request written -> whole response read, one per request."""
    seconds: float
    """Wall time of the whole load, connections already open."""


async def stateless_load(
    port: int, kind: StatelessKind, *, clients: int, per_client: int, timeout: float = 120.0
) -> StatelessResult:
    """`clients` connections, each sending `per_client` requests one after the other;
    every answer is checked (status 200, the request's id in a result, every event)."""
    conns = [await open_keepalive(port) for _ in range(clients)]
    events = kind.progress + 1 if kind.progress else 0
    latencies: list[float] = []

    async def one(c: int) -> None:
        conn = conns[c]
        for i in range(per_client):
            rpc_id = c * per_client + i + 1
            request = kind.encode(port, rpc_id)
            start = time.perf_counter()
            status, body, closing = await conn.exchange(request)
            latencies.append(time.perf_counter() - start)
            ids = _RPC_ID.findall(body)
            if (
                status != 200
                or b'"result"' not in body
                or not ids
                or int(ids[-1]) != rpc_id
                or (events and body.count(DATA) != events)
            ):
                raise IncompleteStreamError(
                    f"port {port} {kind.request}: status {status}, request id {rpc_id}, "
                    f"answer {body[:300]!r}"
                )
            if closing or conn.lost:  # the server ends the connection: reconnect (not in a latency)
                conn.close()
                conn = conns[c] = await open_keepalive(port)

    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
            for c in range(clients):
                group.create_task(one(c), name=f"stateless-client-{c}")
    finally:
        for conn in conns:
            conn.close()
    return StatelessResult(tuple(latencies), time.perf_counter() - start)
