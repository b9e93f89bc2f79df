"""The pure rules of `controlplane.records` and `controlplane.batcher`: no store, no loop."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.batcher import PendingWrites, acknowledge
from controlplane.records import (
    MAX_STREAM_POSITIONS,
    ClaimRefusedError,
    MergeResult,
    Refusal,
    apply_writes,
    claim,
    recreation_refusal,
    refusal,
    tombstone_of,
)
from controlplane.store.protocol import WritesRefused
from tether.model import (
    OwnerName,
    RejectionReason,
    ReportBatch,
    SessionId,
    SessionRecord,
    SessionUpsert,
    StreamId,
    StreamPosition,
    StreamUpdate,
)

SID = SessionId("s1")


def rec(epoch: int = 1) -> SessionRecord:
    return SessionRecord(SID, "s1", "up:1", OwnerName("pod-a"), epoch)


def upd(seq: int, epoch: int = 1, stream: str = "a") -> StreamUpdate:
    return StreamUpdate(SID, StreamPosition(StreamId(stream), f"{stream}.{seq}", "", seq, epoch))


def test_create_then_stale_is_unchanged() -> None:
    created = apply_writes(None, [SessionUpsert(rec(0)), upd(3)], now=10, ttl=5)
    assert created.changed
    assert created.record is not None
    assert created.record.owner_epoch == 1
    assert (created.record.created_at, created.record.expires_at) == (10, 15)
    stale = apply_writes(created.record, [upd(2), upd(3)], now=20, ttl=5)
    assert not stale.changed
    assert stale.record is created.record


def test_update_without_session_is_skipped() -> None:
    assert apply_writes(None, [upd(1)], now=1, ttl=1).record is None


def test_claim_keeps_streams_and_checks_expected_epoch() -> None:
    base = apply_writes(None, [SessionUpsert(rec()), upd(9)], now=1, ttl=1).record
    assert base is not None
    new = claim(base, owner=OwnerName("b"), expected_owner_epoch=1, now=2, ttl=1)
    assert (new.owner, new.owner_epoch, new.streams) == ("b", 2, base.streams)
    with pytest.raises(ClaimRefusedError):
        claim(new, owner=OwnerName("c"), expected_owner_epoch=1, now=3, ttl=1)


@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 50)), min_size=1, max_size=40))
def test_any_order_of_updates_ends_at_the_greatest_of_the_current_epoch(
    updates: list[tuple[int, int]],
) -> None:
    """Whatever the order, batching or replay, a stream ends at the greatest seq written under
    the session's epoch, and never moves backwards on the way."""
    start = apply_writes(None, [SessionUpsert(rec(epoch=2))], now=0, ttl=1).record
    assert start is not None
    record: SessionRecord = start
    seen = -1
    for epoch, seq in updates:
        after = apply_writes(record, [upd(seq, epoch)], now=1, ttl=1).record
        assert after is not None
        record = after
        got = record.streams.get(StreamId("a"))
        if got is not None:
            assert got.seq >= seen
            seen = got.seq
    valid = [seq for epoch, seq in updates if epoch == 2]
    final = record.streams.get(StreamId("a"))
    assert (final.seq if final else None) == (max(valid) if valid else None)
    # One batch of all of them gives the same result as one at a time.
    fresh = apply_writes(None, [SessionUpsert(rec(2))], now=0, ttl=1).record
    batched = apply_writes(fresh, [upd(s, e) for e, s in updates], now=1, ttl=1).record
    assert batched is not None
    assert batched.streams == record.streams


def test_pending_writes_coalesce_per_stream_and_epoch() -> None:
    pending = PendingWrites()
    pending.add([upd(1), upd(5), upd(3), upd(2, epoch=2), upd(1, stream="b")])
    pending.add([SessionUpsert(rec())])
    assert pending.received == 6
    taken = pending.take()
    assert isinstance(taken[0], SessionUpsert)
    updates = sorted(
        (w.position.stream_id, w.position.owner_epoch, w.position.seq)
        for w in taken
        if isinstance(w, StreamUpdate)
    )
    assert updates == [("a", 1, 5), ("a", 2, 2), ("b", 1, 1)]
    assert pending.take() == []


