"""SQLite expiry sweeps in pages: many sessions due at once expire in several transactions of
at most a page each, every one with its EXPIRE event, none left behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from controlplane.store.sqlite import SqliteSessionStore, SqliteStoreConfig
from tests.contract.conftest import FakeClock
from tether.model import (
    OwnerName,
    SessionEvent,
    SessionEventType,
    SessionId,
    SessionRecord,
    SessionUpsert,
)


async def test_sweep_expires_more_than_a_page(tmp_path: Path) -> None:
    clock = FakeClock()
    store = await SqliteSessionStore.open(
        SqliteStoreConfig(path=tmp_path / "s.db", session_ttl=10, sweep_interval=0, page_size=3),
        clock=clock,
    )
    try:
        ids = [f"s{i:02d}" for i in range(10)]
        await store.apply(
            writes=[
                SessionUpsert(SessionRecord(SessionId(s), s, "up:1", OwnerName("pod"), 1))
                for s in ids
            ]
        )
        async with contextlib.aclosing(store.watch()) as events:
            async with asyncio.timeout(10):
                assert len([e async for e in _until_synced(events)]) == 10
                clock.advance(11)
                assert await store.sweep() == 10
                expired = [await anext(events) for _ in ids]
        assert {e.type for e in expired} == {SessionEventType.EXPIRE}
        assert sorted(e.session_id or "" for e in expired) == ids
        assert (await store.list_page()).sessions == ()
        assert await store.sweep() == 0
    finally:
        await store.aclose()


async def _until_synced(events: AsyncIterator[SessionEvent]) -> AsyncIterator[SessionEvent]:
    async for e in events:
        if e.type is SessionEventType.SYNCED:
            return
        yield e
