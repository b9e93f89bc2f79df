"""The control plane over real gRPC (loopback, port 0): reports, reads, claims, watches,
health, reflection, bad requests and restarts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from controlplane.server import RunningControlPlane
from controlplane.store.sqlite import SqliteSessionStore
from tests.contract.conftest import FakeClock
from tests.controlplane.conftest import TTL, start
from tether.api import convert
from tether.api.v1 import sessions_pb2 as pb
from tether.api.v1 import sessions_pb2_grpc
from tether.model import Rejection, RejectionReason, StreamId, parse_session_id

DEADLINE = 10.0
Stub: TypeAlias = "sessions_pb2_grpc.SessionServiceAsyncStub"  # typed by sessions_pb2_grpc.pyi


def session(sid: str = "s1", *, owner: str = "pod-a", epoch: int = 1) -> pb.Session:
    return pb.Session(
        session_id=sid,
        upstream_session_id=sid,
        upstream_address="http://mcp:8080/mcp",
        owner=owner,
        owner_epoch=epoch,
        protocol_version="2025-06-18",
        initialize_request=b'{"jsonrpc":"2.0","method":"initialize"}',
    )


def upd(sid: str, stream: str, seq: int, epoch: int = 1) -> pb.StreamUpdate:
    return pb.StreamUpdate(
        session_id=sid,
        position=pb.StreamPosition(
            stream_id=stream,
            last_event_id=f"{stream}.{epoch}.{seq}",
            upstream_event_id=str(seq),
            seq=seq,
            owner_epoch=epoch,
        ),
    )


class Reporter:
    """One ReportEvents stream, driven a batch at a time."""

    def __init__(self, stub: Stub) -> None:
        self.call = stub.ReportEvents(None)  # None: no request iterator, the test writes
        self.next_id = 0

    async def send(
        self, *, upserts: Sequence[pb.Session] = (), updates: Sequence[pb.StreamUpdate] = ()
    ) -> pb.ReportEventsResponse:
        self.next_id += 1
        await self.call.write(
            pb.ReportEventsRequest(
                batch_id=self.next_id,
                upserts=[pb.SessionUpsert(session=s) for s in upserts],
                updates=list(updates),
            )
        )
        async with asyncio.timeout(DEADLINE):
            ack = await self.call.read()
        assert isinstance(ack, pb.ReportEventsResponse)
        assert ack.batch_id == self.next_id
        return ack

    async def close(self) -> None:
        await self.call.done_writing()
        async with asyncio.timeout(DEADLINE):
            assert await self.call.read() == grpc.aio.EOF  # type: ignore[attr-defined]
            assert await self.call.code() == grpc.StatusCode.OK


async def get(stub: Stub, sid: str) -> pb.Session:
    reply: pb.Session = await stub.GetSession(pb.GetSessionRequest(session_id=sid))
    return reply


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    code: grpc.StatusCode = info.value.code()
    return code


async def test_health_and_reflection(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tether.v1.SessionService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = set()
    async for reply in call:
        names = {s.name for s in reply.list_services_response.service}
    assert {"tether.v1.SessionService", "grpc.health.v1.Health"} <= names
    call = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="tether.v1.Session")])
    )
    async for reply in call:
        assert reply.file_descriptor_response.file_descriptor_proto


async def test_report_creates_and_moves_a_session(stub: Stub) -> None:
    reporter = Reporter(stub)
    ack = await reporter.send(upserts=[session()], updates=[upd("s1", "a", 1), upd("s1", "a", 2)])
    assert list(ack.rejections) == []
    ack = await reporter.send(updates=[upd("s1", "a", 3), upd("s1", "b", 1)])
    assert list(ack.rejections) == []
    got = await get(stub, "s1")
    assert {p.stream_id: p.seq for p in got.streams} == {"a": 3, "b": 1}
    assert got.initialize_request.startswith(b'{"jsonrpc"')
    assert got.HasField("expires_at")
    await reporter.close()


async def test_a_late_report_for_a_session_just_deleted_is_no_warning(
    stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    """Service rule 4: a client ends its session (its sidecar deletes it) while the sidecar's
    last positions are on the way; they are skipped as for any unknown session, but that is
    an ordinary exit, not a warning. A session never known still is one."""
    reporter = Reporter(stub)
    ack = await reporter.send(upserts=[session("bye")], updates=[upd("bye", "a", 1)])
    assert list(ack.rejections) == []
    await stub.DeleteSession(pb.DeleteSessionRequest(session_id="bye"))
    with caplog.at_level(logging.DEBUG, logger="controlplane.service"):
        ack = await reporter.send(updates=[upd("bye", "a", 2), upd("never", "a", 1)])
    assert [(r.session_id, r.reason) for r in ack.rejections] == [
        ("bye", pb.REJECTION_REASON_UNKNOWN_SESSION),
        ("never", pb.REJECTION_REASON_UNKNOWN_SESSION),
    ]
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "skipped" in r.getMessage()]
    assert [level for level, _ in lines] == [logging.DEBUG, logging.WARNING]
    assert lines[0][1].startswith("late report from ")
    assert "for session bye deleted " in lines[0][1]
    assert "for unknown session never" in lines[1][1]
    await reporter.close()


async def test_unknown_session_is_logged_and_survived(
    stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    reporter = Reporter(stub)
    with caplog.at_level(logging.WARNING, logger="controlplane.service"):
        ack = await reporter.send(updates=[upd("ghost", "a", 1)])
    [rej] = ack.rejections
    assert (rej.session_id, rej.reason) == ("ghost", pb.REJECTION_REASON_UNKNOWN_SESSION)
    assert "unknown session ghost" in caplog.text
    # The same stream goes on working.
    ack = await reporter.send(upserts=[session("ghost")], updates=[upd("ghost", "a", 1)])
    assert list(ack.rejections) == []
    await reporter.close()


async def test_invalid_items_are_rejected_alone(stub: Stub) -> None:
    reporter = Reporter(stub)
    ack = await reporter.send(
        upserts=[session("../etc/passwd"), session("ok")],
        updates=[upd("a/b", "x", 1), upd("ok", "bad stream", 1), upd("ok", "x", 1)],
    )
    reasons = sorted((r.session_id, r.reason) for r in ack.rejections)
    invalid = pb.REJECTION_REASON_INVALID
    assert reasons == [("../etc/passwd", invalid), ("a/b", invalid), ("ok", invalid)]
    got = await get(stub, "ok")
    assert [p.stream_id for p in got.streams] == ["x"]
    await reporter.close()


async def test_claim_fences_the_stale_owner(stub: Stub) -> None:
    old = Reporter(stub)
    await old.send(upserts=[session()], updates=[upd("s1", "a", 5)])
    claim = await stub.ClaimSession(pb.ClaimSessionRequest(session_id="s1", owner="pod-b"))
    assert (claim.session.owner, claim.session.owner_epoch) == ("pod-b", 2)
    ack = await old.send(updates=[upd("s1", "a", 6)])
    [rej] = ack.rejections
    assert rej.reason == pb.REJECTION_REASON_FENCED
    assert (rej.current_owner, rej.current_owner_epoch) == ("pod-b", 2)
    new = Reporter(stub)
    ack = await new.send(updates=[upd("s1", "a", 1, epoch=2)])
    assert list(ack.rejections) == []
    got = await get(stub, "s1")
    assert [(p.owner_epoch, p.seq) for p in got.streams] == [(2, 1)]
    # A second claim that expects the old epoch loses the race.
    req = pb.ClaimSessionRequest(session_id="s1", owner="pod-c", expected_owner_epoch=1)
    assert await code_of(stub.ClaimSession(req)) == grpc.StatusCode.FAILED_PRECONDITION
    await old.close()
    await new.close()


async def test_bad_requests_get_clear_statuses(stub: Stub) -> None:
    bad_ids = ["", "a/b", "..", "x" * 300, "sp ace", "\u00e9"]
    for sid in bad_ids:
        assert await code_of(stub.GetSession(pb.GetSessionRequest(session_id=sid))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert await code_of(stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    claim = pb.ClaimSessionRequest(session_id="s1", owner="bad/owner")
    assert await code_of(stub.ClaimSession(claim)) == grpc.StatusCode.INVALID_ARGUMENT
    missing = pb.GetSessionRequest(session_id="missing")
    assert await code_of(stub.GetSession(missing)) == grpc.StatusCode.NOT_FOUND
    claim = pb.ClaimSessionRequest(session_id="missing", owner="pod-b")
    assert await code_of(stub.ClaimSession(claim)) == grpc.StatusCode.NOT_FOUND
    delete = pb.DeleteSessionRequest(session_id="missing")
    assert await code_of(stub.DeleteSession(delete)) == grpc.StatusCode.NOT_FOUND
    listing = pb.ListSessionsRequest(page_token="!!not a token!!")
    assert await code_of(stub.ListSessions(listing)) == grpc.StatusCode.INVALID_ARGUMENT
    listing = pb.ListSessionsRequest(owner="bad owner")
    assert await code_of(stub.ListSessions(listing)) == grpc.StatusCode.INVALID_ARGUMENT
    # And the server keeps serving.
    reporter = Reporter(stub)
    assert list((await reporter.send(upserts=[session()])).rejections) == []
    await reporter.close()


async def test_list_pages_and_filters(stub: Stub) -> None:
    reporter = Reporter(stub)
    await reporter.send(
        upserts=[session(f"s{i}", owner="pod-a" if i < 3 else "pod-b") for i in range(5)]
    )
    first = await stub.ListSessions(pb.ListSessionsRequest(page_size=2))
    assert [s.session_id for s in first.sessions] == ["s0", "s1"]
    rest = await stub.ListSessions(pb.ListSessionsRequest(page_token=first.next_page_token))
    assert [s.session_id for s in rest.sessions] == ["s2", "s3", "s4"]
    assert rest.next_page_token == ""
    mine = await stub.ListSessions(pb.ListSessionsRequest(owner="pod-b"))
    assert [s.session_id for s in mine.sessions] == ["s3", "s4"]
    await reporter.close()


async def test_fifty_concurrent_writers_leave_the_maximum(stub: Stub) -> None:
    setup = Reporter(stub)
    await setup.send(upserts=[session()])
    await setup.close()
    reporters = [Reporter(stub) for _ in range(50)]
    order = list(range(1, 51))[::-1]
    acks = await asyncio.gather(
        *(r.send(updates=[upd("s1", "a", seq)]) for r, seq in zip(reporters, order, strict=True))
    )
    assert all(not a.rejections for a in acks)
    got = await get(stub, "s1")
    assert [p.seq for p in got.streams] == [50]
    for r in reporters:
        await r.close()


async def next_event(events: AsyncIterator[pb.SessionEvent]) -> pb.SessionEvent:
    async with asyncio.timeout(DEADLINE):
        return await anext(events)


async def test_watch_sees_snapshot_changes_and_expiry(
    stub: Stub, control_plane: RunningControlPlane, clock: FakeClock
) -> None:
    reporter = Reporter(stub)
    await reporter.send(upserts=[session("s1"), session("s2")])
    call = stub.WatchSessions(pb.WatchSessionsRequest())
    events = aiter(call)
    snap = [await next_event(events), await next_event(events)]
    assert {e.session_id for e in snap} == {"s1", "s2"}
    assert (await next_event(events)).type == pb.SESSION_EVENT_TYPE_SYNCED
    await reporter.send(updates=[upd("s1", "a", 1)])
    ev = await next_event(events)
    assert (ev.type, ev.session_id, ev.session.streams[0].seq) == (
        pb.SESSION_EVENT_TYPE_PUT,
        "s1",
        1,
    )
    await stub.DeleteSession(pb.DeleteSessionRequest(session_id="s2"))
    ev = await next_event(events)
    assert (ev.type, ev.session_id) == (pb.SESSION_EVENT_TYPE_DELETE, "s2")
    clock.advance(TTL + 1)
    assert isinstance(control_plane.store, SqliteSessionStore)
    assert await control_plane.store.sweep() == 1
    ev = await next_event(events)
    assert (ev.type, ev.session_id, ev.session.owner) == (
        pb.SESSION_EVENT_TYPE_EXPIRE,
        "s1",
        "pod-a",
    )
    # The old owner's next report learns that its session is gone.
    ack = await reporter.send(updates=[upd("s1", "a", 2)])
    assert [r.reason for r in ack.rejections] == [pb.REJECTION_REASON_UNKNOWN_SESSION]
    call.cancel()
    await reporter.close()


async def test_records_survive_a_restart(db_path: Path, clock: FakeClock) -> None:
    first = await start(db_path, clock)
    async with grpc.aio.insecure_channel(first.address) as ch:
        stub = sessions_pb2_grpc.SessionServiceStub(ch)
        reporter = Reporter(stub)
        await reporter.send(upserts=[session()], updates=[upd("s1", "a", 7)])
        before = await get(stub, "s1")
        await reporter.close()
    await first.stop()
    second = await start(db_path, clock)
    try:
        async with grpc.aio.insecure_channel(second.address) as ch:
            stub = sessions_pb2_grpc.SessionServiceStub(ch)
            assert await get(stub, "s1") == before
    finally:
        await second.stop()


async def test_shutdown_acknowledges_what_it_read(db_path: Path, clock: FakeClock) -> None:
    running = await start(db_path, clock)
    async with grpc.aio.insecure_channel(running.address) as ch:
        stub = sessions_pb2_grpc.SessionServiceStub(ch)
        reporter = Reporter(stub)
        await reporter.send(upserts=[session()], updates=[upd("s1", "a", 1)])
        watch = stub.WatchSessions(pb.WatchSessionsRequest())
        events = aiter(watch)
        while (await next_event(events)).type != pb.SESSION_EVENT_TYPE_SYNCED:
            pass
        await running.stop(grace=2.0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await reporter.call.read()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError):
            await next_event(events)
    reopened = await start(db_path, clock)
    try:
        rec = await reopened.store.get(session_id=parse_session_id("s1"))
        assert rec is not None
        assert rec.streams[StreamId("a")].seq == 1
    finally:
        await reopened.stop()


async def test_rejection_reasons_round_trip() -> None:
    for reason in RejectionReason:
        r = convert.rejection_from_pb(convert.rejection_to_pb(Rejection("s", "", reason, "d")))
        assert r.reason is reason
