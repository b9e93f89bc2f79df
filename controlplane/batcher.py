"""Coalescing of reported writes into few store writes, and the acknowledgements they earn.

Sidecars may report every event; the store must not see every event. Between two flushes,
`PendingWrites` keeps per (session, stream, epoch) only the greatest position (upserts, rare,
are kept in order), so a flush writes each stream at most once whatever the event rate.
`WriteBatcher` is the thin async loop around it: the first write after an idle period is
flushed at once; while a flush runs, new writes gather for the next one, and flushes are at
least `flush_interval` apart. Every submitter of a flush awaits the same future, resolved
with the store's results (or its error) once the flush is durable.

`acknowledge` turns a batch and those results into the batch's rejections: pure, so the
fencing and unknown-session outcomes are tested without a store.

Rules:
  1. Coalescing: between two flushes, one pending write per (session, stream, epoch), the
     greatest position; upserts are kept in order.
  2. Bounded: at most `max_pending` pending writes (after coalescing) plus one submission.
     `submit` waits while the pending writes are at the limit, until a flush takes them: a
     flood of distinct sessions (which nothing coalesces) slows its senders down instead of
     growing the pending set. A flush therefore writes at most that many, too.
  3. A flush is never cancelled half-way; `aclose` flushes what is pending.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping

from controlplane.metrics import ControlPlaneMetrics
from controlplane.records import Refusal, refusal, upsert_epoch
from controlplane.store.protocol import (
    ApplyResult,
    OwnerLimitReached,
    SessionStore,
    WritesRefused,
)
from tether import tasks
from tether.model import (
    BatchAck,
    OwnerName,
    Rejection,
    RejectionReason,
    ReportBatch,
    SessionId,
    SessionRecord,
    SessionUpsert,
    SessionWrite,
    StreamId,
    StreamUpdate,
)

log = logging.getLogger(__name__)

FlushResult = Mapping[SessionId, ApplyResult]

DEFAULT_MAX_PENDING = 20_000
"""Rule 2's limit: about 20,000 distinct (session, stream) writes wait for one flush, a few
MiB of records; a SQLite flush of that many takes well under a second here."""


class PendingWrites:
    """Writes waiting for the next flush, coalesced."""

    def __init__(self) -> None:
        self._upserts: list[SessionUpsert] = []
        self._updates: dict[tuple[SessionId, StreamId, int, OwnerName | None], StreamUpdate] = {}
        self.received = 0
        """Writes added since the last `take` (before coalescing)."""

    def add(self, writes: Iterable[SessionWrite]) -> None:
        for w in writes:
            self.received += 1
            if isinstance(w, SessionUpsert):
                self._upserts.append(w)
                continue
            # Keyed by epoch and writer too: an update from a fenced (or never granted) epoch,
            # or from a sidecar that does not own the session, must not hide a valid one; the
            # store sorts them out.
            key = (w.session_id, w.position.stream_id, w.position.owner_epoch, w.writer)
            old = self._updates.get(key)
            if old is None or w.position.seq > old.position.seq:
                self._updates[key] = w

    def __len__(self) -> int:
        return len(self._upserts) + len(self._updates)

    def take(self) -> list[SessionWrite]:
        """All pending writes (upserts first), leaving none."""
        out: list[SessionWrite] = [*self._upserts, *self._updates.values()]
        self._upserts = []
        self._updates = {}
        self.received = 0
        return out


def acknowledge(
    batch: ReportBatch, results: FlushResult, invalid: Iterable[Rejection] = ()
) -> BatchAck:
    """The acknowledgement of `batch` given the records after the flush that included it."""
    rejections = list(invalid)
    for u in batch.upserts:
        rec = results.get(u.session.session_id)
        if isinstance(rec, (OwnerLimitReached, WritesRefused)):
            rejections.append(_not_stored(u.session.session_id, "", rec))
        elif rec is None:
            rejections.append(
                Rejection(u.session.session_id, "", RejectionReason.UNKNOWN_SESSION, "not stored")
            )
        elif upsert_epoch(u) != rec.owner_epoch:
            rejections.append(_fenced(rec, "", upsert_epoch(u)))
        elif (why := refusal(rec, u)) is not None:
            rejections.append(_refused(rec, u, why))
    for s in batch.updates:
        rec = results.get(s.session_id)
        if isinstance(rec, (OwnerLimitReached, WritesRefused)):
            rejections.append(_not_stored(s.session_id, s.position.stream_id, rec))
        elif rec is None:
            rejections.append(
                Rejection(
                    s.session_id,
                    s.position.stream_id,
                    RejectionReason.UNKNOWN_SESSION,
                    "session not found (never created, deleted or expired); upsert it again",
                )
            )
        elif s.position.owner_epoch != rec.owner_epoch:
            rejections.append(_fenced(rec, s.position.stream_id, s.position.owner_epoch))
        elif (why := refusal(rec, s)) is not None:
            rejections.append(_refused(rec, s, why))
    return BatchAck(batch.batch_id, tuple(rejections))


def _not_stored(
    sid: SessionId, stream_id: str, why: OwnerLimitReached | WritesRefused
) -> Rejection:
    """A session whose writes the store refused whole. A refused re-creation is INVALID,
    not UNKNOWN_SESSION: sending the record again would fail the same way (records rule 9)."""
    if isinstance(why, OwnerLimitReached):
        return Rejection(sid, stream_id, RejectionReason.OWNER_LIMIT, why.detail)
    return Rejection(sid, stream_id, RejectionReason.INVALID, why.detail)


def _refused(rec: SessionRecord, write: SessionWrite, why: Refusal) -> Rejection:
    """The rejection of a write refused by records rules 6 to 8: not the owner is FENCED
    (whoever sent it does not own the session: it stops reporting it, as a fenced owner
    does); a changed credential binding is INVALID (it will never be accepted)."""
    stream_id = write.position.stream_id if isinstance(write, StreamUpdate) else ""
    if why is Refusal.BINDING_CHANGED:
        return Rejection(
            rec.session_id,
            stream_id,
            RejectionReason.INVALID,
            "the credential fingerprint of a session is set at creation and cannot change",
        )
    writer = write.writer or (write.session.owner if isinstance(write, SessionUpsert) else "")
    return Rejection(
        rec.session_id,
        stream_id,
        RejectionReason.FENCED,
        f"session is owned by {rec.owner!r}; {writer!r} may not write it "
        "(only ClaimSession changes the owner)",
        current_owner=rec.owner,
        current_owner_epoch=rec.owner_epoch,
    )


def _fenced(rec: SessionRecord, stream_id: str, epoch: int) -> Rejection:
    return Rejection(
        rec.session_id,
        stream_id,
        RejectionReason.FENCED,
        f"owner epoch {epoch} is not the session's current epoch {rec.owner_epoch}",
        current_owner=rec.owner,
        current_owner_epoch=rec.owner_epoch,
    )


class WriteBatcher:
    """Flushes coalesced writes to a store; `start()` it, `aclose()` it (flushes the rest)."""

    def __init__(
        self,
        store: SessionStore,
        *,
        flush_interval: float = 0.05,
        max_pending: int = DEFAULT_MAX_PENDING,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self._store = store
        self._metrics = metrics or ControlPlaneMetrics()
        self._metrics.pending_writes.set_function(self.pending)
        self._interval = flush_interval
        self._max_pending = max_pending
        self._pending = PendingWrites()
        self._room = asyncio.Event()
        """Set when a flush has taken the pending writes (rule 2's waiters re-check)."""
        self._future: asyncio.Future[FlushResult] | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._flushing = False
        self.flushes = 0
        self.writes_submitted = 0
        """Writes accepted by `submit` (before coalescing), flushed or not."""
        self.writes_received = 0
        self.writes_flushed = 0

    def start(self) -> None:
        self._task = tasks.spawn(self._run(), name="control-plane-write-batcher")

    def pending(self) -> int:
        """Pending writes, after coalescing (at most `max_pending` plus one submission)."""
        return len(self._pending)

    async def submit(self, writes: Iterable[SessionWrite]) -> asyncio.Future[FlushResult]:
        """Queue writes for the next flush, once there is room (rule 2); the returned future
        resolves when that flush is durable."""
        while len(self._pending) >= self._max_pending and not self._closed:
            self._room.clear()
            self._wakeup.set()
            await self._room.wait()
        if self._closed:
            raise RuntimeError("write batcher is closed")
        before = self._pending.received
        self._pending.add(writes)
        added = self._pending.received - before
        self.writes_submitted += added
        self._metrics.reported_writes.inc(added)
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            # Mark a failure as seen even if every submitter has gone away meanwhile.
            self._future.add_done_callback(_consume_exception)
        self._wakeup.set()
        # Each caller gets its own view: a caller cancelled while waiting (a sidecar that
        # went away) must not cancel the flush every other caller is waiting for.
        return asyncio.shield(self._future)

    async def flush(self) -> None:
        """Write everything pending now (the loop does this on its own)."""
        future, self._future = self._future, None
        received = self._pending.received
        writes = self._pending.take()
        self._room.set()
        if future is None:
            return
        started = time.monotonic()
        try:
            result = await self._store.apply(writes=writes)
        except Exception as e:
            self._metrics.store_write_seconds.labels("error").observe(time.monotonic() - started)
            log.warning("flushing %d coalesced writes failed: %s", len(writes), e)
            if not future.done():
                future.set_exception(e)
            return
        self._metrics.store_write_seconds.labels("ok").observe(time.monotonic() - started)
        self._metrics.store_batch_size.observe(len(writes))
        self.flushes += 1
        self.writes_received += received
        self.writes_flushed += len(writes)
        if not future.done():
            future.set_result(result)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._flushing = True
            try:
                await self.flush()
            finally:
                self._flushing = False
            if self._closed:
                return
            if self._interval > 0:
                # Pacing, not synchronisation: writes arriving meanwhile join the next flush.
                await asyncio.sleep(self._interval)

    async def aclose(self) -> None:
        """Stop the loop and flush what is pending; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._room.set()  # waiting submitters find the batcher closed
        task = self._task
        if task is not None and self._flushing:
            # Never cancel a store write half-way: let the loop finish it and return.
            await asyncio.wait([task])
        await tasks.cancel_and_wait(task)
        await self.flush()


def _consume_exception(future: asyncio.Future[FlushResult]) -> None:
    if not future.cancelled():
        future.exception()
