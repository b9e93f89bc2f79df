"""Ships session records and stream positions to the control plane, off the event path.

The proxy calls `Reporter.session()` and `Reporter.position()` on every session change and
every event. Both are plain methods doing a few dict operations: the event path never awaits
the network. `ReportQueue` (no I/O) keeps what is waiting and what is in flight; the
`Reporter` is the thin asyncio loop around it that owns one `ReportEvents` stream at a time.

Invariants:
  1. Coalesced: per (session, stream) only the greatest `position.order` waits, and per
     session only the latest upsert; a flush sends each of them once whatever the event rate.
  2. Nothing is let go before it is acknowledged: a sent item stays in flight until the ack of
     its batch (acks come in batch order). When the stream breaks, in-flight items go back to
     the waiting ones (greatest order wins; a waiting upsert, being newer, beats an in-flight
     one) and are sent again after reconnecting. The store is idempotent and monotonic, so
     sending twice is safe.
  3. Bounded: at most `max_pending` items are held (waiting plus in flight); beyond that the
     waiting items of the session that has waited longest are dropped, with a warning.
  4. Upserts before updates: within a batch upserts come first (the control plane applies
     them first), and a session's upsert never travels in a later batch than its updates.
  5. Fencing: once the control plane answers FENCED for a session, nothing more is reported
     for it until `session()` brings a record with a higher owner epoch than the fenced one.
     The fence is remembered for the last `max_fenced` fenced sessions (oldest forgotten
     first); a forgotten fence costs a refused write, as the control plane fences on its own.
  6. Re-creation: when the control plane answers UNKNOWN_SESSION (it lost the session), the
     session is sent again as the last record `session()` was given, whole (every field,
     the credential binding among them), with the greatest position known per stream.
  7. Log lines that a flood could repeat (reconnects, drops, rejections) are rate-limited.
  8. Per-session state is bounded and freed. A session has an entry while it is live here
     (from `session()` or `position()` until `release()` or `forget()`) and, after that, only
     while it has items waiting or in flight: at most live sessions + `max_pending` entries.
     `forget()` (the session was deleted) frees it at once, items and fence included;
     `release()` (it ended here: expired, fenced, moved away) once its items are settled,
     so nothing reported is lost. A fenced session keeps no entry, only its fence (rule 5).
     What an entry holds (`record`, `known`) is needed only while the session is live here:
     to re-create it (rule 6) and to refuse positions older than those already given.
  9. Re-adoption starts clean: `session()` with a record at a higher owner epoch than the
     entry's (this sidecar claimed the session again, maybe after losing it) lifts any fence
     (rule 5) and drops what was known or waiting at older epochs: those positions were
     refused by the control plane anyway, and the new epoch's first position beats them.
 10. Ownership is a lease. Every `renew_interval` the background task queues, for each session
     `served()` names that has a live entry and no upsert waiting, an upsert of its whole
     record (rule 6's): batched with everything else, never awaited by the event path. The
     interval is the smaller of `ReporterConfig.renew_interval` and a third of the session
     TTL the control plane states in its acknowledgements, so two renewals can fail before
     a served session expires. A session not named by `served()` is not renewed and expires
     after the TTL. A renewal of a session claimed meanwhile is FENCED (rule 5): a lease
     that cannot be renewed is lost, and the sidecar learns it within one interval even if
     nothing else reports.
 11. Pushed fences: `fence(session, epoch)` (the control plane's watch showed another owner
     at `epoch`) acts as a FENCED rejection would, without waiting for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, replace

import grpc

from sidecar.tracing import NO_TRACING, Span, Tracing
from tether import tasks
from tether.api.client import ReportStream, SessionClient
from tether.grpc_security import ClientSecurity, open_channel
from tether.logthrottle import ThrottledLog
from tether.model import (
    BatchAck,
    OwnerName,
    Rejection,
    RejectionReason,
    ReportBatch,
    SessionId,
    SessionRecord,
    SessionUpsert,
    StreamId,
    StreamPosition,
    StreamUpdate,
)

log = logging.getLogger("tether.sidecar.reporter")

MAX_BATCHES_IN_FLIGHT = 8
"""Unacknowledged batches per stream before the reporter waits for acks (the control plane
itself stops reading at 256)."""

MAX_BATCH_ITEMS = 5_000
MAX_BATCH_BYTES = 1 << 20
"""A batch is cut at about this many (estimated) bytes: gRPC refuses messages over 4 MiB by
default, and a backlog after an outage can be far bigger than that."""

MAX_ITEM_BYTES = 3 << 20
"""An item estimated bigger than this (a huge `initialize_request`) is dropped with an error:
sent, it would break the stream on every attempt."""

ACK_TIMEOUT = 30.0
"""A batch not acknowledged (or not even written) within this many seconds means the stream is
stuck (say, a half-open connection): it is abandoned and its items are sent on a new one."""

LOG_PERIOD = 5.0
"""At most one line per kind of repeated trouble in this many seconds."""

RENEW_INTERVAL = 30.0
"""Renewal period when the control plane has not said its session TTL (and the cap when it
has): the default TTL is an hour, so this is far inside any sensible one."""

MIN_RENEW_INTERVAL = 0.05
"""A TTL so short that a third of it is below this renews at this pace."""

MAX_FENCED = 10_000
"""Fenced sessions whose fence the queue remembers (invariant 5): a sidecar that lost that
many sessions to others at once is being drained, and each forgotten fence costs only a
write the control plane refuses."""


@dataclass(frozen=True, slots=True)
class ReporterConfig:
    target: str
    """`host:port` of the control plane."""
    owner: OwnerName
    """This sidecar's name (the pod name)."""
    interval: float = 0.05
    """Flush period in seconds: at most one flush per interval (the first item after an idle
    period goes at once)."""
    max_pending: int = 100_000
    """Items held at most (waiting and in flight); beyond that the waiting items of the
    session that has waited longest are dropped with a warning."""
    reconnect_initial: float = 0.2
    reconnect_max: float = 5.0
    security: ClientSecurity | None = None
    """TLS, mutual TLS and bearer token towards the control plane (plaintext when None)."""
    renew_interval: float = RENEW_INTERVAL
    """At most this many seconds between renewals of a served session (invariant 10); a
    third of the control plane's TTL when that is shorter."""

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError("reporter interval must be >= 0")
        if self.renew_interval <= 0:
            raise ValueError("reporter renew_interval must be > 0")
        if self.max_pending < 1:
            raise ValueError("reporter max_pending must be >= 1")
        if not 0 < self.reconnect_initial <= self.reconnect_max:
            raise ValueError("reporter delays must satisfy 0 < reconnect_initial <= reconnect_max")


