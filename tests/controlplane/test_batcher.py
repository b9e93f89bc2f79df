"""The write batcher against a real SQLite store: a caller that goes away mid-flush, and the
cap on pending writes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controlplane.batcher import WriteBatcher
from controlplane.store.sqlite import SqliteSessionStore, SqliteStoreConfig
from tether.model import OwnerName, SessionId, SessionRecord, SessionUpsert


def upsert(n: int) -> SessionUpsert:
    return SessionUpsert(
        SessionRecord(
            session_id=SessionId(f"s{n}"),
            upstream_session_id=f"s{n}",
            upstream_address="http://127.0.0.1:1",
            owner=OwnerName("a"),
            owner_epoch=1,
        )
    )


async def test_a_cancelled_caller_does_not_break_the_flush_for_others(tmp_path: Path) -> None:
    """Found in the end-to-end test: a sidecar killed while its report waited for a flush
    cancelled the flush future every waiter shared, and the batcher task crashed."""
    store = await SqliteSessionStore.open(
        SqliteStoreConfig(path=tmp_path / "s.db", sweep_interval=0)
    )
    batcher = WriteBatcher(store, flush_interval=0.01)
    batcher.start()
    try:
        gone = await batcher.submit([upsert(1)])
        stays = await batcher.submit([upsert(2)])
        gone.cancel()  # the first caller went away
        await asyncio.wait_for(stays, 5)
        # The batcher keeps working for later writes.
        await asyncio.wait_for(await batcher.submit([upsert(3)]), 5)
        for n in (1, 2, 3):
            assert await store.get(session_id=SessionId(f"s{n}")) is not None
    finally:
        await batcher.aclose()
        await store.aclose()


async def test_submit_waits_for_room_under_a_flood_of_distinct_sessions(tmp_path: Path) -> None:
    """Rule 2: distinct sessions do not coalesce, so the pending set is capped and senders
    wait for a flush instead of growing it; every write still reaches the store."""
    store = await SqliteSessionStore.open(
        SqliteStoreConfig(path=tmp_path / "s.db", sweep_interval=0)
    )
    batcher = WriteBatcher(store, flush_interval=0.01, max_pending=10)
    batcher.start()
    futures = []
    try:
        for first in range(1, 200, 4):
            futures.append(await batcher.submit([upsert(n) for n in range(first, first + 4)]))
            assert batcher.pending() <= 10 + 4
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert batcher.flushes >= 200 // 14
        for n in (1, 100, 199):
            assert await store.get(session_id=SessionId(f"s{n}")) is not None
    finally:
        await batcher.aclose()
        await store.aclose()


async def test_a_submitter_waiting_for_room_is_refused_once_closed(tmp_path: Path) -> None:
    store = await SqliteSessionStore.open(
        SqliteStoreConfig(path=tmp_path / "s.db", sweep_interval=0)
    )
    batcher = WriteBatcher(store, flush_interval=0.01, max_pending=1)
    # Not started: nothing flushes, so the second submission waits for room.
    first = await batcher.submit([upsert(1)])
    waiting = asyncio.ensure_future(batcher.submit([upsert(2)]))
    await asyncio.sleep(0)
    assert not waiting.done()
    await batcher.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await waiting
    await first  # aclose flushed what was pending
    assert await store.get(session_id=SessionId("s1")) is not None
    await store.aclose()