def test_acknowledge_reports_fenced_and_unknown() -> None:
    current = dataclasses.replace(rec(epoch=2), owner=OwnerName("pod-b"))
    batch = ReportBatch(
        4,
        upserts=(SessionUpsert(rec(1)),),
        updates=(
            upd(1, epoch=1),
            upd(1, epoch=2),
            StreamUpdate(SessionId("gone"), upd(1).position),
        ),
    )
    ack = acknowledge(batch, {SID: current, SessionId("gone"): None})
    assert ack.batch_id == 4
    got = [(r.session_id, r.stream_id, r.reason) for r in ack.rejections]
    assert got == [
        ("s1", "", RejectionReason.FENCED),
        ("s1", "a", RejectionReason.FENCED),
        ("gone", "a", RejectionReason.UNKNOWN_SESSION),
    ]
    assert ack.rejections[0].current_owner == "pod-b"
    assert ack.rejections[0].current_owner_epoch == 2


POD_A, POD_B = OwnerName("pod-a"), OwnerName("pod-b")


def bound(fp: str = "fp-alice", **kw: object) -> SessionRecord:
    return dataclasses.replace(rec(), credential_fingerprint=fp, **kw)  # type: ignore[arg-type]


def created(record: SessionRecord) -> SessionRecord:
    out = apply_writes(None, [SessionUpsert(record)], now=1, ttl=10).record
    assert out is not None
    return out


def test_rule6_a_sidecar_writes_only_the_sessions_it_owns() -> None:
    current = created(bound())
    own = apply_writes(current, [dataclasses.replace(upd(4), writer=POD_A)], now=2, ttl=10)
    assert own.changed
    assert own.record is not None
    assert own.record.streams[StreamId("a")].seq == 4
    # Same epoch, same stream, a greater seq: refused all the same, the writer is not the owner.
    theirs = dataclasses.replace(upd(9), writer=POD_B)
    assert apply_writes(current, [theirs], now=2, ttl=10) == MergeResult(current, False)
    assert refusal(current, theirs) is Refusal.NOT_OWNER
    upsert = SessionUpsert(bound(upstream_address="evil:1"), writer=POD_B)
    assert apply_writes(current, [upsert], now=2, ttl=10) == MergeResult(current, False)
    # Creating: only under the writer's own name.
    assert apply_writes(None, [SessionUpsert(bound(), writer=POD_B)], now=2, ttl=10).record is None
    mine = apply_writes(None, [SessionUpsert(bound(), writer=POD_A)], now=2, ttl=10).record
    assert mine is not None
    assert mine.owner == POD_A


def test_rule7_an_upsert_cannot_change_the_owner_only_a_claim_can() -> None:
    """The issue's attack without authentication: upsert a session at its current epoch with
    one's own owner name. Refused; a claim (which raises the epoch) is the way to move it."""
    current = created(bound())
    takeover = SessionUpsert(dataclasses.replace(bound(), owner=POD_B))
    assert refusal(current, takeover) is Refusal.NOT_OWNER
    assert apply_writes(current, [takeover], now=2, ttl=10) == MergeResult(current, False)
    claimed = claim(current, owner=POD_B, expected_owner_epoch=None, now=3, ttl=10)
    assert (claimed.owner, claimed.owner_epoch) == (POD_B, 2)


def test_rule8_the_credential_binding_is_set_once_at_creation() -> None:
    current = created(bound("fp-alice"))
    rebind = SessionUpsert(bound("fp-mallory", upstream_address="evil:1"))
    assert refusal(current, rebind) is Refusal.BINDING_CHANGED
    assert apply_writes(current, [rebind], now=2, ttl=10) == MergeResult(current, False)
    # An empty fingerprint keeps the stored one; the same one is a refresh.
    for fp in ("", "fp-alice"):
        kept = apply_writes(
            current, [SessionUpsert(bound(fp, upstream_address="b:2"))], now=2, ttl=10
        )
        assert kept.record is not None
        assert (kept.record.credential_fingerprint, kept.record.upstream_address) == (
            "fp-alice",
            "b:2",
        )
    # A session created without a credential stays without one.
    open_session = created(bound(""))
    assert refusal(open_session, SessionUpsert(bound("fp-mallory"))) is Refusal.BINDING_CHANGED


def test_acknowledge_reports_refused_writes() -> None:
    current = created(bound())
    batch = ReportBatch(
        7,
        upserts=(
            SessionUpsert(bound("fp-mallory")),
            SessionUpsert(dataclasses.replace(bound(), owner=POD_B)),
        ),
        updates=(
            dataclasses.replace(upd(2), writer=POD_B),
            dataclasses.replace(upd(3), writer=POD_A),
        ),
    )
    ack = acknowledge(batch, {SID: current})
    got = [(r.stream_id, r.reason, r.current_owner) for r in ack.rejections]
    assert got == [
        ("", RejectionReason.INVALID, ""),
        ("", RejectionReason.FENCED, "pod-a"),
        ("a", RejectionReason.FENCED, "pod-a"),
    ]
    assert "cannot change" in ack.rejections[0].detail
    assert "'pod-b' may not write it" in ack.rejections[2].detail


