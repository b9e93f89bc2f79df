"""A WatchSessions stream through a real control plane on a real three-member etcd cluster
survives what happens to etcd: the member its store talks to killed (the leader or a
follower), and a compaction of the history it needs while it is cut off (it resynchronises).
The client sees every later change, and its stream never ends or fails."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from pathlib import Path

import aetcd
import grpc
import pytest

from controlplane.config import ControlPlaneConfig, EtcdUrl, parse_store_url
from controlplane.server import RunningControlPlane, start_control_plane
from controlplane.store.etcd import EtcdSessionStore, EtcdStoreConfig
from controlplane.store.protocol import ApplyResult, SessionStore, StoreUnavailableError
from tests.support.etcd import EtcdCluster, etcd_available, make_leader, start_etcd
from tests.support.relay import Relay
from tests.support.waiting import eventually
from tether.api.client import SessionClient
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

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(90)]


@pytest.fixture(autouse=True)
def _store_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="controlplane.store.etcd")


DEADLINE = 20.0
PUT, DELETE, EXPIRE, SYNCED = (
    SessionEventType.PUT,
    SessionEventType.DELETE,
    SessionEventType.EXPIRE,
    SessionEventType.SYNCED,
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    if not etcd_available():
        pytest.skip("etcd binary not installed (apt-get install etcd-server)")
    c = start_etcd(tmp_path, members=3)
    yield c
    c.stop()


def record(sid: str) -> SessionRecord:
    return SessionRecord(SessionId(sid), f"up-{sid}", "http://mcp:8080/mcp", OwnerName("pod"), 1)


def update(sid: str, seq: int) -> StreamUpdate:
    return StreamUpdate(
        SessionId(sid), StreamPosition(StreamId("a"), f"a.1.{seq}", str(seq), seq, 1)
    )


async def write(store: SessionStore, *writes: SessionUpsert | StreamUpdate) -> None:
    """Apply `writes`, again while etcd elects a leader or fails over (as a sidecar resends
    what is not acknowledged): the writes are idempotent."""

    async def attempt() -> Mapping[SessionId, ApplyResult]:
        return await store.apply(writes=list(writes))

    out = await eventually(
        attempt, timeout=DEADLINE, interval=0.05, ignoring=(StoreUnavailableError,)
    )
    assert all(isinstance(r, SessionRecord) for r in out.values()), out


async def delete(store: SessionStore, sid: str) -> None:
    """Delete `sid`, again on failures, until it is gone."""

    async def attempt() -> bool:
        await store.delete(session_id=SessionId(sid))
        return True

    await eventually(attempt, timeout=DEADLINE, interval=0.05, ignoring=(StoreUnavailableError,))


@contextlib.asynccontextmanager
async def control_plane(endpoints: str) -> AsyncIterator[RunningControlPlane]:
    url = parse_store_url(f"etcd://{endpoints}/watch-{uuid.uuid4().hex[:8]}")
    assert isinstance(url, EtcdUrl)
    running = await start_control_plane(ControlPlaneConfig(listen="127.0.0.1:0", store=url))
    try:
        yield running
    finally:
        await running.stop(grace=0.5)


class Watcher:
    """One WatchSessions call through the control plane, read an event at a time."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.events: AsyncGenerator[SessionEvent, None] = SessionClient(channel).watch_sessions()

    async def next(self) -> SessionEvent:
        async with asyncio.timeout(DEADLINE):
            return await anext(self.events)

    async def until_synced(self) -> list[SessionEvent]:
        seen = []
        while (ev := await self.next()).type is not SYNCED:
            seen.append(ev)
        return seen

    async def expect(self, kind: SessionEventType, sid: str, seq: int | None = None) -> None:
        ev = await self.next()
        assert (ev.type, ev.session_id) == (kind, sid), ev
        if seq is not None:
            assert ev.session is not None
            assert ev.session.streams[StreamId("a")].seq == seq


def shown(events: list[SessionEvent]) -> list[tuple[SessionEventType, str | None, int]]:
    """(type, id, seq of stream a) of each event."""
    out: list[tuple[SessionEventType, str | None, int]] = []
    for ev in events:
        stream = ev.session.streams.get(StreamId("a")) if ev.session else None
        out.append((ev.type, ev.session_id, stream.seq if stream else 0))
    return out


