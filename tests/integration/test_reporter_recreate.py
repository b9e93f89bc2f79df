"""A session the control plane lost (deleted, expired) is re-created by its owner's reporter
as the whole last record it was given, credential binding included: a re-created record that
forgot `credential_fingerprint` would let any caller (even one without `Authorization`) adopt
the session on another sidecar and lock its real owner out.

Records are compared whole (dataclass equality), so a field dropped on the way fails the test
whatever its name; only the timestamps, which the control plane sets, are taken from the store.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.server import start_control_plane
from sidecar.guard import fingerprint
from sidecar.reporter import ReporterStats, ReportQueue
from sidecar.tracker import EventId
from tests.integration.conftest import SidecarFactory
from tests.integration.test_proxy import HEADERS, MCP, count_call, progress_numbers
from tests.integration.test_reporter import (  # noqa: F401 - fixtures
    SID,
    ControlPlane,
    ReporterFactory,
    cp,
    make_reporter,
    pos,
    record,
    settled,
    stored,
)
from tests.integration.test_security import initialize_as
from tests.support.sse_client import Received, collect
from tether.api.client import SessionClient
from tether.model import (
    BatchAck,
    Rejection,
    RejectionReason,
    SessionId,
    SessionRecord,
    StreamId,
    StreamPosition,
)

DEADLINE = 10.0


def with_store_times(expected: SessionRecord, got: SessionRecord) -> SessionRecord:
    """`expected` with the timestamps the control plane set on `got` (they are its to set)."""
    return dataclasses.replace(
        expected, created_at=got.created_at, updated_at=got.updated_at, expires_at=got.expires_at
    )


def bound_record() -> SessionRecord:
    """A record with every optional field set, the credential binding among them."""
    return dataclasses.replace(
        record(),
        credential_fingerprint=fingerprint("Bearer alice", key=None),
        streams={StreamId("a"): pos("a", 1)},
    )


def test_queue_recreates_the_whole_last_record() -> None:
    q = ReportQueue(max_pending=100, stats=ReporterStats())
    q.session(dataclasses.replace(bound_record(), upstream_session_id="up-old"))
    latest = bound_record()  # e.g. after a re-initialize: the last record given wins
    q.session(latest)
    q.position(SID, pos("b", 3))
    assert q.take_batch(1, now=0.0) is not None
    assert q.acknowledge(BatchAck(1)) == []

    q.position(SID, pos("a", 2))
    assert q.take_batch(2, now=0.0) is not None
    lost = Rejection(SID, "a", RejectionReason.UNKNOWN_SESSION)
    assert q.acknowledge(BatchAck(2, rejections=(lost,))) == []

    again = q.take_batch(3, now=0.0)
    assert again is not None
    [upsert] = again.upserts
    streams = {StreamId("a"): pos("a", 2), StreamId("b"): pos("b", 3)}
    assert upsert.session == dataclasses.replace(latest, streams=streams)
    assert [u.position for u in again.updates] == [pos("a", 2)]


async def test_reporter_recreates_the_whole_record_in_the_store(
    cp: ControlPlane,  # noqa: F811 - the fixture imported above
    make_reporter: ReporterFactory,  # noqa: F811
) -> None:
    await cp.start()
    reporter = await make_reporter()
    given = bound_record()
    reporter.session(given)
    reporter.position(SID, pos("b", 4))
    await settled(reporter)
    first = await stored(reporter.client)
    streams = {StreamId("a"): pos("a", 1), StreamId("b"): pos("b", 4)}
    assert first == with_store_times(dataclasses.replace(given, streams=streams), first)

    await reporter.client.delete_session(SID, timeout=DEADLINE)
    reporter.position(SID, pos("a", 5))
    await settled(reporter)

    again = await stored(reporter.client)
    streams = {StreamId("a"): pos("a", 5), StreamId("b"): pos("b", 4)}
    assert again == with_store_times(dataclasses.replace(given, streams=streams), again)
    assert reporter.stats.rejected == 1


def last_position(sidecar_streams: dict[StreamId, Any], received: list[Received]) -> StreamPosition:
    """Where the stream that carried `received` ended, as the client saw it (and the upstream
    event id the owning sidecar's tracker read last)."""
    last = received[-1].id
    assert last is not None
    eid = EventId.parse(last)
    assert eid is not None
    stream = StreamId(str(eid.stream))
    return StreamPosition(
        stream_id=stream,
        last_event_id=last,
        upstream_event_id=sidecar_streams[stream].tracker.last_upstream_event_id,
        seq=eid.seq,
        owner_epoch=eid.epoch,
    )


async def test_a_recreated_session_keeps_its_credential_binding(
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Sidecar A creates a session for Bearer alice; the store loses it while A keeps
    streaming; A re-creates it. The stored record is the original one (with the new
    positions), and a new sidecar B serves it to alice only."""
    plane = await start_control_plane(
        ControlPlaneConfig(listen="127.0.0.1:0", store=SqliteUrl(tmp_path / "s.db"))
    )
    try:
        async with (
            numbered_upstream(interval_ms=1) as up,
            grpc.aio.insecure_channel(plane.address) as channel,
        ):
            client = SessionClient(channel)
            a = await sidecar_factory(up, control_plane=plane.address, owner="a")
            reporter = a.proxy.continuity.reporter
            assert reporter is not None
            base_a = f"http://127.0.0.1:{a.port}"
            sid = SessionId(await initialize_as(http, base_a, "alice"))
            alice = {**HEADERS, "Mcp-Session-Id": sid, "Authorization": "Bearer alice"}

            async with http.post(base_a + MCP, json=count_call(3), headers=alice) as resp:
                first_call = await collect(resp)
            assert progress_numbers(first_call) == [1, 2, 3]
            await settled(reporter)
            original = await client.get_session(sid, timeout=DEADLINE)
            assert original is not None
            assert original.credential_fingerprint == fingerprint("Bearer alice", key=None)

            # The store loses the session (no delete through the API, which A would be told
            # of and obey: continuity invariant 13; no tombstone either).
            with sqlite3.connect(tmp_path / "s.db") as db:
                db.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))
            assert await client.get_session(sid, timeout=DEADLINE) is None
            # A keeps streaming: its next positions are refused as unknown, and it re-creates
            # the session.
            async with http.post(base_a + MCP, json=count_call(4, rid=8), headers=alice) as resp:
                second_call = await collect(resp)
            assert progress_numbers(second_call) == [1, 2, 3, 4]
            await settled(reporter)
            assert reporter.stats.rejected >= 1

            got = await client.get_session(sid, timeout=DEADLINE)
            assert got is not None
            ends = [last_position(a.proxy.registry.streams, c) for c in (first_call, second_call)]
            expected = dataclasses.replace(original, streams={p.stream_id: p for p in ends})
            assert got == with_store_times(expected, got)

            b = await sidecar_factory(up, control_plane=plane.address, owner="b")
            base_b = f"http://127.0.0.1:{b.port}"
            anonymous = {k: v for k, v in alice.items() if k != "Authorization"}
            mallory = {**alice, "Authorization": "Bearer mallory"}
            for intruder in (anonymous, mallory):
                async with http.post(base_b + MCP, json=count_call(2), headers=intruder) as resp:
                    assert resp.status == 404
            async with http.post(base_b + MCP, json=count_call(2), headers=alice) as resp:
                assert resp.status == 200
                assert progress_numbers(await collect(resp)) == [1, 2]
    finally:
        await sidecar_factory.stop_all()  # before their control plane (see SidecarFactory)
        await plane.stop()
