"""A deterministic fake MCP Streamable HTTP server whose SSE events are numbered 1, 2, 3, ...

Resilience tests SIGKILL it mid-stream, restart it on the same port and check that the client
behind the proxy saw every event exactly once, in order. That works because every event is a
pure function of (stream, k): the stream's parameters are encoded in its event ids, so a fresh
process resumes any stream from a `Last-Event-ID`, like a server with a persistent event store.

Event ids are `<stream>/<k>`:

- `count.<N>.<interval_ms>.<ref>/<k>`: the SSE response to `tools/call count` (a POST).
  `<ref>` is the unpadded urlsafe base64 of the JSON `[<jsonrpc id>, <progressToken>]`.
  Events k = 1..N are `notifications/progress` (progress k, total N); event k = N+1 is the
  JSON-RPC response `counted N`, after which the stream ends. With `priming`, `<stream>/0`
  is an empty-data priming event sent first.
- `get/<k>`: the standalone GET stream, `notifications/message` with `data.k = k` for
  k = 1, 2, ... forever, one every `interval_ms`.

`GET /mcp` with `Last-Event-ID: <stream>/<k>` resumes that stream at k+1 (after re-sending the
last `overlap` events, if set). Run it with `python -m tests.support.numbered_upstream --port P`
(`--help` lists the flags) or in-process with `make_app(...)`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger("tests.numbered_upstream")

SESSION_HEADER = "Mcp-Session-Id"
PROTOCOL_HEADER = "MCP-Protocol-Version"
STATELESS_VERSION = "2026-07-28"
DEFAULT_VERSION = "2025-11-25"
GET_STREAM = "get"
# The `retry:` (ms) of the event sent before a `poll_every` close.
POLL_RETRY_MS = 50

JsonObject = dict[str, Any]


@dataclass(frozen=True)
class Flags:
    """How the server misbehaves; every field is also a CLI flag (`no_ids` is `--no-ids`)."""

    no_ids: bool = False
    """Emit no `id:` lines, like a server without an event store."""
    crlf: bool = False
    """End SSE lines with CRLF instead of LF."""
    overlap: int = 0
    """On resume, first re-send this many already-sent events (exercises dedup)."""
    poll_every: int = 0
    """After this many new events in one response, send `id`+empty `data`+`retry` and close."""
    malformed: bool = False
    """Send an event whose data is not UTF-8 right after event 3."""
    oversized: int = 0
    """Pad event 3 so its JSON data line is this many bytes (if larger than it already is)."""
    die_after: int = 0
    """After writing this many events in one response, `os._exit(1)` (a crash mid-stream)."""
    interval_ms: int = 20
    """Pause before each new event of the GET stream, and of POST streams by default."""
    strict_sessions: bool = False
    """Answer 404 to unknown or missing session ids (default: accept any, so restarts keep
    sessions)."""
    priming: bool = False
    """Start each SSE response with a priming event `id: <stream>/<k>` and empty data."""
    json_as_sse: bool = False
    """Answer non-streaming requests (initialize, tools/list, ...) as a one-event SSE stream."""
    single_get_stream: bool = False
    """Like the SDK server: a GET stream of a session that already has one open is answered
    409 Conflict. A closed stream is noticed only if the server cancels handlers when their
    client goes away (`handler_cancellation=True`, as `main` and `serve_app` in
    tests/integration/test_ownership.py run it)."""


@dataclass
class _State:
    sessions: set[str] = field(default_factory=set)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    get_streams: dict[str, int] = field(default_factory=dict)
    """Session id -> standalone GET streams open now (fresh or resumed)."""


FLAGS = web.AppKey("flags", Flags)
STATE = web.AppKey("state", _State)


# --- the pure part: stream references, event ids and event bytes ---------------------------


@dataclass(frozen=True)
class StreamRef:
    """Everything needed to regenerate a stream; `name` is its id prefix."""

    name: str
    total: int | None
    """N for a `count` stream (whose last event is k = N+1); None for the endless GET stream."""
    interval_ms: int
    rpc_id: Any = None
    progress_token: Any = None

    @property
    def last_k(self) -> int | None:
        return None if self.total is None else self.total + 1


def count_stream(n: int, interval_ms: int, rpc_id: Any, progress_token: Any) -> StreamRef:
    ref = json.dumps([rpc_id, progress_token], separators=(",", ":")).encode()
    b64 = base64.urlsafe_b64encode(ref).rstrip(b"=").decode()
    return StreamRef(f"count.{n}.{interval_ms}.{b64}", n, interval_ms, rpc_id, progress_token)


def get_stream(interval_ms: int) -> StreamRef:
    return StreamRef(GET_STREAM, None, interval_ms)


def event_id(stream: StreamRef, k: int) -> str:
    return f"{stream.name}/{k}"


def parse_event_id(value: str, *, get_interval_ms: int) -> tuple[StreamRef, int] | None:
    """The stream and k of an event id, or None if it is not one of ours."""
    name, sep, k_text = value.rpartition("/")
    if not sep or not k_text.isdigit():
        return None
    k = int(k_text)
    if name == GET_STREAM:
        return get_stream(get_interval_ms), k
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "count" or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    try:
        decoded = json.loads(base64.urlsafe_b64decode(parts[3] + "=" * (-len(parts[3]) % 4)))
    except (binascii.Error, ValueError):
        return None
    if not (isinstance(decoded, list) and len(decoded) == 2):
        return None
    stream = count_stream(int(parts[1]), int(parts[2]), decoded[0], decoded[1])
    if stream.name != name or stream.last_k is None or k > stream.last_k:
        return None
    return stream, k


def event_message(stream: StreamRef, k: int, *, oversized: int = 0) -> bytes:
    """The JSON-RPC message of event k, as compact JSON."""
    msg: JsonObject
    if stream.total is not None and k == stream.total + 1:
        msg = {
            "jsonrpc": "2.0",
            "id": stream.rpc_id,
            "result": {"content": [{"type": "text", "text": f"counted {stream.total}"}]},
        }
    elif stream.total is not None:
        params: JsonObject = {
            "progressToken": stream.progress_token,
            "progress": k,
            "total": stream.total,
        }
        msg = {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}
    else:
        params = {"level": "info", "logger": "numbered-upstream", "data": {"k": k}}
        msg = {"jsonrpc": "2.0", "method": "notifications/message", "params": params}
    data = json.dumps(msg, separators=(",", ":")).encode()
    if oversized and k == 3 and "params" in msg:
        # `_meta` is allowed in any params; pad it so the whole data line is `oversized` bytes.
        params["_meta"] = {"padding": ""}
        base = len(json.dumps(msg, separators=(",", ":")))
        params["_meta"]["padding"] = "x" * max(0, oversized - base)
        data = json.dumps(msg, separators=(",", ":")).encode()
    return data


def sse_event(data: bytes, *, eid: str | None, eol: bytes, retry_ms: int | None = None) -> bytes:
    lines = [] if eid is None else [b"id: " + eid.encode()]
    lines.append(b"data: " + data)
    if retry_ms is not None:
        lines.append(b"retry: %d" % retry_ms)
    return eol.join(lines) + eol + eol


# --- HTTP ------------------------------------------------------------------------------------


@web.middleware
async def _log_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    log.info(
        "%s %s session=%s last-event-id=%s",
        request.method,
        request.path_qs,
        request.headers.get(SESSION_HEADER, "-"),
        request.headers.get("Last-Event-ID", "-"),
    )
    return await handler(request)


def _jsonrpc_error(rpc_id: Any, code: int, message: str) -> JsonObject:
    return {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": code, "message": message}}


class _Handler:
    def __init__(self, flags: Flags, state: _State) -> None:
        self.flags = flags
        self.state = state
        self.eol = b"\r\n" if flags.crlf else b"\n"

    # Sessions ------------------------------------------------------------------------------

    def _stateless(self, request: web.Request) -> bool:
        return (
            request.headers.get(PROTOCOL_HEADER) == STATELESS_VERSION
            and SESSION_HEADER not in request.headers
        )

    def _session_error(self, request: web.Request) -> web.Response | None:
        """404 when strict sessions are on and the request's session is missing or unknown."""
        if not self.flags.strict_sessions or self._stateless(request):
            return None
        if request.headers.get(SESSION_HEADER) in self.state.sessions:
            return None
        return web.json_response(_jsonrpc_error(None, -32001, "Session not found"), status=404)

    def _session_headers(self, request: web.Request) -> dict[str, str]:
        sid = request.headers.get(SESSION_HEADER)
        return {SESSION_HEADER: sid} if sid else {}

    # Routes --------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            return await self._post(request)
        if request.method == "GET":
            return await self._get(request)
        if request.method == "DELETE":
            if error := self._session_error(request):
                return error
            self.state.sessions.discard(request.headers.get(SESSION_HEADER, ""))
            return web.Response(status=200)
        return web.Response(status=405, headers={"Allow": "GET, POST, DELETE"})

    async def _post(self, request: web.Request) -> web.StreamResponse:
        try:
            msg = json.loads(await request.read())
        except ValueError:
            return web.json_response(_jsonrpc_error(None, -32700, "Parse error"), status=400)
        if not isinstance(msg, dict):
            return web.json_response(
                _jsonrpc_error(None, -32600, "Batches unsupported"), status=400
            )
        method, rpc_id = msg.get("method"), msg.get("id")
        raw_params = msg.get("params")
        params: JsonObject = raw_params if isinstance(raw_params, dict) else {}

        if method == "initialize":
            headers = {}
            if not self._stateless(request):
                sid = secrets.token_hex(16)
                self.state.sessions.add(sid)
                headers[SESSION_HEADER] = sid
            result = {
                "protocolVersion": params.get("protocolVersion", DEFAULT_VERSION),
                "capabilities": {"tools": {}, "logging": {}},
                "serverInfo": {"name": "numbered-upstream", "version": "1"},
            }
            reply = {"jsonrpc": "2.0", "id": rpc_id, "result": result}
            return await self._reply(request, reply, headers)

        if error := self._session_error(request):
            return error
        headers = self._session_headers(request)
        if method is None or rpc_id is None:  # a notification, or a response to the server
            return web.Response(status=202, headers=headers)
        if method == "tools/call" and params.get("name") == "count":
            return await self._call_count(request, rpc_id, params, headers)
        if method == "tools/list":
            reply = {"jsonrpc": "2.0", "id": rpc_id, "result": _TOOLS}
            return await self._reply(request, reply, headers)
        if method == "ping":
            reply = {"jsonrpc": "2.0", "id": rpc_id, "result": {}}
            return await self._reply(request, reply, headers)
        return await self._reply(
            request, _jsonrpc_error(rpc_id, -32601, f"Method not found: {method}"), headers
        )

    async def _call_count(
        self, request: web.Request, rpc_id: Any, params: JsonObject, headers: dict[str, str]
    ) -> web.StreamResponse:
        args = params.get("arguments") or {}
        n, interval = args.get("n"), args.get("interval_ms", self.flags.interval_ms)
        if not (isinstance(n, int) and n >= 0 and isinstance(interval, int) and interval >= 0):
            error = _jsonrpc_error(rpc_id, -32602, "count needs n >= 0 and interval_ms >= 0")
            return await self._reply(request, error, headers)
        meta = params.get("_meta") or {}
        # The spec sends progress only with a token; the point here is numbered events, so
        # without one the request id stands in.
        token = meta.get("progressToken", rpc_id) if isinstance(meta, dict) else rpc_id
        stream = count_stream(n, interval, rpc_id, token)
        return await self._stream(request, stream, first_k=1, resumed_after=0, headers=headers)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if error := self._session_error(request):
            return error
        headers = self._session_headers(request)
        session = request.headers.get(SESSION_HEADER, "")
        last = request.headers.get("Last-Event-ID")
        if last is not None and last.rpartition("/")[0] != GET_STREAM:
            return await self._get_stream(request, headers)  # resuming a POST's stream
        if self.flags.single_get_stream and self.state.get_streams.get(session):
            return web.Response(status=409, text="Conflict: Only one SSE stream is allowed")
        self.state.get_streams[session] = self.state.get_streams.get(session, 0) + 1
        try:
            return await self._get_stream(request, headers)
        finally:
            self.state.get_streams[session] -= 1
            if not self.state.get_streams[session]:
                del self.state.get_streams[session]

    async def _get_stream(
        self, request: web.Request, headers: dict[str, str]
    ) -> web.StreamResponse:
        last = request.headers.get("Last-Event-ID")
        if last is None:
            if self._stateless(request):
                return web.Response(status=405, text="stateless: no standalone stream")
            stream = get_stream(self.flags.interval_ms)
            return await self._stream(request, stream, first_k=1, resumed_after=0, headers=headers)
        parsed = parse_event_id(last, get_interval_ms=self.flags.interval_ms)
        if parsed is None:
            return web.Response(status=400, text=f"unknown Last-Event-ID {last!r}")
        stream, k = parsed
        first = max(1, k + 1 - self.flags.overlap)
        return await self._stream(request, stream, first_k=first, resumed_after=k, headers=headers)

    # Writing -------------------------------------------------------------------------------

    async def _reply(
        self, request: web.Request, reply: JsonObject, headers: dict[str, str] | None = None
    ) -> web.StreamResponse:
        if not self.flags.json_as_sse:
            return web.json_response(reply, headers=headers)
        resp = self._sse_response(headers or {})
        await resp.prepare(request)
        data = json.dumps(reply, separators=(",", ":")).encode()
        await resp.write(sse_event(data, eid=None, eol=self.eol))
        await resp.write_eof()
        return resp

    def _sse_response(self, headers: dict[str, str]) -> web.StreamResponse:
        return web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **headers,
            }
        )

    async def _stream(
        self,
        request: web.Request,
        stream: StreamRef,
        *,
        first_k: int,
        resumed_after: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Send events first_k.. of `stream`; those up to `resumed_after` are re-sends."""
        flags, eol = self.flags, self.eol
        resp = self._sse_response(headers)
        await resp.prepare(request)
        written = new = 0
        try:
            if flags.priming:
                eid = None if flags.no_ids else event_id(stream, first_k - 1)
                await resp.write(sse_event(b"", eid=eid, eol=eol))
            k = first_k
            while stream.last_k is None or k <= stream.last_k:
                if k > resumed_after:
                    if await self._stopped_within(stream.interval_ms / 1000):
                        break
                    new += 1
                eid = None if flags.no_ids else event_id(stream, k)
                data = event_message(stream, k, oversized=flags.oversized)
                await resp.write(sse_event(data, eid=eid, eol=eol))
                written += 1
                if flags.die_after and written >= flags.die_after:
                    # transport.write sends at once when its buffer is empty, as it is on
                    # loopback, so the event is on the wire before the process vanishes.
                    log.warning("dying after %d events of %s", written, stream.name)
                    os._exit(1)
                if flags.malformed and k == 3:
                    await resp.write(b"event: malformed" + eol + b"data: \xff\xfe\xfd" + eol + eol)
                more = stream.last_k is None or k < stream.last_k
                if flags.poll_every and new and new % flags.poll_every == 0 and more:
                    # As 2025-11-25 servers may: say where to resume and close the response.
                    await resp.write(sse_event(b"", eid=eid, eol=eol, retry_ms=POLL_RETRY_MS))
                    break
                k += 1
            await resp.write_eof()
        except ConnectionResetError:
            log.info("client went away from %s after %d events", stream.name, written)
        return resp

    async def _stopped_within(self, seconds: float) -> bool:
        """Pace the stream; True (at once) if the server is shutting down."""
        if self.state.stopping.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.state.stopping.wait(), seconds)
        return self.state.stopping.is_set()


_TOOLS: JsonObject = {
    "tools": [
        {
            "name": "count",
            "description": "Stream progress 1..n, one event every interval_ms.",
            "inputSchema": {
                "type": "object",
                "properties": {"n": {"type": "integer"}, "interval_ms": {"type": "integer"}},
                "required": ["n"],
            },
        }
    ]
}


async def _on_shutdown(app: web.Application) -> None:
    # Endless streams would otherwise hold runner cleanup until its timeout.
    app[STATE].stopping.set()


def make_app(flags: Flags | None = None, **kwargs: Any) -> web.Application:
    """The server as an aiohttp app: `make_app(overlap=2)` or `make_app(Flags(overlap=2))`."""
    flags = flags if flags is not None else Flags(**kwargs)
    app = web.Application(middlewares=[_log_requests])
    app[FLAGS] = flags
    app[STATE] = _State()
    handler = _Handler(flags, app[STATE])
    app.router.add_route("*", "/mcp", handler.handle)
    app.on_shutdown.append(_on_shutdown)
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.support.numbered_upstream",
        description="Fake MCP Streamable HTTP server with numbered, resumable events.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--no-ids", action="store_true", help=_doc("no_ids"))
    p.add_argument("--crlf", action="store_true", help=_doc("crlf"))
    p.add_argument("--overlap", type=int, default=0, metavar="K", help=_doc("overlap"))
    p.add_argument("--poll-every", type=int, default=0, metavar="K", help=_doc("poll_every"))
    p.add_argument("--malformed", action="store_true", help=_doc("malformed"))
    p.add_argument("--oversized", type=int, default=0, metavar="BYTES", help=_doc("oversized"))
    p.add_argument("--die-after", type=int, default=0, metavar="K", help=_doc("die_after"))
    p.add_argument("--interval-ms", type=int, default=Flags.interval_ms, help=_doc("interval_ms"))
    p.add_argument("--strict-sessions", action="store_true", help=_doc("strict_sessions"))
    p.add_argument("--priming", action="store_true", help=_doc("priming"))
    p.add_argument("--json-as-sse", action="store_true", help=_doc("json_as_sse"))
    p.add_argument("--single-get-stream", action="store_true", help=_doc("single_get_stream"))
    return p


def _doc(name: str) -> str:
    return {
        "no_ids": "emit no id: lines (a server without an event store)",
        "crlf": "CRLF line endings",
        "overlap": "on resume, re-send the last K already-sent events first",
        "poll_every": "after every K new events send id + empty data + retry: 50 and close",
        "malformed": "send a non-UTF-8 event after event 3",
        "oversized": "event 3 carries a data line of BYTES bytes",
        "die_after": "os._exit(1) after writing K events of one response",
        "interval_ms": "pause before each new event (default %(default)s)",
        "strict_sessions": "404 for unknown or missing session ids",
        "priming": "start each SSE response with a priming event",
        "json_as_sse": "answer non-streaming requests as one-event SSE",
        "single_get_stream": "409 for a second GET stream of a session while one is open",
    }[name]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s numbered-upstream[{os.getpid()}] %(message)s",
        stream=sys.stderr,
    )
    values = vars(args)
    host, port = values.pop("host"), values.pop("port")
    flags = Flags(**values)

    def ready(*_: object) -> None:
        log.info("ready on http://%s:%d/mcp with %s", host, port, flags)

    web.run_app(
        make_app(flags),
        host=host,
        port=port,
        print=ready,
        shutdown_timeout=2.0,
        handler_cancellation=flags.single_get_stream,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
