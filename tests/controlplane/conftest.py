"""Control-plane fixtures: a real grpc.aio server on loopback port 0 over a SQLite store with
a fake clock, a channel and stub to it, and a task leak check."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.server import RunningControlPlane, start_control_plane
from controlplane.store.sqlite import SqliteSessionStore, SqliteStoreConfig
from tests.contract.conftest import FakeClock
from tests.support.leaks import _no_leaked_tasks  # noqa: F401 - autouse fixture
from tether.api.v1 import sessions_pb2_grpc

TTL = 60.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


def cp_config(db_path: Path) -> ControlPlaneConfig:
    return ControlPlaneConfig(
        listen="127.0.0.1:0",
        store=SqliteUrl(db_path),
        session_ttl=TTL,
        flush_interval=0.0,
        shutdown_grace=1.0,
    )


async def start(db_path: Path, clock: FakeClock) -> RunningControlPlane:
    store = await SqliteSessionStore.open(
        SqliteStoreConfig(path=db_path, session_ttl=TTL, sweep_interval=0), clock=clock
    )
    return await start_control_plane(cp_config(db_path), store=store)


@pytest.fixture
async def control_plane(db_path: Path, clock: FakeClock) -> AsyncIterator[RunningControlPlane]:
    running = await start(db_path, clock)
    yield running
    await running.stop(grace=0.5)


@pytest.fixture
async def channel(control_plane: RunningControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(control_plane.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> sessions_pb2_grpc.SessionServiceAsyncStub:
    return sessions_pb2_grpc.SessionServiceStub(channel)
