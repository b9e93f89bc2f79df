"""The proxied port: MCP Streamable HTTP and legacy HTTP+SSE through one catch-all handler.

How a request flows:
- Any method and path is forwarded to `upstream + path` with end-to-end headers; hop-by-hop
  headers are dropped, status codes and bodies pass through unchanged. Request bodies stream
  through, bounded by `max_request_body_bytes`.
- An SSE response that belongs to a session (an `Mcp-Session-Id` on the request or response, or
  a legacy `GET /sse`) becomes a `LiveStream`: a pump task reads the upstream, the tracker names
  and buffers events, and the client handler writes them. If the upstream breaks before the
  stream is complete, the pump reconnects with the upstream's `Last-Event-ID` under the
  reconnect policy while the client's connection stays open.
- An SSE response with no session (MCP 2026-07-28 is stateless) is piped through untouched.
- A `GET` whose `Last-Event-ID` is an id this sidecar minted is served from the replay buffer,
  then live.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import SidecarConfig
from sidecar.continuity import Continuity, default_owner, session_lost
from sidecar.guard import OriginPolicy, fingerprint
from sidecar.metrics import Metrics
from sidecar.reconnect import GiveUp, Outcome, ReconnectPolicy
from sidecar.sse import SSEError, SSEEvent, SSEParser, encode_comment, encode_event
from sidecar.streams import LiveStream, Registry, Session
from sidecar.tracker import EventId, Gap, StreamKind, StreamTracker
from tether.model import OwnerName, parse_owner
from tether.tasks import cancel_and_wait, spawn

log = logging.getLogger("tether.sidecar.proxy")

SESSION_HEADER = "Mcp-Session-Id"
PROTOCOL_HEADER = "MCP-Protocol-Version"
LAST_EVENT_ID = "Last-Event-ID"
SSE_TYPE = "text/event-stream"
# First revision whose clients expect a priming event (an id with empty data) on SSE streams.
PRIMING_SINCE = "2025-11-25"
SESSION_LOST = "session lost"

_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Not forwarded upstream: Host names the sidecar; Accept-Encoding would only make the upstream
# compress over the pod's loopback for the sidecar to decompress; Last-Event-ID is answered here.
_NOT_UPSTREAM = _HOP_BY_HOP | {"host", "accept-encoding", "last-event-id", "content-length"}
_NOT_DOWNSTREAM = _HOP_BY_HOP | {"content-length"}


def keepalive_socket(addr_info: Any, *, dead_after: float) -> socket.socket:
    """An upstream socket that notices a dead peer on its own.

    The sidecar mostly only reads from the upstream, so a peer that vanished without a reset
    (a network cut, a pod replaced) would never be noticed. TCP keepalive probes after half of
    `dead_after` of silence, three probes over the other half, find it; TCP_USER_TIMEOUT bounds
    unacknowledged sends the same way. A live but idle peer answers the probes."""
    family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(dead_after / 2))
    interval = max(1, int(dead_after / 6))
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", int(dead_after * 1000)),
    ):
        option = getattr(socket, name, None)
        if option is not None:  # Linux has them all; others keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return sock


class BodyTooLargeError(Exception):
    """The client's request body exceeded the configured limit."""


def _drop_connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    listed: set[str] = set()
    for value in headers.getall("Connection", []):
        listed.update(v.strip().lower() for v in value.split(",") if v.strip())
    return listed


