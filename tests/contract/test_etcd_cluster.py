"""The etcd store with every member of a three-member cluster: losing the member the client is
connected to costs a failover, not an error."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.config import EtcdUrl, open_store, parse_store_url
from controlplane.store.etcd import grpc_target
from tests.support.etcd import EtcdCluster, etcd_available, start_etcd
from tether.model import OwnerName, SessionId, SessionRecord, SessionUpsert

pytestmark = pytest.mark.etcd


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    if not etcd_available():
        pytest.skip("etcd binary not installed (apt-get install etcd-server)")
    c = start_etcd(tmp_path, members=3)
    yield c
    c.stop()


def test_grpc_target_names_every_member() -> None:
    assert grpc_target([("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 3)]) == (
        "ipv4:10.0.0.1:1,10.0.0.2:2,10.0.0.3",
        3,
    )
    assert grpc_target([("::1", 1), ("::2", 2)]) == ("ipv6:[::1]:1,[::2]", 2)
    assert grpc_target([("etcd.local", 2379)]) == ("etcd.local", 2379)


async def test_writes_survive_losing_a_member(cluster: EtcdCluster) -> None:
    url = parse_store_url(f"{cluster.url}/failover-{uuid.uuid4().hex[:8]}")
    assert isinstance(url, EtcdUrl)
    store = await open_store(url, session_ttl=60)
    try:
        for i in range(2):
            rec = SessionRecord(SessionId(f"s{i}"), f"u{i}", "up:1", OwnerName("pod"), 1)
            async with asyncio.timeout(15):
                out = await store.apply(writes=[SessionUpsert(rec)])
            assert out[rec.session_id] is not None
            if i == 0:
                # The member the channel uses (pick_first: the first address); two remain,
                # a quorum.
                cluster.members[0].stop()
        async with asyncio.timeout(15):
            page = await store.list_page()
        assert [r.session_id for r in page.sessions] == ["s0", "s1"]
    finally:
        await store.aclose()
