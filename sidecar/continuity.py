"""Session continuity beyond one sidecar and beyond the upstream's memory.

- Reporting: session records and stream positions go to the control plane through the
  `Reporter`, whose methods never await (the event path calls them).
- Adoption: a request naming a session this sidecar does not know makes it ask the control
  plane; if the session exists there, this sidecar claims it (the owner epoch goes up, so the
  old owner's updates are refused from then on) and serves it from the persisted record.
- Re-initialization: when the upstream answers 404 for a session it knew (it restarted without
  persistence), the stored `initialize` request and `notifications/initialized` are replayed,
  and the client's session id is mapped to the new upstream one. The client never sees its
  session vanish.

A control plane that is down or answers garbage degrades to "session unknown": the request is
forwarded as it is and the sidecar keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Mapping

import aiohttp
import grpc
from multidict import CIMultiDict

from sidecar.reporter import Reporter, ReporterConfig
from sidecar.streams import LiveStream, Registry, Session
from tether.api.client import ClaimLostError, SessionGoneError
from tether.grpc_security import ClientSecurity
from tether.model import (
    InvalidIdError,
    OwnerName,
    Rejection,
    SessionId,
    SessionRecord,
    StreamPosition,
    parse_owner,
    parse_session_id,
)

log = logging.getLogger("tether.sidecar.continuity")

SESSION_HEADER = "Mcp-Session-Id"
PROTOCOL_HEADER = "MCP-Protocol-Version"
CONTROL_PLANE_TIMEOUT = 5.0
MAX_INIT_RESPONSE = 1 << 20


def default_owner() -> OwnerName:
    """This sidecar's name: the pod name in Kubernetes, else the host name and pid."""
    name = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    try:
        return parse_owner(name)
    except InvalidIdError:
        return OwnerName(f"sidecar-{os.getpid()}")


def session_lost(status: int, body: bytes) -> bool:
    """Does an upstream answer mean "I do not know this session"? The specification says 404;
    some servers answer 400 and say so in the body."""
    if status == 404:
        return True
    return status == 400 and b"session" in body.lower()


def negotiated_version(body: bytes) -> str | None:
    """The protocolVersion of an initialize result, in a JSON or single-event SSE body."""
    candidates = [body]
    if body.lstrip().startswith((b"event:", b"id:", b"data:", b":")):
        candidates = [
            line.split(b":", 1)[1].strip()
            for line in body.replace(b"\r\n", b"\n").split(b"\n")
            if line.startswith(b"data:")
        ]
    for raw in candidates:
        try:
            msg = json.loads(raw)
        except ValueError:
            continue
        result = msg.get("result") if isinstance(msg, dict) else None
        if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
            return str(result["protocolVersion"])
    return None


