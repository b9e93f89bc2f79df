"""The `SessionStore` contract, run against every backend (SQLite and a real etcd).

Each test states one promise of `controlplane.store.protocol.SessionStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controlplane.store.protocol import (
    ApplyResult,
    ClaimRefusedError,
    InvalidPageTokenError,
    OwnerLimitError,
    OwnerLimitReached,
    SessionNotFoundError,
    SessionStore,
    WritesRefused,
)
from tests.contract.conftest import StoreHarness
from tether.model import (
    OwnerName,
    SessionEvent,
    SessionEventType,
    SessionId,
    SessionRecord,
    SessionUpsert,
    StreamId,
    StreamPosition,
    StreamUpdate,
)

DEADLINE = 10.0


def record(sid: str = "s1", *, owner: str = "pod-a", epoch: int = 1, **kw: Any) -> SessionRecord:
    fields: dict[str, Any] = {
        "session_id": SessionId(sid),
        "upstream_session_id": sid,
        "upstream_address": "http://mcp:8080/mcp",
        "owner": OwnerName(owner),
        "owner_epoch": epoch,
        "protocol_version": "2025-06-18",
        "initialize_request": b'{"method":"initialize"}',
    }
    fields.update(kw)
    return SessionRecord(**fields)


def pos(stream: str, seq: int, epoch: int = 1) -> StreamPosition:
    return StreamPosition(
        stream_id=StreamId(stream),
        last_event_id=f"{stream}.{epoch}.{seq}",
        upstream_event_id=f"up-{seq}",
        seq=seq,
        owner_epoch=epoch,
    )


def update(sid: str, stream: str, seq: int, epoch: int = 1) -> StreamUpdate:
    return StreamUpdate(SessionId(sid), pos(stream, seq, epoch))


async def create(store: SessionStore, sid: str = "s1", **kw: Any) -> SessionRecord:
    out = await store.apply(writes=[SessionUpsert(record(sid, **kw))])
    rec = out[SessionId(sid)]
    assert isinstance(rec, SessionRecord)
    return rec


async def next_event(events: AsyncIterator[SessionEvent]) -> SessionEvent:
    async with asyncio.timeout(DEADLINE):
        return await anext(events)


async def until_synced(events: AsyncIterator[SessionEvent]) -> list[SessionEvent]:
    seen = []
    while (ev := await next_event(events)).type is not SessionEventType.SYNCED:
        seen.append(ev)
    return seen


async def test_upsert_creates_a_session_with_timestamps(store: SessionStore) -> None:
    rec = await create(store, epoch=0)
    assert rec.owner_epoch == 1
    assert rec.created_at > 0
    assert rec.updated_at == rec.created_at
    assert rec.expires_at > rec.updated_at
    got = await store.get(session_id=SessionId("s1"))
    assert got == rec
    assert got.initialize_request == b'{"method":"initialize"}'


async def test_missing_session_is_none(store: SessionStore) -> None:
    assert await store.get(session_id=SessionId("nope")) is None


async def test_stream_updates_are_monotonic_and_idempotent(store: SessionStore) -> None:
    await create(store)
    sid = SessionId("s1")
    out = await store.apply(writes=[update("s1", "a", 5)])
    rec = out[sid]
    assert isinstance(rec, SessionRecord)
    assert rec.streams[StreamId("a")].seq == 5
    # Lower, equal (a replay) and the same batch again: no-ops, not even timestamps move.
    for stale in (update("s1", "a", 3), update("s1", "a", 5), update("s1", "a", 5)):
        again = (await store.apply(writes=[stale]))[sid]
        assert again == rec
    assert await store.get(session_id=sid) == rec
    rec7 = (await store.apply(writes=[update("s1", "a", 7), update("s1", "a", 6)]))[sid]
    assert isinstance(rec7, SessionRecord)
    assert rec7.streams[StreamId("a")].seq == 7
    assert rec7.streams[StreamId("a")].last_event_id == "a.1.7"


async def test_one_batch_creates_and_moves_several_sessions(store: SessionStore) -> None:
    out = await store.apply(
        writes=[
            update("s1", "a", 2),
            SessionUpsert(record("s1", streams={StreamId("b"): pos("b", 1)})),
            SessionUpsert(record("s2")),
            update("s2", "x", 9),
        ]
    )
    s1, s2 = out[SessionId("s1")], out[SessionId("s2")]
    assert isinstance(s1, SessionRecord)
    assert isinstance(s2, SessionRecord)
    assert {k: v.seq for k, v in s1.streams.items()} == {"a": 2, "b": 1}
    assert s2.streams[StreamId("x")].seq == 9


async def test_update_of_unknown_session_creates_nothing(store: SessionStore) -> None:
    out = await store.apply(writes=[update("ghost", "a", 1)])
    assert out == {SessionId("ghost"): None}
    assert await store.get(session_id=SessionId("ghost")) is None


async def test_claim_fences_the_old_owner(store: SessionStore) -> None:
    sid = SessionId("s1")
    await create(store)
    await store.apply(writes=[update("s1", "a", 10)])
    claimed = await store.claim(session_id=sid, owner=OwnerName("pod-b"))
    assert (claimed.owner, claimed.owner_epoch) == ("pod-b", 2)
    assert claimed.streams[StreamId("a")].seq == 10
    # The zombie keeps reporting with epoch 1: refused, whatever its seq.
    zombie = (await store.apply(writes=[update("s1", "a", 99, epoch=1)]))[sid]
    assert zombie == claimed
    zombie_meta = SessionUpsert(record("s1", owner="pod-a", epoch=1, upstream_address="x"))
    assert (await store.apply(writes=[zombie_meta]))[sid] == claimed
    # The new owner's first event beats everything before it.
    new = (await store.apply(writes=[update("s1", "a", 1, epoch=2)]))[sid]
    assert isinstance(new, SessionRecord)
    assert new.streams[StreamId("a")].order == (2, 1)
    # An epoch nobody granted is refused too.
    assert (await store.apply(writes=[update("s1", "a", 5, epoch=3)]))[sid] == new


async def test_claim_with_expected_epoch_is_compare_and_set(store: SessionStore) -> None:
    sid = SessionId("s1")
    await create(store)
    won = await store.claim(session_id=sid, owner=OwnerName("b"), expected_owner_epoch=1)
    assert won.owner_epoch == 2
    with pytest.raises(ClaimRefusedError) as info:
        await store.claim(session_id=sid, owner=OwnerName("c"), expected_owner_epoch=1)
    assert info.value.current.owner == "b"
    with pytest.raises(SessionNotFoundError):
        await store.claim(session_id=SessionId("nope"), owner=OwnerName("b"))


async def test_upsert_by_owner_refreshes_metadata(store: SessionStore) -> None:
    sid = SessionId("s1")
    await create(store)
    new = record("s1", upstream_session_id="s1-reinit", initialize_request=b"")
    rec = (await store.apply(writes=[SessionUpsert(new)]))[sid]
    assert isinstance(rec, SessionRecord)
    assert rec.upstream_session_id == "s1-reinit"
    assert rec.initialize_request == b'{"method":"initialize"}'


async def test_delete_returns_the_last_record(store: SessionStore) -> None:
    rec = await create(store)
    assert await store.delete(session_id=SessionId("s1")) == rec
    assert await store.get(session_id=SessionId("s1")) is None
    assert await store.delete(session_id=SessionId("s1")) is None


async def test_list_pages_and_filters_by_owner(store: SessionStore) -> None:
    for i in range(7):
        await create(store, f"s{i}", owner="even" if i % 2 == 0 else "odd")
    ids: list[str] = []
    token = ""
    while True:
        page = await store.list_page(page_size=3, page_token=token)
        assert len(page.sessions) <= 3
        ids += [r.session_id for r in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert ids == [f"s{i}" for i in range(7)]
    evens = await store.list_page(owner=OwnerName("even"), page_size=2)
    assert [r.session_id for r in evens.sessions] == ["s0", "s2"]
    rest = await store.list_page(owner=OwnerName("even"), page_token=evens.next_page_token)
    assert [r.session_id for r in rest.sessions] == ["s4", "s6"]
    assert rest.next_page_token == ""
    with pytest.raises(InvalidPageTokenError):
        await store.list_page(page_token="../../etc")


async def test_count_is_the_number_of_live_sessions(harness: StoreHarness) -> None:
    ttl = 1.0
    store = await harness.open(session_ttl=ttl)
    assert await store.count() == 0
    for i in range(3):
        await create(store, f"s{i}")
    await store.apply(writes=[update("s0", "a", 1), update("s0", "b", 1)])  # streams: no more
    assert await store.count() == 3
    await store.delete(session_id=SessionId("s1"))
    assert await store.count() == 2
    async with contextlib.aclosing(store.watch()) as events:
        await until_synced(events)
        await harness.expire(store, ttl)
        expired = {(await next_event(events)).session_id for _ in range(2)}
    assert expired == {"s0", "s2"}
    assert await store.count() == 0


async def test_watch_gives_a_snapshot_then_changes(store: SessionStore) -> None:
    await create(store, "s1")
    await create(store, "s2")
    async with contextlib.aclosing(store.watch()) as events:
        snapshot = await until_synced(events)
        assert sorted(e.session_id or "" for e in snapshot) == ["s1", "s2"]
        assert all(e.type is SessionEventType.PUT for e in snapshot)
        await store.apply(writes=[update("s1", "a", 1)])
        ev = await next_event(events)
        assert (ev.type, ev.session_id) == (SessionEventType.PUT, "s1")
        assert ev.session is not None
        assert ev.session.streams[StreamId("a")].seq == 1
        await store.apply(writes=[update("s1", "a", 1)])  # stale: no event
        await store.delete(session_id=SessionId("s2"))
        ev = await next_event(events)
        assert (ev.type, ev.session_id) == (SessionEventType.DELETE, "s2")
        assert ev.session is not None
        assert ev.session.session_id == "s2"


async def test_watcher_sees_expiry(harness: StoreHarness) -> None:
    ttl = 1.0
    store = await harness.open(session_ttl=ttl)
    await create(store, "idle")
    async with contextlib.aclosing(store.watch()) as events:
        assert [e.session_id for e in await until_synced(events)] == ["idle"]
        await harness.expire(store, ttl)
        ev = await next_event(events)
        assert (ev.type, ev.session_id) == (SessionEventType.EXPIRE, "idle")
    assert await store.get(session_id=SessionId("idle")) is None
    # A stream update after expiry finds no session: skipped, not resurrected.
    assert (await store.apply(writes=[update("idle", "a", 1)]))[SessionId("idle")] is None


async def test_concurrent_writers_end_at_the_maximum(store: SessionStore) -> None:
    sid = SessionId("s1")
    await create(store)
    seqs = list(range(1, 51))
    # Interleave high and low sequence numbers; every writer races every other.
    order = seqs[::2] + seqs[1::2][::-1]
    await asyncio.gather(*(store.apply(writes=[update("s1", "a", s)]) for s in order))
    rec = await store.get(session_id=sid)
    assert isinstance(rec, SessionRecord)
    assert rec.streams[StreamId("a")].seq == 50


async def test_records_survive_reopening(harness: StoreHarness) -> None:
    first = await harness.open()
    await create(first)
    rec = (await first.apply(writes=[update("s1", "a", 3)]))[SessionId("s1")]
    assert rec is not None
    await first.aclose()
    second = await harness.open()
    assert await second.get(session_id=SessionId("s1")) == rec


async def test_record_round_trips_every_field(store: SessionStore) -> None:
    rec = await create(
        store,
        "s.1_~+=:@-x",
        initialize_request=bytes(range(256)),
        credential_fingerprint="ab" * 32,
        streams={StreamId("a"): pos("a", 1), StreamId("b"): pos("b", 2)},
    )
    got = await store.get(session_id=SessionId("s.1_~+=:@-x"))
    assert got == rec
    assert rec.credential_fingerprint == "ab" * 32
    assert dataclasses.asdict(got)["initialize_request"] == bytes(range(256))


async def test_credential_binding_is_set_once(store: SessionStore) -> None:
    """records rule 8: no upsert rewrites the fingerprint the session was created with."""
    sid = SessionId("s1")
    rec = await create(store, credential_fingerprint="fp-alice")
    rebind = record("s1", credential_fingerprint="fp-mallory", upstream_address="evil:1")
    assert (await store.apply(writes=[SessionUpsert(rebind)]))[sid] == rec
    assert await store.get(session_id=sid) == rec
    keep = record("s1", credential_fingerprint="", upstream_address="http://mcp:9090/mcp")
    kept = stored((await store.apply(writes=[SessionUpsert(keep)]))[sid])
    assert kept.credential_fingerprint == "fp-alice"
    assert kept.upstream_address == "http://mcp:9090/mcp"


async def test_only_the_owner_writes_and_only_a_claim_moves_a_session(
    store: SessionStore,
) -> None:
    """records rules 6 and 7: another owner's upsert at the current epoch, or a write sent by
    a sidecar that does not own the session, changes nothing."""
    sid = SessionId("s1")
    rec = await create(store, credential_fingerprint="fp-alice")
    takeover = SessionUpsert(record("s1", owner="pod-b", credential_fingerprint="fp-alice"))
    assert (await store.apply(writes=[takeover]))[sid] == rec
    foreign = dataclasses.replace(update("s1", "a", 50), writer=OwnerName("pod-b"))
    assert (await store.apply(writes=[foreign]))[sid] == rec
    own = dataclasses.replace(update("s1", "a", 5), writer=OwnerName("pod-a"))
    moved = stored((await store.apply(writes=[own]))[sid])
    assert moved.streams[StreamId("a")].seq == 5
    assert (await store.get(session_id=sid)) == moved


async def listing(store: SessionStore, owner: str | None = None) -> list[SessionRecord]:
    """Every session, through `list_page`."""
    out: list[SessionRecord] = []
    token = ""
    while True:
        page = await store.list_page(
            owner=OwnerName(owner) if owner else None, page_size=7, page_token=token
        )
        out.extend(page.sessions)
        if not (token := page.next_page_token):
            return out


def follow(state: dict[str, SessionRecord], ev: SessionEvent) -> None:
    """Apply one watch event to a watcher's picture of the store; a session is never shown
    going backwards."""
    assert ev.session_id is not None
    if ev.type is SessionEventType.PUT:
        assert ev.session is not None
        old = state.get(ev.session_id)
        if old is not None:
            assert ev.session.updated_at >= old.updated_at
            for sid, p in old.streams.items():
                assert ev.session.streams[sid].order >= p.order
        state[ev.session_id] = ev.session
    else:
        state.pop(ev.session_id, None)


async def test_watch_snapshot_is_read_in_pages_and_loses_no_change(
    harness: StoreHarness,
) -> None:
    """A snapshot of eight pages comes complete and in id order, and changes made while it
    is half read (in pages read and not yet read, creations, deletions) all reach the
    watcher: its picture ends equal to the store's."""
    store = await harness.open(page_size=4)
    ids = [f"s{i:02d}" for i in range(30)]
    await store.apply(
        writes=[SessionUpsert(record(sid, owner=f"pod-{i % 3}")) for i, sid in enumerate(ids)]
    )
    state: dict[str, SessionRecord] = {}
    async with contextlib.aclosing(store.watch()) as events:
        snapshot = [await next_event(events) for _ in range(6)]  # into the second page
        await store.apply(
            writes=[
                update("s01", "a", 1),
                update("s25", "a", 1),
                SessionUpsert(record("s02x")),
                SessionUpsert(record("s99")),
            ]
        )
        await store.apply(writes=[update("s01", "a", 2), update("s25", "a", 2)])
        assert await store.delete(session_id=SessionId("s03")) is not None
        assert await store.delete(session_id=SessionId("s27")) is not None
        snapshot += await until_synced(events)
        assert all(e.type is SessionEventType.PUT for e in snapshot)
        shown = [e.session_id or "" for e in snapshot]
        assert shown == sorted(set(shown))
        assert set(ids) - {"s03", "s27"} <= set(shown)
        for ev in snapshot:
            follow(state, ev)
        await create(store, "zz-end")
        while (ev := await next_event(events)).session_id != "zz-end":
            follow(state, ev)
        follow(state, ev)
    assert state == {r.session_id: r for r in await listing(store)}
    assert state["s01"].streams[StreamId("a")].seq == 2
    assert state["s25"].streams[StreamId("a")].seq == 2
    assert {"s02x", "s99"} <= state.keys()
    assert not {"s03", "s27"} & state.keys()


