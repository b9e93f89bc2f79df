"""The gRPC servicer of `tether.v1.SessionService`: a thin loop around the store and the
write batcher.

Protobuf is converted to `tether.model` at the top of each method and back at the bottom.
Every bad request gets a clear status and the server keeps serving:
    INVALID_ARGUMENT     bad id, owner or page token
    NOT_FOUND            no such session
    FAILED_PRECONDITION  ClaimSession with an expected_owner_epoch that is no longer current
    RESOURCE_EXHAUSTED   ClaimSession for an owner that holds the most sessions allowed
    UNAVAILABLE          the store failed, or the control plane is shutting down
    ABORTED              a watcher fell too far behind (watch again)
    UNAUTHENTICATED      no or bad credentials (`controlplane.identity`)
    PERMISSION_DENIED    the caller's roles do not allow the call (`controlplane.policy`)
    RESOURCE_EXHAUSTED   a request over the item limit, or too many streaming calls from
                         one peer (`controlplane.limits`)
In ReportEvents, per-item problems (bad ids, fenced owner, unknown session, a sidecar writing a
session it does not own or changing its credential binding) are rejections in the
acknowledgement, never a failed stream: a sidecar's other sessions keep flowing.

Rules this module keeps (the limits themselves are in `controlplane.limits`):
  1. Read-ahead is bounded: a ReportEvents stream reads its next request only while what it
     has read and not acknowledged is under its own and the shared read-ahead limits, a
     request is converted only once admitted, and submitting to the write batcher waits for
     room; a faster sender is slowed by gRPC flow control. A stream gives back what it held
     when it ends, however it ends, and every acknowledgement wakes the waiting readers.
  2. Rejection lines are rate-limited per (kind, peer host): the first few in full, then one
     summary line per interval (`tether.logthrottle`); a flood writes a bounded log.
  3. Streaming calls (ReportEvents, WatchSessions) are counted per peer host and refused
     beyond `max_calls_per_peer`; the count is released when the call ends, however it ends.
  4. A report for a session deleted (DeleteSession) in the last `LATE_REPORT_GRACE` seconds is
     the tail of an ordinary exit (the client ended its session while its sidecar's last
     positions were on the way): skipped like any unknown session, logged at DEBUG, not as a
     warning. At most `RECENT_DELETES` deletions are remembered, the oldest forgotten first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import NoReturn, TypeVar

import grpc

from controlplane.batcher import FlushResult, WriteBatcher, acknowledge
from controlplane.identity import current_principal
from controlplane.limits import (
    DEFAULT_MAX_CALLS_PER_PEER,
    PeerCalls,
    ReadAhead,
    RequestTooLargeError,
    SharedReadAhead,
    check_request_items,
    peer_key,
)
from controlplane.metrics import ControlPlaneMetrics, Reason
from controlplane.policy import Access, Authorizer, Denied, Read, redact
from controlplane.store.protocol import (
    ClaimRefusedError,
    InvalidPageTokenError,
    OwnerLimitError,
    SessionNotFoundError,
    SessionStore,
    StoreError,
    StoreUnavailableError,
    WatchLaggedError,
)
from tether import tasks
from tether.api import convert
from tether.api.v1 import sessions_pb2 as pb
from tether.api.v1 import sessions_pb2_grpc as pb_grpc
from tether.logsetup import OWNER, SESSION, STREAM
from tether.logthrottle import ThrottledLog
from tether.model import (
    InvalidIdError,
    OwnerName,
    Rejection,
    RejectionReason,
    ReportBatch,
    SessionEvent,
    SessionEventType,
    SessionId,
    SessionWrite,
    parse_owner,
    parse_session_id,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

WATCH_QUEUE = 256
"""Events buffered between the store's watch and a slow WatchSessions client (the store keeps
its own bounded buffer behind it and drops a watcher that falls further behind)."""

_WatchItem = SessionEvent | StoreError | None
"""An event, the error that ended the store's watch, or None: the watch is over."""

Context = grpc.aio.ServicerContext[object, object]

_Pending = tuple[ReportBatch, tuple[Rejection, ...], "asyncio.Future[FlushResult] | None", int, int]
"""A request read and not yet acknowledged: its batch, its invalid items, the flush it waits
for, and its size in items and wire bytes (released from the read-ahead when acknowledged)."""


async def _abort(context: Context, code: grpc.StatusCode, details: str) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("context.abort returned")  # pragma: no cover


LATE_REPORT_GRACE = 60.0
RECENT_DELETES = 4096