def test_pending_writes_keep_writers_apart() -> None:
    """A non-owner's update with a greater seq must not hide the owner's in coalescing."""
    pending = PendingWrites()
    pending.add(
        [dataclasses.replace(upd(3), writer=POD_A), dataclasses.replace(upd(99), writer=POD_B)]
    )
    current = created(bound())
    out = apply_writes(current, pending.take(), now=2, ttl=10).record
    assert out is not None
    assert out.streams[StreamId("a")].seq == 3


@pytest.mark.parametrize(
    ("what", "owner", "epoch", "fp", "allowed"),
    [
        ("the last owner, its epoch and credential", "pod-b", 2, "fp-alice", True),
        ("a higher epoch, same credential", "pod-a", 3, "fp-alice", True),
        ("another credential", "pod-b", 2, "fp-mallory", False),
        ("another credential, higher epoch", "pod-b", 9, "fp-mallory", False),
        ("no credential", "pod-b", 2, "", False),
        ("a fenced owner below the last epoch", "pod-a", 1, "fp-alice", False),
        ("another owner at the last epoch", "pod-a", 2, "fp-alice", False),
    ],
)
def test_rule9_recreation_over_a_tombstone(
    what: str, owner: str, epoch: int, fp: str, allowed: bool
) -> None:
    last = dataclasses.replace(bound(), owner=POD_B, owner_epoch=2)
    tomb = tombstone_of(last, ended_at=100, ttl=10)
    assert (tomb.owner_epoch, tomb.expires_at) == (2, 110)
    upsert = SessionUpsert(bound(fp, owner=OwnerName(owner), owner_epoch=epoch))
    why = recreation_refusal(tomb, upsert)
    assert (why == "") is allowed, what
    merged = apply_writes(None, [upsert, upd(1, epoch)], now=105, ttl=10, tombstone=tomb)
    assert (merged.record is not None) is allowed, what
    assert merged.refused == why
    assert recreation_refusal(None, upsert) == ""


def test_acknowledge_reports_a_refused_as_invalid() -> None:
    batch = ReportBatch(3, upserts=(SessionUpsert(bound()),), updates=(upd(1),))
    ack = acknowledge(batch, {SID: WritesRefused("re-created with another credential")})
    got = [(r.stream_id, r.reason, r.detail) for r in ack.rejections]
    assert got == [
        ("", RejectionReason.INVALID, "re-created with another credential"),
        ("a", RejectionReason.INVALID, "re-created with another credential"),
    ]


def test_rule11_a_record_keeps_the_most_recently_moved_streams() -> None:
    """Every call of a session is a stream: the record keeps the latest `MAX_STREAM_POSITIONS`
    of them, and a long-lived stream that keeps moving (a GET stream) is never the one
    dropped."""
    record = apply_writes(None, [SessionUpsert(rec(0)), upd(1, stream="get")], now=1, ttl=60)
    current = record.record
    for call in range(3 * MAX_STREAM_POSITIONS):
        writes = [upd(1, stream=f"post-{call}"), upd(call + 2, stream="get")]
        current = apply_writes(current, writes, now=2, ttl=60).record
        assert current is not None
        assert len(current.streams) <= MAX_STREAM_POSITIONS
    assert current is not None
    assert current.streams[StreamId("get")].seq == 3 * MAX_STREAM_POSITIONS + 1
    kept = {f"post-{c}" for c in range(2 * MAX_STREAM_POSITIONS + 1, 3 * MAX_STREAM_POSITIONS)}
    assert set(current.streams) == kept | {"get"}


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 5)), min_size=200, max_size=400))
def test_rule11_holds_for_any_order_of_updates(moves: list[tuple[int, int]]) -> None:
    current = apply_writes(None, [SessionUpsert(rec(0))], now=1, ttl=60).record
    for stream, seq in moves:
        current = apply_writes(current, [upd(seq, stream=f"s{stream}")], now=2, ttl=60).record
        assert current is not None
        assert len(current.streams) <= MAX_STREAM_POSITIONS
