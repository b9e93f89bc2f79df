"""Store figures: what a watch's snapshot costs in memory, and what the owner limit costs a
burst of creations. `python -m bench.store_figures [--sessions N] [--no-etcd]`.

  * Snapshot memory: the peak of the Python heap (tracemalloc) while a watch streams its
    snapshot to a consumer that keeps nothing, read in pages (`SNAPSHOT_PAGE_SIZE`) and read
    in one piece (a page as large as the store, as the stores did before paging). Sessions
    carry a 1 KiB `initialize` body.
  * Owner limit on etcd: one `apply` batch of 1,000 creations, for one owner or spread over
    100, with the limit on (counted atomically with each creation) and off.

Real SQLite files and a real one-member etcd (`tests.support.etcd`); nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

from controlplane.store.etcd import EtcdSessionStore, EtcdStoreConfig
from controlplane.store.protocol import (
    DEFAULT_MAX_SESSIONS_PER_OWNER,
    SNAPSHOT_PAGE_SIZE,
    SessionStore,
    StoreError,
)
from controlplane.store.sqlite import SqliteSessionStore, SqliteStoreConfig
from tests.support.etcd import EtcdCluster, etcd_available, start_etcd
from tether.model import OwnerName, SessionEventType, SessionId, SessionRecord, SessionUpsert

BODY = b"x" * 1024


def upserts(n: int, owners: int) -> list[SessionUpsert]:
    return [
        SessionUpsert(
            SessionRecord(
                SessionId(f"s{i:07d}"),
                f"u{i:07d}",  # one upstream session per session (records rule 10)
                "http://mcp:8080/mcp",
                OwnerName(f"pod-{i % owners}"),
                1,
                initialize_request=BODY,
            )
        )
        for i in range(n)
    ]


async def fill(store: SessionStore, n: int) -> None:
    writes = upserts(n, owners=100)
    for i in range(0, n, 1000):
        await store.apply(writes=writes[i : i + 1000])


async def snapshot_peak(store: SessionStore) -> tuple[int, float]:
    """(sessions in the snapshot, peak heap growth in MiB while streaming it)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    shown = 0
    try:
        async for event in store.watch():
            if event.type is SessionEventType.SYNCED:
                break
            shown += 1
        return shown, (tracemalloc.get_traced_memory()[1] - base) / 2**20
    finally:
        tracemalloc.stop()


async def snapshot_figures(n: int, cluster: EtcdCluster | None, tmp: Path) -> None:
    print(f"### Watch snapshot of {n:,} sessions (1 KiB initialize bodies): peak heap")
    print("| store | page | sessions shown | peak heap MiB |")
    print("|---|---:|---:|---:|")
    for page in (SNAPSHOT_PAGE_SIZE, n):
        sqlite = await SqliteSessionStore.open(
            SqliteStoreConfig(path=tmp / f"p{page}.db", sweep_interval=0, page_size=page)
        )
        try:
            await fill(sqlite, n)
            shown, peak = await snapshot_peak(sqlite)
            print(f"| sqlite | {page:,} | {shown:,} | {peak:.1f} |")
        finally:
            await sqlite.aclose()
        if cluster is None:
            continue
        etcd = await open_etcd(cluster, page_size=page)
        try:
            await fill(etcd, n)
            shown, peak = await snapshot_peak(etcd)
            note = " (halved until a page fits in a gRPC message)" if page > 1000 else ""
            print(f"| etcd | {page:,}{note} | {shown:,} | {peak:.1f} |")
        except StoreError as e:
            print(f"| etcd | {page:,} | failed: {str(e)[:80]} | - |")
        finally:
            await etcd.aclose()


async def open_etcd(
    cluster: EtcdCluster,
    *,
    page_size: int = SNAPSHOT_PAGE_SIZE,
    max_sessions_per_owner: int = DEFAULT_MAX_SESSIONS_PER_OWNER,
) -> EtcdSessionStore:
    host, port = cluster.endpoints[0].rsplit(":", 1)
    return await EtcdSessionStore.open(
        EtcdStoreConfig(
            endpoints=((host, int(port)),),
            prefix=f"/bench-{uuid.uuid4().hex[:8]}",
            watch_reconnect_timeout=5.0,
            page_size=page_size,
            max_sessions_per_owner=max_sessions_per_owner,
        )
    )


async def owner_limit_figures(cluster: EtcdCluster, n: int) -> None:
    print(f"\n### etcd: one batch of {n:,} creations")
    print("| owners | limit | seconds | creations/s |")
    print("|---:|---:|---:|---:|")
    for owners in (1, 100):
        for limit in (0, 10_000):
            store = await open_etcd(cluster, max_sessions_per_owner=limit)
            try:
                started = time.perf_counter()
                await store.apply(writes=upserts(n, owners))
                took = time.perf_counter() - started
            finally:
                await store.aclose()
            shown = "off" if limit == 0 else f"{limit:,}"
            print(f"| {owners} | {shown} | {took:.2f} | {n / took:,.0f} |")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=10_000, help="sessions in the snapshot")
    p.add_argument("--creations", type=int, default=1000, help="creations in the etcd batch")
    p.add_argument("--no-etcd", action="store_true", help="SQLite only")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        cluster = None
        if not args.no_etcd and etcd_available():
            cluster = await asyncio.to_thread(start_etcd, tmp / "etcd")
        try:
            await snapshot_figures(args.sessions, cluster, tmp)
            if cluster is not None:
                await owner_limit_figures(cluster, args.creations)
        finally:
            if cluster is not None:
                await asyncio.to_thread(cluster.stop)


if __name__ == "__main__":
    asyncio.run(main())