class SessionService(pb_grpc.SessionServiceServicer):
    def __init__(
        self,
        store: SessionStore,
        batcher: WriteBatcher,
        *,
        session_ttl: float = 0.0,
        authorizer: Authorizer | None = None,
        max_calls_per_peer: int = DEFAULT_MAX_CALLS_PER_PEER,
        rejection_log: ThrottledLog | None = None,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics or ControlPlaneMetrics()
        self._authorizer = authorizer or Authorizer()
        self._batcher = batcher
        self._session_ttl = session_ttl
        """Told to reporters in every acknowledgement, so they know how often to renew."""
        self._calls = PeerCalls(max_calls_per_peer)
        self._shared_read_ahead = SharedReadAhead()
        self._read_room = asyncio.Event()
        """Replaced and set whenever a stream acknowledges: wakes every reader waiting for
        room (its own or the shared budget's)."""
        self._deleted: OrderedDict[str, float] = OrderedDict()
        """Rule 4: session id -> when it was deleted, oldest first."""
        self.rejection_log = rejection_log or ThrottledLog(log)
        """Rule 2; other refusals (e.g. permission denied) may share it with their own keys."""
        self._stopping = False
        self._readers: set[asyncio.Task[None]] = set()
        self._watch_queues: set[asyncio.Queue[_WatchItem]] = set()

    def _access(self) -> Access:
        """What the caller of the call being handled may do."""
        return self._authorizer.access(current_principal())

    async def _refuse(
        self, context: Context, access: Access, call: str, denied: Denied
    ) -> NoReturn:
        self._authorizer.log_denial(access, call, denied, context.peer())
        self._metrics.reject(Reason.PERMISSION_DENIED)
        await _abort(context, grpc.StatusCode.PERMISSION_DENIED, denied.message)

    def stopping(self) -> bool:
        """A method, not an attribute: the flag changes while a handler awaits."""
        return self._stopping

    def begin_shutdown(self) -> None:
        """Stop reading reports (acknowledge what was read, then end those streams with
        UNAVAILABLE) and end every watch, so `server.stop(grace)` is not held up by them."""
        self._stopping = True
        self.rejection_log.flush()
        for t in self._readers:
            t.cancel()
        for q in self._watch_queues:
            while q.full():
                q.get_nowait()
            q.put_nowait(None)

    @contextlib.asynccontextmanager
    async def _streaming_call(self, context: Context) -> AsyncIterator[str]:
        """Rule 3: count the call against its peer host for as long as it runs."""
        key = peer_key(context.peer())
        if not self._calls.try_open(key):
            self.rejection_log.log(
                ("too many calls", key),
                f"streaming calls refused from {key} (over the per-peer limit)",
                logging.WARNING,
                "streaming call from %s refused: %d calls already open from that host",
                context.peer(),
                self._calls.open_calls(key),
            )
            self._metrics.reject(Reason.TOO_MANY_CALLS)
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many streaming calls open from {key} "
                f"(at most {self._calls.max_calls}); close some first",
            )
        try:
            yield key
        finally:
            self._calls.close(key)

    async def ReportEvents(
        self, request_iterator: AsyncIterator[pb.ReportEventsRequest], context: Context
    ) -> AsyncIterator[pb.ReportEventsResponse]:
        if self.stopping():
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "control plane shutting down")
        access = self._access()
        if (denied := access.report()) is not None:
            await self._refuse(context, access, "ReportEvents", denied)
        async with self._streaming_call(context) as key:
            self._metrics.report_streams.inc()
            try:
                async for response in self._report_events(request_iterator, context, key, access):
                    yield response
            finally:
                self._metrics.report_streams.dec()

    async def _report_events(
        self,
        request_iterator: AsyncIterator[pb.ReportEventsRequest],
        context: Context,
        key: str,
        access: Access,
    ) -> AsyncIterator[pb.ReportEventsResponse]:
        peer = context.peer()
        # Unbounded in count: the read-ahead (rule 1) keeps it short, and the reader must
        # never block on it after the writer has stopped taking from it.
        in_flight: asyncio.Queue[_Pending | RequestTooLargeError | None] = asyncio.Queue()
        budget = ReadAhead(self._shared_read_ahead)

        async def read() -> None:
            requests = aiter(request_iterator)
            try:
                while True:
                    while not budget.may_read():
                        await self._read_room.wait()
                    request = await anext(requests, None)
                    if request is None:
                        break
                    items = len(request.upserts) + len(request.updates)
                    try:
                        check_request_items(items)
                    except RequestTooLargeError as e:
                        in_flight.put_nowait(e)
                        return
                    nbytes = request.ByteSize()
                    while not budget.may_admit(items, nbytes):
                        await self._read_room.wait()
                    budget.read(items, nbytes)
                    batch, invalid = convert.batch_from_pb(request)
                    self._metrics.reject(Reason.INVALID, len(invalid))
                    del request  # the decoded batch is what is kept until acknowledged
                    batch, invalid = self._authorized(access, batch, invalid, peer)
                    writes: list[SessionWrite] = [*batch.upserts, *batch.updates]
                    future = await self._batcher.submit(writes) if writes else None
                    in_flight.put_nowait((batch, invalid, future, items, nbytes))
            except Exception as e:
                # A sidecar going away mid-stream is routine; it resends what is unacked.
                log.info("report stream from %s: reading ended: %r", peer, e)
            finally:
                self._readers.discard(reader)

        reader = tasks.spawn(read(), name=f"report-events-reader {peer}")
        # However the reader ends (even cancelled before it ran), the writer wakes up; the
        # queue has no bound, so this never blocks.
        reader.add_done_callback(lambda _: in_flight.put_nowait(None))
        self._readers.add(reader)
        try:
            while True:
                item = await in_flight.get()
                if item is None:
                    break
                if isinstance(item, RequestTooLargeError):
                    self._metrics.reject(Reason.REQUEST_TOO_LARGE)
                    self.rejection_log.log(
                        ("request too large", key),
                        f"report streams ended for too large requests from {key}",
                        logging.WARNING,
                        "report stream from %s ended: %s",
                        peer,
                        item,
                    )
                    await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(item))
                batch, invalid, future, items, nbytes = item
                results = await _flushed(future, context, peer) if future is not None else {}
                response = self._acknowledgement(batch, results, invalid, peer, key)
                del batch, results, item
                yield response
                budget.acknowledged(items, nbytes)
                self._wake_readers()
        finally:
            await tasks.cancel_and_wait(reader)
            budget.release_all()
            self._wake_readers()
        if reader.cancelled() and self.stopping():
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "control plane shutting down")

    def _acknowledgement(
        self,
        batch: ReportBatch,
        results: FlushResult,
        invalid: tuple[Rejection, ...],
        peer: str,
        key: str,
    ) -> pb.ReportEventsResponse:
        """One batch's acknowledgement. Rejections are counted by reason as they are made:
        `invalid` (conversion, policy) already were, the store's are here; all are logged."""
        ack = acknowledge(batch, results)
        for r in ack.rejections:
            self._metrics.reject(Reason.of(r.reason))
        ack = dataclasses.replace(
            ack, rejections=(*invalid, *ack.rejections), session_ttl=self._session_ttl
        )
        self._log_rejections(ack.rejections, peer, key)
        return convert.ack_to_pb(ack)

    def _authorized(
        self,
        access: Access,
        batch: ReportBatch,
        invalid: tuple[Rejection, ...],
        peer: str,
    ) -> tuple[ReportBatch, tuple[Rejection, ...]]:
        """The writes the caller may make, and the others as rejections (policy rules)."""
        batch, refused = access.writes(batch)
        self._metrics.reject(Reason.PERMISSION_DENIED, len(refused))
        if refused:
            denied = Denied(f"{access.principal.id}: {refused[0].detail}")
            self._authorizer.log_denial(access, "ReportEvents", denied, peer)
        return batch, (*invalid, *refused)

    def _wake_readers(self) -> None:
        room, self._read_room = self._read_room, asyncio.Event()
        room.set()

    def _log_rejections(self, rejections: Iterable[Rejection], peer: str, key: str) -> None:
        """Rule 2: per (reason, peer host), a few lines in full, then one summary."""
        for r in rejections:
            if r.reason is RejectionReason.UNKNOWN_SESSION and (
                (ago := self._deleted_ago(r.session_id)) is not None
            ):
                self.rejection_log.log(
                    ("late report", key),
                    f"late reports for deleted sessions from {key}",
                    logging.DEBUG,
                    "late report from %s for session %s deleted %.1fs ago (stream %r): skipped",
                    peer,
                    r.session_id,
                    ago,
                    r.stream_id,
                    extra={SESSION: r.session_id, STREAM: r.stream_id or None},
                )
            elif r.reason is RejectionReason.UNKNOWN_SESSION:
                self.rejection_log.log(
                    ("unknown session", key),
                    f"reports for unknown sessions from {key}",
                    logging.WARNING,
                    "report from %s for unknown session %s (stream %r): skipped",
                    peer,
                    r.session_id,
                    r.stream_id,
                )
            elif r.reason is RejectionReason.FENCED:
                self.rejection_log.log(
                    ("fenced", key),
                    f"fenced reports from {key}",
                    logging.INFO,
                    "fenced report from %s: %s %s",
                    peer,
                    r.session_id,
                    r.detail,
                )

    def _note_deleted(self, session_id: str) -> None:
        now = time.monotonic()
        self._deleted.pop(session_id, None)
        self._deleted[session_id] = now
        while self._deleted and (
            len(self._deleted) > RECENT_DELETES
            or now - next(iter(self._deleted.values())) > LATE_REPORT_GRACE
        ):
            self._deleted.popitem(last=False)

    def _deleted_ago(self, session_id: str) -> float | None:
        """Seconds since `session_id` was deleted, if within the grace (rule 4)."""
        when = self._deleted.get(session_id)
        if when is None:
            return None
        ago = time.monotonic() - when
        return ago if ago <= LATE_REPORT_GRACE else None

    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.Session:
        sid = await _valid_session_id(request.session_id, context)
        access = self._access()
        read = access.read("GetSession")
        if isinstance(read, Denied):
            await self._refuse(context, access, "GetSession", read)
        rec = await _store_call(context, self._store.get(session_id=sid))
        if rec is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"session {sid} not found")
        return convert.session_to_pb(redact(rec) if read.redacted else rec)

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        if request.page_size < 0:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "page_size is negative")
        owner = await _valid_owner(request.owner, context) if request.owner else None
        access = self._access()
        read = access.read("ListSessions")
        if isinstance(read, Denied):
            await self._refuse(context, access, "ListSessions", read)
        try:
            page = await _store_call(
                context,
                self._store.list_page(
                    owner=owner, page_size=request.page_size, page_token=request.page_token
                ),
            )
        except InvalidPageTokenError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if read.redacted:
            page = dataclasses.replace(page, sessions=tuple(map(redact, page.sessions)))
        return convert.page_to_pb(page)

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        sid = await _valid_session_id(request.session_id, context)
        access = self._access()
        if not access.deletes_any:
            # A sidecar deletes its own sessions only (policy rule 3). Between this read and
            # the delete the session may be claimed; harmless: a sidecar may claim any.
            current = await _store_call(context, self._store.get(session_id=sid))
            if current is None:
                await _abort(context, grpc.StatusCode.NOT_FOUND, f"session {sid} not found")
            if (denied := access.delete(current)) is not None:
                await self._refuse(context, access, "DeleteSession", denied)
        rec = await _store_call(context, self._store.delete(session_id=sid))
        if rec is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"session {sid} not found")
        self._note_deleted(sid)
        log.info(
            "session %s deleted on request from %s",
            sid,
            context.peer(),
            extra={SESSION: sid, OWNER: rec.owner},
        )
        return pb.DeleteSessionResponse(session=convert.session_to_pb(rec))

    async def ClaimSession(
        self, request: pb.ClaimSessionRequest, context: Context
    ) -> pb.ClaimSessionResponse:
        sid = await _valid_session_id(request.session_id, context)
        owner = await _valid_owner(request.owner, context)
        access = self._access()
        if (denied := access.claim(owner)) is not None:
            await self._refuse(context, access, "ClaimSession", denied)
        expected = request.expected_owner_epoch or None
        try:
            rec = await _store_call(
                context,
                self._store.claim(session_id=sid, owner=owner, expected_owner_epoch=expected),
            )
        except SessionNotFoundError:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"session {sid} not found")
        except ClaimRefusedError as e:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except OwnerLimitError as e:
            self._metrics.reject(Reason.OWNER_LIMIT)
            self.rejection_log.log(
                ("owner limit", owner),
                f"claims refused to {owner} over the per-owner limit",
                logging.WARNING,
                "claim of session %s by %s refused: %s",
                sid,
                owner,
                e,
            )
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        log.info(
            "session %s claimed by %s (owner epoch %d)",
            sid,
            owner,
            rec.owner_epoch,
            extra={SESSION: sid, OWNER: owner},
        )
        return pb.ClaimSessionResponse(session=convert.session_to_pb(rec))

    async def WatchSessions(
        self, request: pb.WatchSessionsRequest, context: Context
    ) -> AsyncIterator[pb.SessionEvent]:
        owner = await _valid_owner(request.owner, context) if request.owner else None
        read = await self._watch_access(context, owner)
        if self.stopping():
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "control plane shutting down")
        async with self._streaming_call(context):
            self._metrics.watchers.inc()
            try:
                async for event in self._watch(owner, context, read):
                    yield event
            finally:
                self._metrics.watchers.dec()

    async def _watch(
        self, owner: OwnerName | None, context: Context, read: Read
    ) -> AsyncIterator[pb.SessionEvent]:
        # A pump task feeds a queue that `begin_shutdown` can also end: cancelling a grpc.aio
        # handler task does not end its call, so a watch must be able to finish on its own.
        queue: asyncio.Queue[_WatchItem] = asyncio.Queue(WATCH_QUEUE)
        admits = OwnerFilter(owner)

        async def pump() -> None:
            try:
                async with contextlib.aclosing(self._store.watch()) as events:
                    async for ev in events:
                        await queue.put(ev)
                await queue.put(None)
            except StoreError as e:
                await queue.put(e)

        pump_task = tasks.spawn(pump(), name=f"watch-pump {context.peer()}")
        self._watch_queues.add(queue)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    if self.stopping():
                        await _abort(
                            context, grpc.StatusCode.UNAVAILABLE, "control plane shutting down"
                        )
                    return
                if isinstance(item, WatchLaggedError):
                    await _abort(context, grpc.StatusCode.ABORTED, str(item))
                if isinstance(item, StoreError):
                    await _abort(context, grpc.StatusCode.UNAVAILABLE, f"store: {item}")
                if not admits(item):
                    continue
                yield convert.event_to_pb(_redacted(item) if read.redacted else item)
        finally:
            self._watch_queues.discard(queue)
            await tasks.cancel_and_wait(pump_task)

    async def _watch_access(self, context: Context, owner: OwnerName | None) -> Read:
        access = self._access()
        read = access.watch(owner)
        if isinstance(read, Denied):
            await self._refuse(context, access, "WatchSessions", read)
        return read


