"""The typed client (`tether.api.client`) against a real control plane on port 0."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from tether.api.client import ClaimLostError, SessionClient, SessionGoneError
from tether.model import (
    OwnerName,
    RejectionReason,
    ReportBatch,
    SessionEventType,
    SessionId,
    SessionRecord,
    SessionUpsert,
    StreamId,
    StreamPosition,
    StreamUpdate,
)

SID = SessionId("s1")
DEADLINE = 10.0


def position(seq: int, epoch: int = 1) -> StreamPosition:
    return StreamPosition(StreamId("a"), f"a.{epoch}.{seq}", str(seq), seq, epoch)


async def test_typed_client_round_trip(channel: grpc.aio.Channel) -> None:
    client = SessionClient(channel)
    record = SessionRecord(SID, "s1", "up:1", OwnerName("pod-a"), 1, initialize_request=b"{}")
    stream = client.report_events()
    acks = stream.acks()
    await stream.send(ReportBatch(1, (SessionUpsert(record),), (StreamUpdate(SID, position(4)),)))
    async with asyncio.timeout(DEADLINE):
        ack = await anext(acks)
    assert (ack.batch_id, ack.rejections) == (1, ())

    got = await client.get_session(SID)
    assert got is not None
    assert got.streams[StreamId("a")] == position(4)
    assert await client.get_session(SessionId("nope")) is None

    claimed = await client.claim_session(SID, owner=OwnerName("pod-b"), expected_owner_epoch=1)
    assert claimed.owner_epoch == 2
    with pytest.raises(ClaimLostError):
        await client.claim_session(SID, owner=OwnerName("pod-c"), expected_owner_epoch=1)

    await stream.send(ReportBatch(2, (), (StreamUpdate(SID, position(5)),)))
    async with asyncio.timeout(DEADLINE):
        ack = await anext(acks)
    assert [r.reason for r in ack.rejections] == [RejectionReason.FENCED]
    assert ack.rejections[0].current_owner == "pod-b"

    page = await client.list_sessions(owner=OwnerName("pod-b"))
    assert [r.session_id for r in page.sessions] == ["s1"]

    async with contextlib.aclosing(client.watch_sessions()) as events:
        async with asyncio.timeout(DEADLINE):
            first = await anext(events)
            assert (first.type, first.session_id) == (SessionEventType.PUT, "s1")
            assert (await anext(events)).type is SessionEventType.SYNCED
            deleted = await client.delete_session(SID)
            ev = await anext(events)
        assert (ev.type, ev.session) == (SessionEventType.DELETE, deleted)
    with pytest.raises(SessionGoneError):
        await client.delete_session(SID)

    await stream.done_writing()
    async with asyncio.timeout(DEADLINE):
        assert [a async for a in acks] == []
