"""Resume: a client comes back with `Last-Event-ID` naming an id a Tether sidecar minted.

- A stream this sidecar has: replay from the buffer (or first from the upstream, when the id
  is older than the buffer), then live; a failed or stopped stream is revived for it.
- A stream of a session this sidecar adopted from another: a new stream with the same id
  continues under this sidecar's epoch, its upstream resumed right after the client's own
  position (the id carries the upstream cursor).

Rules:
1. Ids are checked before anything is served: another session's stream is 404, an id this
   stream never delivered (future seq, other epoch) is 410.
2. Adoption needs nothing but the client's id: its kind letter says POST or GET stream, its
   cursor where to resume the upstream. The stored position is a fallback for ids without a
   cursor. A GET stream with no cursor (nothing delivered yet, or an upstream without ids) is
   reopened upstream; only a POST response whose upstream gave no id cannot be resumed.
3. An id from a higher owner epoch than this sidecar's session means another sidecar served
   the client since: `Continuity.adopt` (given that epoch) has already dropped the stale
   local state and claimed the session again before the resume gets here; if the control
   plane says the session is still this sidecar's at its epoch, the id is not real (410).
4. A stream taken over continues from the client's id: that id (the previous owner's epoch,
   the seq where it took over) stays valid here, so a client that reconnects again before
   the next event is served, not refused.
5. A resumed stream first repeats the client's own id to it (`StreamCore.resume_marker`), so
   a connection that ends before the next event leaves the client holding that id.
- Anything else: 410 (unknown or too old) or 404 (another session's, another credential's).
"""

from __future__ import annotations

import logging

from aiohttp import web
from multidict import CIMultiDict

from sidecar.admission import Admission
from sidecar.config import SidecarConfig
from sidecar.headers import (
    SESSION_HEADER,
    SSE_TYPE,
    error_response,
    expects_priming,
    upstream_request_headers,
)
from sidecar.metrics import Metrics, ResumeClock, ResumeSource
from sidecar.pump import Pump
from sidecar.stream_core import StreamCore
from sidecar.streams import LiveStream, Registry, Session
from sidecar.tracker import EventId, Gap, StreamKind, StreamTracker
from sidecar.writer import Writer

log = logging.getLogger("tether.sidecar.resume")


class Resume:
    def __init__(
        self,
        *,
        config: SidecarConfig,
        metrics: Metrics,
        registry: Registry,
        admission: Admission,
        pump: Pump,
        writer: Writer,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.registry = registry
        self.admission = admission
        self.pump = pump
        self.writer = writer

    async def resume(
        self, request: web.Request, event_id: EventId, sess: Session | None, *, started: float
    ) -> web.StreamResponse:
        """`started`: when the request arrived (monotonic), for the resume-time histogram."""
        stream = self.registry.streams.get(event_id.stream)
        if stream is None and sess is not None:
            adopted = self._adopt_stream(request, sess, event_id)
            if adopted is not None:
                self.metrics.resumes.inc()
                return await self.writer.write(
                    request,
                    adopted,
                    after_seq=event_id.seq,
                    priming=False,
                    first=self._marker(request, event_id, adopted, sess),
                    resume=ResumeClock(self.metrics, ResumeSource.ADOPTED, started),
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
        if not self.admission.legacy_credential_matches(request, stream):
            return error_response(404, "no such session for that event id")
        tracker = stream.tracker
        # The id where this sidecar took the stream over is the previous owner's (rule 4).
        at_takeover = event_id.epoch < tracker.epoch and event_id.seq == tracker.start_seq
        if (event_id.epoch != tracker.epoch and not at_takeover) or event_id.seq > tracker.seq:
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
        if (stream.pump is None or stream.pump.done()) and stream.revive():
            # The pump gave up earlier (e.g. a long outage): a client is back, try again.
            self.pump.start(stream, None)
        return await self.writer.write(
            request,
            stream,
            after_seq=event_id.seq,
            priming=False,
            first=self._marker(request, event_id, stream, sess),
            catch_up_cursor=catch_up_cursor,
            resume=ResumeClock(
                self.metrics,
                ResumeSource.BUFFER if catch_up_cursor is None else ResumeSource.UPSTREAM,
                started,
            ),
        )

    def _marker(
        self, request: web.Request, event_id: EventId, stream: LiveStream, sess: Session | None
    ) -> bytes | None:
        """The id the client resumed from, first on its new connection (rule 5)."""
        if stream.kind is StreamKind.LEGACY:
            return None
        if not expects_priming(request, sess.protocol_version if sess else None):
            return None
        return StreamCore.resume_marker(event_id, self.config.client_retry_ms)

    def _adopt_stream(
        self, request: web.Request, sess: Session, event_id: EventId
    ) -> LiveStream | None:
        """Take over a stream another sidecar served: resume its upstream right after the
        client's own position and go on numbering under this sidecar's epoch."""
        kind = StreamKind.of(event_id.stream)
        if kind not in (StreamKind.POST, StreamKind.STANDALONE):
            return None
        # Rule 2: the client's id says it all; the stored position is only a fallback.
        cursor = event_id.upstream
        persisted = sess.persisted_streams.get(event_id.stream)
        if not cursor and persisted is not None and persisted.order == event_id.order:
            cursor = persisted.upstream_event_id
        if not cursor and kind is StreamKind.POST:
            log.warning(
                "resume of %s refused: the upstream gave this response no event id to resume from",
                event_id,
            )
            return None
        headers = upstream_request_headers(
            request, trusted_peer=self.admission.trusts_forwarding(request)
        )
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
        self.pump.start(stream, None, resume_now=True)
        log.info(
            "%s stream %s adopted at %s; %s",
            "GET" if kind is StreamKind.STANDALONE else kind.name,
            stream.stream_id,
            event_id,
            f"resuming the upstream after event {cursor!r}" if cursor else "reopening the upstream",
        )
        return stream
