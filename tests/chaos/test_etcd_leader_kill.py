"""A three-member etcd cluster (Debian etcd, loopback ports) behind the control plane
(`--store etcd://` with all three endpoints); the leader is SIGKILLed mid-stream. The client
is not disturbed, the remaining two members elect a leader, and the control plane keeps
persisting positions through the other endpoints.

Leadership is first moved to the member the control plane's channel uses (its first endpoint),
so the kill costs both an election and an endpoint failover: the hardest case.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.config import ControlPlaneConfig, EtcdUrl, parse_store_url
from controlplane.server import RunningControlPlane, start_control_plane
from sidecar.tracker import EventId
from tests.integration.conftest import SidecarFactory
from tests.support.chaos import (
    DEADLINE_S,
    ChaosRow,
    ChaosTable,
    PositionWatcher,
    assert_delivered_and_persisted,
    poll_persisted,
    start_count_stream,
)
from tests.support.etcd import (
    EtcdCluster,
    etcd_available,
    make_leader,
    member_ids,
    start_etcd,
    wait_leader,
)

pytestmark = [pytest.mark.slow, pytest.mark.etcd, pytest.mark.timeout(40)]


@dataclass
class EtcdControlPlane:
    cluster: EtcdCluster
    running: RunningControlPlane


@pytest.fixture
async def etcd_control_plane(tmp_path: Path) -> AsyncIterator[EtcdControlPlane]:
    """A three-member cluster and an in-process control plane given all three endpoints."""
    if not etcd_available():
        pytest.skip("etcd binary not installed (Debian etcd-server)")
    cluster = await asyncio.to_thread(start_etcd, tmp_path / "etcd", members=3)
    try:
        store = parse_store_url(f"{cluster.url}/chaos-{uuid.uuid4().hex[:8]}")
        assert isinstance(store, EtcdUrl)
        running = await start_control_plane(ControlPlaneConfig(listen="127.0.0.1:0", store=store))
        try:
            yield EtcdControlPlane(cluster, running)
        finally:
            await running.stop()
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_etcd_leader_killed_mid_stream(
    etcd_control_plane: EtcdControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    chaos_table: ChaosTable,
) -> None:
    """recover_s: from the kill to the store holding a position the client received after
    the kill (a write that needed the new leader)."""
    cluster = etcd_control_plane.cluster
    ids = await asyncio.to_thread(member_ids, cluster)
    leader = cluster.members[0]
    await make_leader(cluster, leader)
    address = etcd_control_plane.running.address
    n = 200
    async with numbered_upstream(interval_ms=10) as upstream:
        sidecar = await sidecar_factory(upstream, control_plane=address, owner="chaos")
        base = f"http://127.0.0.1:{sidecar.port}"
        async with PositionWatcher(address) as watcher:
            sid, _headers, client = await start_count_stream(http, base, n=n, interval_ms=10)
            try:
                await client.wait_count(30)
                reached = EventId.parse(client.last_id)
                assert reached is not None
                await watcher.wait_position(sid, reached)
                assert leader.process is not None
                leader.process.kill()  # SIGKILL
                await asyncio.to_thread(leader.process.wait)
                killed = time.monotonic()
                assert await client.wait_new_event(timeout=DEADLINE_S)
                after = EventId.parse(client.last_id)
                assert after is not None
                await poll_persisted(address, sid, after, watcher=watcher, exact=False)
                recovered = time.monotonic() - killed
                survivors = [m for m in cluster.members if m is not leader]
                new_leader = await wait_leader(survivors, ids)
                assert new_leader is not leader
                await client.finished()
            finally:
                await client.aclose()
            got, last, _ = await assert_delivered_and_persisted(
                client, n=n, address=address, session_id=sid, watcher=watcher
            )
            await watcher.wait_position(sid, last)
            watcher.assert_never_backwards()
    chaos_table.add(ChaosRow.of("etcd leader SIGKILL (3 members)", got, recovered))
