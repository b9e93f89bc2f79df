"""The write batcher against a real SQLite store: a caller that goes away mid-flush."""

from __future__ import annotations

import asyncio
from pathlib import Path

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
        gone = batcher.submit([upsert(1)])
        stays = batcher.submit([upsert(2)])
        gone.cancel()  # the first caller went away
        await asyncio.wait_for(stays, 5)
        # The batcher keeps working for later writes.
        await asyncio.wait_for(batcher.submit([upsert(3)]), 5)
        for n in (1, 2, 3):
            assert await store.get(session_id=SessionId(f"s{n}")) is not None
    finally:
        await batcher.aclose()
        await store.aclose()