def upstream_request_headers(request: web.Request) -> CIMultiDict[str]:
    """End-to-end headers of the client request, plus the usual X-Forwarded-* trio."""
    extra = _drop_connection_listed(request.headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lname = name.lower()
        if lname in _NOT_UPSTREAM or lname in extra:
            continue
        out.add(name, value)
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out.setdefault("X-Forwarded-Proto", request.scheme)
    out.setdefault("X-Forwarded-Host", request.host)
    return out


def downstream_headers(headers: CIMultiDictProxy[str], *, keep_length: bool) -> CIMultiDict[str]:
    extra = _drop_connection_listed(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        if (lname in _NOT_DOWNSTREAM and not (keep_length and lname == "content-length")) or (
            lname in extra
        ):
            continue
        out.add(name, value)
    return out


def jsonrpc_error_body(message: str, request_id: Any = None, code: int = -32000) -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    ).encode()


def error_response(status: int, message: str) -> web.Response:
    """An HTTP error in JSON-RPC shape, which MCP clients already know how to read."""
    return web.Response(
        status=status,
        body=jsonrpc_error_body(f"tether: {message}"),
        content_type="application/json",
    )


def request_ids(body: bytes) -> tuple[set[Any], str | None, str | None]:
    """Ids of the JSON-RPC requests in a POST body, plus the method and requested protocol
    version when the body is an `initialize` request. Unparseable bodies give no ids."""
    try:
        msg = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return set(), None, None
    msgs = msg if isinstance(msg, list) else [msg]
    ids: set[Any] = set()
    method: str | None = None
    version: str | None = None
    for m in msgs:
        if not isinstance(m, dict):
            continue
        if "method" in m and isinstance(m.get("id"), int | str):
            ids.add(m["id"])
        if m.get("method") == "initialize":
            method = "initialize"
            params = m.get("params")
            if isinstance(params, dict) and isinstance(params.get("protocolVersion"), str):
                version = params["protocolVersion"]
    return ids, method, version


def answered_ids(data: str) -> list[Any]:
    """Ids of the JSON-RPC responses carried by one event's data (cheap pre-check first)."""
    if '"result"' not in data and '"error"' not in data:
        return []
    try:
        msg = json.loads(data)
    except ValueError:
        return []
    msgs = msg if isinstance(msg, list) else [msg]
    return [
        m["id"]
        for m in msgs
        if isinstance(m, dict) and "method" not in m and isinstance(m.get("id"), int | str)
    ]


class Proxy:
    """Request handling for the proxied port; owns the upstream client and the registry."""

    def __init__(self, config: SidecarConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.registry = Registry(config.tracker)
        owner: OwnerName = parse_owner(config.owner) if config.owner else default_owner()
        self.continuity = Continuity(
            registry=self.registry,
            upstream=config.upstream,
            control_plane=config.control_plane,
            security=config.control_plane_security,
            owner=owner,
            report_interval=config.report_interval,
        )
        self._client: aiohttp.ClientSession | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._base = config.upstream_base
        self._base_parts = urlsplit(self._base)
        self.origins = OriginPolicy(config.allowed_origins)
        if self.continuity.reporter is not None:
            metrics.watch_reporter(self.continuity.reporter)
        self.active_streams = 0
        """SSE responses being written to clients now (bounded by `max_streams`)."""

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        dead_after = self.config.upstream_dead_after
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,
                enable_cleanup_closed=True,
                socket_factory=lambda info: keepalive_socket(info, dead_after=dead_after),
            ),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self.config.connect_timeout, sock_read=None
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        self._janitor = spawn(self._sweep_forever(), name="sidecar-janitor")
        await self.continuity.start()

    async def drain(self) -> None:
        """End every stream cleanly, without failing its open requests: writers flush what
        they have and close, so clients reconnect (with Last-Event-ID) to another sidecar."""
        streams = list(self.registry.streams.values())
        for stream in streams:
            stream.end("sidecar shutting down")
        await cancel_and_wait(*(s.pump for s in streams))

    async def stop(self) -> None:
        """Stop the pumps, flush the final positions to the control plane, close."""
        await self.drain()
        await cancel_and_wait(self._janitor)
        for stream in self.registry.streams.values():
            self.continuity.report_position(stream)
        await self.continuity.stop()
        if self._client is not None:
            await self._client.close()

    @property
    def client(self) -> aiohttp.ClientSession:
        assert self._client is not None, "Proxy.start() not called"
        return self._client

    async def _sweep_forever(self) -> None:
        cfg = self.config
        period = min(5.0, cfg.orphan_timeout / 2, cfg.stream_linger / 2)
        while True:
            await asyncio.sleep(period)
            stale = self.registry.sweep(
                now=time.monotonic(),
                orphan_timeout=cfg.orphan_timeout,
                linger=cfg.stream_linger,
                session_idle=cfg.session_idle_timeout,
            )
            await cancel_and_wait(*(s.pump for s in stale))
            self.metrics.refresh(self.registry)

    # -- entry point ---------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and not self.origins.allows(origin):
            log.warning("%s %s: origin %r refused", request.method, request.path, origin[:200])
            self.metrics.refused.labels("origin").inc()
            return error_response(403, f"origin {origin[:200]!r} is not allowed")
        if request.method in ("GET", "POST") and self.active_streams >= self.config.max_streams:
            self.metrics.refused.labels("too_many_streams").inc()
            log.warning(
                "refusing %s %s: %d streams open", request.method, request.path, self.active_streams
            )
            busy = error_response(503, "too many open streams; retry shortly")
            busy.headers["Retry-After"] = "1"
            return busy
        if request.method == "POST" and not self._legacy_post_allowed(request):
            return error_response(404, "session not found")
        client_session = request.headers.get(SESSION_HEADER)
        # A session this sidecar does not know may live on in the control plane.
        sess = await self.continuity.adopt(client_session) if client_session else None
        if sess is not None and not self._credential_matches(request, sess):
            return error_response(404, "session not found")
        if request.method == "GET":
            last_id = request.headers.get(LAST_EVENT_ID)
            if last_id is not None:
                event_id = EventId.parse(last_id)
                if event_id is not None:
                    return await self._resume(request, event_id, sess)

        declared = request.content_length
        if declared is not None and declared > self.config.max_request_body_bytes:
            return self._too_large()
        body_parts: list[bytes] = []
        headers = upstream_request_headers(request)
        if sess is not None and sess.upstream_session_id != client_session:
            headers[SESSION_HEADER] = sess.upstream_session_id
        try:
            resp = await self._send(request, headers, body_parts)
            if sess is not None and request.method != "DELETE" and resp.status in (400, 404):
                retried = await self._after_session_lost(request, sess, resp, headers, body_parts)
                if isinstance(retried, web.Response):
                    return retried
                resp = retried
        except BodyTooLargeError:
            return self._too_large()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.metrics.upstream_errors.inc()
            log.warning("%s %s: upstream unreachable: %s", request.method, request.path, exc)
            return error_response(502, f"upstream unreachable: {exc or type(exc).__name__}")
        # _relay owns `resp` from here: it releases it, or hands it to a stream's pump.
        return await self._relay(request, resp, headers, b"".join(body_parts))

    def _credential_matches(self, request: web.Request, sess: Session) -> bool:
        """A session belongs to the credential that created it; first sight records it."""
        if not self.config.session_binding:
            return True
        presented = fingerprint(request.headers.get("Authorization"))
        if sess.credential_fingerprint is None:
            sess.credential_fingerprint = presented
            return True
        if sess.credential_fingerprint == presented:
            return True
        return self._refuse_credential(request, f"session {sess.session_id}")

    def _legacy_credential_matches(self, request: web.Request, stream: LiveStream) -> bool:
        """A legacy stream belongs to the credential of the GET /sse that opened it."""
        if not self.config.session_binding or stream.credential_fingerprint is None:
            return True
        if stream.credential_fingerprint == fingerprint(request.headers.get("Authorization")):
            return True
        return self._refuse_credential(request, f"legacy session {stream.legacy_session}")

    def _refuse_credential(self, request: web.Request, what: str) -> bool:
        """Log and count a request refused for presenting another credential; False."""
        log.warning("%s %s: %s refused to another credential", request.method, request.path, what)
        self.metrics.refused.labels("credential").inc()
        return False

    def _legacy_post_allowed(self, request: web.Request) -> bool:
        """A POST to a legacy session's endpoint (`...?session_id=X`) needs its credential."""
        name = request.query.get("session_id") or request.query.get("sessionId")
        stream = self.registry.legacy_sessions.get(name) if name else None
        return stream is None or self._legacy_credential_matches(request, stream)

    async def _after_session_lost(
        self,
        request: web.Request,
        sess: Session,
        resp: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        body_parts: list[bytes],
    ) -> aiohttp.ClientResponse | web.Response:
        """The upstream answered 400/404 on a known session: if it lost the session,
        re-initialize it and send the request once more (the upstream did not process it)."""
        try:
            body = await resp.content.read(1 << 16)
        finally:
            resp.release()
        lost_id = headers.get(SESSION_HEADER, sess.session_id)
        if session_lost(resp.status, body) and await self.continuity.reinitialize(
            self.client, sess, base_url=self._base, headers=headers, lost_upstream_id=lost_id
        ):
            self.metrics.reinitializations.inc()
            headers[SESSION_HEADER] = sess.upstream_session_id
            data = b"".join(body_parts) if request.body_exists else None
            return await self.client.request(
                request.method,
                self._base + request.path_qs,
                headers=headers,
                data=data,
                allow_redirects=False,
            )
        return web.Response(
            status=resp.status,
            body=body,
            headers=self._client_headers(resp, sess.session_id, keep_length=False),
        )

    def _client_headers(
        self, resp: aiohttp.ClientResponse, client_session: str | None, *, keep_length: bool
    ) -> CIMultiDict[str]:
        """Response headers for the client: hop-by-hop dropped, the upstream's session id
        mapped back to the one the client knows."""
        out = downstream_headers(resp.headers, keep_length=keep_length)
        if client_session is not None and SESSION_HEADER in out:
            out[SESSION_HEADER] = client_session
        return out

    def _too_large(self) -> web.Response:
        limit = self.config.max_request_body_bytes
        log.warning("request body over the %d-byte limit refused", limit)
        return error_response(413, f"request body exceeds {limit} bytes")

    async def _send(
        self, request: web.Request, headers: CIMultiDict[str], captured: list[bytes]
    ) -> aiohttp.ClientResponse:
        data: AsyncIterator[bytes] | None = None
        if request.body_exists:
            data = self._stream_body(request, captured)
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
        try:
            return await self.client.request(
                request.method,
                self._base + request.path_qs,
                headers=headers,
                data=data,
                allow_redirects=False,
            )
        except aiohttp.ClientError as exc:
            if isinstance(exc.__cause__, BodyTooLargeError) or isinstance(
                exc.__context__, BodyTooLargeError
            ):
                raise BodyTooLargeError from exc
            raise

    async def _stream_body(
        self, request: web.Request, captured: list[bytes]
    ) -> AsyncIterator[bytes]:
        """Stream the client's body upstream, keeping a copy (bounded by the limit) so the
        JSON-RPC ids and any `initialize` request can be read once it is sent."""
        total = 0
        limit = self.config.max_request_body_bytes
        async for chunk in request.content.iter_any():
            total += len(chunk)
            if total > limit:
                raise BodyTooLargeError
            captured.append(chunk)
            yield chunk

    # -- responses -----------------------------------------------------------------------

    async def _relay(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        body: bytes,
    ) -> web.StreamResponse:
        method = request.method
        client_session = request.headers.get(SESSION_HEADER)
        session_id = client_session or resp.headers.get(SESSION_HEADER)
        is_sse = resp.status == 200 and resp.headers.get("Content-Type", "").startswith(SSE_TYPE)
        try:
            stream_kind = self._stream_kind(method, session_id, is_sse=is_sse)
            ids = self._note_request(request, resp, body, session_id)
            if method == "DELETE" and client_session and resp.status in (200, 202, 204, 404):
                await self._forget_session(client_session)
        except BaseException:
            resp.release()
            raise
        if stream_kind is None:
            return await self._pipe(request, resp, client_session)
        return await self._open_stream(
            request, resp=resp, headers=headers, kind=stream_kind, session_id=session_id, ids=ids
        )

    @staticmethod
    def _stream_kind(method: str, session_id: str | None, *, is_sse: bool) -> StreamKind | None:
        """Which SSE responses the sidecar tracks; None means pipe through untouched."""
        if not is_sse:
            return None
        if session_id:
            return StreamKind.POST if method == "POST" else StreamKind.STANDALONE
        if method == "GET":
            return StreamKind.LEGACY
        return None  # stateless (2026-07-28): nothing to resume, nothing to track

    def _note_request(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        body: bytes,
        session_id: str | None,
    ) -> set[Any]:
        """Read the JSON-RPC ids of a POST; remember a session's `initialize` request."""
        ids: set[Any] = set()
        if request.method == "POST" and body:
            ids, rpc_method, requested_version = request_ids(body)
            if rpc_method == "initialize" and session_id and resp.status == 200:
                sess = self.registry.session(session_id)
                sess.initialize_request = body
                sess.protocol_version = requested_version
                sess.init_path = request.path_qs
                sess.credential_fingerprint = fingerprint(request.headers.get("Authorization"))
        if session_id and resp.status < 300 and request.method != "DELETE":
            # A session the upstream accepts: make sure the control plane knows it.
            sess = self.registry.session(session_id)
            if sess.credential_fingerprint is None:
                sess.credential_fingerprint = fingerprint(request.headers.get("Authorization"))
            if not sess.reported:
                self.continuity.report_session(sess)
        return ids

    async def _pipe(
        self, request: web.Request, resp: aiohttp.ClientResponse, client_session: str | None
    ) -> web.StreamResponse:
        """Pass a response through untouched, chunk by chunk, as it arrives."""
        out = web.StreamResponse(
            status=resp.status,
            reason=resp.reason,
            headers=self._client_headers(resp, client_session, keep_length=True),
        )
        sse = resp.headers.get("Content-Type", "").startswith(SSE_TYPE)
        self.active_streams += sse
        try:
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            log.warning("%s %s: upstream body broke: %s", request.method, request.path, exc)
        finally:
            resp.release()
            self.active_streams -= sse
        return out

    async def _open_stream(
        self,
        request: web.Request,
        *,
        resp: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        kind: StreamKind,
        session_id: str | None,
        ids: set[Any],
    ) -> web.StreamResponse:
        reconnect_headers = CIMultiDict(headers)
        for name in ("Content-Type", "Content-Length"):
            reconnect_headers.popall(name, None)
        if session_id is not None:
            # The upstream's name for the session (they differ after a re-initialize).
            reconnect_headers[SESSION_HEADER] = headers.get(SESSION_HEADER) or session_id
        reconnect_headers["Accept"] = SSE_TYPE
        stream = self.registry.new_stream(
            kind=kind,
            session_id=session_id,
            upstream_path=request.path_qs,
            upstream_headers=reconnect_headers,
            response_headers=self._client_headers(resp, session_id, keep_length=False),
        )
        stream.pending_request_ids = ids
        stream.expects_responses = bool(ids)
        if kind is StreamKind.LEGACY:
            stream.credential_fingerprint = fingerprint(request.headers.get("Authorization"))
        # The pump owns the upstream response from here on.
        stream.pump = spawn(self._pump(stream, resp), name=f"pump-{stream.stream_id}")
        self.metrics.streams_opened.inc()
        if kind is StreamKind.STANDALONE and session_id is not None:
            sess = self.registry.session(session_id)
            old = self.registry.streams.get(sess.standalone) if sess.standalone else None
            if old is not None and old is not stream:
                old.end("replaced by a new GET stream")
                await cancel_and_wait(old.pump)
            sess.standalone = stream.stream_id
        version = request.headers.get(PROTOCOL_HEADER)
        if version is None and session_id is not None:
            version = self.registry.session(session_id).protocol_version
        priming = kind is not StreamKind.LEGACY and (version or "") >= PRIMING_SINCE
        return await self._write_stream(request, stream, after_seq=0, priming=priming)

    async def _write_stream(
        self,
        request: web.Request,
        stream: LiveStream,
        *,
        after_seq: int,
        priming: bool,
        catch_up_cursor: str | None = None,
    ) -> web.StreamResponse:
        """Write the stream's events after `after_seq` to the client, then live ones.

        With `catch_up_cursor`, the events between `after_seq` and the replay buffer are
        first fetched again from the upstream (which resumes after that cursor)."""
        out = web.StreamResponse(status=200, headers=stream.response_headers)
        out.headers["Cache-Control"] = "no-cache"
        out.headers["X-Accel-Buffering"] = "no"
        stream.attach()
        self.active_streams += 1
        tracker = stream.tracker
        position = after_seq
        write_timeout = self.config.client_write_timeout
        try:
            await out.prepare(request)
            if priming:
                await out.write(tracker.priming_event(self.config.client_retry_ms))
            if catch_up_cursor is not None:
                caught_up = await self._catch_up(out, stream, position, catch_up_cursor)
                if caught_up is None:
                    await out.write(encode_comment("tether: could not replay older events"))
                    await out.write_eof()
                    return out
                position = caught_up
            while True:
                got = tracker.events_after(position)
                if isinstance(got, Gap):
                    log.warning(
                        "stream %s: client fell behind the replay buffer (at %d, oldest %d);"
                        " closing it so it resumes",
                        stream.stream_id,
                        position,
                        got.oldest_seq,
                    )
                    self.metrics.slow_clients.inc()
                    break
                if got:
                    position += len(got)
                    async with asyncio.timeout(write_timeout):
                        await out.write(b"".join(got) if len(got) > 1 else got[0])
                    stream.sent(position)
                    self.metrics.events_out.inc(len(got))
                    continue
                if stream.ended:
                    if stream.end_reason and stream.end_reason != "complete":
                        await out.write(
                            encode_comment(f"tether: stream ended: {stream.end_reason}")
                        )
                    break
                if not await stream.signal.wait(self.config.heartbeat_interval):
                    async with asyncio.timeout(write_timeout):
                        await out.write(b": keepalive\n\n")
            await out.write_eof()
        except (ConnectionError, TimeoutError) as exc:
            log.info("stream %s: client went away (%s)", stream.stream_id, type(exc).__name__)
        finally:
            stream.detach()
            self.active_streams -= 1
        return out

    async def _catch_up(
        self, out: web.StreamResponse, stream: LiveStream, after_seq: int, cursor: str
    ) -> int | None:
        """Re-fetch events older than the replay buffer from the upstream and write them with
        their original client-facing ids; returns the seq where the buffer takes over, or None
        if the upstream could not supply them."""
        tracker = stream.tracker
        try:
            resp = await self._get_stream(stream, cursor)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("stream %s: catch-up request failed: %s", stream.stream_id, exc)
            return None
        position = after_seq
        try:
            if resp.status != 200 or not resp.headers.get("Content-Type", "").startswith(SSE_TYPE):
                log.warning("stream %s: catch-up answered %d", stream.stream_id, resp.status)
                return None
            parser = SSEParser(max_event_bytes=self.config.max_event_bytes)
            async for chunk in resp.content.iter_any():
                batch: list[bytes] = []
                for item in parser.feed(chunk):
                    if isinstance(item, SSEError):
                        log.warning("stream %s: catch-up: %s", stream.stream_id, item.message)
                        return None
                    if not item.data:
                        continue
                    if not item.id:
                        log.warning("stream %s: catch-up event has no id", stream.stream_id)
                        return None
                    # Usually the next seq; otherwise look the upstream id up in the index.
                    seq: int | None = position + 1
                    if tracker.upstream_cursor_at(position + 1) != item.id:
                        seq = tracker.seq_for_upstream_id(item.id)
                    if seq is None:
                        log.warning(
                            "stream %s: catch-up event %s is not in the id index",
                            stream.stream_id,
                            item.id,
                        )
                        return None
                    if seq <= position:
                        continue  # the upstream re-sent something the client has
                    batch.append(
                        encode_event(
                            data=item.data, id=str(tracker.event_id(seq)), event=item.event
                        )
                    )
                    position = seq
                    if not isinstance(tracker.events_after(position), Gap):
                        break
                if batch:
                    async with asyncio.timeout(self.config.client_write_timeout):
                        await out.write(b"".join(batch))
                    self.metrics.events_out.inc(len(batch))
                if not isinstance(tracker.events_after(position), Gap):
                    return position
            return None
        finally:
            resp.release()

    # -- resume --------------------------------------------------------------------------

    async def _resume(
        self, request: web.Request, event_id: EventId, sess: Session | None
    ) -> web.StreamResponse:
        stream = self.registry.streams.get(event_id.stream)
        if stream is None and sess is not None:
            adopted = self._adopt_stream(request, sess, event_id)
            if adopted is not None:
                self.metrics.resumes.inc()
                return await self._write_stream(
                    request, adopted, after_seq=event_id.seq, priming=False
                )
        if stream is None:
            log.warning("resume of unknown stream %s refused", event_id.stream)
            self.metrics.resume_failures.inc()
            return error_response(
                410, f"event id {event_id} names a stream this sidecar does not know"
            )
        client_session = request.headers.get(SESSION_HEADER)
        if stream.session_id is not None and client_session != stream.session_id:
            log.warning("resume of stream %s with the wrong session refused", event_id.stream)
            return error_response(404, "no such session for that event id")
        if not self._legacy_credential_matches(request, stream):
            return error_response(404, "no such session for that event id")
        tracker = stream.tracker
        if event_id.epoch != tracker.epoch or event_id.seq > tracker.seq:
            self.metrics.resume_failures.inc()
            return error_response(410, f"event id {event_id} is not one this stream delivered")
        catch_up_cursor: str | None = None
        if isinstance(tracker.events_after(event_id.seq), Gap):
            # The client's own id carries its upstream cursor; the index is the fallback.
            catch_up_cursor = event_id.upstream or tracker.upstream_cursor_at(event_id.seq)
            if catch_up_cursor is None:
                log.warning(
                    "resume of %s refused: older than the replay buffer, and the upstream"
                    " cannot replay it",
                    event_id,
                )
                self.metrics.resume_failures.inc()
                return error_response(
                    410, f"event id {event_id} is older than the replay buffer; start a new stream"
                )
        self.metrics.resumes.inc()
        if stream.ended and not stream.complete and (stream.pump is None or stream.pump.done()):
            # The pump gave up earlier (e.g. a long outage): a client is back, try again.
            stream.ended = False
            stream.end_reason = ""
            stream.finished.clear()
            stream.pump = spawn(self._pump(stream, None), name=f"pump-{stream.stream_id}")
        return await self._write_stream(
            request,
            stream,
            after_seq=event_id.seq,
            priming=False,
            catch_up_cursor=catch_up_cursor,
        )

    def _adopt_stream(
        self, request: web.Request, sess: Session, event_id: EventId
    ) -> LiveStream | None:
        """Take over a stream another sidecar served: resume its upstream right after the
        client's own position and go on numbering under this sidecar's epoch."""
        kind = StreamKind.of(event_id.stream)
        if kind not in (StreamKind.POST, StreamKind.STANDALONE):
            return None
        persisted = sess.persisted_streams.get(event_id.stream)
        if persisted is None:
            log.warning(
                "resume of %s refused: session %s has no such stream", event_id, sess.session_id
            )
            return None
        cursor = event_id.upstream
        if not cursor and persisted.order == event_id.order:
            cursor = persisted.upstream_event_id
        if not cursor:
            log.warning("resume of %s refused: the upstream gave no id to resume from", event_id)
            return None
        headers = upstream_request_headers(request)
        headers[SESSION_HEADER] = sess.upstream_session_id
        headers["Accept"] = SSE_TYPE
        tracker = StreamTracker(
            event_id.stream,
            limits=self.config.tracker,
            epoch=max(sess.owner_epoch, event_id.epoch),
            seq=event_id.seq,
            last_upstream_event_id=cursor,
        )
        stream = self.registry.new_stream(
            kind=kind,
            session_id=sess.session_id,
            upstream_path=request.path_qs,
            upstream_headers=headers,
            response_headers=CIMultiDict(
                {"Content-Type": SSE_TYPE, SESSION_HEADER: sess.session_id}
            ),
            tracker=tracker,
        )
        if kind is StreamKind.STANDALONE:
            sess.standalone = stream.stream_id
        stream.pump = spawn(
            self._pump(stream, None, resume_now=True), name=f"pump-{stream.stream_id}"
        )
        log.info(
            "stream %s adopted at %s; resuming the upstream after %r", kind.name, event_id, cursor
        )
        return stream

    async def _forget_session(self, session_id: str) -> None:
        streams = self.registry.drop_session(session_id)
        for s in streams:
            s.end("session deleted")
        await cancel_and_wait(*(s.pump for s in streams))
        self.continuity.forget(session_id)
        spawn(self.continuity.delete_remote(session_id), name=f"delete-{session_id[:16]}")

    # -- upstream pump -------------------------------------------------------------------

    async def _pump(
        self,
        stream: LiveStream,
        resp: aiohttp.ClientResponse | None,
        *,
        resume_now: bool = False,
    ) -> None:
        """Read the upstream into the tracker; reconnect with Last-Event-ID until complete."""
        loop = asyncio.get_running_loop()
        policy = ReconnectPolicy(self.config.reconnect)
        cursor = stream.tracker.last_upstream_event_id
        retry_ms: int | None = None
        outcome = Outcome.FAILED
        reopened_logged = False
        try:
            while True:
                if resp is not None:
                    parser = SSEParser(max_event_bytes=self.config.max_event_bytes)
                    try:
                        outcome = await self._consume(stream, resp, parser, policy)
                    finally:
                        resp.release()
                        resp = None
                    cursor = parser.last_event_id or cursor
                    retry_ms = parser.retry if parser.retry is not None else retry_ms
                    if parser.failed is not None:
                        self._fail(stream, f"upstream sent a bad event: {parser.failed.message}")
                        return
                    if stream.complete:
                        stream.end("complete")
                        return
                    if (
                        outcome is Outcome.CLOSED
                        and stream.kind is StreamKind.POST
                        and not stream.expects_responses
                        and parser.retry is None
                    ):
                        # A clean end with no `retry:` (not polling) completes a POST stream
                        # whose request ids are unknown (e.g. adopted from another sidecar).
                        stream.complete = True
                        stream.end("complete")
                        return
                if not cursor:
                    if stream.kind is not StreamKind.STANDALONE:
                        self._fail(
                            stream, "upstream stream broke and it gave no event id to resume"
                        )
                        return
                    # A GET stream can be opened afresh, as a client would: the client's
                    # connection stays, only events sent during the gap (if any) are missed.
                    if not reopened_logged:
                        log.info(
                            "stream %s: upstream GET stream has no ids; reopening it afresh",
                            stream.stream_id,
                        )
                        reopened_logged = True
                if resume_now:
                    resume_now = False
                else:
                    decision = policy.next(outcome, now=loop.time(), retry_ms=retry_ms)
                    if isinstance(decision, GiveUp):
                        self._fail(stream, f"gave up reconnecting: {decision.reason}")
                        return
                    await asyncio.sleep(decision.delay)
                self.metrics.reconnects.inc()
                resp, outcome, fatal = await self._reconnect(stream, cursor)
                if fatal == SESSION_LOST:
                    resp, fatal = await self._recover_session(stream)
                    cursor = ""
                if fatal:
                    self._fail(stream, fatal)
                    return
        finally:
            if resp is not None:
                resp.release()
            stream.end("stopped")
            self.continuity.report_position(stream)

    async def _recover_session(
        self, stream: LiveStream
    ) -> tuple[aiohttp.ClientResponse | None, str]:
        """The upstream lost the session: re-initialize it; a GET stream starts afresh on the
        new upstream session, a POST stream's request died with the old one."""
        sess = self.registry.sessions.get(stream.session_id or "")
        lost_id = stream.upstream_headers.get(SESSION_HEADER, "")
        if sess is None or not await self.continuity.reinitialize(
            self.client,
            sess,
            base_url=self._base,
            headers=stream.upstream_headers,
            lost_upstream_id=lost_id,
        ):
            return None, "the upstream lost the session and it could not be re-initialized"
        self.metrics.reinitializations.inc()
        stream.upstream_headers[SESSION_HEADER] = sess.upstream_session_id
        if stream.kind is not StreamKind.STANDALONE:
            return None, "the upstream restarted and lost this request; please retry it"
        resp, _, fatal = await self._reconnect(stream, "")
        return resp, fatal or ("" if resp is not None else "the new upstream session refused GET")

    async def _get_stream(self, stream: LiveStream, cursor: str) -> aiohttp.ClientResponse:
        """GET the stream's upstream path with its session's headers, resuming after `cursor`
        when there is one (the upstream's own Last-Event-ID)."""
        headers = CIMultiDict(stream.upstream_headers)
        if cursor:
            headers[LAST_EVENT_ID] = cursor
        return await self.client.get(
            self._base + stream.upstream_path, headers=headers, allow_redirects=False
        )

    async def _reconnect(
        self, stream: LiveStream, cursor: str
    ) -> tuple[aiohttp.ClientResponse | None, Outcome, str]:
        """GET the stream again (with Last-Event-ID when there is a cursor);
        returns (response, outcome, fatal reason or SESSION_LOST)."""
        try:
            resp = await self._get_stream(stream, cursor)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.info("stream %s: reconnect failed: %s", stream.stream_id, exc)
            return None, Outcome.FAILED, ""
        if resp.status == 200 and resp.headers.get("Content-Type", "").startswith(SSE_TYPE):
            log.info("stream %s: resumed upstream after %r", stream.stream_id, cursor)
            return resp, Outcome.FAILED, ""
        try:
            body = await resp.content.read(1 << 16)
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        finally:
            resp.release()
        if stream.session_id is not None and session_lost(resp.status, body):
            return None, Outcome.FAILED, SESSION_LOST
        if resp.status == 405:
            return None, Outcome.FAILED, "upstream does not support resuming streams (405)"
        log.info("stream %s: reconnect answered %d", stream.stream_id, resp.status)
        return None, Outcome.FAILED, ""

    async def _consume(
        self,
        stream: LiveStream,
        resp: aiohttp.ClientResponse,
        parser: SSEParser,
        policy: ReconnectPolicy,
    ) -> Outcome:
        """Feed one upstream response into the tracker until it ends; how did it end?"""
        tracker = stream.tracker
        pending = stream.pending_request_ids
        legacy = stream.kind is StreamKind.LEGACY
        post_ids_unknown = stream.kind is StreamKind.POST and not stream.expects_responses
        watch_answers = bool(pending) or post_ids_unknown
        metrics = self.metrics
        try:
            async for chunk in resp.content.iter_any():
                delivered = 0
                seq_mark, bytes_mark = stream.backlog_marks()
                items = parser.feed_runs(chunk)
                if legacy:
                    url = str(resp.url)
                    items = [
                        self._rewrite_endpoint(stream, it, url)
                        if isinstance(it, SSEEvent) and it.event == "endpoint" and it.data
                        else it
                        for it in items
                    ]
                i, end = 0, len(items)
                while i < end:
                    duplicates = tracker.duplicates
                    i, got, answers = tracker.accept_run(
                        items,
                        i,
                        seq_mark=seq_mark,
                        bytes_mark=bytes_mark,
                        watch_answers=watch_answers,
                    )
                    delivered += got
                    if tracker.duplicates != duplicates:
                        metrics.duplicates.inc(tracker.duplicates - duplicates)
                    for data in answers:
                        if pending:
                            for rid in answered_ids(data):
                                pending.discard(rid)
                            if not pending and stream.expects_responses:
                                stream.complete = True
                        elif post_ids_unknown and answered_ids(data):
                            # Request ids unknown (adopted stream, unparseable body): a POST
                            # stream carries its request's answer last. Resumed SDK streams
                            # never close by themselves, so this is the only end we will see.
                            stream.complete = True
                    error = items[i] if i < end else None
                    if isinstance(error, SSEError):
                        log.error("stream %s: %s", stream.stream_id, error.message)
                        break
                    # Checked per event inside the run (one chunk can hold a whole buffer's
                    # worth); the exact check only once a mark is crossed.
                    if tracker.seq >= seq_mark or tracker.total_bytes >= bytes_mark:
                        if stream.backlogged():
                            metrics.events_in.inc(delivered)
                            delivered = 0
                            policy.progress()
                            stream.publish()
                            metrics.upstream_paused.inc()
                            while stream.backlogged():
                                await stream.room.wait()
                        seq_mark, bytes_mark = stream.backlog_marks()
                if delivered:
                    metrics.events_in.inc(delivered)
                    policy.progress()
                    stream.publish()
                    self.continuity.report_position(stream)  # O(1); never awaits
                if stream.complete or parser.failed is not None:
                    return Outcome.CLOSED
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            log.info("stream %s: upstream broke: %s", stream.stream_id, exc or type(exc).__name__)
            return Outcome.FAILED
        finally:
            parser.close()  # an unterminated event is dropped; a `retry:` line still counts
        return Outcome.CLOSED

    def _fail(self, stream: LiveStream, reason: str) -> None:
        """End a stream that cannot go on; answer its open requests with an error."""
        log.warning("stream %s (session %s): %s", stream.stream_id, stream.session_id, reason)
        self.metrics.streams_failed.inc()
        if stream.kind is StreamKind.POST and stream.pending_request_ids:
            for rid in sorted(stream.pending_request_ids, key=str):
                data = jsonrpc_error_body(f"tether: {reason}", rid).decode()
                stream.tracker.accept(SSEEvent(data=data))
            stream.pending_request_ids.clear()
        stream.end(reason)

    def _rewrite_endpoint(self, stream: LiveStream, event: SSEEvent, stream_url: str) -> SSEEvent:
        """Point a legacy `endpoint` event at the sidecar: same path, minus the upstream base
        path, so the client's POSTs come back through here."""
        target = urlsplit(urljoin(stream_url, event.data.strip()))
        base = self._base_parts
        if (target.scheme, target.netloc) != (base.scheme, base.netloc):
            log.warning("legacy endpoint %r is not on the upstream; left as is", event.data)
            return event
        path = target.path
        prefix = base.path.rstrip("/")
        if prefix and path.startswith(prefix + "/"):
            path = path[len(prefix) :]
        rewritten = path + (f"?{target.query}" if target.query else "")
        query = parse_qs(target.query)
        names = query.get("session_id") or query.get("sessionId")
        stream.legacy_session = names[0] if names else None
        if stream.legacy_session:
            self.registry.legacy_sessions[stream.legacy_session] = stream
        return SSEEvent(
            data=rewritten, event=event.event, id=event.id, last_event_id=event.last_event_id
        )
