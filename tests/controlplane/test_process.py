"""`tether control-plane` as a real process: serves, and on SIGTERM stops gracefully with its
writes on disk; and the control plane over a real etcd."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.config import ControlPlaneConfig, parse_store_url
from controlplane.server import start_control_plane
from controlplane.store.sqlite import SqliteSessionStore, SqliteStoreConfig
from tests.contract.conftest import etcd_cluster
from tests.support.etcd import EtcdCluster
from tether.api.v1 import sessions_pb2 as pb
from tether.api.v1 import sessions_pb2_grpc
from tether.model import SessionId, StreamId

__all__ = ["etcd_cluster"]  # the session-scoped fixture, shared with tests/contract

DEADLINE = 15.0


def report(n: int) -> pb.ReportEventsRequest:
    return pb.ReportEventsRequest(
        batch_id=n,
        upserts=[pb.SessionUpsert(session=pb.Session(session_id="s1", owner="pod-a"))],
        updates=[
            pb.StreamUpdate(
                session_id="s1",
                position=pb.StreamPosition(stream_id="a", seq=n, owner_epoch=1),
            )
        ],
    )


async def report_and_watch(address: str) -> list[pb.SessionEvent]:
    """Report one batch, then watch: the snapshot, SYNCED, and a delete."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub: Any = sessions_pb2_grpc.SessionServiceStub(ch)
        call = stub.ReportEvents()
        await call.write(report(3))
        async with asyncio.timeout(DEADLINE):
            ack = await call.read()
        assert (ack.batch_id, list(ack.rejections)) == (3, [])
        await call.done_writing()
        watch = stub.WatchSessions(pb.WatchSessionsRequest())
        seen: list[pb.SessionEvent] = []
        async with asyncio.timeout(DEADLINE):
            async for ev in watch:
                seen.append(ev)
                if ev.type == pb.SESSION_EVENT_TYPE_SYNCED:
                    await stub.DeleteSession(pb.DeleteSessionRequest(session_id="s1"))
                if ev.type == pb.SESSION_EVENT_TYPE_DELETE:
                    watch.cancel()
                    break
        return seen


Process = asyncio.subprocess.Process


@pytest.fixture
async def process(tmp_path: Path) -> AsyncIterator[tuple[Process, str]]:
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "tether.cli", "control-plane", "--listen", "127.0.0.1:0"],
        cwd=tmp_path,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(DEADLINE):
            line = (await proc.stderr.readline()).decode()
        match = re.search(r"serving on ([\d.]+:\d+)", line)
        assert match, line
        yield proc, match.group(1)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_sigterm_stops_gracefully_with_writes_on_disk(
    process: tuple[Process, str], tmp_path: Path
) -> None:
    proc, address = process
    async with grpc.aio.insecure_channel(address) as ch:
        stub: Any = sessions_pb2_grpc.SessionServiceStub(ch)
        call = stub.ReportEvents()
        await call.write(report(5))
        async with asyncio.timeout(DEADLINE):
            assert (await call.read()).batch_id == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        async with asyncio.timeout(DEADLINE):
            log = (await proc.stderr.read()).decode()
            code = await proc.wait()
        assert code == 0
        call.cancel()
    assert "control plane stopped" in log
    # The default store: a SQLite file in the working directory.
    store = await SqliteSessionStore.open(
        SqliteStoreConfig(path=tmp_path / "tether-sessions.db", sweep_interval=0)
    )
    try:
        rec = await store.get(session_id=SessionId("s1"))
        assert rec is not None
        assert rec.streams[StreamId("a")].seq == 5
    finally:
        await store.aclose()


@pytest.mark.etcd
async def test_control_plane_over_etcd(etcd_cluster: EtcdCluster) -> None:
    config = ControlPlaneConfig(
        listen="127.0.0.1:0",
        store=parse_store_url(f"{etcd_cluster.url}/cp-test"),
        flush_interval=0.0,
        shutdown_grace=1.0,
    )
    running = await start_control_plane(config)
    try:
        seen = await report_and_watch(running.address)
    finally:
        await running.stop()
    kinds = [ev.type for ev in seen]
    assert kinds == [
        pb.SESSION_EVENT_TYPE_PUT,
        pb.SESSION_EVENT_TYPE_SYNCED,
        pb.SESSION_EVENT_TYPE_DELETE,
    ]
    assert seen[0].session.streams[0].seq == 3
