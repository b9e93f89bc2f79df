"""The sidecar's reporter against a real control plane (grpc.aio on loopback over a SQLite file):
positions reach the store coalesced, survive a control plane that is down or restarts, and
fencing, unknown sessions and invalid items are handled as the wire contract says."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.server import RunningControlPlane, start_control_plane
from controlplane.store.sqlite import SqliteSessionStore, SqliteStoreConfig
from sidecar.reporter import (
    MAX_BATCH_ITEMS,
    Reporter,
    ReporterConfig,
    ReporterStats,
    ReportProtocolError,
    ReportQueue,
)
from tests.contract.conftest import FakeClock
from tests.controlplane.conftest import TTL, cp_config
from tests.support.procs import free_port
from tether.api.client import SessionClient
from tether.model import (
    BatchAck,
    OwnerName,
    Rejection,
    RejectionReason,
    SessionId,
    SessionRecord,
    StreamId,
    StreamPosition,
)

DEADLINE = 10.0
SID = SessionId("s1")
POD_A = OwnerName("pod-a")
POD_B = OwnerName("pod-b")


class ControlPlane:
    """A control plane that can be stopped and started again on the same port and file."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.port = free_port()
        self.clock = FakeClock()
        self.running: RunningControlPlane | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def writes_received(self) -> int:
        assert self.running is not None
        return self.running.batcher.writes_received

    async def start(self) -> None:
        assert self.running is None
        store = await SqliteSessionStore.open(
            SqliteStoreConfig(path=self.db_path, session_ttl=TTL, sweep_interval=0),
            clock=self.clock,
        )
        config = dataclasses.replace(cp_config(self.db_path), listen=self.address)
        self.running = await start_control_plane(config, store=store)

    async def stop(self) -> None:
        if self.running is not None:
            running, self.running = self.running, None
            await running.stop(grace=0.5)


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    """A control plane on a reserved port, not started yet."""
    plane = ControlPlane(tmp_path / "sessions.db")
    yield plane
    await plane.stop()


ReporterFactory = Callable[..., Awaitable[Reporter]]


@pytest.fixture
async def make_reporter(cp: ControlPlane) -> AsyncIterator[ReporterFactory]:
    """Start reporters (to `cp` unless told otherwise); all are stopped after the test."""
    started: list[Reporter] = []

    async def factory(
        *, on_fenced: Callable[[SessionId, Rejection], None] | None = None, **overrides: Any
    ) -> Reporter:
        config = ReporterConfig(
            target=cp.address,
            owner=POD_A,
            interval=0.01,
            reconnect_initial=0.02,
            reconnect_max=0.2,
        )
        reporter = Reporter(dataclasses.replace(config, **overrides), on_fenced=on_fenced)
        await reporter.start()
        started.append(reporter)
        return reporter

    yield factory
    for r in started:
        await r.stop(flush_timeout=0.5)


def record(sid: str = "s1", *, owner: str = "pod-a", epoch: int = 1) -> SessionRecord:
    return SessionRecord(
        session_id=SessionId(sid),
        upstream_session_id=f"up-{sid}",
        upstream_address="http://mcp:8080/mcp",
        owner=OwnerName(owner),
        owner_epoch=epoch,
        protocol_version="2025-06-18",
        initialize_request=b'{"jsonrpc":"2.0","method":"initialize"}',
    )


def pos(stream: str, seq: int, *, epoch: int = 1) -> StreamPosition:
    return StreamPosition(
        stream_id=StreamId(stream),
        last_event_id=f"{stream}.{epoch}.{seq}",
        upstream_event_id=str(seq),
        seq=seq,
        owner_epoch=epoch,
    )


async def settled(reporter: Reporter) -> None:
    async with asyncio.timeout(DEADLINE):
        await reporter.flushed()


async def stored(client: SessionClient, sid: SessionId = SID) -> SessionRecord:
    rec = await client.get_session(sid, timeout=DEADLINE)
    assert rec is not None, f"session {sid} is not in the store"
    return rec


def seqs(rec: SessionRecord) -> dict[str, int]:
    return {stream: p.seq for stream, p in rec.streams.items()}