@dataclass(slots=True)
class ReporterStats:
    """Counters since the reporter was made (plain ints, for metrics and tests)."""

    batches_sent: int = 0
    """Batches written to a stream, re-sends included."""
    items_sent: int = 0
    """Upserts and updates in those batches."""
    acked: int = 0
    """Items acknowledged as applied (durable, or a stale no-op)."""
    rejected: int = 0
    """Items acknowledged as rejected (fenced, unknown session, invalid)."""
    fenced: int = 0
    """Times a session was fenced off (this sidecar is no longer its owner)."""
    reconnects: int = 0
    """Report streams opened after a broken one."""
    dropped: int = 0
    """Items given up unsent: over `max_pending`, of a fenced session, or too large."""


class ReportProtocolError(RuntimeError):
    """The control plane broke the stream's contract (an ack out of order)."""


class _StreamEndedError(RuntimeError):
    """The report stream ended while the reporter still had something to say."""


def _position_size(p: StreamPosition) -> int:
    return 24 + len(p.stream_id) + len(p.last_event_id) + len(p.upstream_event_id)


def _upsert_size(r: SessionRecord) -> int:
    fixed = len(r.session_id) + len(r.upstream_session_id) + len(r.upstream_address)
    fixed += len(r.owner) + len(r.protocol_version) + len(r.initialize_request)
    fixed += len(r.credential_fingerprint)
    return 64 + fixed + sum(_position_size(p) for p in r.streams.values())


def _update_size(session_id: SessionId, p: StreamPosition) -> int:
    return 8 + len(session_id) + _position_size(p)


class _Session:
    """What the reporter knows about one session, and what of it waits to be sent."""

    __slots__ = (
        "first_mark",
        "in_flight",
        "known",
        "record",
        "released",
        "session_id",
        "updates",
        "upsert",
    )

    def __init__(self, session_id: SessionId) -> None:
        self.session_id = session_id
        self.record: SessionRecord | None = None
        """The latest record given to `session()`: re-sent if the control plane lost it."""
        self.known: dict[StreamId, StreamPosition] = {}
        """The greatest position given per stream (sent or not)."""
        self.released = False
        """The session ended here: free the entry once nothing of it is waiting or in flight."""
        self.in_flight = 0
        """In-flight batches carrying items of this session."""
        self.upsert: SessionRecord | None = None
        self.updates: dict[StreamId, StreamPosition] = {}
        self.first_mark = 0
        """The report mark of the oldest waiting item (see `ReportQueue.mark`)."""

    @property
    def waiting(self) -> int:
        return len(self.updates) + (self.upsert is not None)


@dataclass(slots=True)
class _InFlight:
    batch: ReportBatch
    sessions: dict[SessionId, _Session]
    """The session state each item was taken from: an item whose session has since been
    forgotten (and maybe re-created) is not sent again."""
    marks: dict[SessionId, int]
    min_mark: int
    sent_at: float

    @property
    def size(self) -> int:
        return len(self.batch.upserts) + len(self.batch.updates)


