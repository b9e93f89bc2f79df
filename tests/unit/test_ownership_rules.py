"""The ownership rules on their own, without I/O: the watch filter of the control plane
(`OwnerFilter`) and the reporter queue's lease and fencing rules (reporter rules 9-11)."""

from __future__ import annotations

from controlplane.service import OwnerFilter
from sidecar.reporter import ReporterStats, ReportQueue
from tether.model import (
    BatchAck,
    OwnerName,
    SessionEvent,
    SessionEventType,
    SessionId,
    SessionRecord,
    StreamId,
    StreamPosition,
)

SID = SessionId("s1")
A, B = OwnerName("a"), OwnerName("b")


def record(owner: OwnerName = A, epoch: int = 1) -> SessionRecord:
    return SessionRecord(SID, "up", "http://up", owner, epoch, initialize_request=b"{}")


def put(owner: OwnerName, epoch: int) -> SessionEvent:
    return SessionEvent(SessionEventType.PUT, SID, record(owner, epoch))


def position(epoch: int, seq: int) -> StreamPosition:
    return StreamPosition(StreamId("p1"), f"p1.{epoch}.{seq}", "", seq, epoch)


def test_owner_filter_passes_the_one_event_that_shows_a_session_lost() -> None:
    admits = OwnerFilter(A)
    assert admits(SessionEvent(SessionEventType.SYNCED))
    assert not admits(put(B, 1))  # never ours: not followed
    assert admits(put(A, 1))
    assert admits(put(A, 1))
    assert admits(put(B, 2))  # claimed away: the old owner sees it once
    assert not admits(put(B, 2))
    assert not admits(SessionEvent(SessionEventType.DELETE, SID, record(B, 2)))
    assert admits(put(A, 3))  # claimed back
    assert admits(SessionEvent(SessionEventType.EXPIRE, SID, record(A, 3)))
    assert OwnerFilter(None)(put(B, 1))


def queue() -> ReportQueue:
    return ReportQueue(max_pending=100, stats=ReporterStats())


def drain(q: ReportQueue) -> None:
    batch = q.take_batch(1, now=0.0)
    assert batch is not None
    q.acknowledge(BatchAck(batch.batch_id))


def test_renew_queues_the_whole_record_of_live_sessions_only() -> None:
    q = queue()
    assert q.renew([SID]) == 0  # nothing known of it
    q.session(record())
    q.position(SID, position(1, 5))
    assert q.renew([SID]) == 0  # its upsert is still waiting
    drain(q)
    assert q.renew([SID]) == 1
    batch = q.take_batch(2, now=0.0)
    assert batch is not None
    (upsert,) = batch.upserts
    assert upsert.session.initialize_request == b"{}"
    assert upsert.session.streams[StreamId("p1")] == position(1, 5)
    q.acknowledge(BatchAck(2))
    q.release(SID)
    assert q.renew([SID]) == 0  # ended here: no lease to keep


def test_a_pushed_fence_stops_reports_and_a_claim_back_starts_clean() -> None:
    q = queue()
    q.session(record())
    q.position(SID, position(1, 5))
    drain(q)
    assert not q.fence(SID, epoch=1, owner=B)  # not newer than ours: nothing to do
    assert q.fence(SID, epoch=2, owner=B)
    assert not q.position(SID, position(1, 6))
    assert q.renew([SID]) == 0
    assert not q.session(record(A, 2))  # the epoch it lost: still fenced
    assert q.session(record(A, 3))  # claimed back
    assert q.position(SID, position(3, 1))  # a new epoch's first position is accepted
    batch = q.take_batch(3, now=0.0)
    assert batch is not None
    assert [u.session.owner_epoch for u in batch.upserts] == [3]
    assert [u.position.owner_epoch for u in batch.updates] == [3]


def test_reclaiming_drops_positions_of_older_epochs() -> None:
    q = queue()
    q.session(record())
    drain(q)
    q.position(SID, position(1, 5))  # waiting when the session is claimed back at epoch 3
    q.session(record(A, 3))
    batch = q.take_batch(1, now=0.0)
    assert batch is not None
    assert batch.updates == ()
    assert [u.session.owner_epoch for u in batch.upserts] == [3]
    assert dict(batch.upserts[0].session.streams) == {}
