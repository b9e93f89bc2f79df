"""A real control plane for tests, on port 0, over a SQLite file or a real etcd cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from controlplane.config import ControlPlaneConfig, EtcdUrl, SqliteUrl, parse_store_url
from controlplane.server import RunningControlPlane, start_control_plane
from tests.support.etcd import EtcdCluster, etcd_available, start_etcd

STORES = ("sqlite", "etcd", "etcd x3")
"""What `control_plane_on` runs on: a SQLite file, a one-member or a three-member etcd."""


@asynccontextmanager
async def control_plane_on(store: str, tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    """Start a control plane on `store` (one of `STORES`); stop it, and its etcd, after.
    A missing etcd fails the test: scripts/test.sh installs it, and a skip would hide that."""
    cluster: EtcdCluster | None = None
    url: SqliteUrl | EtcdUrl = SqliteUrl(tmp_path / "sessions.db")
    if store != "sqlite":
        if not etcd_available():
            pytest.fail("etcd is not installed (Debian etcd-server; scripts/test.sh installs it)")
        members = 3 if store == "etcd x3" else 1
        cluster = await asyncio.to_thread(start_etcd, tmp_path / "etcd", members=members)
        parsed = parse_store_url(cluster.url)
        assert isinstance(parsed, EtcdUrl)
        url = parsed
    running = await start_control_plane(ControlPlaneConfig(listen="127.0.0.1:0", store=url))
    try:
        yield running
    finally:
        await running.stop()
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)


@pytest.fixture(
    name="control_plane", params=["sqlite", pytest.param("etcd x3", marks=pytest.mark.etcd)]
)
async def control_plane_on_sqlite_and_etcd(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[RunningControlPlane]:
    """The `control_plane` fixture of scenarios run on both stores: a SQLite file, then a real
    three-member etcd cluster. A module uses it as `control_plane = control_plane_on_...`."""
    async with control_plane_on(request.param, tmp_path) as running:
        yield running