async def test_positions_reach_the_store_coalesced(
    cp: ControlPlane, make_reporter: ReporterFactory
) -> None:
    await cp.start()
    reporter = await make_reporter()
    reporter.session(record())
    await settled(reporter)
    assert reporter.connected
    items_before, writes_before = reporter.stats.items_sent, cp.writes_received

    # No await in between: all of these fall into one interval.
    for seq in range(1, 1001):
        reporter.position(SID, pos("a", seq))
    for seq in range(1, 11):
        reporter.position(SID, pos("b", seq))
    reporter.position(SID, pos("a", 500))  # older than what was given: ignored
    assert reporter.pending == 2
    await settled(reporter)

    rec = await stored(reporter.client)
    assert seqs(rec) == {"a": 1000, "b": 10}
    assert rec.streams[StreamId("a")].last_event_id == "a.1.1000"
    assert (rec.owner, rec.owner_epoch) == (POD_A, 1)
    # One item per stream reached the control plane, hence one store write per stream.
    assert reporter.stats.items_sent - items_before == 2
    assert cp.writes_received - writes_before == 2
    assert reporter.pending == 0
    assert reporter.stats.rejected == 0


async def test_event_path_is_plain_and_bounded(
    make_reporter: ReporterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Plain methods: the event path can call them without awaiting anything.
    for name in ("session", "position", "forget"):
        assert not inspect.iscoroutinefunction(getattr(Reporter, name))
    reporter = await make_reporter(target=f"127.0.0.1:{free_port()}", max_pending=50)
    caplog.set_level(logging.WARNING, logger="tether.sidecar.reporter")

    for i in range(100_000):
        sid = SessionId(f"s{i % 1000}")
        if i % 100 == 0:
            reporter.session(record(sid))
        reporter.position(sid, pos(f"x{i % 7}", i))
        assert reporter.pending <= 50

    assert not reporter.connected
    assert reporter.stats.dropped > 0
    drops = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert 1 <= len(drops) <= 3, "drop warnings are rate-limited"


async def test_control_plane_down_at_start(
    cp: ControlPlane, make_reporter: ReporterFactory
) -> None:
    reporter = await make_reporter()
    reporter.session(record())
    for seq in range(1, 21):
        reporter.position(SID, pos("a", seq))
    for seq in range(1, 6):
        reporter.position(SID, pos("b", seq))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await reporter.flushed()
    assert not reporter.connected
    assert reporter.pending == 3

    await cp.start()
    await settled(reporter)
    rec = await stored(reporter.client)
    assert seqs(rec) == {"a": 20, "b": 5}
    assert reporter.connected


async def test_control_plane_restarted(cp: ControlPlane, make_reporter: ReporterFactory) -> None:
    await cp.start()
    reporter = await make_reporter()
    reporter.session(record())
    for seq in range(1, 11):
        reporter.position(SID, pos("a", seq))
    await settled(reporter)

    # These race the shutdown: sent or not, acknowledged or not, none may be lost.
    for seq in range(11, 21):
        reporter.position(SID, pos("a", seq))
    await cp.stop()
    for seq in range(21, 51):
        reporter.position(SID, pos("a", seq))
    for seq in range(1, 8):
        reporter.position(SID, pos("b", seq))
    reporter.session(record("s2"))
    reporter.position(SessionId("s2"), pos("c", 3))
    await cp.start()

    await settled(reporter)
    rec = await stored(reporter.client)
    assert seqs(rec) == {"a": 50, "b": 7}
    assert seqs(await stored(reporter.client, SessionId("s2"))) == {"c": 3}
    assert reporter.stats.reconnects >= 1
    assert reporter.pending == 0


async def test_fenced_session_is_no_longer_reported(
    cp: ControlPlane, make_reporter: ReporterFactory
) -> None:
    await cp.start()
    fenced = asyncio.Event()
    calls: list[tuple[SessionId, Rejection]] = []

    def on_fenced(session_id: SessionId, rejection: Rejection) -> None:
        calls.append((session_id, rejection))
        fenced.set()

    reporter = await make_reporter(on_fenced=on_fenced)
    reporter.session(record())
    for seq in range(1, 6):
        reporter.position(SID, pos("a", seq))
    await settled(reporter)

    claimed = await reporter.client.claim_session(SID, owner=POD_B, timeout=DEADLINE)
    assert claimed.owner_epoch == 2
    reporter.position(SID, pos("a", 6))  # a zombie's write
    async with asyncio.timeout(DEADLINE):
        await fenced.wait()
    await settled(reporter)

    [(session_id, rejection)] = calls
    assert session_id == SID
    assert rejection.reason is RejectionReason.FENCED
    assert (rejection.current_owner, rejection.current_owner_epoch) == ("pod-b", 2)
    assert reporter.stats.fenced == 1
    # Reporting of the session has stopped; the store did not move.
    reporter.position(SID, pos("a", 7))
    reporter.session(record(epoch=1))
    assert reporter.pending == 0
    rec = await stored(reporter.client)
    assert seqs(rec) == {"a": 5}
    assert (rec.owner, rec.owner_epoch) == (POD_B, 2)

    # Taking the session back (a higher epoch) lifts the fence.
    back = await reporter.client.claim_session(SID, owner=POD_A, timeout=DEADLINE)
    reporter.session(dataclasses.replace(record(), owner_epoch=back.owner_epoch))
    reporter.position(SID, pos("a", 1, epoch=back.owner_epoch))
    await settled(reporter)
    rec = await stored(reporter.client)
    assert (rec.owner, rec.owner_epoch) == (POD_A, 3)
    assert rec.streams[StreamId("a")].order == (3, 1)
    assert len(calls) == 1


async def test_unknown_session_is_created_again(
    cp: ControlPlane, make_reporter: ReporterFactory
) -> None:
    await cp.start()
    reporter = await make_reporter()
    reporter.session(record())
    for seq in range(1, 4):
        reporter.position(SID, pos("a", seq))
    for seq in range(1, 5):
        reporter.position(SID, pos("b", seq))
    await settled(reporter)

    await reporter.client.delete_session(SID, timeout=DEADLINE)
    reporter.position(SID, pos("a", 4))
    await settled(reporter)

    rec = await stored(reporter.client)
    # The update that was refused, and the streams the reporter had given before.
    assert seqs(rec) == {"a": 4, "b": 4}
    assert (rec.owner, rec.owner_epoch, rec.upstream_session_id) == (POD_A, 1, "up-s1")
    assert reporter.stats.rejected == 1


async def test_unknown_session_without_record_is_dropped(
    cp: ControlPlane, make_reporter: ReporterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    await cp.start()
    reporter = await make_reporter()
    reporter.position(SessionId("ghost"), pos("a", 1))
    await settled(reporter)
    assert await reporter.client.get_session(SessionId("ghost"), timeout=DEADLINE) is None
    assert reporter.stats.rejected == 1
    assert any(r.levelno == logging.WARNING and "ghost" in r.getMessage() for r in caplog.records)


async def test_invalid_item_is_logged_and_dropped(
    cp: ControlPlane, make_reporter: ReporterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    await cp.start()
    reporter = await make_reporter()
    reporter.session(record())
    reporter.position(SID, pos("a", 1))
    reporter.position(SID, pos("../bad", 1))
    await settled(reporter)
    assert seqs(await stored(reporter.client)) == {"a": 1}
    assert reporter.stats.rejected == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("invalid" in r.getMessage() and "../bad" in r.getMessage() for r in errors)


async def test_forget_drops_pending_items(make_reporter: ReporterFactory) -> None:
    reporter = await make_reporter()  # the control plane is not running
    reporter.session(record())
    reporter.position(SID, pos("a", 1))
    reporter.position(SessionId("s2"), pos("a", 1))
    assert reporter.pending == 3
    reporter.forget(SID)
    assert reporter.pending == 1


async def test_stop_flushes_what_is_pending(
    cp: ControlPlane, make_reporter: ReporterFactory
) -> None:
    await cp.start()
    reporter = await make_reporter()
    reporter.session(record())
    for seq in range(1, 31):
        reporter.position(SID, pos("a", seq))
    await reporter.stop()
    assert reporter.pending == 0
    assert not reporter.connected

    async with grpc.aio.insecure_channel(cp.address) as channel:
        rec = await stored(SessionClient(channel))
    assert seqs(rec) == {"a": 30}


async def test_stop_cuts_the_pacing_interval_short(
    cp: ControlPlane, make_reporter: ReporterFactory
) -> None:
    """A stop while the sender paces a long interval flushes at once: it used to wait out the
    interval, and so the whole flush deadline (every sidecar stop with a long interval)."""
    await cp.start()
    reporter = await make_reporter(interval=3600.0)
    reporter.session(record())
    await reporter.flushed()  # the first batch went out; the sender now paces for an hour
    reporter.position(SID, pos("a", 7))
    async with asyncio.timeout(DEADLINE):
        await reporter.stop(flush_timeout=3600.0)
    assert reporter.pending == 0
    async with grpc.aio.insecure_channel(cp.address) as channel:
        rec = await stored(SessionClient(channel))
    assert seqs(rec) == {"a": 7}


async def test_stop_with_control_plane_down_ends_at_the_deadline(
    make_reporter: ReporterFactory,
) -> None:
    reporter = await make_reporter()
    reporter.session(record())
    async with asyncio.timeout(DEADLINE):
        await reporter.stop(flush_timeout=0.2)
    assert reporter.pending == 1
    with pytest.raises(RuntimeError):
        await reporter.flushed()


# The queue on its own (no I/O): the rules the reporter relies on when a stream breaks.


def test_queue_requeue_keeps_the_newest_items() -> None:
    q = ReportQueue(max_pending=100, stats=ReporterStats())
    q.session(record())
    q.position(SID, pos("a", 5))
    q.position(SID, pos("b", 2))
    first = q.take_batch(1, now=0.0)
    assert first is not None
    assert (len(first.upserts), len(first.updates)) == (1, 2)
    # Reported while the batch is in flight: newer than what is in it.
    q.position(SID, pos("a", 7))
    q.session(dataclasses.replace(record(), upstream_session_id="up-new"))
    q.requeue_in_flight()
    assert q.pending == 3

    again = q.take_batch(2, now=0.0)
    assert again is not None
    assert [u.session.upstream_session_id for u in again.upserts] == ["up-new"]
    assert {u.position.stream_id: u.position.seq for u in again.updates} == {"a": 7, "b": 2}
    with pytest.raises(ReportProtocolError):
        q.acknowledge(BatchAck(1))
    assert q.acknowledge(BatchAck(2)) == []
    assert q.pending == 0
    assert q.min_unsettled_mark() is None


def test_queue_forgotten_sessions_are_not_sent_again() -> None:
    q = ReportQueue(max_pending=100, stats=ReporterStats())
    q.session(record())
    q.position(SID, pos("a", 1))
    assert q.take_batch(1, now=0.0) is not None
    q.forget(SID)
    q.session(record())  # the same id, a new session
    q.requeue_in_flight()
    batch = q.take_batch(2, now=0.0)
    assert batch is not None
    assert (len(batch.upserts), len(batch.updates)) == (1, 0)


def test_queue_cuts_big_backlogs_upserts_first() -> None:
    q = ReportQueue(max_pending=100_000, stats=ReporterStats())
    total = MAX_BATCH_ITEMS * 2 + 10
    for i in range(total - 1):
        q.position(SID, pos(f"x{i}", 1))
    q.session(record())
    sizes: list[int] = []
    first_upserts = None
    while (batch := q.take_batch(len(sizes) + 1, now=0.0)) is not None:
        if first_upserts is None:
            first_upserts = len(batch.upserts)
        sizes.append(len(batch.upserts) + len(batch.updates))
    assert first_upserts == 1
    assert sizes == [MAX_BATCH_ITEMS, MAX_BATCH_ITEMS, 10]


def test_queue_lets_go_of_released_sessions_once_settled() -> None:
    q = ReportQueue(max_pending=100, stats=ReporterStats())
    q.session(record())
    q.position(SID, pos("a", 1))
    assert q.take_batch(1, now=0.0) is not None
    q.release(SID)
    assert q.sessions == 1  # in flight: kept, so that a broken stream re-sends it
    q.requeue_in_flight()
    assert q.sessions == 1
    assert q.take_batch(2, now=0.0) is not None
    q.acknowledge(BatchAck(2))
    assert (q.sessions, q.pending) == (0, 0)

    q.session(record("s2"))
    q.release(SessionId("s2"))
    q.session(record("s2"))  # live again before it was let go
    assert q.take_batch(3, now=0.0) is not None
    q.acknowledge(BatchAck(3))
    assert q.sessions == 1


def test_queue_keeps_only_a_bounded_fence_of_fenced_sessions() -> None:
    q = ReportQueue(max_pending=100, stats=ReporterStats(), max_fenced=2)
    sids = [SessionId(f"s{i}") for i in range(3)]
    for sid in sids:
        q.session(record(sid))
        q.position(sid, pos("a", 1))
    assert q.take_batch(1, now=0.0) is not None
    rejections = tuple(Rejection(sid, "a", RejectionReason.FENCED) for sid in sids)
    assert [sid for sid, _ in q.acknowledge(BatchAck(1, rejections))] == sids
    assert (q.sessions, q.fences) == (0, 2)
    # A remembered fence still refuses the old epoch; the oldest one was forgotten.
    assert not q.position(sids[2], pos("a", 2))
    assert not q.session(record(sids[2]))
    assert q.session(record(sids[0]))
    q.forget(sids[1])
    assert q.fences == 1
    assert q.session(dataclasses.replace(record(sids[2]), owner_epoch=2))
    assert (q.sessions, q.fences) == (2, 0)
