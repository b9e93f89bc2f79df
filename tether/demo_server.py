"""The bundled example MCP server, written with the official SDK.

`tether demo` puts it behind the sidecar, and the integration tests use it as the "real MCP
server" tier. Its `count` tool streams progress notifications slowly enough that a stream can be
cut mid-flight, which is what Tether exists to survive. Its `notify` tool makes the server send
a notification on the session's standalone GET stream, so that stream's survival can be tested too.

For the stateless revision (2026-07-28) `touch` publishes `subscriptions/listen` events (a
resource updated, the tool list changed), and `remember` is the one tool that changes state and
must not run twice (it appends to an in-process list). Every tool carries `ToolAnnotations`
that are true of it: the sidecar re-issues a `tools/call` to a restarted server only for a tool
annotated read-only or idempotent, so the annotations are part of what the tests exercise.

Resumability comes from `MemoryEventStore`, an in-process, bounded `EventStore`: a stream that
drops can be resumed with `Last-Event-ID` while the process lives. Event ids are
`"{stream_id}:{seq}"` with one `seq` counter for the whole store, so ids are unique and
increasing, and the stream of an id is everything before its last colon.

The SDK hands one store to every session and names streams by request id ("7" in any session,
"_GET_stream" for every GET stream), so the store keeps each session's streams apart itself:
`scope_events_by_session` (ASGI middleware) tells it which session a call belongs to.

Run it with `python -m tether.demo_server --port 8931`; see `--help` for the flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import (
    EventCallback,
    EventId,
    EventMessage,
    EventStore,
    StreamId,
)
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import JSONRPCMessage, ToolAnnotations
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("tether.demo_server")

Transport = Literal["streamable-http", "sse"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8931
DEFAULT_RETRY_INTERVAL_MS = 500
# `notify` names the resource it announces as updated with this prefix and its topic.
NOTIFY_URI_PREFIX = "demo://topics/"
# Reads nothing but its arguments and the process: safe to run again after a failure.
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
# Announces a change; a second announcement says nothing the first did not (level triggers).
IDEMPOTENT = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
# Appends: every run adds one more entry, so it must run once per call.
APPENDS = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
)
# Open SSE streams never end on their own; after this long uvicorn cancels them on shutdown.
SHUTDOWN_GRACE_S = 2

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_STARTED_AT = time.monotonic()


@dataclass
class _Stream:
    """The retained events of one stream, oldest first, and how far eviction has reached."""

    events: deque[tuple[int, JSONRPCMessage | None]] = field(default_factory=deque)
    evicted_through: int = 0


@dataclass
class _SessionScope:
    """Which session the store calls of one request (and of the session's own tasks) are for:
    the `Mcp-Session-Id` of the request, or for the request that opens a session, the one its
    response names (filled in when the response starts; the session's message router runs
    in a copy of that request's context and sees the same object)."""

    session_id: str | None = None


_SCOPE: contextvars.ContextVar[_SessionScope | None] = contextvars.ContextVar(
    "tether_demo_session_scope", default=None
)
_SESSION_HEADER = b"mcp-session-id"


def scope_events_by_session(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: run each HTTP request with its session scope set (see _SessionScope)."""

    async def scoped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == _SESSION_HEADER), None)
        holder = _SessionScope(header.decode("latin-1") if header is not None else None)

        async def learn_session(message: Message) -> None:
            if message["type"] == "http.response.start" and holder.session_id is None:
                for key, value in message.get("headers", ()):
                    if key.lower() == _SESSION_HEADER:
                        holder.session_id = value.decode("latin-1")
            await send(message)

        token = _SCOPE.set(holder)
        try:
            await app(scope, receive, send if header is not None else learn_session)
        finally:
            _SCOPE.reset(token)

    return scoped


def _current_session() -> str | None:
    holder = _SCOPE.get()
    return holder.session_id if holder is not None else None


_StreamKey = tuple[str | None, StreamId]
"""(session id, the SDK's stream id): the SDK's stream ids repeat across sessions."""


class MemoryEventStore(EventStore):
    """A bounded in-memory `EventStore`: resumable while the process lives.

    Contract (as the SDK's transport expects it): both methods are coroutines that never await
    while mutating, so each call is atomic on the event loop. At most `max_events` events are
    kept across all streams; the oldest go first. `replay_events_after` answers `None` (unknown:
    the client must start over) when the id is malformed, its stream is gone, or eviction has
    removed an event after it, so a replay is never silently incomplete.
    """

    def __init__(self, max_events: int = 10_000) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.max_events = max_events
        self._seq = 0
        self._streams: dict[_StreamKey, _Stream] = {}
        # Stream of every retained event in storage order, for global oldest-first eviction.
        self._order: deque[_StreamKey] = deque()

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        """Append `message` (None = priming event) to `stream_id` and return its event id."""
        self._seq += 1
        key = (_current_session(), stream_id)
        self._streams.setdefault(key, _Stream()).events.append((self._seq, message))
        self._order.append(key)
        if len(self._order) > self.max_events:
            self._evict_oldest()
        return f"{stream_id}:{self._seq}"

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        """Send the events of `last_event_id`'s stream that came after it; return that stream."""
        stream_id, sep, seq_text = last_event_id.rpartition(":")
        if not sep or not seq_text.isdigit():
            return None
        last_seq = int(seq_text)
        key = (_current_session(), stream_id)  # another session's id finds nothing of its
        stream = self._streams.get(key)
        if stream is None or last_seq < stream.evicted_through:
            return None
        # Replay in rounds until caught up, never from one snapshot: each callback awaits the
        # client, and an event stored meanwhile is not delivered live either (the transport only
        # registers the stream for live delivery once this returns), so a snapshot would lose
        # it. No await between the last empty round and the return.
        sent = last_seq
        while True:
            stream = self._streams.get(key)
            if stream is None or sent < stream.evicted_through:
                # Evicted while we replayed: raising makes the transport close the stream, so
                # the client resumes from what it got and learns it cannot go on (None above).
                raise LookupError(f"events of {stream_id} after {sent} were evicted mid-replay")
            later = [(seq, msg) for seq, msg in stream.events if seq > sent]
            if not later:
                break
            for seq, msg in later:
                sent = seq
                if msg is not None:
                    await send_callback(EventMessage(msg, f"{stream_id}:{seq}"))
        return stream_id

    @property
    def event_count(self) -> int:
        """Events retained. (Deliberately not `__len__`: the SDK tests the store with
        `if self._event_store:`, so an empty store would be falsy and silently disabled.)"""
        return len(self._order)

    def _evict_oldest(self) -> None:
        key = self._order.popleft()
        stream = self._streams[key]
        seq, _ = stream.events.popleft()
        stream.evicted_through = seq
        if not stream.events:
            del self._streams[key]


def build_mcp_server() -> MCPServer[Any]:
    """The demo server's tools; transport-independent."""
    app: MCPServer[Any] = MCPServer(
        "tether-demo",
        instructions="Example server bundled with Tether. `count` streams progress slowly.",
    )

    remembered: list[str] = []

    @app.tool(annotations=READ_ONLY)
    async def count(n: int, ctx: Context[Any, Any], interval_ms: int = 100) -> str:
        """Count to n, reporting progress `tick i` every interval_ms milliseconds."""
        for i in range(1, n + 1):
            await asyncio.sleep(interval_ms / 1000)
            await ctx.report_progress(i, n, f"tick {i}")
        return f"counted {n}"

    @app.tool(annotations=READ_ONLY)
    async def echo(text: str) -> str:
        """Return text unchanged."""
        return text

    @app.tool(annotations=READ_ONLY)
    async def add(a: float, b: float) -> float:
        """Add two numbers."""
        return a + b

    @app.tool(annotations=IDEMPOTENT)
    async def notify(topic: str, ctx: Context[Any, Any]) -> str:
        """Send `notifications/resources/updated` for `demo://topics/{topic}`, unrelated to
        this call: the SDK sends it on the session's standalone (GET) stream, not this call's.
        (Session revision; on 2026-07-28 use `touch`.)"""
        await ctx.session.send_resource_updated(f"{NOTIFY_URI_PREFIX}{topic}")
        return f"notified {topic}"

    @app.tool(annotations=IDEMPOTENT)
    async def touch(topic: str, ctx: Context[Any, Any]) -> str:
        """Publish to `subscriptions/listen` streams (2026-07-28): `resources/updated` for
        `demo://topics/{topic}`, then `tools/list_changed`."""
        await ctx.notify_resource_updated(f"{NOTIFY_URI_PREFIX}{topic}")
        await ctx.notify_tools_changed()
        return f"touched {topic}"

    @app.tool(annotations=APPENDS)
    async def remember(text: str) -> int:
        """Append text to this process's list and return how many entries it holds: a call
        that ran twice shows as one too many."""
        remembered.append(text)
        return len(remembered)

    @app.tool(annotations=READ_ONLY)
    async def server_info() -> dict[str, Any]:
        """This process's pid and uptime: shows whether a call reached a restarted server."""
        return {"pid": os.getpid(), "uptime_s": round(time.monotonic() - _STARTED_AT, 3)}

    return app


def transport_security(allowed_hosts: Sequence[str]) -> TransportSecuritySettings | None:
    """DNS-rebinding settings accepting extra `allowed_hosts` (`*` turns the check off).

    With no extras this returns None, the SDK default: checking on for a loopback bind (Host
    must be `127.0.0.1:*`, `localhost:*` or `[::1]:*`), off otherwise. Behind a Kubernetes
    Service the Host header is the Service name, so pass e.g. `--allowed-host 'demo.ns.svc:*'`.
    """
    if "*" in allowed_hosts:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    if not allowed_hosts:
        return None
    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*", *allowed_hosts]
    origins = [f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


def build_app(
    *,
    transport: Transport,
    event_store: bool,
    retry_interval_ms: int | None,
    host: str = DEFAULT_HOST,
    allowed_hosts: Sequence[str] = (),
    max_events: int = 10_000,
) -> Starlette:
    """The ASGI app: `/mcp` (streamable-http) or `/sse` + `/messages/` (legacy sse).

    `event_store` and `retry_interval_ms` apply to streamable-http only; the legacy transport
    has no resumability. `host` is the bind address, used only for the SDK's DNS-rebinding
    defaults.
    """
    mcp = build_mcp_server()
    security = transport_security(allowed_hosts)
    if transport == "sse":
        return mcp.sse_app(transport_security=security, host=host)
    app = mcp.streamable_http_app(
        event_store=MemoryEventStore(max_events) if event_store else None,
        retry_interval=retry_interval_ms,
        transport_security=security,
        host=host,
    )
    app.add_middleware(scope_events_by_session)
    return app


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket; bound here so `--port 0` works and the ready line shows the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A restarted server must get its port back while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling: `serve` handles SIGTERM/SIGINT itself.

    uvicorn re-raises a caught SIGTERM once it has shut down, so the process would end "killed
    by signal" instead of with status 0.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _announce_when_started(app: Starlette, announce: Callable[[], None]) -> None:
    """Call `announce` once the app's lifespan startup (the SDK session manager) is done."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as state:
            announce()
            yield state

    app.router.lifespan_context = lifespan


async def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    transport: Transport = "streamable-http",
    event_store: bool = True,
    retry_interval_ms: int | None = DEFAULT_RETRY_INTERVAL_MS,
    allowed_hosts: Sequence[str] = (),
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set (or SIGTERM/SIGINT when `stop` is None), then shut down."""
    app = build_app(
        transport=transport,
        event_store=event_store,
        retry_interval_ms=retry_interval_ms,
        host=host,
        allowed_hosts=allowed_hosts,
    )
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    path = "/sse" if transport == "sse" else "/mcp"
    shown_host = f"[{host}]" if ":" in host else host
    _announce_when_started(
        app,
        lambda: log.info(
            "demo MCP server ready on http://%s:%d%s (transport=%s, event_store=%s, pid=%d)",
            shown_host,
            bound_port,
            path,
            transport,
            "on" if event_store and transport == "streamable-http" else "off",
            os.getpid(),
        ),
    )
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = _Server(config)

    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else asyncio.Event()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)

    async def stop_on_request() -> None:
        await stop.wait()
        server.should_exit = True

    try:
        async with asyncio.TaskGroup() as tg:
            stopper = tg.create_task(stop_on_request(), name="demo-server-stop")
            await server.serve(sockets=[sock])
            stopper.cancel()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        sock.close()
    log.info("demo MCP server stopped")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tether.demo_server",
        description="Example MCP server (official SDK) with a slow, progress-reporting tool.",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    p.add_argument(
        "--transport",
        choices=["streamable-http", "sse"],
        default="streamable-http",
        help="streamable-http serves /mcp; sse serves the legacy GET /sse + POST /messages/",
    )
    p.add_argument(
        "--no-event-store",
        dest="event_store",
        action="store_false",
        help="no resumability: streams carry no event ids (streamable-http only)",
    )
    p.add_argument(
        "--retry-interval-ms",
        type=int,
        default=DEFAULT_RETRY_INTERVAL_MS,
        help="`retry:` sent in priming events; 0 sends none (default %(default)s)",
    )
    p.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        default=[],
        metavar="HOST[:PORT|:*]",
        help="also accept this Host header (repeatable), e.g. 'demo.tether.svc:*' behind a "
        "Kubernetes Service; '*' disables DNS-rebinding protection",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(
            serve(
                args.host,
                args.port,
                transport=args.transport,
                event_store=args.event_store,
                retry_interval_ms=args.retry_interval_ms or None,
                allowed_hosts=args.allowed_hosts,
            )
        )
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", args.host, args.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