class ReportQueue:
    """Waiting and in-flight report items, without I/O (the `Reporter` drives it).

    Marks make `Reporter.flushed()` exact: `mark` grows whenever a session starts waiting,
    each waiting session and in-flight batch remembers the oldest mark it carries, so
    "everything reported up to mark m is settled" is "no waiting or in-flight unit carries a
    mark <= m".
    """

    def __init__(
        self, *, max_pending: int, stats: ReporterStats, max_fenced: int = MAX_FENCED
    ) -> None:
        self._max_pending = max_pending
        self._max_fenced = max_fenced
        self.stats = stats
        self._sessions: dict[SessionId, _Session] = {}
        self._fenced: OrderedDict[SessionId, int] = OrderedDict()
        """Fenced session -> the epoch it was fenced at; the oldest fence first."""
        # Oldest first. An OrderedDict: popping the front of a plain dict over and over costs
        # a scan of its deleted slots.
        self._waiting: OrderedDict[SessionId, _Session] = OrderedDict()
        self._waiting_count = 0
        self._in_flight: deque[_InFlight] = deque()
        self._in_flight_count = 0
        self._limiter = ThrottledLog(log, burst=1, interval=LOG_PERIOD)
        self.mark = 0

    # -- the event path: O(1) -------------------------------------------------------------

    def session(self, record: SessionRecord) -> bool:
        """Queue an upsert of `record`; False if ignored (the session is fenced at a higher
        or equal epoch)."""
        sid = record.session_id
        fenced = self._fenced.get(sid)
        if fenced is not None:
            if record.owner_epoch <= fenced:
                return False
            del self._fenced[sid]
        s = self._sessions.get(sid)
        if s is None:
            s = self._sessions[sid] = _Session(sid)
        elif s.record is not None and record.owner_epoch > s.record.owner_epoch:
            self._start_clean(s, record.owner_epoch)
        s.released = False
        s.record = record
        if s.upsert is None:
            self._waiting_count += 1
        s.upsert = record
        self._start_waiting(s)
        self._bound()
        return True

    def _start_clean(self, s: _Session, epoch: int) -> None:
        """Invariant 9: the session is ours again at `epoch`: forget older epochs' positions."""
        s.known = {k: p for k, p in s.known.items() if p.owner_epoch >= epoch}
        for stream, p in list(s.updates.items()):
            if p.owner_epoch < epoch:
                del s.updates[stream]
                self._waiting_count -= 1
        if not s.waiting and self._waiting.pop(s.session_id, None) is not None:
            s.first_mark = 0

    def renew(self, session_ids: Iterable[SessionId]) -> int:
        """Invariant 10: queue a renewal (the whole record as an upsert) of each named session
        that is live here and has no upsert waiting; return how many were queued."""
        queued = 0
        for sid in session_ids:
            s = self._sessions.get(sid)
            if s is None or s.released or s.record is None or s.upsert is not None:
                continue
            s.upsert = self._recreated(s)
            self._waiting_count += 1
            self._start_waiting(s)
            queued += 1
        if queued:
            self._bound()
        return queued

    def fence(self, session_id: SessionId, *, epoch: int, owner: OwnerName) -> bool:
        """Invariant 11: another sidecar owns the session at `epoch`; fence ours off as a
        FENCED rejection would. False if it was not ours at an older epoch (nothing done)."""
        s = self._sessions.get(session_id)
        if s is None or s.record is None or s.record.owner_epoch >= epoch:
            return False
        r = Rejection(session_id, "", RejectionReason.FENCED, "claimed", owner, epoch)
        self._fence(s, s.record.owner_epoch, r)
        self._fenced[session_id] = epoch  # the claimant's epoch: ours can only be above it
        return True

    def position(self, session_id: SessionId, position: StreamPosition) -> bool:
        """Queue a stream update; False if ignored (fenced session, or not newer than a
        position already given for the stream)."""
        if session_id in self._fenced:
            return False
        s = self._sessions.get(session_id)
        if s is None:
            s = self._sessions[session_id] = _Session(session_id)
        s.released = False
        stream = position.stream_id
        known = s.known.get(stream)
        if known is not None and position.order <= known.order:
            return False
        s.known[stream] = position
        if stream not in s.updates:
            self._waiting_count += 1
        s.updates[stream] = position
        self._start_waiting(s)
        self._bound()
        return True

    def forget(self, session_id: SessionId) -> None:
        """Drop the session's waiting items and everything remembered about it (its fence
        included): it was deleted."""
        self._fenced.pop(session_id, None)
        s = self._sessions.pop(session_id, None)
        if s is not None and self._waiting.pop(session_id, None) is not None:
            self._clear_waiting(s)

    def release(self, session_id: SessionId) -> None:
        """The session ended here (not deleted): let its entry go once its items are settled
        (invariant 8). A later `session()` or `position()` makes it live again."""
        s = self._sessions.get(session_id)
        if s is not None:
            s.released = True
            self._free_if_done(s)

    def _free_if_done(self, s: _Session) -> None:
        done = s.released and not s.waiting and not s.in_flight
        if done and self._sessions.get(s.session_id) is s:
            del self._sessions[s.session_id]

    def _start_waiting(self, s: _Session) -> None:
        if s.session_id not in self._waiting:
            self.mark += 1
            s.first_mark = self.mark
            self._waiting[s.session_id] = s

    def _clear_waiting(self, s: _Session) -> int:
        """Empty `s`'s waiting items (the caller has removed it from `_waiting`)."""
        n = s.waiting
        s.upsert = None
        s.updates = {}
        self._waiting_count -= n
        return n

    def _bound(self) -> None:
        if self._waiting_count + self._in_flight_count <= self._max_pending:
            return
        dropped = 0
        while self._waiting and self._waiting_count + self._in_flight_count > self._max_pending:
            _, s = self._waiting.popitem(last=False)
            dropped += self._clear_waiting(s)
            self._free_if_done(s)
        self.stats.dropped += dropped
        self._limiter.log(
            "dropped",
            "report-queue overflows",
            logging.WARNING,
            "more than %d report items pending (control plane slow or unreachable): "
            "dropped %d items of the longest-waiting sessions",
            self._max_pending,
            dropped,
        )

    # -- the background task --------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Items not yet acknowledged: waiting or in flight."""
        return self._waiting_count + self._in_flight_count

    @property
    def waiting(self) -> int:
        return self._waiting_count

    @property
    def sessions(self) -> int:
        """Sessions with an entry (invariant 8 bounds them)."""
        return len(self._sessions)

    @property
    def fences(self) -> int:
        """Fences remembered (at most `max_fenced`)."""
        return len(self._fenced)

    @property
    def batches_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def oldest_sent_at(self) -> float | None:
        return self._in_flight[0].sent_at if self._in_flight else None

    def min_unsettled_mark(self) -> int | None:
        """The oldest mark still waiting or in flight; None if everything is settled."""
        marks = [s.first_mark for s in self._waiting.values()]
        marks.extend(f.min_mark for f in self._in_flight)
        return min(marks, default=None)

    def take_batch(self, batch_id: int, *, now: float) -> ReportBatch | None:
        """Move waiting items, oldest sessions first, into a new in-flight batch (cut at
        `MAX_BATCH_ITEMS` / `MAX_BATCH_BYTES`); None if nothing is waiting."""
        upserts: list[SessionUpsert] = []
        updates: list[StreamUpdate] = []
        sessions: dict[SessionId, _Session] = {}
        marks: dict[SessionId, int] = {}
        budget = MAX_BATCH_BYTES
        full = False
        while self._waiting and not full:
            s = next(iter(self._waiting.values()))
            taken = 0
            if s.upsert is not None:
                cost = _upsert_size(s.upsert)
                if cost > MAX_ITEM_BYTES:
                    self._drop_too_large(s.session_id, cost)
                    s.upsert = None
                    self._waiting_count -= 1
                elif (upserts or updates) and (
                    cost > budget or len(upserts) + len(updates) >= MAX_BATCH_ITEMS
                ):
                    full = True
                else:
                    upserts.append(SessionUpsert(s.upsert))
                    s.upsert = None
                    budget -= cost
                    taken += 1
            while s.updates and not full:
                stream, p = s.updates.popitem()
                cost = _update_size(s.session_id, p)
                if cost > MAX_ITEM_BYTES:
                    self._drop_too_large(s.session_id, cost)
                    self._waiting_count -= 1
                elif (upserts or updates) and (
                    cost > budget or len(upserts) + len(updates) >= MAX_BATCH_ITEMS
                ):
                    s.updates[stream] = p
                    full = True
                else:
                    updates.append(StreamUpdate(s.session_id, p))
                    budget -= cost
                    taken += 1
            if taken:
                sessions[s.session_id] = s
                marks[s.session_id] = s.first_mark
                s.in_flight += 1
            if not s.waiting:
                self._waiting.popitem(last=False)
                self._free_if_done(s)  # everything it had was too large: dropped
        if not upserts and not updates:
            return None
        batch = ReportBatch(batch_id, tuple(upserts), tuple(updates))
        self._waiting_count -= len(upserts) + len(updates)
        self._in_flight_count += len(upserts) + len(updates)
        self._in_flight.append(_InFlight(batch, sessions, marks, min(marks.values()), now))
        return batch

    def _drop_too_large(self, session_id: SessionId, size: int) -> None:
        self.stats.dropped += 1
        self._limiter.log(
            "too-large",
            "report items too large to send",
            logging.ERROR,
            "session %s: report item of about %d bytes is too large to send: dropped",
            session_id,
            size,
        )

    def acknowledge(self, ack: BatchAck) -> list[tuple[SessionId, Rejection]]:
        """Settle the oldest in-flight batch; return the sessions newly fenced (for the
        caller to announce once the queue is consistent). Raises `ReportProtocolError` if
        the ack is not for the oldest batch."""
        if not self._in_flight or self._in_flight[0].batch.batch_id != ack.batch_id:
            expected = self._in_flight[0].batch.batch_id if self._in_flight else None
            raise ReportProtocolError(f"ack for batch {ack.batch_id}, expected {expected}")
        done = self._in_flight.popleft()
        self._in_flight_count -= done.size
        for s in done.sessions.values():
            s.in_flight -= 1
        self.stats.acked += max(0, done.size - len(ack.rejections))
        self.stats.rejected += len(ack.rejections)
        fenced: list[tuple[SessionId, Rejection]] = []
        if ack.rejections:
            upserts = {u.session.session_id: u for u in done.batch.upserts}
            updates = {(u.session_id, u.position.stream_id): u for u in done.batch.updates}
            for r in ack.rejections:
                if self._rejected(done, r, upserts, updates):
                    fenced.append((SessionId(r.session_id), r))
        for s in done.sessions.values():
            self._free_if_done(s)
        return fenced

    def _rejected(
        self,
        done: _InFlight,
        r: Rejection,
        upserts: dict[SessionId, SessionUpsert],
        updates: dict[tuple[SessionId, StreamId], StreamUpdate],
    ) -> bool:
        """Act on one rejection; True if it newly fenced the session."""
        sid = SessionId(r.session_id)
        if r.reason in (RejectionReason.INVALID, RejectionReason.OWNER_LIMIT):
            self._log_refused(r)
            return False
        s = self._sessions.get(sid)
        if s is None or s is not done.sessions.get(sid):
            return False  # forgotten since it was sent
        upsert = upserts.get(sid)
        update = updates.get((sid, StreamId(r.stream_id))) if r.stream_id else None
        if r.reason is RejectionReason.FENCED:
            if update is not None:
                epoch = update.position.owner_epoch
            elif upsert is not None:
                epoch = max(upsert.session.owner_epoch, 1)
            else:
                epoch = s.record.owner_epoch if s.record is not None else 0
            if s.record is not None and s.record.owner_epoch > epoch:
                return False  # a stale item: the session has been given to us again since
            self._fence(s, epoch, r)
            return True
        # UNKNOWN_SESSION: the control plane lost the session (deleted, expired). Send its
        # record again with the update, once: if the batch already carried the upsert, a
        # second try would fail the same way.
        if update is None or s.record is None or upsert is not None:
            self._limiter.log(
                "unknown",
                "reports of sessions unknown to the control plane",
                logging.WARNING,
                "session %s is unknown to the control plane and cannot be re-created "
                "(%s): report dropped",
                sid,
                "no record known" if s.record is None else "its upsert failed",
            )
            return False
        if s.upsert is None:
            s.upsert = self._recreated(s)
            self._waiting_count += 1
        self._merge_update(s, update.position)
        self._wait_again(s, done.marks[sid])
        return False

    def _log_refused(self, r: Rejection) -> None:
        """Log an item the control plane will not store as it is (rate-limited)."""
        if r.reason is RejectionReason.OWNER_LIMIT:
            # Not stored: the session keeps working here, and a later renewal stores it
            # once this owner holds fewer sessions. Other sidecars cannot adopt it meanwhile.
            self._limiter.log(
                "owner_limit",
                "sessions refused over the owner limit",
                logging.ERROR,
                "control plane refused to store session %s: %s; it cannot move to "
                "another sidecar until it is stored",
                r.session_id,
                r.detail,
            )
            return
        self._limiter.log(
            "invalid",
            "reports refused as invalid",
            logging.ERROR,
            "control plane refused a report of session %r stream %r as invalid: %s",
            r.session_id,
            r.stream_id,
            r.detail,
        )

    def _recreated(self, s: _Session) -> SessionRecord:
        """The last record given to `session()`, whole, with every position given so far.

        Whole because the control plane keeps only what it is sent: a field left out here
        (the credential binding, say) would be lost for good, and a sidecar adopting the
        session next would serve it to anyone.
        """
        assert s.record is not None
        streams = SessionRecord.streams_of([*s.record.streams.values(), *s.known.values()])
        return replace(s.record, streams=streams)

    def _fence(self, s: _Session, epoch: int, r: Rejection) -> None:
        """Fence `s` off: drop its waiting items and its entry, remember only the epoch (its
        in-flight items are let go as those of a forgotten session)."""
        fenced_epoch = max(epoch, s.record.owner_epoch if s.record is not None else 0)
        self._fenced.pop(s.session_id, None)
        self._fenced[s.session_id] = fenced_epoch
        while len(self._fenced) > self._max_fenced:
            self._fenced.popitem(last=False)
        if self._waiting.pop(s.session_id, None) is not None:
            self.stats.dropped += self._clear_waiting(s)
        del self._sessions[s.session_id]
        self.stats.fenced += 1
        self._limiter.log(
            "fenced",
            "sessions fenced off",
            logging.WARNING,
            "session %s now belongs to %r (owner epoch %d; ours %d): this sidecar is "
            "fenced off and stops reporting it",
            s.session_id,
            r.current_owner,
            r.current_owner_epoch,
            fenced_epoch,
        )

    def _merge_update(self, s: _Session, p: StreamPosition) -> None:
        old = s.updates.get(p.stream_id)
        if old is None:
            self._waiting_count += 1
            s.updates[p.stream_id] = p
        elif p.order > old.order:
            s.updates[p.stream_id] = p

    def _wait_again(self, s: _Session, mark: int) -> None:
        """Put `s` (whose items were just merged back) at the front of the waiting line."""
        if s.session_id in self._waiting:
            s.first_mark = min(s.first_mark, mark)
        else:
            s.first_mark = mark
            self._waiting[s.session_id] = s
        self._waiting.move_to_end(s.session_id, last=False)

    def requeue_in_flight(self) -> None:
        """The stream broke: merge every unacknowledged item back into the waiting ones."""
        if not self._in_flight:
            return
        batches = list(self._in_flight)
        self._in_flight.clear()
        self._in_flight_count = 0
        for f in batches:
            for held in f.sessions.values():
                held.in_flight -= 1
        self._merge_back(batches)
        # Oldest batch last, so that its sessions end up at the very front.
        for f in reversed(batches):
            for sid in reversed(f.marks):
                s = self._sessions.get(sid)
                if s is not None and s is f.sessions[sid] and s.waiting:
                    self._wait_again(s, f.marks[sid])
        for f in batches:
            for held in f.sessions.values():
                self._free_if_done(held)
        self._bound()

    def _merge_back(self, batches: list[_InFlight]) -> None:
        """Merge the items of unacknowledged batches back into the waiting ones; newest
        batch first, so that the newest upsert of a session is the one kept."""
        for f in reversed(batches):
            for u in f.batch.upserts:
                s = self._live(f, u.session.session_id)
                if s is not None and s.upsert is None:
                    s.upsert = u.session
                    self._waiting_count += 1
            for w in f.batch.updates:
                s = self._live(f, w.session_id)
                if s is not None:
                    self._merge_update(s, w.position)

    def _live(self, f: _InFlight, sid: SessionId) -> _Session | None:
        """The entry an in-flight item came from, if it is still there: a session forgotten
        or fenced since (maybe made again) does not get its old items back."""
        s = self._sessions.get(sid)
        return s if s is not None and s is f.sessions[sid] else None