def stored(result: ApplyResult) -> SessionRecord:
    assert isinstance(result, SessionRecord), result
    return result


async def test_sessions_per_owner_are_limited(harness: StoreHarness) -> None:
    store = await harness.open(max_sessions_per_owner=3)
    for i in range(3):
        await create(store, f"a{i}", owner="pod-a")
    out = await store.apply(
        writes=[
            SessionUpsert(record("a3", owner="pod-a")),
            update("a3", "x", 1),
            SessionUpsert(record("b0", owner="pod-b")),
            update("a0", "x", 1),
        ]
    )
    refused = out[SessionId("a3")]
    assert refused == OwnerLimitReached(OwnerName("pod-a"), 3, None)
    assert "pod-a" in refused.detail
    assert "--max-sessions-per-owner" in refused.detail
    assert await store.get(session_id=SessionId("a3")) is None
    # Other owners, and the sessions an owner holds, are not limited.
    assert stored(out[SessionId("b0")]).owner == "pod-b"
    assert stored(out[SessionId("a0")]).streams[StreamId("x")].seq == 1
    renewed = await store.apply(writes=[SessionUpsert(record("a1", owner="pod-a"))])
    assert stored(renewed[SessionId("a1")]).owner == "pod-a"
    # A claim would move a session to the full owner: refused, nothing changes.
    before = await store.get(session_id=SessionId("b0"))
    with pytest.raises(OwnerLimitError, match="pod-a"):
        await store.claim(session_id=SessionId("b0"), owner=OwnerName("pod-a"))
    assert await store.get(session_id=SessionId("b0")) == before
    # A claim away from the full owner frees a place; so does a delete.
    claimed = await store.claim(session_id=SessionId("a0"), owner=OwnerName("pod-b"))
    assert claimed.owner == "pod-b"
    await create(store, "a3", owner="pod-a")
    assert await store.delete(session_id=SessionId("a1")) is not None
    await create(store, "a4", owner="pod-a")
    full = await store.apply(writes=[SessionUpsert(record("a5", owner="pod-a"))])
    assert isinstance(full[SessionId("a5")], OwnerLimitReached)
    assert sorted(r.session_id for r in await listing(store, "pod-a")) == ["a2", "a3", "a4"]


