"""Abuse limits through a real control plane (grpc.aio on loopback, SQLite): throttled
rejection logs under a flood, the item limit per request, streaming calls per peer, and the
bounded read-ahead of a stream whose store does not keep up. The pure counters are tested
at the bottom."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controlplane import limits
from controlplane.limits import PeerCalls, ReadAhead, SharedReadAhead, peer_key
from controlplane.server import RunningControlPlane, start_control_plane
from controlplane.store.sqlite import SqliteSessionStore, SqliteStoreConfig
from tests.contract.conftest import FakeClock
from tests.controlplane.conftest import TTL, cp_config
from tests.controlplane.test_service import DEADLINE, Reporter, Stub, get, session, upd
from tests.support.waiting import eventually
from tether.api.v1 import sessions_pb2 as pb
from tether.api.v1 import sessions_pb2_grpc
from tether.logthrottle import ThrottledLog

SERVICE_LOG = "controlplane.service"


def lines(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    """The service's log lines that start with `start`."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == SERVICE_LOG and r.getMessage().startswith(start)
    ]


async def test_a_flood_of_unknown_sessions_writes_a_bounded_log(
    control_plane: RunningControlPlane, stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    log_clock = FakeClock()
    control_plane.service.rejection_log = ThrottledLog(
        logging.getLogger(SERVICE_LOG), burst=5, interval=10.0, clock=log_clock
    )
    reporter = Reporter(stub)
    with caplog.at_level(logging.INFO, logger=SERVICE_LOG):
        for b in range(20):
            ghosts = [upd(f"ghost-{b}-{i}", "a", 1) for i in range(500)]
            ack = await reporter.send(updates=ghosts)
            assert len(ack.rejections) == 500  # every item is still rejected to its sender
        assert len(lines(caplog, "report from")) == 5
        assert lines(caplog, "9995 more reports") == []
        # The next report after the interval brings the summary of the 9,995 held back.
        log_clock.advance(10.0)
        await reporter.send(updates=[upd("ghost-late", "a", 1)])
        [summary] = lines(caplog, "9995 more reports")
        assert summary.startswith(
            "9995 more reports for unknown sessions from ipv4:127.0.0.1 in the last 10 s, "
            "e.g. report from ipv4:127.0.0.1:"
        )
        assert "ghost-0-5" in summary  # the first one held back
        # The flooding stream and everyone else are still served.
        ack = await reporter.send(upserts=[session("real")], updates=[upd("real", "a", 2)])
        assert list(ack.rejections) == []
        assert {p.stream_id: p.seq for p in (await get(stub, "real")).streams} == {"a": 2}
        await reporter.close()
        await control_plane.stop(grace=0.5)  # flushes the open window's summary
    assert len(lines(caplog, "report from")) == 6  # a new burst began after 10 s
    assert len(lines(caplog, "9995 more reports")) == 1
    assert [m for m in caplog.messages if " more reports " in m and "9995" not in m] == []


async def test_a_request_over_the_item_limit_ends_its_stream_only(
    stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    good = Reporter(stub)
    await good.send(upserts=[session("s1")])
    call = stub.ReportEvents(None)
    too_many = [upd(f"x{i}", "a", 1) for i in range(limits.MAX_ITEMS_PER_REQUEST + 1)]
    with caplog.at_level(logging.WARNING, logger=SERVICE_LOG):
        await call.write(pb.ReportEventsRequest(batch_id=1, updates=too_many))
        async with asyncio.timeout(DEADLINE):
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"at most {limits.MAX_ITEMS_PER_REQUEST} per request" in await call.details()
    assert lines(caplog, "report stream from ipv4:127.0.0.1")
    ack = await good.send(updates=[upd("s1", "a", 1)])
    assert list(ack.rejections) == []
    await good.close()


async def test_a_message_over_the_size_limit_is_refused_by_grpc(stub: Stub) -> None:
    big = session("big")
    big.initialize_request = b"x" * (limits.MAX_MESSAGE_BYTES + 1)
    call = stub.ReportEvents(None)
    await call.write(pb.ReportEventsRequest(batch_id=1, upserts=[pb.SessionUpsert(session=big)]))
    async with asyncio.timeout(DEADLINE):
        assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The server goes on serving.
    reporter = Reporter(stub)
    assert list((await reporter.send(upserts=[session("small")])).rejections) == []
    await reporter.close()


@pytest.fixture
async def capped(db_path: Path, clock: FakeClock) -> AsyncIterator[RunningControlPlane]:
    store = await SqliteSessionStore.open(
        SqliteStoreConfig(path=db_path, session_ttl=TTL, sweep_interval=0), clock=clock
    )
    config = dataclasses.replace(cp_config(db_path), max_calls_per_peer=2)
    running = await start_control_plane(config, store=store)
    yield running
    await running.stop(grace=0.5)


async def test_streaming_calls_per_peer_are_capped(capped: RunningControlPlane) -> None:
    async with grpc.aio.insecure_channel(capped.address) as channel:
        stub = sessions_pb2_grpc.SessionServiceStub(channel)
        first = Reporter(stub)
        await first.send(upserts=[session("s1")])
        watch = stub.WatchSessions(pb.WatchSessionsRequest())
        async with asyncio.timeout(DEADLINE):
            first_event = await watch.read()
        assert isinstance(first_event, pb.SessionEvent)
        assert first_event.session.session_id == "s1"
        # A third streaming call from this host is refused, with a reason.
        third = stub.ReportEvents(None)
        async with asyncio.timeout(DEADLINE):
            assert await third.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many streaming calls open from ipv4:127.0.0.1 (at most 2)" in (
            await third.details()
        )
        # Unary calls are not counted, and the open calls keep working.
        assert (await get(stub, "s1")).owner == "pod-a"
        assert list((await first.send(updates=[upd("s1", "a", 1)])).rejections) == []
        # Ending a call frees its place (once the server has seen the cancel).
        watch.cancel()

        async def opens() -> Reporter:
            again = Reporter(stub)
            await again.send(updates=[upd("s1", "a", 2)])
            return again

        again = await eventually(
            opens, timeout=DEADLINE, ignoring=(grpc.aio.AioRpcError,), what="a free place"
        )
        await again.close()
        await first.close()


async def test_read_ahead_stops_reading_while_the_store_is_stuck(
    control_plane: RunningControlPlane, stub: Stub
) -> None:
    """Rule 2 of controlplane.limits: with the store's only thread held busy, the server
    reads a stream up to its read-ahead and no further; once the store moves again, every
    request is read, flushed and acknowledged."""
    store = control_plane.store
    assert isinstance(store, SqliteSessionStore)
    gate = threading.Event()
    stuck = store._executor.submit(gate.wait, DEADLINE * 3)  # the store's only thread
    batcher = control_plane.batcher
    per_request = 1000
    requests = 3 * limits.READ_AHEAD_ITEMS // per_request
    call = stub.ReportEvents(None)

    async def write_all() -> None:
        for b in range(1, requests + 1):
            ups = [upd(f"r{b}-{i}", "a", 1) for i in range(per_request)]
            await call.write(pb.ReportEventsRequest(batch_id=b, updates=ups))

    writer = asyncio.ensure_future(write_all())
    try:
        # The first flush waits on the store; what the stream read meanwhile waits for it.
        await eventually(
            lambda: batcher.writes_submitted >= limits.READ_AHEAD_ITEMS,
            timeout=DEADLINE,
            what="the stream's read-ahead filled",
        )
        for _ in range(20):
            await asyncio.sleep(0.01)  # the scenario: time for the server to read more
            assert batcher.writes_submitted <= limits.READ_AHEAD_ITEMS + per_request
        assert batcher.flushes == 0
    finally:
        gate.set()
        stuck.result()
    async with asyncio.timeout(DEADLINE * 3):
        await writer
        await call.done_writing()
        acks = [ack async for ack in call]
    assert [a.batch_id for a in acks] == list(range(1, requests + 1))
    assert await call.code() == grpc.StatusCode.OK


# --- the pure counters ------------------------------------------------------------------------


def test_read_ahead_admits_one_request_past_its_limits() -> None:
    budget = ReadAhead(max_items=10, max_bytes=100, max_requests=3)
    assert budget.may_read()
    budget.read(50, 500)  # with nothing in flight, the next request is read whatever its size
    assert not budget.may_read()
    budget.acknowledged(50, 500)
    assert budget.may_read()
    budget.read(9, 50)
    assert budget.may_read()
    budget.read(9, 50)  # over the item limit by one request: no further reading
    assert not budget.may_read()
    budget.acknowledged(9, 50)
    assert budget.may_read()
    budget.read(1, 60)
    assert not budget.may_read()  # bytes
    budget.acknowledged(1, 60)
    budget.read(0, 0)
    budget.read(0, 0)
    assert not budget.may_read()  # requests


def test_the_shared_read_ahead_binds_every_stream_up_to_a_hard_limit() -> None:
    shared = SharedReadAhead(max_items=100, max_bytes=1000)
    a, b = ReadAhead(shared), ReadAhead(shared)
    assert a.may_admit(500, 5000)  # nothing held anywhere: one request of any size
    a.read(60, 10)
    assert b.may_admit(40, 10)
    assert not b.may_admit(141, 10)  # a stream with nothing in flight: up to twice the limit
    assert b.may_admit(60, 10)
    b.read(60, 10)
    assert not a.may_admit(1, 1)  # over the shared limit: streams with something in flight wait
    assert ReadAhead(shared).may_admit(80, 10)
    assert not ReadAhead(shared).may_admit(81, 10)  # the hard limit: 200 items
    assert not ReadAhead(shared).may_admit(1, 1981)  # and 2,000 bytes
    assert not a.may_read()  # the budget is full: a stream with requests in flight reads no more
    assert ReadAhead(shared).may_read()  # one with none still reads (below the hard limit)
    ReadAhead(shared).read(80, 10)
    assert not ReadAhead(shared).may_read()  # at the hard limit nobody reads
    shared.items -= 80
    shared.bytes -= 10
    a.acknowledged(60, 10)
    assert b.may_admit(40, 10)
    b.release_all()  # the stream ended with a request unacknowledged
    assert (shared.items, shared.bytes) == (0, 0)


def test_peer_calls_are_counted_and_forgotten() -> None:
    calls = PeerCalls(max_calls=2)
    assert calls.try_open("a")
    assert calls.try_open("a")
    assert not calls.try_open("a")
    assert calls.try_open("b")
    calls.close("a")
    assert calls.try_open("a")
    for _ in range(2):
        calls.close("a")
    calls.close("b")
    assert len(calls) == 0  # rule 3: nothing kept for peers without calls
    unlimited = PeerCalls(max_calls=0)
    assert all(unlimited.try_open("a") for _ in range(1000))


def test_peer_key_is_the_host() -> None:
    assert peer_key("ipv4:10.0.0.7:51234") == "ipv4:10.0.0.7"
    assert peer_key("ipv6:[::1]:5555") == "ipv6:[::1]"
    assert peer_key("unix:/tmp/sock") == "unix:/tmp/sock"


def test_the_sidecar_never_sends_more_items_than_the_control_plane_reads() -> None:
    from sidecar.reporter import MAX_BATCH_ITEMS

    assert MAX_BATCH_ITEMS <= limits.MAX_ITEMS_PER_REQUEST
