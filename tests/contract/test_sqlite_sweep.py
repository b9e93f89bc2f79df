"""SQLite expiry sweeps in pages: many sessions due at once expire in several transactions of
at most a page each, every one with its EXPIRE event, none left behind."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

from controlplane.store.protocol import WritesRefused
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


async def test_tombstones_last_one_ttl_and_are_swept(tmp_path: Path) -> None:
    """controlplane.store.sqlite rule 5: a deleted session's tombstone refuses a rebinding
    while it lasts, and the sweeper removes it after one TTL (bounded)."""
    clock = FakeClock()
    path = tmp_path / "s.db"
    store = await SqliteSessionStore.open(
        SqliteStoreConfig(path=path, session_ttl=10, sweep_interval=0), clock=clock
    )
    try:
        sid = SessionId("s1")
        alice = SessionRecord(sid, "s1", "up:1", OwnerName("pod"), 1, credential_fingerprint="a")
        mallory = SessionRecord(sid, "s1", "up:1", OwnerName("x"), 1, credential_fingerprint="m")
        await store.apply(writes=[SessionUpsert(alice)])
        assert await store.delete(session_id=sid) is not None
        refused = (await store.apply(writes=[SessionUpsert(mallory)]))[sid]
        assert isinstance(refused, WritesRefused)
        clock.advance(11)
        await store.sweep()
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT COUNT(*) FROM tombstones").fetchone() == (0,)
        assert isinstance((await store.apply(writes=[SessionUpsert(mallory)]))[sid], SessionRecord)
    finally:
        await store.aclose()