class Backoff:
    """Exponential backoff with jitter, capped, that never gives up (pure: no clock, no sleep).

    The n-th consecutive failure waits a random time in [c/2, c] with c = min(maximum,
    initial * 2**(n-1)): half of it keeps a floor under the wait, the random half spreads
    the sidecars that lost the same control plane. (`sidecar.reconnect.ReconnectPolicy` is
    the upstream policy: it gives up, and its exponent is not capped.)
    """

    def __init__(self, initial: float, maximum: float, *, rng: random.Random | None = None) -> None:
        self._initial = initial
        self._maximum = maximum
        self._rng = rng or random.Random()
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        ceiling = min(self._maximum, self._initial * 2.0 ** min(self.failures - 1, 64))
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


def _channel_options(config: ReporterConfig) -> list[tuple[str, int]]:
    # gRPC's own reconnect backoff (default up to 120 s) would otherwise keep the channel
    # failing fast long after the control plane is back.
    initial = max(1, int(config.reconnect_initial * 1000))
    return [
        ("grpc.initial_reconnect_backoff_ms", initial),
        ("grpc.min_reconnect_backoff_ms", initial),
        ("grpc.max_reconnect_backoff_ms", max(initial, int(config.reconnect_max * 1000))),
    ]


def _describe(error: BaseException) -> str:
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return repr(error)


