"""The control plane's gRPC health follows its store (`controlplane.health`): NOT_SERVING while
etcd is down (a real etcd, killed and started again), SERVING again after; the liveness
service stays SERVING throughout."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.config import ControlPlaneConfig, SqliteUrl, parse_store_url
from controlplane.health import LIVENESS_SERVICE
from controlplane.server import SERVICE_NAME, start_control_plane
from tests.support.etcd import EtcdCluster, etcd_available, start_etcd
from tests.support.waiting import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REACHABLE = "tether_control_plane_store_reachable"


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """An etcd of this test's own: the test kills it."""
    if not etcd_available():
        pytest.skip("etcd binary not installed (apt-get install etcd-server)")
    cluster = start_etcd(tmp_path / "etcd")
    yield cluster
    cluster.stop()


async def statuses(address: str) -> dict[str, int]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {
            name: (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
            for name in ("", SERVICE_NAME, LIVENESS_SERVICE)
        }


@pytest.mark.etcd
async def test_health_is_not_serving_while_etcd_is_down(own_etcd: EtcdCluster) -> None:
    running = await start_control_plane(
        ControlPlaneConfig(
            listen="127.0.0.1:0",
            store=parse_store_url(own_etcd.url),
            store_probe_interval=0.05,
            store_probe_timeout=1.0,
            shutdown_grace=0.5,
        )
    )
    try:
        assert await statuses(running.address) == dict.fromkeys(
            ("", SERVICE_NAME, LIVENESS_SERVICE), SERVING
        )
        member = own_etcd.members[0]
        assert member.process is not None
        member.process.kill()
        await asyncio.to_thread(member.process.wait)

        async def down() -> bool:
            return await statuses(running.address) == {
                "": NOT_SERVING,
                SERVICE_NAME: NOT_SERVING,
                LIVENESS_SERVICE: SERVING,
            }

        await eventually(down, timeout=15, what="NOT_SERVING with etcd killed")
        assert running.metrics.registry.get_sample_value(REACHABLE) == 0

        member.start(f"{member.name}={member.peer_url}")
        await asyncio.to_thread(own_etcd.wait_healthy)

        async def up() -> bool:
            return set((await statuses(running.address)).values()) == {SERVING}

        await eventually(up, timeout=20, what="SERVING with etcd back")
        assert running.metrics.registry.get_sample_value(REACHABLE) == 1
    finally:
        await running.stop()


async def test_a_sqlite_control_plane_is_serving(tmp_path: Path) -> None:
    running = await start_control_plane(
        ControlPlaneConfig(
            listen="127.0.0.1:0", store=SqliteUrl(tmp_path / "s.db"), store_probe_interval=0.05
        )
    )
    try:
        assert set((await statuses(running.address)).values()) == {SERVING}
        assert running.store_health.state.up is True
    finally:
        await running.stop(grace=0.5)
