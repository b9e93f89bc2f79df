"""Sessions per owner (`--max-sessions-per-owner`) end to end: a real control plane (gRPC on
loopback, a SQLite file, the limit from its config) and the sidecar's reporter. The session
over the limit is refused item by item in the acknowledgement, with a reason the sidecar
logs; a claim for a full owner is RESOURCE_EXHAUSTED; the CLI refuses a negative limit."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controlplane.server import RunningControlPlane, start_control_plane
from sidecar.reporter import Reporter, ReporterConfig
from tests.controlplane.conftest import cp_config
from tether.api.client import SessionClient
from tether.api.v1 import sessions_pb2 as pb
from tether.api.v1 import sessions_pb2_grpc
from tether.cli import main
from tether.model import OwnerName, SessionId, SessionRecord

DEADLINE = 10.0


def record(sid: str, owner: str = "pod-a") -> SessionRecord:
    return SessionRecord(
        session_id=SessionId(sid),
        upstream_session_id=f"up-{sid}",
        upstream_address="http://mcp:8080/mcp",
        owner=OwnerName(owner),
        owner_epoch=1,
    )


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    config = dataclasses.replace(cp_config(tmp_path / "sessions.db"), max_sessions_per_owner=2)
    running = await start_control_plane(config)
    yield running
    await running.stop(grace=0.5)


async def test_the_session_over_the_limit_is_refused_and_logged_by_the_sidecar(
    control_plane: RunningControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    reporter = Reporter(
        ReporterConfig(target=control_plane.address, owner=OwnerName("pod-a"), interval=0.01)
    )
    await reporter.start()
    try:
        for sid in ("s1", "s2"):
            reporter.session(record(sid))
        async with asyncio.timeout(DEADLINE):
            await reporter.flushed()
        assert reporter.stats.rejected == 0
        with caplog.at_level(logging.ERROR, logger="tether.sidecar.reporter"):
            reporter.session(record("s3"))
            async with asyncio.timeout(DEADLINE):
                await reporter.flushed()
        assert reporter.stats.rejected == 1
        [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert "refused to store session s3" in line
        assert "--max-sessions-per-owner" in line
        client = reporter.client
        assert await client.get_session(SessionId("s3"), timeout=DEADLINE) is None
        assert await client.get_session(SessionId("s1"), timeout=DEADLINE) is not None
    finally:
        await reporter.stop(flush_timeout=0.5)


async def test_acknowledgement_and_claim_over_the_limit(
    control_plane: RunningControlPlane,
) -> None:
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        stub = sessions_pb2_grpc.SessionServiceStub(channel)
        call = stub.ReportEvents(None)
        sessions = [
            pb.Session(session_id=sid, owner=owner, owner_epoch=1)
            for sid, owner in (("a1", "pod-a"), ("a2", "pod-a"), ("a3", "pod-a"), ("b1", "pod-b"))
        ]
        update = pb.StreamUpdate(
            session_id="a3",
            position=pb.StreamPosition(stream_id="x", last_event_id="x.1.1", seq=1, owner_epoch=1),
        )
        await call.write(
            pb.ReportEventsRequest(
                batch_id=1,
                upserts=[pb.SessionUpsert(session=s) for s in sessions],
                updates=[update],
            )
        )
        async with asyncio.timeout(DEADLINE):
            ack = await call.read()
        assert isinstance(ack, pb.ReportEventsResponse)
        refused = sorted((r.session_id, r.stream_id, r.reason) for r in ack.rejections)
        limit = pb.REJECTION_REASON_OWNER_LIMIT
        assert refused == [("a3", "", limit), ("a3", "x", limit)]
        assert all("pod-a already holds 2 sessions" in r.detail for r in ack.rejections)
        await call.done_writing()
        async with asyncio.timeout(DEADLINE):
            assert await call.read() == grpc.aio.EOF  # type: ignore[attr-defined]

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ClaimSession(pb.ClaimSessionRequest(session_id="b1", owner="pod-a"))
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "pod-a already holds 2 sessions" in (info.value.details() or "")
        # The other way is free: pod-b holds one session.
        claimed = await stub.ClaimSession(pb.ClaimSessionRequest(session_id="a1", owner="pod-b"))
        assert (claimed.session.owner, claimed.session.owner_epoch) == ("pod-b", 2)
        got = await SessionClient(channel).get_session(SessionId("b1"), timeout=DEADLINE)
        assert got is not None
        assert got.owner == "pod-b"


def test_cli_refuses_a_negative_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["control-plane", "--max-sessions-per-owner", "-1"]) == 2
    assert "--max-sessions-per-owner is negative" in capsys.readouterr().err