async def test_owner_limit_holds_against_concurrent_creators(harness: StoreHarness) -> None:
    """Four stores on one backend (four control-plane replicas) create 24 sessions of one
    owner at once, each write on its own: exactly the limit is stored."""
    stores = [await harness.open(max_sessions_per_owner=5) for _ in range(4)]
    results = await asyncio.gather(
        *(
            stores[i % 4].apply(writes=[SessionUpsert(record(f"c{i:02d}", owner="pod-c"))])
            for i in range(24)
        )
    )
    outcomes = [r for out in results for r in out.values()]
    assert sum(isinstance(r, SessionRecord) for r in outcomes) == 5
    assert sum(isinstance(r, OwnerLimitReached) for r in outcomes) == 19
    assert len(await listing(stores[0], "pod-c")) == 5


async def test_expired_sessions_leave_the_owner_count(harness: StoreHarness) -> None:
    ttl = 1.0
    store = await harness.open(session_ttl=ttl, max_sessions_per_owner=2)
    await create(store, "e0", owner="pod-e")
    await create(store, "e1", owner="pod-e")
    over = await store.apply(writes=[SessionUpsert(record("e2", owner="pod-e"))])
    assert isinstance(over[SessionId("e2")], OwnerLimitReached)
    async with contextlib.aclosing(store.watch()) as events:
        assert len(await until_synced(events)) == 2
        await harness.expire(store, ttl)
        gone = {(await next_event(events)).session_id for _ in range(2)}
        assert gone == {"e0", "e1"}
    await create(store, "e2", owner="pod-e")
    await create(store, "e3", owner="pod-e")