class Continuity:
    """Reporting, adoption and re-initialization for one sidecar."""

    def __init__(
        self,
        *,
        registry: Registry,
        upstream: str,
        control_plane: str | None,
        security: ClientSecurity | None = None,
        owner: OwnerName,
        report_interval: float,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.owner = owner
        self.reporter: Reporter | None = None
        if control_plane:
            self.reporter = Reporter(
                ReporterConfig(
                    target=control_plane,
                    owner=owner,
                    interval=report_interval,
                    security=security,
                ),
                on_fenced=self._fenced,
            )
        self._locks: dict[str, asyncio.Lock] = {}
        self.adoptions = 0
        self.reinitializations = 0
        self.fenced_sessions: set[str] = set()

    async def start(self) -> None:
        if self.reporter is not None:
            await self.reporter.start()

    async def stop(self) -> None:
        if self.reporter is not None:
            await self.reporter.stop()

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = self._locks[session_id] = asyncio.Lock()
        return lock

    # -- reporting (never awaits) ----------------------------------------------------------

    def record_of(self, sess: Session) -> SessionRecord | None:
        try:
            session_id = parse_session_id(sess.session_id)
        except InvalidIdError as exc:
            log.warning("session %r not reported: %s", sess.session_id[:64], exc)
            return None
        return SessionRecord(
            session_id=session_id,
            upstream_session_id=sess.upstream_session_id,
            upstream_address=self.upstream,
            owner=self.owner,
            owner_epoch=sess.owner_epoch,
            protocol_version=sess.protocol_version or "",
            initialize_request=sess.initialize_request or b"",
            credential_fingerprint=sess.credential_fingerprint or "",
        )

    def report_session(self, sess: Session) -> None:
        if self.reporter is None or sess.session_id in self.fenced_sessions:
            return
        record = self.record_of(sess)
        if record is not None:
            self.reporter.session(record)
            sess.reported = True

    def report_position(self, stream: LiveStream) -> None:
        if self.reporter is None or stream.session_id is None:
            return
        tracker = stream.tracker
        last = tracker.last_event_id
        if last is None:
            return
        sess = self.registry.sessions.get(stream.session_id)
        if sess is None or not sess.reported:
            return
        self.reporter.position(
            SessionId(stream.session_id),
            StreamPosition(
                stream_id=tracker.stream_id,
                last_event_id=str(last),
                upstream_event_id=tracker.last_upstream_event_id,
                seq=tracker.seq,
                owner_epoch=tracker.epoch,
            ),
        )

    def forget(self, session_id: str) -> None:
        """The client deleted the session: forget it here and in the control plane."""
        if self.reporter is None:
            return
        try:
            sid = parse_session_id(session_id)
        except InvalidIdError:
            return
        self.reporter.forget(sid)

    async def delete_remote(self, session_id: str) -> None:
        if self.reporter is None:
            return
        try:
            await self.reporter.client.delete_session(
                parse_session_id(session_id), timeout=CONTROL_PLANE_TIMEOUT
            )
        except (SessionGoneError, InvalidIdError):
            pass
        except grpc.aio.AioRpcError as exc:
            log.warning("session %s: delete in the control plane failed: %s", session_id, exc)

    def _fenced(self, session_id: SessionId, rejection: Rejection) -> None:
        """Another sidecar claimed the session: stop serving it here (we are the zombie)."""
        log.warning(
            "session %s now belongs to %s (epoch %d); dropping it here",
            session_id,
            rejection.current_owner,
            rejection.current_owner_epoch,
        )
        self.fenced_sessions.add(session_id)
        for stream in self.registry.drop_session(session_id):
            stream.end("session taken over by another sidecar")
            if stream.pump is not None:
                stream.pump.cancel()

    # -- adoption --------------------------------------------------------------------------

    async def adopt(self, session_id: str) -> Session | None:
        """The local session, or one adopted from the control plane; None if unknown there."""
        sess = self.registry.sessions.get(session_id)
        if sess is not None or self.reporter is None:
            return sess
        async with self._lock(session_id):
            sess = self.registry.sessions.get(session_id)
            if sess is not None:
                return sess
            try:
                sid = parse_session_id(session_id)
            except InvalidIdError:
                return None
            client = self.reporter.client
            try:
                record = await client.get_session(sid, timeout=CONTROL_PLANE_TIMEOUT)
                if record is None:
                    return None
                if record.owner != self.owner:
                    record = await client.claim_session(
                        sid, owner=self.owner, timeout=CONTROL_PLANE_TIMEOUT
                    )
            except (SessionGoneError, ClaimLostError) as exc:
                log.warning("session %s: could not claim it: %s", session_id, exc)
                return None
            except (grpc.aio.AioRpcError, ValueError) as exc:
                log.warning("session %s: control plane unavailable (%s)", session_id, exc)
                return None
            sess = self.registry.session(session_id)
            sess.upstream_session_id = record.upstream_session_id or session_id
            sess.protocol_version = record.protocol_version or None
            sess.initialize_request = record.initialize_request or None
            sess.owner_epoch = record.owner_epoch
            sess.persisted_streams = dict(record.streams)
            sess.credential_fingerprint = record.credential_fingerprint
            sess.reported = True
            self.fenced_sessions.discard(session_id)
            self.adoptions += 1
            log.info(
                "session %s adopted from %s at epoch %d (%d streams)",
                session_id,
                record.owner,
                record.owner_epoch,
                len(record.streams),
            )
            return sess

    # -- re-initialization -----------------------------------------------------------------

    async def reinitialize(
        self,
        client: aiohttp.ClientSession,
        sess: Session,
        *,
        base_url: str,
        headers: Mapping[str, str],
        lost_upstream_id: str,
    ) -> bool:
        """Replay the session's `initialize` on the upstream; True once it has a new upstream
        session (possibly made by a concurrent caller)."""
        async with self._lock(sess.session_id):
            if sess.upstream_session_id != lost_upstream_id:
                return True  # somebody else re-initialized it meanwhile
            body = sess.initialize_request
            if not body:
                log.warning(
                    "session %s: upstream lost it and no initialize request is known",
                    sess.session_id,
                )
                return False
            h: CIMultiDict[str] = CIMultiDict(headers)
            for name in (SESSION_HEADER, "Last-Event-ID", "Content-Length"):
                h.popall(name, None)
            h["Content-Type"] = "application/json"
            h["Accept"] = "application/json, text/event-stream"
            url = base_url + sess.init_path
            try:
                async with client.post(url, data=body, headers=h) as resp:
                    new_id = resp.headers.get(SESSION_HEADER)
                    answer = await resp.content.read(MAX_INIT_RESPONSE)
                    if resp.status != 200 or not new_id:
                        log.warning(
                            "session %s: re-initialize answered %d", sess.session_id, resp.status
                        )
                        return False
                version = negotiated_version(answer) or sess.protocol_version
                h[SESSION_HEADER] = new_id
                if version:
                    h[PROTOCOL_HEADER] = version
                note = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
                async with client.post(url, data=note, headers=h) as resp:
                    await resp.read()
                    if resp.status >= 300:
                        log.warning(
                            "session %s: notifications/initialized answered %d",
                            sess.session_id,
                            resp.status,
                        )
                        return False
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.warning("session %s: re-initialize failed: %s", sess.session_id, exc)
                return False
            sess.upstream_session_id = new_id
            if version:
                sess.protocol_version = version
            self.reinitializations += 1
            log.warning(
                "session %s: the upstream had lost it; re-initialized as %s",
                sess.session_id,
                new_id,
            )
            self.report_session(sess)
            return True
