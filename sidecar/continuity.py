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
     unknown id costs the lookups of one wait (rule 11) per id per period, whatever the
     request rate. So is a session its client just deleted here. Such a request is routine
     (a late one after its client ended the session, a stale id): a DEBUG line.
  4. `fenced_sessions` holds at most `FENCED_CACHE` ids for at most `FENCED_TTL` seconds, and
     lets an id go when the session is adopted again or deleted. It only saves work: the
     control plane fences a forgotten one's writes again.
  5. A session that ends here (deleted, expired, fenced) is released in the reporter
     (`Reporter.forget` or `Reporter.release`), whose per-session state is bounded too.

Ownership (the protocol with the control plane and the other sidecars; the control plane's
side is in `proto/tether/v1/sessions.proto`, the reporter's in `sidecar.reporter`):
  6. A sidecar serves a session only as its owner at an epoch: the one it created it at, or
     the one its claim returned. Local state of a session (its streams, trackers, positions)
     belongs to the epoch it was made under.
  7. Re-adoption starts clean. A request whose `Last-Event-ID` carries an epoch above the local
     session's shows that another sidecar served the session since: the sidecar asks the
     control plane, and unless the session is still its own at the local epoch (the id
     lied), it ends the session's old streams here (their pumps cancelled), claims it and
     serves it from the stored record; the reporter forgets fences and positions of older
     epochs (reporter rules 5 and 9), so the session is reported again at the new epoch.
  8. Fencing is pushed. While a control plane is configured, one task follows
     `WatchSessions(owner=us)`; the moment it shows a session we serve owned by another
     sidecar at a higher epoch, the session is dropped here as if a report had been FENCED:
     its client streams end with the comment "session taken over by another sidecar" and
     their pumps are cancelled (so the upstream GET stream closes, and the new owner can
     open its own). A broken watch is reopened with capped, jittered backoff (one log line
     per outage, then one per `WATCH_LOG_EVERY` failures); claims made while it was down
     are learned when it is back: each session served here that its snapshot does not show
     as ours is looked up, and dropped if another sidecar owns it now (and, should that
     fail, from the next renewal's FENCED answer, reporter rule 10).
  9. Ownership is a lease: the reporter renews, off the event path, every session this
     sidecar serves (`Registry.serving`: a client attached or a stream open, or a request
     within the session TTL); a session nobody serves expires after the TTL.
  10. A POST response being read by its client when the session is taken over is not cut:
     its client may hold no id that can resume it elsewhere yet (nothing relayed with an
     upstream cursor), and the response belongs to that one connection. It finishes here;
     its positions are not reported (a session taken over is not reported, rule 5 of the
     reporter), and the new owner serves everything else. Once its last client has gone
     it ends and its upstream is closed (`Registry.client_left`): a client that resumes it
     does so on the new owner, and an upstream that serves one connection per stream (the
     official Python SDK's) must not keep sending its events to the old one.
  11. A session the control plane does not have yet (its creation may still be on its way
     to the store: a client moving right after `initialize`) is looked up again every
     `ADOPT_POLL` seconds for up to `ADOPT_GRACE` seconds before it is "unknown", by at most
     `ADOPT_WAITERS` requests at once (others get "unknown" after one lookup); one request at
     a time per session id (rule 2), then the answer is remembered (rule 3): a made-up id
     costs at most 1 + `ADOPT_GRACE / ADOPT_POLL` lookups per period.
  12. With a control plane, a session this sidecar does not hold is served only once it is
     adopted: a request whose credential is not the one the session is bound to claims
     nothing and gets 404 (as for an unknown session), an unknown session 404, and while the
     control plane cannot answer 503 — never forwarded unchecked into the upstream session.
  13. A session deleted in the control plane while served here (at this sidecar's epoch) is
     dropped here as soon as the watch shows it: its streams end ("session deleted"), it is
     no longer renewed (so not re-created), and its client's next request gets 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import grpc
from multidict import CIMultiDict

from sidecar.reporter import RENEW_INTERVAL, Backoff, Reporter, ReporterConfig
from sidecar.streams import TAKEN_OVER, LiveStream, Registry, Session
from sidecar.tracing import NO_TRACING, Tracing
from sidecar.tracker import StreamKind
from tether import tasks
from tether.api.client import ClaimLostError, SessionGoneError
from tether.grpc_security import ClientSecurity
from tether.logsetup import OWNER, SESSION
from tether.model import (
    InvalidIdError,
    OwnerName,
    Rejection,
    SessionEvent,
    SessionEventType,
    SessionId,
    SessionRecord,
    StreamPosition,
    parse_owner,
    parse_session_id,
)
from tether.rpcerrors import one_line

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


@dataclass(frozen=True, slots=True)
class Unserved:
    """Why a session this sidecar does not hold cannot be served here (invariant 12)."""

    status: int
    reason: str


UNKNOWN = Unserved(404, "session not found")
UNAVAILABLE = Unserved(503, "the control plane cannot say who serves this session; retry")

RECONCILE_MAX = 10_000
"""Sessions checked one by one when a watch's snapshot leaves them out (invariant 8)."""
ADOPT_GRACE = 1.0
ADOPT_POLL = 0.1
ADOPT_WAITERS = 16
"""How long, and how often, a session the control plane does not have is looked up again
(invariant 11): well above a report's way to the store (the reporter's and the control
plane's batching, one store write); and how many requests may wait so at once (beyond them,
unknown at once: a flood of made-up ids costs one lookup each)."""
UNKNOWN_SESSION_CACHE = 1024
"""Unknown ids remembered at most (about 400 bytes each); the least recently added go first."""
FENCED_CACHE = 10_000
FENCED_TTL = 600.0
"""Fenced ids remembered at most, and for how long: long enough for the requests that were
under way when the session was taken over to end."""
WATCH_RECONNECT_INITIAL = 0.2
WATCH_RECONNECT_MAX = 5.0
"""Backoff bounds of the ownership watch's reconnects (invariant 8)."""
WATCH_LOG_EVERY = 20
"""During a long outage of the watch, one warning per this many failed attempts."""


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
        renew_interval: float = RENEW_INTERVAL,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.registry = registry
        self.tracing = tracing
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
                    renew_interval=renew_interval,
                ),
                on_fenced=self._fenced,
                served=self._served,
                tracing=tracing,
            )
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self.watch_synced = asyncio.Event()
        """Set while the ownership watch is open and past its snapshot (invariant 8)."""
        self.takeovers = 0
        """Sessions dropped here because the watch showed another owner."""
        self.locks = KeyedLocks()
        self._adopt_waiters = 0
        """Requests waiting for a session to be stored (invariant 11)."""
        self.unknown_sessions = RecentIds(capacity=UNKNOWN_SESSION_CACHE, ttl=UNKNOWN_SESSION_TTL)
        """Ids the control plane recently said it does not have (invariant 3)."""
        self.adoptions = 0
        self.reinitializations = 0
        self.fenced_sessions = RecentIds(capacity=FENCED_CACHE, ttl=FENCED_TTL)
        """Sessions another sidecar took over: not reported from here (invariant 4)."""
        self.report_interval = report_interval
        registry.session_ended.append(self._session_ended)

    async def start(self) -> None:
        if self.reporter is not None:
            await self.reporter.start()
            self._watch = tasks.spawn(self._watch_ownership(), name=f"ownership-watch {self.owner}")

    async def stop(self) -> None:
        self._stopping = True
        await tasks.cancel_and_wait(self._watch)
        if self.reporter is not None:
            await self.reporter.stop()

    def _served(self) -> list[SessionId]:
        """Invariant 9: the sessions whose lease the reporter renews."""
        assert self.reporter is not None
        window = self.reporter.session_ttl or 3 * self.reporter.renew_interval
        out: list[SessionId] = []
        for session_id in self.registry.serving(now=time.monotonic(), active_within=window):
            with contextlib.suppress(InvalidIdError):
                out.append(parse_session_id(session_id))
        return out

    # -- pushed fencing (invariant 8) -------------------------------------------------------

    async def _watch_ownership(self) -> None:
        assert self.reporter is not None
        backoff = Backoff(WATCH_RECONNECT_INITIAL, WATCH_RECONNECT_MAX)
        # Not `while True`: grpc may turn a cancellation into a CANCELLED status.
        while not self._stopping:
            error: BaseException | None = None
            try:
                await self._follow_watch()
            except (grpc.aio.AioRpcError, ValueError) as exc:
                error = exc
            finally:
                self.watch_synced.clear()
            if backoff.failures == 0 or (backoff.failures + 1) % WATCH_LOG_EVERY == 0:
                log.warning(
                    "ownership watch on %s broke (%s, %d attempts); reopening with backoff",
                    self.reporter.config.target,
                    error or "ended by the control plane",
                    backoff.failures + 1,
                )
            await asyncio.sleep(backoff.next_delay())  # the backoff itself, not a wait
            if self.watch_synced.is_set():
                backoff.reset()

    async def _follow_watch(self) -> None:
        assert self.reporter is not None
        # Ownership only: every position a session of ours moves comes back as a change,
        # and converting its streams cost more than the call that moved them (issue 16).
        events = self.reporter.client.watch_sessions(owner=self.owner, positions=False)
        shown: set[str] | None = set()  # sessions the snapshot shows ours, until SYNCED
        async with contextlib.aclosing(events):
            async for event in events:
                if event.type is SessionEventType.SYNCED:
                    if shown is not None:
                        missing = [s for s in self.registry.sessions if s not in shown]
                        shown = None
                        await self._reconcile(missing)
                    self.watch_synced.set()
                    log.info("ownership watch on %s open", self.reporter.config.target)
                else:
                    if shown is not None and event.session is not None:
                        shown.add(event.session.session_id)
                    self._on_watch_event(event)

    async def _reconcile(self, missing: list[str]) -> None:
        """Invariant 8: the sessions served here that a new watch's snapshot does not show as
        ours may have been claimed while the watch was down: ask, and drop those another
        sidecar now owns (at most `RECONCILE_MAX` per snapshot; the renewals catch the rest)."""
        assert self.reporter is not None
        for session_id in missing[:RECONCILE_MAX]:
            sess = self.registry.sessions.get(session_id)
            try:
                sid = parse_session_id(session_id)
            except InvalidIdError:
                continue
            if sess is None:
                continue
            record = await self.reporter.client.get_session(sid, timeout=CONTROL_PLANE_TIMEOUT)
            if record is not None and record.owner != self.owner:
                self._on_watch_event(SessionEvent(SessionEventType.PUT, sid, record))

    def _on_watch_event(self, event: SessionEvent) -> None:
        record = event.session
        if event.type is SessionEventType.DELETE:
            self._deleted_elsewhere(event)
            return
        if event.type is not SessionEventType.PUT or record is None:
            return  # expiries of our sessions: the lease renews what is still served
        if record.owner == self.owner:
            return
        sess = self.registry.sessions.get(record.session_id)
        if sess is None or sess.owner_epoch >= record.owner_epoch:
            return
        self.takeovers += 1
        if self.reporter is not None:
            self.reporter.fence(record.session_id, epoch=record.owner_epoch, owner=record.owner)
        self._taken_over(record.session_id, record.owner, record.owner_epoch)

    def _deleted_elsewhere(self, event: SessionEvent) -> None:
        """Invariant 13: the session was deleted in the control plane (an operator, or its
        client through another sidecar) while served here at that epoch: end it here too,
        and stop renewing it, so that it is not brought back."""
        record = event.session
        session_id = event.session_id or (record.session_id if record is not None else None)
        sess = self.registry.sessions.get(session_id) if session_id else None
        if session_id is None or sess is None:
            return
        if record is not None and (
            record.owner != self.owner or record.owner_epoch != sess.owner_epoch
        ):
            return  # the delete of another incarnation of the session
        log.warning("session %s was deleted in the control plane; ending it here", session_id)
        self._drop_local(session_id, deleted=True)
        self.forget(session_id)

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
        last = tracker.last_event_id_text
        if last is None:
            return
        sess = self.registry.sessions.get(stream.session_id)
        if sess is None or not sess.reported:
            return
        self.reporter.position(
            SessionId(stream.session_id),
            StreamPosition(
                stream_id=tracker.stream_id,
                last_event_id=last,
                upstream_event_id=tracker.last_upstream_event_id,
                seq=tracker.seq,
                owner_epoch=tracker.epoch,
            ),
        )

    def forget(self, session_id: str) -> None:
        """The client deleted the session: forget everything about it here, but remember it
        as unknown (rule 3): its delete reaches the control plane a moment later, and a late
        request of the client meanwhile must not restore the session from the stored record
        (only for the control plane's delete to end it again, with a warning)."""
        self.fenced_sessions.discard(session_id)
        if self.reporter is None:
            return
        try:
            sid = parse_session_id(session_id)
        except InvalidIdError:
            return
        self.unknown_sessions.add(sid)
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
            log.warning(
                "session %s: delete in the control plane failed: %s", session_id, one_line(exc)
            )

    def _fenced(self, session_id: SessionId, rejection: Rejection) -> None:
        """Another sidecar claimed the session: stop serving it here (we are the zombie)."""
        self._taken_over(session_id, rejection.current_owner, rejection.current_owner_epoch)

    def _taken_over(self, session_id: str, owner: str, epoch: int) -> None:
        sess = self.registry.sessions.get(session_id)
        if sess is None or (owner == self.owner and epoch <= sess.owner_epoch):
            return  # gone already, or a late answer to a report from before we took it back
        # Routine (a client moved, a pod drained): INFO, not WARNING.
        log.info(
            "session %s now belongs to %s (epoch %d); dropping it here", session_id, owner, epoch
        )
        self.fenced_sessions.add(session_id)
        self._drop_local(session_id)

    def _drop_local(self, session_id: str, *, deleted: bool = False) -> None:
        """End the session's streams here and cancel their pumps (closing the upstream). When
        it was taken over, a POST response still in flight is the exception (invariant 10): it
        finishes on the connection its client reads, without reporting (the session is no
        longer ours). When it was `deleted` (invariant 13), everything ends."""
        for stream in self.registry.drop_session(session_id):
            in_flight = stream.kind is StreamKind.POST and not stream.ended and stream.clients
            if in_flight and not deleted:
                self.registry.finishing.add(stream)
                continue
            stream.end("session deleted" if deleted else TAKEN_OVER)
            if stream.pump is not None:
                stream.pump.cancel()

    # -- adoption --------------------------------------------------------------------------

    async def adopt(
        self, session_id: str, *, seen_epoch: int = 0, credential: str | None = None
    ) -> Session | Unserved | None:
        """The local session, or one adopted from the control plane; `Unserved` when a
        control plane is configured and the session cannot be served here (invariant 12);
        None when there is nothing to adopt from (no control plane, an id it cannot hold).

        `seen_epoch` is the owner epoch of the client's `Last-Event-ID` (0 if none): above the
        local session's, it means another sidecar served the session since (invariant 7).
        `credential` is the fingerprint the request presents (None: binding off)."""
        sess = self.registry.sessions.get(session_id)
        if self.reporter is None or self._still_ours(sess, seen_epoch):
            return sess
        try:
            sid = parse_session_id(session_id)
        except InvalidIdError:
            return sess  # no lock, no call, nothing remembered (invariant 1)
        if sess is None and sid in self.unknown_sessions:
            # A late request after the client ended its session, or a stale id: routine.
            log.debug("session %s: unknown here and to the control plane", sid)
            return UNKNOWN
        async with self.locks.hold(sid):
            sess = self.registry.sessions.get(sid)
            if self._still_ours(sess, seen_epoch):
                return sess
            if sess is None and sid in self.unknown_sessions:
                return UNKNOWN  # answered while this request waited for the lock
            with self.tracing.span("tether.adopt", {"mcp.session.id": sid}) as span:
                claimed = await self._claim(sid, credential=credential)
                if isinstance(claimed, Unserved):
                    span.set("tether.adopt.outcome", f"unserved {claimed.status}")
                    return sess if sess is not None else claimed
                record, previous_owner = claimed
                span.set("tether.owner.epoch", record.owner_epoch)
                if sess is not None:
                    if record.owner_epoch == sess.owner_epoch:
                        span.set("tether.adopt.outcome", "still ours")
                        return sess  # still ours at the local epoch: the id's epoch was not real
                    log.info(
                        "session %s: served elsewhere since epoch %d; starting again here",
                        sid,
                        sess.owner_epoch,
                    )
                    self._drop_local(sid)
                span.set("tether.adopt.outcome", "adopted")
                return self._install(sid, record, previous_owner=previous_owner)

    def _still_ours(self, sess: Session | None, seen_epoch: int) -> bool:
        """A local session to serve as it is: no later epoch seen, and not taken over (a
        request that was under way when another sidecar took the session may have left a
        bare local session behind; the stored record is the session)."""
        return (
            sess is not None
            and seen_epoch <= sess.owner_epoch
            and sess.session_id not in self.fenced_sessions
        )

    async def _claim(
        self, sid: SessionId, *, credential: str | None
    ) -> tuple[SessionRecord, str] | Unserved:
        """The stored record, claimed for this sidecar if another owns it, and its owner before
        (this sidecar's own name when it owned it already); `Unserved` if the
        session is unknown there (still, after `ADOPT_GRACE`: invariant 11), bound to another
        credential (nothing is claimed: invariant 12) or the control plane cannot say."""
        assert self.reporter is not None
        client = self.reporter.client
        loop = asyncio.get_running_loop()
        may_wait = self._adopt_waiters < ADOPT_WAITERS
        give_up = loop.time() + (ADOPT_GRACE if may_wait else 0.0)
        self._adopt_waiters += may_wait
        try:
            while (record := await client.get_session(sid, timeout=CONTROL_PLANE_TIMEOUT)) is None:
                if loop.time() >= give_up:
                    self.unknown_sessions.add(sid)
                    return UNKNOWN
                await asyncio.sleep(ADOPT_POLL)
            bound = record.credential_fingerprint
            if credential is not None and bound and bound != credential:
                log.warning("session %s: a request with another credential claims nothing", sid)
                return UNKNOWN  # the same answer as for no session: nothing to probe
            previous_owner = record.owner
            if record.owner != self.owner:
                record = await client.claim_session(
                    sid, owner=self.owner, timeout=CONTROL_PLANE_TIMEOUT
                )
        except SessionGoneError as exc:
            self.unknown_sessions.add(sid)
            log.warning("session %s: could not claim it: %s", sid, exc)
            return UNKNOWN
        except ClaimLostError as exc:
            log.warning("session %s: could not claim it: %s", sid, exc)
            return UNAVAILABLE
        except (grpc.aio.AioRpcError, ValueError) as exc:
            log.warning("session %s: control plane unavailable (%s)", sid, one_line(exc))
            return UNAVAILABLE
        finally:
            self._adopt_waiters -= may_wait
        return record, previous_owner

    def _install(self, sid: SessionId, record: SessionRecord, *, previous_owner: str) -> Session:
        """Serve the session here from its stored record, at the record's epoch."""
        sess = self.registry.session(sid)
        sess.upstream_session_id = record.upstream_session_id or sid
        sess.protocol_version = record.protocol_version or None
        sess.initialize_request = record.initialize_request or None
        sess.owner_epoch = record.owner_epoch
        sess.persisted_streams = dict(record.streams)
        sess.credential_fingerprint = record.credential_fingerprint
        self.fenced_sessions.discard(sid)
        # The reporter gets the whole record (to re-create the session should the control
        # plane lose it) at the new epoch, which lifts a fence it may remember from before
        # and drops what it knew of older epochs (reporter rule 9).
        self.report_session(sess)
        self.adoptions += 1
        if previous_owner == self.owner:
            # Its own session it no longer held in memory (a restart under the same name, or
            # dropped while idle): nothing moved, so no "adopted from" itself.
            log.info(
                "session %s restored from the control plane at epoch %d (%d streams): "
                "this sidecar already owned it",
                sid,
                record.owner_epoch,
                len(record.streams),
                extra={SESSION: sid, OWNER: record.owner, "previous_owner": previous_owner},
            )
        else:
            log.info(
                "session %s adopted from %s at epoch %d (%d streams)",
                sid,
                previous_owner,
                record.owner_epoch,
                len(record.streams),
                extra={SESSION: sid, OWNER: record.owner, "previous_owner": previous_owner},
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
        with self.tracing.span("tether.reinitialize", {"mcp.session.id": sess.session_id}) as span:
            done = await self._reinitialize(
                client, sess, base_url=base_url, headers=headers, lost_upstream_id=lost_upstream_id
            )
            if not done:
                span.fail("the session could not be re-initialized")
            return done

    async def _reinitialize(
        self,
        client: aiohttp.ClientSession,
        sess: Session,
        *,
        base_url: str,
        headers: Mapping[str, str],
        lost_upstream_id: str,
    ) -> bool:
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
                with self.tracing.upstream("POST", url, h) as span:
                    resp = await client.post(url, data=body, headers=h)
                    span.http_status(resp.status)
                async with resp:
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
                with self.tracing.upstream("POST", url, h) as span:
                    resp = await client.post(url, data=note, headers=h)
                    span.http_status(resp.status)
                async with resp:
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
            # Routine after a move to another pod (each has its own MCP server): INFO.
            log.info(
                "session %s: the upstream had lost it; re-initialized as %s",
                sess.session_id,
                new_id,
            )
            self.report_session(sess)
            return True