async def test_large_records_are_listed_and_watched_whole(store: SessionStore) -> None:
    """Thirty sessions with 300 KB `initialize` bodies: more than one gRPC message (4 MiB)
    holds, so a page of them is read in smaller pieces, and none is missing."""
    body = b"x" * 300_000
    ids = [f"big{i:02d}" for i in range(30)]
    for sid in ids:
        await create(store, sid, initialize_request=body)
    listed = await listing(store)
    assert [r.session_id for r in listed] == ids
    page = await store.list_page(page_size=1000)
    assert [r.session_id for r in page.sessions] == ids
    async with contextlib.aclosing(store.watch()) as events:
        snapshot = await until_synced(events)
    assert [e.session_id for e in snapshot] == ids
    assert all(e.session is not None and e.session.initialize_request == body for e in snapshot)


async def test_a_deleted_session_is_recreated_only_by_its_last_owner_and_credential(
    store: SessionStore,
) -> None:
    """records rule 9: a delete leaves a tombstone; re-creating the id needs the tombstone's
    fingerprint, and its epoch (the same owner), or a higher one."""
    sid = SessionId("s1")
    await create(store, credential_fingerprint="fp-alice")
    claimed = await store.claim(session_id=sid, owner=OwnerName("pod-b"))
    assert claimed.owner_epoch == 2
    assert await store.delete(session_id=sid) is not None
    refused = {
        "another credential": record("s1", owner="pod-b", epoch=3, credential_fingerprint="fp-m"),
        "no credential": record("s1", owner="pod-b", epoch=2, credential_fingerprint=""),
        "below the last epoch": record("s1", epoch=1, credential_fingerprint="fp-alice"),
        "another owner, same epoch": record("s1", epoch=2, credential_fingerprint="fp-alice"),
    }
    for what, rec in refused.items():
        out = (await store.apply(writes=[SessionUpsert(rec), update("s1", "a", 1, 2)]))[sid]
        assert isinstance(out, WritesRefused), what
        assert await store.get(session_id=sid) is None, what
    # Its last owner, at its last epoch and with its credential: the store lost it.
    again = record("s1", owner="pod-b", epoch=2, credential_fingerprint="fp-alice")
    back = stored((await store.apply(writes=[SessionUpsert(again)]))[sid])
    assert (back.owner, back.owner_epoch, back.credential_fingerprint) == ("pod-b", 2, "fp-alice")


