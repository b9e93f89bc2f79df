"""Fixtures for the contract suites: one `store` fixture per backend, a real etcd, and a task
leak check (as in tests/integration)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controlplane.store.etcd import EtcdSessionStore, EtcdStoreConfig
from controlplane.store.protocol import SessionStore
from controlplane.store.sqlite import SqliteSessionStore, SqliteStoreConfig
from tests.support.etcd import EtcdCluster, etcd_available, start_etcd
from tests.support.leaks import _no_leaked_tasks  # noqa: F401 - autouse fixture


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One single-member etcd for the whole run, on free loopback ports."""
    if not etcd_available():
        pytest.skip("etcd binary not installed (apt-get install etcd-server)")
    cluster = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield cluster
    cluster.stop()


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class StoreHarness:
    """Opens stores of one backend and makes sessions expire in that backend's way."""

    backend: str
    opener: Callable[[float, dict[str, Any]], Awaitable[SessionStore]]
    clock: FakeClock | None
    opened: list[SessionStore]

    async def open(self, *, session_ttl: float = 3600.0, **config: Any) -> SessionStore:
        """A store of this backend; `config`: fields both configs have (`page_size`,
        `max_sessions_per_owner`)."""
        store = await self.opener(session_ttl, config)
        self.opened.append(store)
        return store

    async def expire(self, store: SessionStore, ttl: float) -> None:
        """Let sessions written so far pass their TTL: fake time plus a sweep on SQLite; on
        etcd the lease expires in real time and the caller waits for the event."""
        if isinstance(store, SqliteSessionStore):
            assert self.clock is not None
            self.clock.advance(ttl + 1)
            await store.sweep()


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreHarness]:
    opened: list[SessionStore] = []
    if request.param == "sqlite":
        clock = FakeClock()

        async def open_sqlite(ttl: float, extra: dict[str, Any]) -> SessionStore:
            config = SqliteStoreConfig(
                path=tmp_path / "s.db", session_ttl=ttl, sweep_interval=0, **extra
            )
            return await SqliteSessionStore.open(config, clock=clock)

        h = StoreHarness("sqlite", open_sqlite, clock, opened)
    else:
        cluster: EtcdCluster = request.getfixturevalue("etcd_cluster")
        prefix = f"/test-{uuid.uuid4().hex[:12]}"

        async def open_etcd(ttl: float, extra: dict[str, Any]) -> SessionStore:
            host, port = cluster.endpoints[0].rsplit(":", 1)
            config = EtcdStoreConfig(
                endpoints=((host, int(port)),),
                prefix=prefix,
                session_ttl=ttl,
                lease_granularity=0.5,
                **extra,
            )
            return await EtcdSessionStore.open(config)

        h = StoreHarness("etcd", open_etcd, None, opened)
    yield h
    for store in opened:
        await store.aclose()


@pytest.fixture
async def store(harness: StoreHarness) -> SessionStore:
    return await harness.open()
