"""The benchmark's upstream: an MCP-shaped SSE server on raw asyncio, built to be cheap.

It speaks just enough HTTP/1.1 for the harness (one request per connection; SSE bodies are
close-delimited, so there is no chunk framing to produce) and writes pre-encoded bytes in
large slices under transport flow control, so its cost per event is close to nothing:

- `POST /mcp?n=N&size=S`: N `notifications/progress` events of exactly S bytes each (ids
  1..N), then the JSON-RPC result (id N+1), then close. The body is encoded once per (N, S)
  and cached, so a measured request only copies bytes to the socket.
- `POST /mcp?n=N&size=S&rate=R`: the same events paced at R events/s, each stamped with
  `"t":<time.time_ns()>` at the moment it is written (CLOCK_REALTIME is shared by the
  processes of one machine; the client subtracts it from its receive time).
- `GET /mcp` (with `Mcp-Session-Id`): a standalone stream that stays idle; `?burst=K` first
  sends K events (ids 1..K). With `Last-Event-ID: k` it resumes: events k+1..k+K at once
  (K = 5 when not given), then idle. Every event of a GET stream carries `"k":<id>`.
- `POST /release`: every open idle GET stream gets one event (`"released":true`), so a
  client can check that each stream still delivers; the answer is the number released.
- `POST /mcp` with an `initialize` request: its JSON result, with a new `Mcp-Session-Id`
  (how a sidecar with a control plane learns a session it may serve).
- `POST /mcp` with `MCP-Protocol-Version: 2026-07-28` (stateless, no session): answered
  at once, in `data_received`, and the connection is kept alive for the next request (unless
  the request said `Connection: close`). The JSON-RPC result echoes the request's id (a
  `tools/list` result for `tools/list`, an empty `content` for anything else), as
  `application/json` with a Content-Length; with `?progress=K`, as a chunked
  `text/event-stream` instead: K `notifications/progress` events, one chunk and one
  `transport.write` each with a pass of the event loop between writes, then the result.
  See `stateless_answer`.
- Anything else: `202 Accepted`, empty (notifications, DELETE).

Every session SSE response echoes the request's `Mcp-Session-Id`, so a sidecar tracks it as
a session stream. `python -m bench.sse_generator --port P` (prints `ready` when listening).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tether.tasks import spawn

WRITE_SLICE = 1 << 20
HIGH_WATER = 4 << 20
RESUME_BURST = 5
_PROGRESS = b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":%d,'
_GET_EVENT = b'{"jsonrpc":"2.0","method":"notifications/message","params":{"k":%d,'
STATELESS_VERSION = "2026-07-28"
_STATELESS_PROGRESS = (
    b'data: {"jsonrpc":"2.0","method":"notifications/progress",'
    b'"params":{"progressToken":%s,"progress":%d,"total":%d}}\n\n'
)
_TOOLS = b'{"tools":[{"name":"noop","inputSchema":{"type":"object"}}]}'
_EMPTY_CONTENT = b'{"content":[]}'


def progress_event(k: int, size: int, stamp: int | None = None) -> bytes:
    """One `id: k` progress event of exactly `size` bytes (padded; longer if size is tiny)."""
    head = _PROGRESS % k + (b'"t":%d,' % stamp if stamp is not None else b"") + b'"pad":"'
    frame = b"id: %d\ndata: " % k
    fixed = len(frame) + len(head) + len(b'"}}\n\n')
    return frame + head + b"x" * max(0, size - fixed) + b'"}}\n\n'


def result_event(k: int, rpc_id: object = 1) -> bytes:
    result = {"jsonrpc": "2.0", "id": rpc_id, "result": {"content": []}}
    return b"id: %d\ndata: %s\n\n" % (k, json.dumps(result, separators=(",", ":")).encode())


def get_event(k: int, *, released: bool = False) -> bytes:
    tail = b'"released":true}}' if released else b'"level":"info"}}'
    return b"id: %d\ndata: " % k + _GET_EVENT % k + tail + b"\n\n"


def burst_body(n: int, size: int) -> bytes:
    return b"".join(progress_event(k, size) for k in range(1, n + 1)) + result_event(n + 1)


def stateless_answer(method: str, target: str, body: bytes) -> list[bytes]:
    """The writes that answer one stateless (2026-07-28) POST, head first.

    JSON with a Content-Length, or (`?progress=K`) a chunked SSE body: one chunk per write,
    so a proxy sees the events arrive as a server that reports progress sends them."""
    request: Any = {}
    with contextlib.suppress(ValueError):
        request = json.loads(body)
    if not isinstance(request, dict):
        request = {}
    rpc_id = json.dumps(request.get("id"), separators=(",", ":")).encode()
    result = _TOOLS if request.get("method") == "tools/list" else _EMPTY_CONTENT
    answer = b'{"jsonrpc":"2.0","id":%s,"result":%s}' % (rpc_id, result)
    query = parse_qs(urlsplit(target).query)
    if method != "POST" or "progress" not in query:
        return [
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(answer), answer)
        ]
    k = int(query["progress"][-1])
    meta = request.get("params", {}).get("_meta", {}) if request else {}
    token = json.dumps(meta.get("progressToken", 0), separators=(",", ":")).encode()
    events = [_STATELESS_PROGRESS % (token, i, k) for i in range(1, k + 1)]
    events.append(b"data: %s\n\n" % answer)
    return [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        *(b"%x\r\n%s\r\n" % (len(e), e) for e in events),
        b"0\r\n\r\n",
    ]


def sse_head(session_id: str) -> bytes:
    sid = f"Mcp-Session-Id: {session_id}\r\n".encode() if session_id else b""
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        + sid
        + b"Connection: close\r\n\r\n"
    )


class Generator:
    """State shared by the connections: cached bodies and the open idle streams."""

    def __init__(self) -> None:
        self.bodies: dict[tuple[int, int], bytes] = {}
        self.idle: dict[Connection, int] = {}
        """Open idle GET streams and the id of their last event."""

    def body(self, n: int, size: int) -> bytes:
        key = (n, size)
        if key not in self.bodies:
            self.bodies.clear()  # one cached body at a time bounds the memory
            self.bodies[key] = burst_body(n, size)
        return self.bodies[key]

    def release(self) -> int:
        streams = list(self.idle.items())
        for conn, last in streams:
            conn.transport.write(get_event(last + 1, released=True))
            self.idle[conn] = last + 1
        return len(streams)


class Connection(asyncio.Protocol):
    """One HTTP/1.1 request per connection; the answer is written by a named task."""

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.buf = bytearray()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.streaming: asyncio.Task[None] | None = None
        """A stateless SSE answer being written; requests that come meanwhile wait in `buf`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self.task is not None:
            return  # a request body we do not need, or a second request (not served)
        self.buf += data
        if self.streaming is None:
            self.serve_buffered()

    def serve_buffered(self) -> None:
        """Answer the requests in `buf`, in order, until one is incomplete or takes a task."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body_len = int(headers.get("content-length", "0"))
            if len(self.buf) - end - 4 < body_len:
                return  # wait for the whole body (the harness's bodies are tiny)
            body = bytes(self.buf[end + 4 : end + 4 + body_len])
            if headers.get("mcp-protocol-version") != STATELESS_VERSION:
                self.task = spawn(
                    self.answer(method, target, headers, body), name="generator-request"
                )
                return
            # Stateless: a JSON answer is written here and now, then the next request on this
            # connection, if one came already; an SSE answer by a task, one event per loop
            # iteration, so that a proxy reads them apart as a server's progress would come.
            del self.buf[: end + 4 + body_len]
            writes = stateless_answer(method, target, body)
            close = headers.get("connection", "").lower() == "close"
            if len(writes) > 1:
                self.streaming = spawn(self.write_apart(writes, close), name="generator-sse")
                return
            self.transport.write(writes[0])
            if close:
                self.transport.close()
                return

    async def write_apart(self, writes: list[bytes], close: bool) -> None:
        for chunk in writes:
            if self.closed:
                return
            self.transport.write(chunk)
            await asyncio.sleep(0)
        self.streaming = None
        if close:
            self.transport.close()
        else:
            self.serve_buffered()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable.set()
        self.gen.idle.pop(self, None)

    async def write(self, data: bytes) -> bool:
        """Write in slices under flow control; False once the peer has gone."""
        view = memoryview(data)
        for offset in range(0, len(view), WRITE_SLICE):
            if not self.writable.is_set():
                await self.writable.wait()
            if self.closed:
                return False
            self.transport.write(view[offset : offset + WRITE_SLICE])
        return not self.closed

    async def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        session_id = headers.get("mcp-session-id", "")
        if method == "POST" and url.path == "/release":
            released = str(self.gen.release()).encode()
            await self.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(released), released)
            )
            self.transport.close()
        elif method == "POST" and "n" in query:
            n, size = int(query["n"]), int(query.get("size", "256"))
            rpc_id: object = 1
            with contextlib.suppress(ValueError, AttributeError):
                rpc_id = json.loads(body).get("id", 1)
            if "rate" in query:
                await self.paced(session_id, n, size, float(query["rate"]), rpc_id)
            else:
                await self.write(sse_head(session_id) + self.gen.body(n, size))
                self.transport.close()
        elif method == "POST" and b'"initialize"' in body:
            answer = (
                b'{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-06-18",'
                b'"capabilities":{},"serverInfo":{"name":"bench-generator","version":"1"}}}'
            )
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: %s\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (uuid.uuid4().hex.encode(), len(answer), answer)
            )
            self.transport.close()
        elif method == "GET":
            last = headers.get("last-event-id")
            start = int(last) if last and last.isdigit() else 0
            burst = int(query.get("burst", RESUME_BURST if last else 0))
            events = b"".join(get_event(k) for k in range(start + 1, start + burst + 1))
            # An SSE comment flushes the head at once; parsers ignore it.
            await self.write(sse_head(session_id) + events + b": idle\n\n")
            if not self.closed:
                self.gen.idle[self] = start + burst
        else:
            self.transport.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()

    async def paced(self, session_id: str, n: int, size: int, rate: float, rpc_id: object) -> None:
        """Write event k at start + k/rate (several at once if the loop was late), stamped."""
        if not await self.write(sse_head(session_id)):
            return
        start = time.monotonic()
        k = 1
        while k <= n:
            due = min(n, int((time.monotonic() - start) * rate) + 1)
            if due >= k:
                stamp = time.time_ns()
                chunk = b"".join(progress_event(j, size, stamp) for j in range(k, due + 1))
                if not await self.write(chunk):
                    return
                k = due + 1
            await asyncio.sleep(max(0.0, start + (k - 1) / rate - time.monotonic()))
        await self.write(result_event(n + 1, rpc_id))
        self.transport.close()


async def serve(host: str, port: int) -> None:
    gen = Generator()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(gen), host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sse_generator", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
