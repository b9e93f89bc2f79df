"""The upstream pump: a thin asyncio loop that reads upstream bytes into a `StreamCore`.

Everything the pump decides is decided by the core (`relay`, `upstream_ended`,
`resume_now`, `session_renewed`): the loop only reads, waits, reconnects and reports. It
never lets an exception end it silently: an unexpected one is logged and fails the stream
with a reason the client sees.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from sidecar.config import SidecarConfig
from sidecar.continuity import Continuity, session_lost
from sidecar.headers import SESSION_HEADER, is_sse
from sidecar.metrics import Metrics, OutageClock
from sidecar.reconnect import Outcome
from sidecar.stream_core import Finished, Next, Reconnect, Relay, StreamState
from sidecar.streams import LiveStream, Registry
from sidecar.upstream import UPSTREAM_ERRORS, Upstream, describe_upstream_error, finish_body
from tether.logsetup import log_context
from tether.tasks import spawn

log = logging.getLogger("tether.sidecar.pump")

MAX_ERROR_BODY = 1 << 16


class Pump:
    """Runs one task per live stream, from its first upstream response to its end."""

    def __init__(
        self,
        *,
        config: SidecarConfig,
        metrics: Metrics,
        upstream: Upstream,
        continuity: Continuity,
        registry: Registry,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.upstream = upstream
        self.continuity = continuity
        self.registry = registry

    def start(
        self,
        stream: LiveStream,
        resp: aiohttp.ClientResponse | None,
        *,
        resume_now: bool = False,
    ) -> None:
        """Start the stream's pump; it owns `resp` from here on. Its lines name the stream
        and its session (the task keeps the context it was started in)."""
        with log_context(session=stream.session_id, stream=stream.stream_id):
            stream.pump = spawn(
                self.run(stream, resp, resume_now=resume_now), name=f"pump-{stream.stream_id}"
            )

    async def run(
        self,
        stream: LiveStream,
        resp: aiohttp.ClientResponse | None,
        *,
        resume_now: bool = False,
    ) -> None:
        core = stream.core
        loop = asyncio.get_running_loop()
        step: Next | None = core.resume_now() if resume_now else None
        attempt = 0
        outage = OutageClock(self.metrics)
        try:
            # One span for the stream's upstream life, child of the request that opened (or
            # revived, or adopted) it; a child span per reconnect (`sidecar.tracing` rule 3).
            with self.upstream.tracing.span(
                "tether.stream",
                {"tether.stream.id": stream.stream_id, "tether.stream.kind": stream.kind.name},
            ) as span:
                if stream.session_id is not None:
                    span.set("mcp.session.id", stream.session_id)
                while True:
                    if resp is not None:
                        try:
                            outcome = await self._consume(stream, resp)
                        finally:
                            resp.release()
                            resp = None
                        span.event("tether.upstream.ended", {"outcome": outcome.name})
                        step = core.upstream_ended(outcome, now=loop.time())
                        outage.connection_ended(outcome, loop.time())
                    elif step is None:
                        step = core.upstream_ended(Outcome.FAILED, now=loop.time())
                        outage.connection_ended(Outcome.FAILED, loop.time())
                    if isinstance(step, Finished):
                        span.set("tether.stream.state", step.state.value)
                        if step.state is StreamState.FAILED:
                            span.fail(step.reason)
                        return
                    attempt += 1
                    resp, step = await self._reconnect_after(stream, step, attempt)
                    outage.reconnected(resp is not None, loop.time())
        except Exception:
            log.exception("stream %s: the pump failed unexpectedly", stream.stream_id)
            core.fail("internal error in the sidecar (see its log)")
        finally:
            if resp is not None:
                resp.release()
            core.stop("stopped")
            outage.stream_ended(core.state is StreamState.FAILED, loop.time())
            if core.state is StreamState.FAILED:
                log.warning(
                    "stream %s (session %s): %s", stream.stream_id, stream.session_id, core.reason
                )
                self.metrics.streams_failed.inc()
            stream.settle()
            self.registry.finishing.discard(stream)
            self.continuity.report_position(stream)
            self.registry.trim_lingering(self.config.linger_max_bytes, stream)

    async def _reconnect_after(
        self, stream: LiveStream, step: Reconnect, attempt: int
    ) -> tuple[aiohttp.ClientResponse | None, Next | None]:
        """Wait as the core said, then `_reconnect`: one `tether.reconnect` span."""
        with self.upstream.tracing.span(
            "tether.reconnect",
            {
                "tether.stream.id": stream.stream_id,
                "tether.reconnect.attempt": attempt,
                "tether.reconnect.delay_s": step.delay,
                "tether.reconnect.resumed": bool(step.cursor),
            },
        ) as span:
            if step.delay:
                await asyncio.sleep(step.delay)
            self.metrics.reconnects.inc()
            resp, after = await self._reconnect(stream, step.cursor)
            if resp is None and not isinstance(after, Reconnect):
                span.fail("the upstream stream was not reopened")
            return resp, after

    async def _consume(self, stream: LiveStream, resp: aiohttp.ClientResponse) -> Outcome:
        """Relay one upstream response until it ends or the stream leaves OPEN."""
        core = stream.core
        core.upstream_opened(str(resp.url))
        try:
            async for chunk in resp.content.iter_any():
                step = core.relay(chunk)
                self._publish(stream, step)
                while step.paused:
                    self.metrics.upstream_paused.inc()
                    while core.backlogged() and not core.ended:
                        await stream.room.wait()
                    step = core.relay()
                    self._publish(stream, step)
                if core.ended:
                    await finish_body(resp)  # `sidecar.upstream` rule 4: keep the connection
                    return Outcome.CLOSED
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            log.info(
                "stream %s: upstream broke: %s", stream.stream_id, describe_upstream_error(exc)
            )
            return Outcome.FAILED
        return Outcome.CLOSED

    def _publish(self, stream: LiveStream, step: Relay) -> None:
        """Obey one relay: count, wake writers, report the position (never awaits)."""
        if step.duplicates:
            self.metrics.duplicates.inc(step.duplicates)
        if step.announced:
            stream.legacy_session = step.announced
            self.registry.legacy_sessions[step.announced] = stream
        if step.delivered:
            self.metrics.events_in.inc(step.delivered)
            stream.publish()
            self.continuity.report_position(stream)
        stream.settle()

    async def _reconnect(
        self, stream: LiveStream, cursor: str
    ) -> tuple[aiohttp.ClientResponse | None, Next | None]:
        """GET the stream again; (a response to relay, None) or (None, what to do next:
        None means "count it as a failed attempt")."""
        try:
            resp = await self.upstream.get_stream(
                stream.upstream_path, stream.upstream_headers, cursor
            )
        except UPSTREAM_ERRORS as exc:
            log.info(
                "stream %s: reconnect failed: %s", stream.stream_id, describe_upstream_error(exc)
            )
            return None, None
        if is_sse(resp.status, resp.headers.get("Content-Type", "")):
            if cursor:
                log.info("stream %s: resumed upstream after event %r", stream.stream_id, cursor)
            else:
                log.info("stream %s: reopened upstream stream", stream.stream_id)
            return resp, None
        try:
            body = await resp.content.read(MAX_ERROR_BODY)
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        finally:
            resp.release()
        if stream.session_id is not None and session_lost(resp.status, body):
            return None, await self._recover_session(stream)
        if resp.status == 405:
            return None, stream.core.fail("upstream does not support resuming streams (405)")
        log.info("stream %s: reconnect answered %d", stream.stream_id, resp.status)
        return None, None

    async def _recover_session(self, stream: LiveStream) -> Next:
        """The upstream lost the session: re-initialize it, then let the core decide."""
        sess = self.registry.sessions.get(stream.session_id or "")
        lost_id = stream.upstream_headers.get(SESSION_HEADER, "")
        if sess is None or not await self.continuity.reinitialize(
            self.upstream.client,
            sess,
            base_url=self.upstream.base,
            headers=stream.upstream_headers,
            lost_upstream_id=lost_id,
        ):
            return stream.core.fail(
                "the upstream lost the session and it could not be re-initialized"
            )
        self.metrics.reinitializations.inc()
        stream.upstream_headers[SESSION_HEADER] = sess.upstream_session_id
        return stream.core.session_renewed()