class Reporter:
    """Ships session records and stream positions to the control plane, off the event path.

    `session`, `position` and `forget` are plain methods (never awaited, O(1)); `start` and
    `stop` bracket the background task; `flushed` waits until what was reported is settled.
    `on_fenced(session_id, rejection)` is called (from the background task) when the control
    plane says another sidecar now owns a session; it must not block. `served()` names the
    sessions whose lease to renew (invariant 10); called from the renewal task, it must not
    block either.

    The latest record and positions of a session are remembered (to re-create it if the
    control plane loses it) while it is live here: `forget()` (deleted) drops them at once,
    `release()` (ended here otherwise) once its items are acknowledged.
    """

    def __init__(
        self,
        config: ReporterConfig,
        *,
        on_fenced: Callable[[SessionId, Rejection], None] | None = None,
        served: Callable[[], Iterable[SessionId]] | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.config = config
        self._tracing = tracing
        self.stats = ReporterStats()
        self._queue = ReportQueue(max_pending=config.max_pending, stats=self.stats)
        self._on_fenced = on_fenced
        self._served = served
        self.session_ttl = 0.0
        """The session TTL the control plane last stated (0.0 until it has)."""
        self.renewals = 0
        """Renewal upserts queued (invariant 10)."""
        self._ttl_changed = asyncio.Event()
        self._renewer: asyncio.Task[None] | None = None
        self._limiter = ThrottledLog(log, burst=1, interval=LOG_PERIOD)
        self._channel: grpc.aio.Channel | None = None
        self._client: SessionClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        """Set when there is something new for the sender: items, an ack, a stop request."""
        self._stop_requested = asyncio.Event()
        self._stopping = False
        self._closed = False
        self._stream_open = False
        self._half_closed = False
        self._progress = False
        self._failing = False
        self._batch_id = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def client(self) -> SessionClient:
        """A client on the reporter's channel (for `get_session`, `claim_session`...)."""
        if self._client is None:
            raise RuntimeError("the reporter is not started")
        return self._client

    @property
    def connected(self) -> bool:
        """A report stream is open over a ready channel."""
        return (
            self._stream_open
            and self._channel is not None
            and self._channel.get_state() is grpc.ChannelConnectivity.READY
        )

    @property
    def renew_interval(self) -> float:
        """Seconds between renewals (invariant 10)."""
        interval = self.config.renew_interval
        if self.session_ttl > 0:
            interval = min(interval, max(MIN_RENEW_INTERVAL, self.session_ttl / 3))
        return interval

    @property
    def pending(self) -> int:
        """Items reported but not yet acknowledged (waiting or in flight)."""
        return self._queue.pending

    @property
    def sessions(self) -> int:
        """Sessions the reporter holds state for (live here, or with items unacknowledged)."""
        return self._queue.sessions

    @property
    def fences(self) -> int:
        """Fenced sessions whose fence is remembered (at most `MAX_FENCED`)."""
        return self._queue.fences

    # -- the event path -------------------------------------------------------------------

    def session(self, record: SessionRecord) -> None:
        """Create the session, or refresh its metadata, on the control plane (soon)."""
        if self._closed:
            return
        dropped = self.stats.dropped
        if self._queue.session(record):
            self._wake.set()
        if self.stats.dropped != dropped:
            self._settle()

    def position(self, session_id: SessionId, position: StreamPosition) -> None:
        """Report where a stream has got to; only the greatest `order` per stream is sent."""
        if self._closed:
            return
        dropped = self.stats.dropped
        if self._queue.position(session_id, position):
            self._wake.set()
        if self.stats.dropped != dropped:
            self._settle()

    def forget(self, session_id: SessionId) -> None:
        """The session was deleted locally: drop its pending items and its remembered record."""
        self._queue.forget(session_id)
        self._settle()

    def release(self, session_id: SessionId) -> None:
        """The session ended here without being deleted (expired, fenced): let go of what is
        remembered of it once its pending items are acknowledged."""
        self._queue.release(session_id)

    def fence(self, session_id: SessionId, *, epoch: int, owner: OwnerName) -> bool:
        """Another sidecar claimed the session at `epoch` (invariant 11): stop reporting it.
        False if this reporter did not hold it at an older epoch."""
        if not self._queue.fence(session_id, epoch=epoch, owner=owner):
            return False
        self._settle()
        return True

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the channel and start the background task; never fails for a control plane
        that is down (the task keeps trying)."""
        if self._channel is not None or self._closed:
            raise RuntimeError("a reporter starts once")
        self._channel = open_channel(
            self.config.target,
            self.config.security,
            options=_channel_options(self.config),
            interceptors=self._tracing.grpc_interceptors(),
        )
        self._client = SessionClient(self._channel)
        self._task = tasks.spawn(self._run(), name=f"tether-reporter {self.config.target}")
        if self._served is not None:
            self._renewer = tasks.spawn(
                self._renew_forever(), name=f"tether-reporter-renew {self.config.target}"
            )

    async def stop(self, *, flush_timeout: float = 5.0) -> None:
        """Send what is pending and wait for its acks (up to `flush_timeout` seconds), then
        end the stream, the task and the channel; idempotent."""
        if self._closed:
            return
        self._stopping = True
        self._stop_requested.set()
        self._wake.set()
        task = self._task
        try:
            if task is not None:
                await asyncio.wait([task], timeout=flush_timeout)
                if not task.done():
                    log.warning(
                        "reporter stopping with %d items unacknowledged after %.1fs",
                        self._queue.pending,
                        flush_timeout,
                    )
        finally:
            self._closed = True
            await tasks.cancel_and_wait(self._renewer, task)
            if self._channel is not None:
                await self._channel.close(None)
            for _, future in self._waiters:
                if not future.done():
                    future.set_exception(RuntimeError("reporter stopped before the flush"))
            self._waiters = []

    async def flushed(self) -> None:
        """Return once everything reported so far is acknowledged (applied or rejected) or
        dropped. Raises RuntimeError if the reporter stops first."""
        target = self._queue.mark
        oldest = self._queue.min_unsettled_mark()
        if oldest is None or oldest > target:
            return
        if self._closed:
            raise RuntimeError("reporter stopped before the flush")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (target, future)
        self._waiters.append(entry)
        try:
            await future
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    def _settle(self) -> None:
        if not self._waiters:
            return
        oldest = self._queue.min_unsettled_mark()
        for target, future in self._waiters:
            if not future.done() and (oldest is None or oldest > target):
                future.set_result(None)

    # -- the background tasks -------------------------------------------------------------

    async def _renew_forever(self) -> None:
        """Invariant 10: queue renewals of the served sessions every `renew_interval`."""
        assert self._served is not None
        while True:
            self._ttl_changed.clear()
            with contextlib.suppress(TimeoutError):
                # Pacing, not synchronisation; a newly stated TTL restarts the wait.
                async with asyncio.timeout(self.renew_interval):
                    await self._ttl_changed.wait()
                continue
            if self._closed or self._stopping:
                return
            queued = self._queue.renew(self._served())
            if queued:
                self.renewals += queued
                self._wake.set()

    async def _run(self) -> None:
        backoff = Backoff(self.config.reconnect_initial, self.config.reconnect_max)
        opened_once = False
        # `_closed` too: a cancellation swallowed on the way (grpc may turn one into a
        # CANCELLED status) must not keep a stopped reporter retrying forever.
        while not (self._stopping and self._queue.pending == 0) and not self._closed:
            if opened_once:
                self.stats.reconnects += 1
            opened_once = True
            opened = time.monotonic()
            error = await self._serve_stream()
            self._queue.requeue_in_flight()
            if error is None:
                continue  # we half-closed to stop; loop again only if items came meanwhile
            if self._progress or time.monotonic() - opened >= self.config.reconnect_max:
                backoff.reset()
            delay = backoff.next_delay()
            self._failing = True
            self._limiter.log(
                "stream",
                "report stream failures",
                logging.WARNING,
                "control plane %s: report stream failed (%s); retrying in %.2fs with %d "
                "items pending",
                self.config.target,
                _describe(error),
                delay,
                self._queue.pending,
            )
            await self._backoff(delay)

    async def _backoff(self, delay: float) -> None:
        if self._stopping:
            if self._queue.pending:
                await asyncio.sleep(delay)  # keep trying until stop()'s deadline
            return
        await self._sleep_unless_stopped(delay)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        """Sleep `seconds`, or less if `stop()` is called meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop_requested.wait()

    async def _serve_stream(self) -> BaseException | None:
        """Run one report stream until it fails (return the error) or, when stopping, until
        everything is acknowledged and the stream is closed (return None)."""
        # One span per report stream; its batches and acks are events (`sidecar.tracing`
        # rule 3), exported when the stream ends (a reconnect, the stop).
        with self._tracing.span(
            "tether.control_plane.report_stream", {"server.address": self.config.target}
        ) as span:
            stream = self.client.report_events()
            self._stream_open = True
            self._half_closed = False
            self._progress = False
            error: BaseException | None = None
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._send(stream, span), name="tether-reporter-send")
                    group.create_task(self._read_acks(stream, span), name="tether-reporter-acks")
            except* Exception as failure:
                error = failure
                span.fail(_describe(failure))
            finally:
                self._stream_open = False
                stream.cancel()
            return error

    async def _send(self, stream: ReportStream, span: Span) -> None:
        queue = self._queue
        while True:
            while True:
                self._wake.clear()
                if self._stopping and queue.pending == 0:
                    self._half_closed = True
                    await stream.done_writing()
                    return
                if queue.waiting and queue.batches_in_flight < MAX_BATCHES_IN_FLIGHT:
                    break
                await self._wait_for_wake(queue.oldest_sent_at)
            while queue.waiting and queue.batches_in_flight < MAX_BATCHES_IN_FLIGHT:
                self._batch_id += 1
                batch = queue.take_batch(self._batch_id, now=time.monotonic())
                if batch is None:  # everything waiting was too large to send: dropped
                    self._settle()
                    break
                self.stats.batches_sent += 1
                self.stats.items_sent += len(batch.upserts) + len(batch.updates)
                span.event(
                    "tether.report.batch",
                    {
                        "tether.batch.id": batch.batch_id,
                        "tether.batch.upserts": len(batch.upserts),
                        "tether.batch.updates": len(batch.updates),
                    },
                )
                try:
                    async with asyncio.timeout(ACK_TIMEOUT):
                        await stream.send(batch)
                except TimeoutError:
                    raise _StreamEndedError(f"writing a batch took over {ACK_TIMEOUT}s") from None
            if self.config.interval > 0 and not self._stopping:
                # Pacing, not synchronisation: items reported meanwhile join the next batch.
                # A stop cuts it short: its flush must not wait out a long interval.
                await self._sleep_unless_stopped(self.config.interval)

    async def _wait_for_wake(self, oldest_sent_at: float | None) -> None:
        if oldest_sent_at is None:
            await self._wake.wait()
            return
        remaining = oldest_sent_at + ACK_TIMEOUT - time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                await self._wake.wait()
        except TimeoutError:
            raise _StreamEndedError(f"no acknowledgement for {ACK_TIMEOUT}s") from None

    async def _read_acks(self, stream: ReportStream, span: Span) -> None:
        acks = stream.acks()
        try:
            async for ack in acks:
                if ack.session_ttl > 0 and ack.session_ttl != self.session_ttl:
                    self.session_ttl = ack.session_ttl
                    self._ttl_changed.set()
                fenced = self._queue.acknowledge(ack)
                span.event(
                    "tether.report.ack",
                    {"tether.batch.id": ack.batch_id, "tether.batch.fenced": len(fenced)},
                )
                self._progress = True
                if self._failing:
                    self._failing = False
                    log.info("control plane %s: reporting again", self.config.target)
                self._wake.set()
                self._settle()
                for session_id, rejection in fenced:
                    self._announce_fenced(session_id, rejection)
        finally:
            if isinstance(acks, AsyncGenerator):
                await acks.aclose()
        if not self._half_closed:
            raise _StreamEndedError("the control plane ended the report stream")

    def _announce_fenced(self, session_id: SessionId, rejection: Rejection) -> None:
        if self._on_fenced is None:
            return
        try:
            self._on_fenced(session_id, rejection)
        except Exception:
            log.exception("on_fenced callback failed for session %s", session_id)
