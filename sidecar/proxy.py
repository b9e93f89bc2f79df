"""The proxied port: one request, read top to bottom in `Proxy.handle`.

Stages, each its own module with one job:
  admission (`sidecar.admission`)  host, origin, limits, credentials: refuse or go on
  session     (`sidecar.continuity`) a session this sidecar does not know may be adopted
  resume      (`sidecar.resume`)   `GET` with one of our `Last-Event-ID`s: replay, then live
  upstream    (`sidecar.upstream`) forward the request, bounded in time and in number
  routing     (here)               which responses become tracked streams, which pass through
  pump        (`sidecar.pump`)     upstream bytes -> `StreamCore`, reconnects
  writer      (`sidecar.writer`)   `StreamCore` -> client bytes

Invariants:
1. An SSE response is tracked (ids rewritten, buffered, resumable) exactly when it belongs to
   a session: an `Mcp-Session-Id` on the request or response, or a legacy `GET /sse`.
   Anything else, including stateless 2026-07-28 traffic, passes through byte for byte.
2. Ownership of an upstream response is never shared: the handler releases it, or hands it
   to exactly one pump, which releases it.
3. A session id is validated and the session adopted (if the control plane knows it) before
   anything is forwarded, and its credential is checked before anything is served.
4. An upstream that answers "session lost" for a known session is re-initialized and the
   request sent once more (the upstream did not process it); nothing else is retried.
5. A `GET` with a `Last-Event-ID` is a resume: one Tether cannot read is refused (410), never
   served as a fresh stream that would skip what the client missed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from sidecar.accesslog import log_client_closed, notes
from sidecar.admission import Admission
from sidecar.config import SidecarConfig
from sidecar.continuity import UNKNOWN, Continuity, Unserved, default_owner, session_lost
from sidecar.drain import DrainState, Parking, holds_drain
from sidecar.guard import fingerprint
from sidecar.headers import (
    LAST_EVENT_ID,
    SESSION_HEADER,
    SSE_TYPE,
    downstream_headers,
    error_response,
    expects_priming,
    is_sse,
    upstream_request_headers,
)
from sidecar.jsonrpc import PostBody, read_post_body
from sidecar.legacy import EndpointRewriter
from sidecar.metrics import Failure, Metrics, method_label
from sidecar.pump import MAX_ERROR_BODY, Pump
from sidecar.reissue import (
    HEADER_MISMATCH,
    NOT_A_CALL,
    Call,
    header_mismatch,
    may_reissue,
    read_call,
)
from sidecar.resilient import Lesson, Resilient, body_broke, end_upstream
from sidecar.resume import Resume
from sidecar.streams import Registry, Session
from sidecar.tracing import NO_SPAN, NO_TRACING, Span, Tracing
from sidecar.tracker import EventId, StreamKind
from sidecar.upstream import (
    UPSTREAM_ERRORS,
    BodyTooLargeError,
    Upstream,
    UpstreamTimeoutError,
    describe_upstream_error,
)
from sidecar.writer import Writer
from tether.logsetup import bind_log_fields, log_context
from tether.logthrottle import ThrottledLog
from tether.model import OwnerName, parse_owner
from tether.tasks import cancel_and_wait, spawn

log = logging.getLogger("tether.sidecar.proxy")

DRAIN_POLL_S = 0.05
"""How often a drain looks at what is still in flight."""


class Proxy:
    """Request handling for the proxied port; assembles the stages and owns their lifecycle."""

    def __init__(
        self, config: SidecarConfig, metrics: Metrics, *, tracing: Tracing = NO_TRACING
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.tracing = tracing
        self.registry = Registry(
            config.tracker, reconnect=config.reconnect, max_event_bytes=config.max_event_bytes
        )
        owner: OwnerName = parse_owner(config.owner) if config.owner else default_owner()
        self.continuity = Continuity(
            registry=self.registry,
            upstream=config.upstream,
            control_plane=config.control_plane,
            security=config.control_plane_security,
            owner=owner,
            report_interval=config.report_interval,
            renew_interval=config.renew_interval,
            tracing=tracing,
        )
        if self.continuity.reporter is not None:
            metrics.watch_reporter(self.continuity.reporter)
        self.upstream = Upstream(config, tracing=tracing)
        self.writer = Writer(
            config=config, metrics=metrics, upstream=self.upstream, registry=self.registry
        )
        self.admission = Admission(
            config=config,
            metrics=metrics,
            registry=self.registry,
            upstream=self.upstream,
            writer=self.writer,
        )
        self.pump = Pump(
            config=config,
            metrics=metrics,
            upstream=self.upstream,
            continuity=self.continuity,
            registry=self.registry,
        )
        self.resume = Resume(
            config=config,
            metrics=metrics,
            registry=self.registry,
            admission=self.admission,
            pump=self.pump,
            writer=self.writer,
        )
        self.resilient = Resilient(config, metrics, self.upstream)
        self._rewrite_endpoint = EndpointRewriter(config.upstream_base)
        self.warnings = ThrottledLog(log)
        """Per-request warnings, summarised when they flood (`tether.logthrottle`)."""
        self._janitor: asyncio.Task[None] | None = None
        self.draining = DrainState(config.drain_timeout)
        self._holding: set[int] = set()
        """Requests in flight that hold a drain (`sidecar.drain` rule 3), by `id()`: aiohttp's
        requests are not hashable; each is removed before its handler returns."""
        self._listens: set[aiohttp.ClientResponse] = set()
        """Upstream answers to `subscriptions/listen` being piped: a drain ends them."""
        self.busy_connections: dict[RequestHandler, int] = {}
        """Client connections with a request being handled (`sidecar.drain` rule 5)."""
        self.parking: Parking[RequestHandler] = Parking(self.draining.settle)
        """While draining: since when each idle connection has been idle (rule 5)."""
        self.shedder: asyncio.Task[None] | None = None
        """While draining: closes parked connections until the sidecar stops (rule 5)."""

    @property
    def active_streams(self) -> int:
        """SSE responses being written to clients now, tracked or piped (`max_streams`)."""
        return self.writer.active

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.upstream.start()
        self._janitor = spawn(self._sweep_forever(), name="sidecar-janitor")
        await self.continuity.start()

    async def end_streams(self) -> None:
        """End every stream cleanly, without failing its open requests: writers flush what
        they have and close, so clients reconnect (with Last-Event-ID) to another sidecar."""
        streams = [*self.registry.streams.values(), *self.registry.finishing]
        for stream in streams:
            stream.end("sidecar shutting down")
        self.resilient.stop()  # kept listens end, waits to re-issue give up
        await cancel_and_wait(*(s.pump for s in streams))

    async def drain(self) -> bool:
        """`sidecar.drain`: stop being ready, end the standalone streams, and wait until no
        request is in flight upstream or the drain timeout passes; False on the timeout.
        Concurrent callers (a retried preStop hook) all wait for the same drain."""
        if self.draining.begin(time.monotonic()):
            log.info(
                "draining: %d requests in flight, at most %.0fs",
                self.draining.in_flight,
                self.config.drain_timeout,
            )
        while not self.draining.drained(time.monotonic(), upstream_busy=self._orphan_calls()):
            # Rule 3, again each turn: a GET that arrived meanwhile is sent on as well.
            await self._end_standalone_streams()
            await asyncio.sleep(DRAIN_POLL_S)
        await self._end_standalone_streams()
        if self.draining.timed_out(time.monotonic(), upstream_busy=self._orphan_calls()):
            log.warning(
                "drain timed out after %.0fs with %d requests still in flight",
                self.config.drain_timeout,
                self.draining.in_flight,
            )
            return False
        return True

    async def _end_standalone_streams(self) -> None:
        standalone = [
            s
            for s in self.registry.streams.values()
            if s.kind is StreamKind.STANDALONE and not s.ended
        ]
        for stream in standalone:
            stream.end("sidecar draining")
        for listen in self._listens:
            end_upstream(listen)
        self.resilient.end_listens()
        await cancel_and_wait(*(s.pump for s in standalone))

    def _orphan_calls(self) -> int:
        """POST response streams still reading their upstream with no client attached: the
        client will resume them here, so the call is still in flight."""
        return sum(
            1
            for s in self.registry.streams.values()
            if s.kind is StreamKind.POST
            and s.clients == 0
            and not s.ended
            and s.pump is not None
            and not s.pump.done()
        )

    async def stop(self) -> None:
        """Stop the pumps, flush the final positions to the control plane, close."""
        await cancel_and_wait(self.shedder)
        await self.end_streams()
        await cancel_and_wait(self._janitor)
        for stream in self.registry.streams.values():
            self.continuity.report_position(stream)
        await self.continuity.stop()
        await self.upstream.close()
        if self.tracing.enabled:
            await asyncio.to_thread(self.tracing.shutdown)  # exports what is buffered
        for warnings in self._throttled():
            warnings.flush()

    def _throttled(self) -> tuple[ThrottledLog, ...]:
        return (self.warnings, self.admission.warnings, self.resilient.warnings)

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
            for warnings in self._throttled():
                warnings.poll()  # a flood that stopped still gets its summary line

    # -- one request, top to bottom --------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """One request; counted in flight while it holds a drain (`sidecar.drain`, rule 3)."""
        last_id = request.headers.get(LAST_EVENT_ID) if request.method == "GET" else None
        holds = holds_drain(request.method, EventId.parse(last_id) if last_id else None)
        connection = request.protocol
        self.busy_connections[connection] = self.busy_connections.get(connection, 0) + 1
        started = time.monotonic()
        if holds:
            self._holding.add(id(request))
            self.draining.request_started(started)
        try:
            # Every line logged for this request (and by the pumps it starts) names its session.
            with log_context(session=request.headers.get(SESSION_HEADER)):
                if not self.tracing.enabled:  # one coroutine frame less per open call
                    return await self._handle(request, NO_SPAN)
                return await self._traced(request)
        except asyncio.CancelledError:
            if self.config.access_log:  # `sidecar.accesslog` rule 1: aiohttp writes nothing
                log_client_closed(request, time.monotonic() - started)
            raise
        finally:
            self._release_drain(request)
            left = self.busy_connections.pop(connection) - 1
            if left:
                self.busy_connections[connection] = left
            elif self.draining.draining:
                self.parking.idle(connection, time.monotonic())

    async def _traced(self, request: web.Request) -> web.StreamResponse:
        """`_handle` inside the request's server span (`sidecar.tracing`)."""
        with self.tracing.request(request) as span:
            session_id = request.headers.get(SESSION_HEADER)
            if session_id:
                span.set("mcp.session.id", session_id)
            try:
                response = await self._handle(request, span)
            except asyncio.CancelledError:  # the client went away (a stream it stopped reading)
                span.event("tether.client.disconnected")
                raise
            span.http_status(response.status)
            if not session_id and (created := response.headers.get(SESSION_HEADER)):
                span.set("mcp.session.id", created)
            return response

    def _release_drain(self, request: web.Request) -> None:
        """The request no longer holds a drain: answered, or a listen stream (rule 3)."""
        if id(request) in self._holding:
            self._holding.discard(id(request))
            self.draining.request_finished(time.monotonic())

    async def _handle(self, request: web.Request, span: Span) -> web.StreamResponse:
        arrived = time.monotonic()
        refusal = self.admission.refusal(request)
        if refusal is not None:
            return refusal
        client_session = request.headers.get(SESSION_HEADER)
        last_id = request.headers.get(LAST_EVENT_ID) if request.method == "GET" else None
        event_id = EventId.parse(last_id) if last_id else None
        sess = await self._session(request, client_session, event_id)
        if isinstance(sess, Unserved):
            return self._unserved(sess)
        if last_id:
            if event_id is None:
                # Rule 5: starting afresh would silently skip what the client missed.
                self.warnings.log(
                    ("foreign last-event-id",),
                    "resumes with a Last-Event-ID that is not Tether's",
                    logging.WARNING,
                    "%s: Last-Event-ID %r is not one of ours",
                    request.path,
                    last_id[:80],
                )
                self.metrics.resume_failures.inc()
                return error_response(410, "Last-Event-ID is not an event id Tether gave out")
            span.set("tether.resume.last_event_id", last_id)
            return await self.resume.resume(request, event_id, sess, started=arrived)

        declared = request.content_length
        if declared is not None and declared > self.config.max_request_body_bytes:
            return self._too_large()
        read = await self._read_request(request)
        if isinstance(read, web.Response):
            return read
        body, call = read
        trace_call(span, call)
        headers = upstream_request_headers(
            request, trusted_peer=self.admission.trusts_forwarding(request)
        )
        if sess is not None and sess.upstream_session_id != client_session:
            headers[SESSION_HEADER] = sess.upstream_session_id
        listen = call.method == "subscriptions/listen" and call.is_request and not client_session
        reissue = listen or may_reissue(call, self.resilient.hints, request.path)
        method = method_label(request.method, call.method)
        started = time.monotonic()
        try:
            resp = await self.resilient.send(request, headers, body, reissue=reissue)
            if sess is not None and request.method != "DELETE" and resp.status in (400, 404):
                retried = await self._after_session_lost(request, sess, resp, headers, body)
                if isinstance(retried, web.Response):
                    self.metrics.upstream_request(method, retried.status, started)
                    return retried
                resp = retried
        except UpstreamTimeoutError as exc:
            self.metrics.upstream_errors.inc()
            self.metrics.upstream_request(method, Failure.TIMEOUT, started)
            self.warnings.log(
                ("upstream timed out",),
                "requests the upstream did not answer in time",
                logging.WARNING,
                "%s %s: upstream timed out: %s",
                request.method,
                request.path,
                exc,
            )
            return error_response(504, f"upstream timed out: {exc}")
        except UPSTREAM_ERRORS as exc:
            self.metrics.upstream_errors.inc()
            self.metrics.upstream_request(method, Failure.UNREACHABLE, started)
            why = describe_upstream_error(exc)
            self.warnings.log(
                ("upstream unreachable",),
                "requests refused with the upstream unreachable",
                logging.WARNING,
                "%s %s: upstream unreachable: %s",
                request.method,
                request.path,
                why,
            )
            return error_response(502, f"upstream unreachable: {why}")
        self.metrics.upstream_request(method, resp.status, started)
        # Rule 2: _route owns `resp` from here: it releases it, or hands it to a pump.
        return await self._route(request, resp, headers, body, call=call, reissue=reissue)

    async def _read_request(self, request: web.Request) -> tuple[bytes | None, Call] | web.Response:
        """The body, and the JSON-RPC request it carries; refused when too large or when its
        `Mcp-*` headers disagree with it (`sidecar.reissue` rule 3)."""
        if not request.body_exists:
            return None, NOT_A_CALL
        try:
            body = await self.upstream.read_body(request)
        except BodyTooLargeError:
            return self._too_large()
        except TimeoutError:
            self.warnings.log(
                ("slow body",),
                "request bodies not received in time",
                logging.WARNING,
                "%s %s: request body not received in time",
                request.method,
                request.path,
            )
            return error_response(408, "request body not received in time")
        call = read_call(body) if request.method == "POST" else NOT_A_CALL
        if call.method:
            bind_log_fields(mcp_method=call.method, request_id=call.request_id)
            noted = notes(request)
            noted.mcp_method, noted.request_id = call.method, call.request_id
        mismatch = header_mismatch(request.headers, call)
        if mismatch is None:
            return body, call
        self.metrics.refused.labels("header_mismatch").inc()
        self.warnings.log(
            ("header mismatch",),
            "requests refused for a header mismatch",
            logging.WARNING,
            "%s %s refused: %s",
            request.method,
            request.path,
            mismatch,
        )
        return error_response(
            400, f"header mismatch: {mismatch}", code=HEADER_MISMATCH, request_id=call.request_id
        )

    def _unserved(self, why: Unserved) -> web.Response:
        """Continuity invariant 12: a session that cannot be served here is not forwarded."""
        refusal = error_response(why.status, why.reason)
        if why.status == 503:
            self.metrics.refused.labels("control_plane_unavailable").inc()
            refusal.headers["Retry-After"] = "1"
        return refusal

    async def _session(
        self, request: web.Request, client_session: str | None, event_id: EventId | None
    ) -> Session | Unserved | None:
        """A session this sidecar does not know may live on in the control plane; one it knows
        at an older epoch than the client's event id was served elsewhere since. Either way,
        only for the credential the session is bound to."""
        if not client_session:
            return None
        seen_epoch = event_id.epoch if event_id is not None else 0
        sess = await self.continuity.adopt(
            client_session, seen_epoch=seen_epoch, credential=self.admission.presented(request)
        )
        if isinstance(sess, Session) and not self.admission.credential_matches(request, sess):
            return UNKNOWN
        return sess

    async def _after_session_lost(
        self,
        request: web.Request,
        sess: Session,
        resp: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        request_body: bytes | None,
    ) -> aiohttp.ClientResponse | web.Response:
        """Rule 4: the upstream answered 400/404 on a known session: if it lost the session,
        re-initialize it and send the request once more."""
        try:
            body = await resp.content.read(MAX_ERROR_BODY)
        finally:
            resp.release()
        lost_id = headers.get(SESSION_HEADER, sess.session_id)
        if session_lost(resp.status, body) and await self.continuity.reinitialize(
            self.upstream.client,
            sess,
            base_url=self.upstream.base,
            headers=headers,
            lost_upstream_id=lost_id,
        ):
            self.metrics.reinitializations.inc()
            headers[SESSION_HEADER] = sess.upstream_session_id
            return await self.upstream.request(
                request.method, request.path_qs, headers=headers, data=request_body
            )
        return web.Response(
            status=resp.status,
            body=body,
            headers=self._client_headers(resp, sess.session_id, keep_length=False),
        )

    def _too_large(self) -> web.Response:
        limit = self.config.max_request_body_bytes
        self.warnings.log(
            ("too large",),
            "request bodies over the limit",
            logging.WARNING,
            "request body over the %d-byte limit refused",
            limit,
        )
        return error_response(413, f"request body exceeds {limit} bytes")

    def _client_headers(
        self, resp: aiohttp.ClientResponse, client_session: str | None, *, keep_length: bool
    ) -> CIMultiDict[str]:
        """Response headers for the client: hop-by-hop dropped, the upstream's session id
        mapped back to the one the client knows."""
        out = downstream_headers(resp.headers, keep_length=keep_length)
        if client_session is not None and SESSION_HEADER in out:
            out[SESSION_HEADER] = client_session
        return out

    # -- routing ---------------------------------------------------------------------------

    async def _route(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        body: bytes | None,
        *,
        call: Call,
        reissue: bool,
    ) -> web.StreamResponse:
        method = request.method
        client_session = request.headers.get(SESSION_HEADER)
        session_id = client_session or resp.headers.get(SESSION_HEADER)
        sse = is_sse(resp.status, resp.headers.get("Content-Type", ""))
        try:
            kind = stream_kind(method, session_id, sse=sse)
            post = self._note_request(request, resp, body or b"", session_id)
            if method == "DELETE" and client_session and resp.status in (200, 202, 204, 404):
                await self._forget_session(client_session)
        except BaseException:
            resp.release()
            raise
        if kind is None and session_id is None and (reissue or post.listen):
            return await self._stateless(request, resp, headers, body, call=call)
        if kind is None:
            return await self._pipe(
                request,
                resp,
                client_session,
                listen=sse and post.listen,
                learn=call.method == "tools/list",
            )
        return await self._open_stream(
            request,
            resp=resp,
            headers=headers,
            kind=kind,
            session_id=session_id,
            post=post,
            learn=call.method == "tools/list",
        )

    def _note_request(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        body: bytes,
        session_id: str | None,
    ) -> PostBody:
        """Read the JSON-RPC ids of a POST; remember a session's `initialize` request."""
        post = PostBody()
        if request.method == "POST" and body:
            post = read_post_body(body)
            if post.initialize and session_id and resp.status == 200:
                sess = self.registry.session(session_id)
                sess.initialize_request = body
                sess.protocol_version = post.protocol_version
                sess.init_path = request.path_qs
                sess.credential_fingerprint = fingerprint(
                    request.headers.get("Authorization"), key=self.config.fingerprint_key
                )
        taken_over = (
            session_id in self.continuity.fenced_sessions
            and session_id not in self.registry.sessions
        )
        if session_id and resp.status < 300 and request.method != "DELETE" and not taken_over:
            # A session the upstream accepts: make sure the control plane knows it (unless
            # another sidecar took it over while this request was under way: a bare local
            # session here would shadow the stored record on the next request).
            sess = self.registry.session(session_id)
            if sess.credential_fingerprint is None:
                sess.credential_fingerprint = fingerprint(
                    request.headers.get("Authorization"), key=self.config.fingerprint_key
                )
            if not sess.reported:
                self.continuity.report_session(sess)
        return post

    async def _stateless(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        body: bytes | None,
        *,
        call: Call,
    ) -> web.StreamResponse:
        """Issue #13 (`sidecar.resilient`): a 2026-07-28 listen kept across upstream restarts,
        or the answer to a request that is safe to send again, re-issued while none of it has
        reached the client."""
        if call.method != "subscriptions/listen":
            return await self.resilient.relay(
                request,
                resp,
                headers=headers,
                body=body,
                call=call,
                headers_for=lambda r: self._client_headers(r, None, keep_length=True),
            )
        # `sidecar.drain` rule 3: a listen stream never ends by itself, so it does not hold a
        # drain, which ends it instead.
        self._release_drain(request)
        self.writer.active += 1
        try:
            return await self.resilient.listen(
                request,
                resp,
                headers=headers,
                body=body,
                call=call,
                headers_for=lambda r: self._client_headers(r, None, keep_length=False),
                stopping=lambda: self.draining.draining,
            )
        finally:
            self.writer.active -= 1

    async def _pipe(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        client_session: str | None,
        *,
        listen: bool = False,
        learn: bool = False,
    ) -> web.StreamResponse:
        """Pass a response through untouched, chunk by chunk, as it arrives. A `listen`
        stream (2026-07-28) does not hold a drain, which ends it (`sidecar.drain` rule 3):
        the client listens again, on a new connection, at another pod."""
        if listen:
            self._release_drain(request)
            self._listens.add(resp)
            if self.draining.draining:
                end_upstream(resp)
        out = web.StreamResponse(
            status=resp.status,
            reason=resp.reason,
            headers=self._client_headers(resp, client_session, keep_length=True),
        )
        sse = resp.headers.get("Content-Type", "").startswith(SSE_TYPE)
        self.writer.active += sse
        # A `tools/list` answer in JSON teaches which tools are safe to send again
        # (`sidecar.reissue` rule 2).
        lesson = (
            Lesson(self.resilient, request.path, sse=False)
            if learn and not sse and resp.status == 200
            else None
        )
        try:
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
                if lesson is not None:
                    lesson.feed(chunk)
            await out.write_eof()
            if lesson is not None:
                lesson.end()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            body_broke(self.warnings, request, exc)
        finally:
            self._listens.discard(resp)
            resp.release()
            self.writer.active -= sse
        return out

    async def _open_stream(
        self,
        request: web.Request,
        *,
        resp: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        kind: StreamKind,
        session_id: str | None,
        post: PostBody,
        learn: bool = False,
    ) -> web.StreamResponse:
        reconnect_headers = headers  # sent already: the stream keeps it, not a copy
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
            request_ids=post.request_ids,
            rewrite=self._rewrite_endpoint if kind is StreamKind.LEGACY else None,
        )
        if learn:  # `sidecar.reissue` rule 2: a tools/list answer names the safe tools
            stream.core.on_answer = partial(self.resilient.hints.learn_answer, path=request.path)
        if kind is StreamKind.LEGACY:
            stream.credential_fingerprint = fingerprint(
                request.headers.get("Authorization"), key=self.config.fingerprint_key
            )
        self.pump.start(stream, resp)  # rule 2: the pump owns `resp` from here on
        self.metrics.streams_opened.inc()
        if kind is StreamKind.STANDALONE and session_id is not None:
            sess = self.registry.session(session_id)
            old = self.registry.streams.get(sess.standalone) if sess.standalone else None
            if old is not None and old is not stream:
                old.end("replaced by a new GET stream")
                await cancel_and_wait(old.pump)
            sess.standalone = stream.stream_id
            if self.draining.draining:
                # `sidecar.drain` rule 3: its priming event goes out, then the client resumes
                # the stream on another pod.
                stream.end("sidecar draining")
        version = self.registry.session(session_id).protocol_version if session_id else None
        priming = kind is not StreamKind.LEGACY and expects_priming(request, version)
        return await self.writer.write(request, stream, after_seq=0, priming=priming)

    async def _forget_session(self, session_id: str) -> None:
        streams = self.registry.drop_session(session_id)
        for s in streams:
            s.end("session deleted")
        await cancel_and_wait(*(s.pump for s in streams))
        self.continuity.forget(session_id)
        spawn(self.continuity.delete_remote(session_id), name=f"delete-{session_id[:16]}")


def stream_kind(method: str, session_id: str | None, *, sse: bool) -> StreamKind | None:
    """Rule 1: which responses the sidecar tracks; None means pipe through untouched."""
    if not sse:
        return None
    if session_id:
        return StreamKind.POST if method == "POST" else StreamKind.STANDALONE
    if method == "GET":
        return StreamKind.LEGACY
    return None  # stateless (2026-07-28): nothing to resume, nothing to track


def trace_call(span: Span, call: Call) -> None:
    """The JSON-RPC request a proxied request carries, on its span."""
    if call.method:
        span.set("mcp.method.name", call.method)
        if call.request_id is not None:
            span.set("jsonrpc.request.id", str(call.request_id))