async def test_an_expired_session_leaves_a_tombstone_and_other_ids_none(
    harness: StoreHarness,
) -> None:
    ttl = 2.0  # the tombstone lasts one more TTL: beyond what `expire` lets pass (ttl + 1)
    store = await harness.open(session_ttl=ttl)
    sid = SessionId("idle")
    await create(store, "idle", credential_fingerprint="fp-alice")
    async with contextlib.aclosing(store.watch()) as events:
        await until_synced(events)
        await harness.expire(store, ttl)
        assert (await next_event(events)).type is SessionEventType.EXPIRE
    rebind = record("idle", owner="pod-x", epoch=1, credential_fingerprint="fp-mallory")
    assert isinstance((await store.apply(writes=[SessionUpsert(rebind)]))[sid], WritesRefused)
    # The owner renewing the session it still serves (after a partition) brings it back.
    renewal = record("idle", credential_fingerprint="fp-alice")
    assert stored((await store.apply(writes=[SessionUpsert(renewal)]))[sid]).owner_epoch == 1
    # A fresh id has no tombstone: any credential creates it.
    await create(store, "fresh", credential_fingerprint="fp-mallory")


async def test_an_upstream_session_belongs_to_one_session(harness: StoreHarness) -> None:
    """records rule 10: no session may name the upstream session of another live one; once
    that session is gone (deleted, expired) or names another one, the id is free."""
    store = await harness.open()
    await create(store, "alice", upstream_session_id="up-alice", credential_fingerprint="fp-a")
    borrowed = record("mallory", owner="pod-m", upstream_session_id="up-alice")
    out = await store.apply(writes=[SessionUpsert(borrowed), update("mallory", "a", 1)])
    assert isinstance(out[SessionId("mallory")], WritesRefused)
    assert await store.get(session_id=SessionId("mallory")) is None
    # An existing session cannot move onto it either, and stays as it was.
    mine = await create(store, "mallory", owner="pod-m", upstream_session_id="up-m")
    moved = dataclasses.replace(mine, upstream_session_id="up-alice")
    out = await store.apply(writes=[SessionUpsert(moved)])
    assert isinstance(out[SessionId("mallory")], WritesRefused)
    assert await store.get(session_id=SessionId("mallory")) == mine
    # Two new sessions racing for one upstream session: one wins.
    racers = [record(f"r{i}", upstream_session_id="up-race") for i in range(4)]
    outs = await asyncio.gather(*(store.apply(writes=[SessionUpsert(r)]) for r in racers))
    won = [o for out in outs for o in out.values() if isinstance(o, SessionRecord)]
    assert len(won) == 1
    # The owner re-initializing its session elsewhere frees the old upstream id...
    alice = stored((await store.apply(writes=[SessionUpsert(record("alice"))]))[SessionId("alice")])
    assert alice.upstream_session_id == "alice"
    await create(store, "late", upstream_session_id="up-alice")
    # ...and so does a delete.
    assert await store.delete(session_id=SessionId("late")) is not None
    await create(store, "later", upstream_session_id="up-alice")