@pytest.mark.parametrize("role", ["leader", "follower"])
async def test_watch_survives_losing_the_member_it_reads_from(
    cluster: EtcdCluster, role: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's channel uses the first endpoint (pick_first): that member is made the
    leader or a follower, then SIGKILLed between two changes."""
    first = cluster.members[0]
    await make_leader(cluster, first if role == "leader" else cluster.members[1])
    async with control_plane(",".join(cluster.endpoints)) as running:
        store = running.store
        await write(store, SessionUpsert(record("s0")), SessionUpsert(record("s1")))
        async with grpc.aio.insecure_channel(running.address) as channel:
            watcher = Watcher(channel)
            async with contextlib.aclosing(watcher.events):
                assert sorted(e.session_id or "" for e in await watcher.until_synced()) == [
                    "s0",
                    "s1",
                ]
                await write(store, update("s0", 1))
                await watcher.expect(PUT, "s0", 1)

                assert first.process is not None
                first.process.kill()  # SIGKILL
                await asyncio.to_thread(first.process.wait)

                await write(store, update("s0", 2))
                await write(store, SessionUpsert(record("s2")))
                await delete(store, "s1")
                await write(store, update("s2", 1))
                await watcher.expect(PUT, "s0", 2)
                await watcher.expect(PUT, "s2")
                await watcher.expect(DELETE, "s1")
                await watcher.expect(PUT, "s2", 1)
    # The store's watch did break and was opened again (through another member).
    assert "etcd watch broken" in caplog.text
    assert "etcd watch open again" in caplog.text


class Gate(Relay):
    """A relay that can also refuse new connections: etcd unreachable, not just a blip."""

    open = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        await super()._accept(reader, writer)


async def test_watch_resynchronises_after_a_compaction_while_cut_off(
    cluster: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The control plane reaches the three members through gates; with the gates shut,
    another writer changes, creates and deletes sessions and etcd compacts its history. Once
    the gates open, the watch cannot resume from its revision: it sends the sessions as they
    are, the one deleted meanwhile as DELETE, SYNCED, and then follows changes again."""
    async with contextlib.AsyncExitStack() as stack:
        gates: list[Gate] = []
        for member in cluster.members:
            host, port = member.endpoint.rsplit(":", 1)
            gate = Gate(host, int(port))
            await stack.enter_async_context(gate)
            gates.append(gate)
        endpoints = ",".join(f"127.0.0.1:{g.port}" for g in gates)
        running = await stack.enter_async_context(control_plane(endpoints))
        assert isinstance(running.config.store, EtcdUrl)
        prefix = running.config.store.prefix
        host, port = cluster.members[1].endpoint.rsplit(":", 1)
        other = await EtcdSessionStore.open(
            EtcdStoreConfig(endpoints=((host, int(port)),), prefix=prefix)
        )
        stack.push_async_callback(other.aclose)
        etcd = aetcd.Client(host=host, port=int(port))
        stack.push_async_callback(etcd.close)

        await write(running.store, *(SessionUpsert(record(f"s{i}")) for i in range(4)))
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(running.address))
        watcher = Watcher(channel)
        await stack.enter_async_context(contextlib.aclosing(watcher.events))
        assert len(await watcher.until_synced()) == 4
        await write(running.store, update("s0", 1))
        await watcher.expect(PUT, "s0", 1)

        for gate in gates:
            gate.open = False
            gate.cut()
        await write(other, update("s0", 2), update("s1", 1), SessionUpsert(record("s4")))
        assert await other.delete(session_id=SessionId("s2")) is not None
        await etcd.connect()
        now = await etcd.kvstub.Range(aetcd.rpc.RangeRequest(key=b"/", limit=1))
        await etcd.compact(int(now.header.revision), physical=True)
        for gate in gates:
            gate.open = True

        resync = await watcher.until_synced()
        puts = [e for e in resync if e.type is PUT]
        assert [e.session_id for e in puts] == ["s0", "s1", "s3", "s4"]
        assert shown(resync[len(puts) :]) == [(DELETE, "s2", 0)]
        assert shown(puts)[0] == (PUT, "s0", 2)
        assert shown(puts)[1] == (PUT, "s1", 1)
        # The same stream goes on with changes.
        await write(running.store, update("s3", 1))
        await watcher.expect(PUT, "s3", 1)
    assert "is compacted" in caplog.text


async def test_watch_catches_up_on_more_than_a_grpc_message_of_changes(
    cluster: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Cut off while 30 sessions with 300 KB bodies are written (9 MB of history, which etcd
    sends a reopened watch in one batch unless it fragments it), the watch catches up on all
    of them in order, without a resync."""
    host, port = cluster.members[0].endpoint.rsplit(":", 1)
    async with contextlib.AsyncExitStack() as stack:
        gate = Gate(host, int(port))
        await stack.enter_async_context(gate)
        running = await stack.enter_async_context(control_plane(f"127.0.0.1:{gate.port}"))
        assert isinstance(running.config.store, EtcdUrl)
        other = await EtcdSessionStore.open(
            EtcdStoreConfig(endpoints=((host, int(port)),), prefix=running.config.store.prefix)
        )
        stack.push_async_callback(other.aclose)
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(running.address))
        watcher = Watcher(channel)
        await stack.enter_async_context(contextlib.aclosing(watcher.events))
        assert await watcher.until_synced() == []

        gate.open = False
        gate.cut()
        body = b"x" * 300_000
        ids = [f"big{i:02d}" for i in range(30)]
        for sid in ids:
            big = dataclasses.replace(record(sid), initialize_request=body)
            await write(other, SessionUpsert(big))
        gate.open = True
        for sid in ids:
            await watcher.expect(PUT, sid)
    assert "etcd watch open again" in caplog.text
    assert "is compacted" not in caplog.text


async def test_a_key_that_holds_no_record_is_logged_and_skipped(
    etcd_cluster: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Something else written under the sessions prefix (by hand, by another program) breaks
    neither listings nor watches of the other sessions: it is skipped with a log line."""
    host, port = etcd_cluster.endpoints[0].rsplit(":", 1)
    prefix = f"/bad-{uuid.uuid4().hex[:8]}"
    store = await EtcdSessionStore.open(
        EtcdStoreConfig(endpoints=((host, int(port)),), prefix=prefix)
    )
    etcd = aetcd.Client(host=host, port=int(port))
    try:
        await write(store, SessionUpsert(record("s1")))
        await etcd.put(f"{prefix}/sessions/junk".encode(), b"not json")
        assert [r.session_id for r in (await store.list_page()).sessions] == ["s1"]
        async with contextlib.aclosing(store.watch()) as events:
            async with asyncio.timeout(DEADLINE):
                assert (await anext(events)).session_id == "s1"
                assert (await anext(events)).type is SYNCED
                await etcd.put(f"{prefix}/sessions/junk2".encode(), b"\xff")
                await etcd.delete(f"{prefix}/sessions/junk".encode())
                await write(store, update("s1", 1))
                ev = await anext(events)
        assert (ev.type, ev.session_id) == (PUT, "s1")
        assert "sessions/junk' holds no session record" in caplog.text
        assert "sessions/junk2' holds no session record" in caplog.text
    finally:
        await etcd.close()
        await store.aclose()
