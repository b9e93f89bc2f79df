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

Invariants (a request's `Mcp-Session-Id` is chosen by the caller, so nothing it names may
cost unbounded memory or unbounded control-plane calls):
  1. An id is validated (`parse_session_id`) before anything else: an invalid id creates no
     state and never reaches the control plane.
  2. Per-session locks (`KeyedLocks`) exist only while a task holds or awaits them.
  3. A session the control plane said it does not have is answered "unknown" from memory for
     `UNKNOWN_SESSION_TTL` seconds, for at most `UNKNOWN_SESSION_CACHE` ids: repeating an
     unknown id costs one `GetSession` per id per period, whatever the request rate.
  4. `fenced_sessions` holds at most `FENCED_CACHE` ids for at most `FENCED_TTL` seconds, and
     lets an id go when the session is adopted again or deleted. It only saves work: the
     control plane fences a forgotten one's writes again.
  5. A session that ends here (deleted, expired, fenced) is released in the reporter
     (`Reporter.forget` or `Reporter.release`), whose per-session state is bounded too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

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

UNKNOWN_SESSION_TTL = 2.0
"""Seconds an id the control plane does not have is answered "unknown" without asking again
(0 turns the cache off). Short because a session created on another sidecar just after we
asked stays unknown here that long; its first request here failed anyway (the report had
not landed yet), and clients start a new session on 404."""
UNKNOWN_SESSION_CACHE = 1024
"""Unknown ids remembered at most (about 400 bytes each); the least recently added go first."""
FENCED_CACHE = 10_000
FENCED_TTL = 600.0
"""Fenced ids remembered at most, and for how long: long enough for the requests that were
under way when the session was taken over to end."""


class RecentIds:
    """Ids remembered for `ttl` seconds, at most `capacity` of them (the oldest go first).

    For memories whose loss only costs work (a control-plane call, a refused report), so that
    they can be bounded. `clock` is injectable for tests; expired ids are let go whenever the
    set is used, so its size is what it holds. Changing `ttl` affects ids added afterwards.
    """

    def __init__(
        self, *, capacity: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if capacity < 1 or ttl < 0:
            raise ValueError("RecentIds needs capacity >= 1 and ttl >= 0")
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()
        """Id -> when it expires; in expiry order, since every id gets the same ttl."""

    def add(self, key: str) -> None:
        now = self._clock()
        self._prune(now)
        if self.ttl <= 0:
            return
        self._until.pop(key, None)
        self._until[key] = now + self.ttl
        if len(self._until) > self.capacity:
            self._until.popitem(last=False)

    def discard(self, key: str) -> None:
        self._until.pop(key, None)

    def __contains__(self, key: object) -> bool:
        self._prune(self._clock())
        return key in self._until

    def __len__(self) -> int:
        self._prune(self._clock())
        return len(self._until)

    def _prune(self, now: float) -> None:
        until = self._until
        while until and next(iter(until.values())) <= now:
            until.popitem(last=False)


class _Held:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
        """Tasks holding or awaiting `lock`."""


class KeyedLocks:
    """One `asyncio.Lock` per key, existing only while a task holds or awaits it: a key
    nobody uses costs nothing, however many keys were ever used."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = _Held()
        held.users += 1
        try:
            async with held.lock:
                yield
        finally:
            held.users -= 1
            if held.users == 0:
                del self._held[key]

    def users(self, key: str) -> int:
        """Tasks holding or awaiting `key`'s lock."""
        held = self._held.get(key)
        return held.users if held is not None else 0

    def __len__(self) -> int:
        return len(self._held)


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
        self.locks = KeyedLocks()
        self.unknown_sessions = RecentIds(capacity=UNKNOWN_SESSION_CACHE, ttl=UNKNOWN_SESSION_TTL)
        """Ids the control plane recently said it does not have (invariant 3)."""
        self.adoptions = 0
        self.reinitializations = 0
        self.fenced_sessions = RecentIds(capacity=FENCED_CACHE, ttl=FENCED_TTL)
        """Sessions another sidecar took over: not reported from here (invariant 4)."""
        registry.session_ended.append(self._session_ended)

    async def start(self) -> None:
        if self.reporter is not None:
            await self.reporter.start()

    async def stop(self) -> None:
        if self.reporter is not None:
            await self.reporter.stop()

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
        """The client deleted the session: forget everything about it here."""
        self.fenced_sessions.discard(session_id)
        if self.reporter is None:
            return
        try:
            sid = parse_session_id(session_id)
        except InvalidIdError:
            return
        self.reporter.forget(sid)

    def _session_ended(self, session_id: str) -> None:
        """The registry let the session go (expired, deleted, fenced): so may the reporter,
        once what it has of the session is acknowledged."""
        if self.reporter is None:
            return
        try:
            sid = parse_session_id(session_id)
        except InvalidIdError:
            return
        self.reporter.release(sid)

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
        try:
            sid = parse_session_id(session_id)
        except InvalidIdError:
            return None  # no lock, no call, nothing remembered (invariant 1)
        if sid in self.unknown_sessions:
            return None
        async with self.locks.hold(sid):
            sess = self.registry.sessions.get(sid)
            if sess is not None:
                return sess
            if sid in self.unknown_sessions:
                return None  # answered while this request waited for the lock
            client = self.reporter.client
            try:
                record = await client.get_session(sid, timeout=CONTROL_PLANE_TIMEOUT)
                if record is None:
                    self.unknown_sessions.add(sid)
                    return None
                if record.owner != self.owner:
                    record = await client.claim_session(
                        sid, owner=self.owner, timeout=CONTROL_PLANE_TIMEOUT
                    )
            except SessionGoneError as exc:
                self.unknown_sessions.add(sid)
                log.warning("session %s: could not claim it: %s", session_id, exc)
                return None
            except ClaimLostError as exc:
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
            self.fenced_sessions.discard(session_id)
            # The reporter gets the whole record (to re-create the session should the control
            # plane lose it) at the new epoch, which lifts a fence it may remember from before.
            self.report_session(sess)
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
        async with self.locks.hold(sess.session_id):
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