def _redacted(event: SessionEvent) -> SessionEvent:
    if event.session is None:
        return event
    return dataclasses.replace(event, session=redact(event.session))


class OwnerFilter:
    """Which events a watch filtered by `owner` sees (no I/O; one per watch).

    Rules:
      1. Without an owner, every event.
      2. SYNCED always; an event of a session whose record says `owner` owns it.
      3. A session this watch has shown owned by `owner` is followed: the one event that shows
         it owned by someone else (a claim), deleted or expired is passed too, so that the
         old owner learns at once that it lost the session; after it, the session is
         followed no more (until an event shows it owned by `owner` again).
      4. Memory: one id per session the watch has shown owned by `owner` and not yet lost.
    """

    def __init__(self, owner: OwnerName | None) -> None:
        self._owner = owner
        self._followed: set[SessionId] = set()

    def __call__(self, event: SessionEvent) -> bool:
        if self._owner is None or event.type is SessionEventType.SYNCED:
            return True
        record = event.session
        sid = event.session_id or (record.session_id if record is not None else None)
        ours = record is not None and record.owner == self._owner
        if sid is None:
            return ours
        if ours and event.type is SessionEventType.PUT:
            self._followed.add(sid)
            return True
        if sid in self._followed:
            self._followed.discard(sid)
            return True
        # Deletes and expiries of the owner's sessions carry the last record.
        return ours


async def _flushed(future: asyncio.Future[FlushResult], context: Context, peer: str) -> FlushResult:
    """The batcher's result for one report batch; a failed flush ends the stream."""
    try:
        return await future
    except StoreError as e:
        await _abort(context, grpc.StatusCode.UNAVAILABLE, f"store: {e}")
    except Exception:
        log.exception("flushing reports from %s failed", peer)
        await _abort(context, grpc.StatusCode.INTERNAL, "flushing reports failed")


async def _valid_session_id(value: str, context: Context) -> SessionId:
    try:
        return parse_session_id(value)
    except InvalidIdError as e:
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))


async def _valid_owner(value: str, context: Context) -> OwnerName:
    try:
        return parse_owner(value)
    except InvalidIdError as e:
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))


async def _store_call(context: Context, call: Awaitable[T]) -> T:
    try:
        return await call
    except StoreUnavailableError as e:
        log.warning("store unavailable: %s", e)
        await _abort(context, grpc.StatusCode.UNAVAILABLE, f"store: {e}")
