"""Session ownership while clients move between live sidecars (issue #10).

In-process sidecars on port 0, the numbered upstream, and a real control plane over SQLite.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web

from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.server import RunningControlPlane, start_control_plane
from sidecar.app import RunningSidecar
from sidecar.guard import fingerprint
from sidecar.tracker import EventId
from tests.integration.conftest import SidecarFactory
from tests.integration.test_proxy import HEADERS, MCP, count_call, final_results, initialize
from tests.integration.test_proxy import progress_numbers as progress
from tests.support.numbered_upstream import STATE, make_app
from tests.support.relay import Relay
from tests.support.sse_client import Received, events
from tests.support.waiting import eventually
from tether.api.client import SessionClient
from tether.model import OwnerName, SessionId, SessionRecord, StreamId, StreamPosition

pytestmark = pytest.mark.slow


TTL = 1.0
"""The short session TTL of the lease tests (seconds). A sidecar renews every TTL/3, so a
session it serves expires only if renewals stop for two intervals; 1 s is also the TTL of the
ownership protocol test (tests/protocol), which checks the same lease on every step."""


@asynccontextmanager
async def running_control_plane(
    tmp_path: Path, *, session_ttl: float = 3600.0
) -> AsyncIterator[RunningControlPlane]:
    running = await start_control_plane(
        ControlPlaneConfig(
            listen="127.0.0.1:0",
            store=SqliteUrl(tmp_path / "sessions.db"),
            session_ttl=session_ttl,
        )
    )
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    async with running_control_plane(tmp_path) as running:
        yield running


@pytest.fixture
async def short_ttl_control_plane(tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    async with running_control_plane(tmp_path, session_ttl=TTL) as running:
        yield running


@asynccontextmanager
async def single_get_upstream(**flags: Any) -> AsyncIterator[tuple[str, dict[str, int]]]:
    """The numbered upstream allowing one GET stream per session, as the SDK server does;
    yields its URL and its live count of open GET streams per session. Handlers are cancelled
    when their client goes away, so a closed stream is seen at once."""
    app = make_app(single_get_stream=True, **flags)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app[STATE].get_streams
    finally:
        await runner.cleanup()


async def watching(sidecar: RunningSidecar) -> None:
    """Wait until the sidecar follows its sessions' ownership (nothing to wait for in a
    sidecar that has no such watch)."""
    synced: asyncio.Event | None = getattr(sidecar.proxy.continuity, "watch_synced", None)
    if synced is not None:
        await asyncio.wait_for(synced.wait(), 10)


async def stored(control_plane: RunningControlPlane, sid: str) -> SessionRecord | None:
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        return await SessionClient(channel).get_session(SessionId(sid))


async def persisted(cp: RunningControlPlane, sid: str, event_id: str) -> bool:
    """Does the stored record hold the stream of `event_id` at that position or later?"""
    parsed = EventId.parse(event_id)
    record = await stored(cp, sid)
    assert parsed is not None
    if record is None or parsed.stream not in record.streams:
        return False
    return record.streams[parsed.stream].order >= parsed.order


async def test_client_switching_between_two_live_sidecars_every_20_events(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """A→B→A→B... every 20 events, for 600 events: a sidecar claiming a session it once lost
    starts clean and reports again. Every event arrives exactly once, in order, and the stored
    record is the client's last position, owned by the last sidecar.

    The upstream sends the whole stream at once, so each sidecar's pump has read it all (and
    has nothing more to report) before the client comes back: only being told, or noticing
    the client's newer epoch, shows a sidecar that its copy is stale. The client waits for
    its position to be stored before each hop (resuming from the id alone, before the
    position is stored, is another matter)."""
    n = 599  # 599 progress notifications and the result: 600 events
    async with numbered_upstream() as up:
        a = await sidecar_factory(up, control_plane=control_plane.address, owner="a")
        b = await sidecar_factory(up, control_plane=control_plane.address, owner="b")
        sidecars: list[RunningSidecar] = [a, b]
        sid = await initialize(http, f"http://127.0.0.1:{a.port}")
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        assert a.proxy.continuity.reporter is not None
        await a.proxy.continuity.reporter.flushed()
        got: list[Received] = []
        hops = 0
        async with http.post(
            f"http://127.0.0.1:{a.port}{MCP}", json=count_call(n, interval_ms=0), headers=headers
        ) as resp:
            assert resp.status == 200
            async for ev in events(resp):
                got.append(ev)
                if len(got) == 20:
                    break
        while len(got) < n + 1:
            last = got[-1].id
            assert last is not None
            await eventually(
                functools.partial(persisted, control_plane, sid, last),
                timeout=10,
                what=f"{last} stored",
            )
            hops += 1
            here = sidecars[hops % 2]
            async with http.get(
                f"http://127.0.0.1:{here.port}{MCP}",
                headers={**headers, "Accept": "text/event-stream", "Last-Event-ID": last},
            ) as resp:
                assert resp.status == 200, f"hop {hops}: {resp.status} {await resp.text()}"
                before = len(got)
                async for ev in events(resp):
                    got.append(ev)
                    if len(got) - before == 20:
                        break
                assert len(got) > before, f"hop {hops}: the stream ended with nothing"
        last_sidecar = sidecars[hops % 2]
        assert progress(got) == list(range(1, n + 1))
        assert len(final_results(got)) == 1
        ids = [EventId.parse(e.id or "") for e in got]
        assert all(i is not None for i in ids)
        assert len({str(i) for i in ids}) == len(ids)
        final = ids[-1]
        assert final is not None
        reporter = last_sidecar.proxy.continuity.reporter
        assert reporter is not None
        await reporter.flushed()
        record = await stored(control_plane, sid)
        assert record is not None
        (sess,) = last_sidecar.proxy.registry.sessions.values()
        expected = SessionRecord(
            session_id=SessionId(sid),
            upstream_session_id=sid,
            upstream_address=up,
            owner=OwnerName(last_sidecar.proxy.continuity.owner),
            owner_epoch=hops + 1,
            protocol_version="2025-11-25",
            initialize_request=sess.initialize_request or b"",
            credential_fingerprint=fingerprint(None, key=None),
            streams={
                StreamId(final.stream): StreamPosition(
                    stream_id=StreamId(final.stream),
                    last_event_id=str(final),
                    upstream_event_id=final.upstream,
                    seq=final.seq,
                    owner_epoch=final.epoch,
                )
            },
        )
        assert final.epoch == hops + 1
        assert record == dataclasses.replace(
            expected,
            created_at=record.created_at,
            updated_at=record.updated_at,
            expires_at=record.expires_at,
        )


async def test_a_quiet_session_with_a_client_attached_outlives_the_ttl(
    short_ttl_control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """Ownership is a lease the serving sidecar renews: a GET stream open and quiet for three
    TTLs keeps its session (same owner, same epoch); once the sidecar stops, the session
    expires after the TTL."""
    cp = short_ttl_control_plane
    async with numbered_upstream(interval_ms=600_000) as up:  # the GET stream stays quiet
        a = await sidecar_factory(up, control_plane=cp.address, owner="a")
        sid = await initialize(http, f"http://127.0.0.1:{a.port}")
        headers = {**HEADERS, "Mcp-Session-Id": sid, "Accept": "text/event-stream"}
        created = await eventually(lambda: stored(cp, sid), timeout=10, what="the session stored")
        assert created is not None
        async with http.get(f"http://127.0.0.1:{a.port}{MCP}", headers=headers) as resp:
            assert resp.status == 200
            await asyncio.sleep(3 * TTL)  # the scenario: quiet for three TTLs
            record = await stored(cp, sid)
            assert record is not None, "the session expired while its client was attached"
            assert (record.owner, record.owner_epoch) == ("a", created.owner_epoch)
            assert record.expires_at > created.expires_at
        await sidecar_factory.stop_all()
        await eventually(
            lambda: _gone(cp, sid), timeout=3 * TTL, what="the unrenewed session expired"
        )


async def _gone(cp: RunningControlPlane, sid: str) -> bool:
    return await stored(cp, sid) is None


async def test_a_takeover_is_pushed_to_the_old_owner(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Sidecar A serves an idle standalone GET stream; B claims the session on a client's
    request. A learns it at once (not on its next report, which never comes): its client
    stream ends with the taken-over comment, its upstream GET stream closes, and B can open
    the upstream's only GET stream."""
    async with single_get_upstream(interval_ms=600_000) as (up, get_streams):
        a = await sidecar_factory(up, control_plane=control_plane.address, owner="a")
        b = await sidecar_factory(up, control_plane=control_plane.address, owner="b")
        await watching(a)
        sid = await initialize(http, f"http://127.0.0.1:{a.port}")
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        sse = {**headers, "Accept": "text/event-stream"}
        await eventually(lambda: stored(control_plane, sid), timeout=10, what="session stored")
        async with http.get(f"http://127.0.0.1:{a.port}{MCP}", headers=sse) as on_a:
            assert on_a.status == 200
            await eventually(lambda: get_streams.get(sid) == 1, timeout=10, what="A's GET")
            ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
            async with http.post(
                f"http://127.0.0.1:{b.port}{MCP}", json=ping, headers=headers
            ) as resp:
                assert resp.status == 200, await resp.text()
            record = await stored(control_plane, sid)
            assert record is not None
            assert (record.owner, record.owner_epoch) == ("b", 2)
            try:
                async with asyncio.timeout(5):
                    rest = await on_a.content.read()
            except TimeoutError:
                pytest.fail("A's GET stream stayed open after B claimed the session")
        assert b": tether: stream ended: session taken over by another sidecar" in rest
        await eventually(
            lambda: not get_streams.get(sid), timeout=5, what="A's upstream GET stream closed"
        )
        async with http.get(f"http://127.0.0.1:{b.port}{MCP}", headers=sse) as on_b:
            assert on_b.status == 200, await on_b.text()
            await eventually(lambda: get_streams.get(sid) == 1, timeout=10, what="B's GET")


async def test_a_move_right_after_initialize_waits_for_the_session_to_be_stored(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """Continuity invariant 11: A's path to the control plane is slow to come up, so the
    session it made is not stored yet when the client, its first event from A in hand,
    resumes on B. B looks again until the session is stored, adopts it, and the client gets
    every event exactly once (not 410 "a stream this sidecar does not know")."""
    n = 30
    host, _, port = control_plane.address.rpartition(":")
    path_up = asyncio.Event()
    async with (
        numbered_upstream(interval_ms=20) as up,
        Relay(host, int(port), opened=path_up) as slow_path,
    ):
        a = await sidecar_factory(up, control_plane=f"127.0.0.1:{slow_path.port}", owner="a")
        b = await sidecar_factory(up, control_plane=control_plane.address, owner="b")
        sid = await initialize(http, f"http://127.0.0.1:{a.port}")
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        got: list[Received] = []
        async with http.post(
            f"http://127.0.0.1:{a.port}{MCP}", json=count_call(n), headers=headers
        ) as resp:
            async for ev in events(resp):
                got.append(ev)
                break
        assert await stored(control_plane, sid) is None  # A could not report it yet
        asyncio.get_running_loop().call_later(0.5, path_up.set)
        resume = {**headers, "Accept": "text/event-stream", "Last-Event-ID": got[-1].id or ""}
        async with http.get(f"http://127.0.0.1:{b.port}{MCP}", headers=resume) as on_b:
            assert on_b.status == 200, await on_b.text()
            got += [ev async for ev in events(on_b)]
    assert progress(got) == list(range(1, n + 1))
    assert len(final_results(got)) == 1
    record = await stored(control_plane, sid)
    assert record is not None
    assert record.owner == "b"


async def test_a_resumed_stream_first_repeats_the_clients_own_id(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """StreamCore rule 7: on this sidecar and on another, a resumed stream starts with an
    empty event carrying the id the client resumed from (the TypeScript SDK forgets its id
    when a resumed stream ends before an id-bearing event), then goes on exactly once."""
    n = 10
    async with numbered_upstream(interval_ms=20) as up:
        a = await sidecar_factory(up, control_plane=control_plane.address, owner="a")
        b = await sidecar_factory(up, control_plane=control_plane.address, owner="b")
        sid = await initialize(http, f"http://127.0.0.1:{a.port}")
        headers = {**HEADERS, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
        got: list[Received] = []
        async with http.post(
            f"http://127.0.0.1:{a.port}{MCP}", json=count_call(n), headers=headers
        ) as resp:
            async for ev in events(resp):
                got.append(ev)
                break
        for sidecar in (a, b):  # the same sidecar, then another one
            last = got[-1].id or ""
            resume = {**headers, "Accept": "text/event-stream", "Last-Event-ID": last}
            async with http.get(f"http://127.0.0.1:{sidecar.port}{MCP}", headers=resume) as r:
                assert r.status == 200, await r.text()
                stream = events(r, include_priming=True)
                first = await anext(stream)
                assert (first.id, first.data) == (last, "")
                async for ev in stream:
                    got.append(ev)
                    if sidecar is a:
                        break
    assert progress(got) == list(range(1, n + 1))
    assert len(final_results(got)) == 1


async def test_a_session_deleted_in_the_control_plane_ends_where_it_is_served(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Continuity invariant 13: an operator deletes a session (`tether sessions delete`)
    while its client holds a GET stream on A. A ends the stream at once ("session deleted"),
    closes its upstream stream, does not bring the session back with its renewals, and the
    client's next request gets 404 (so it starts a new session)."""
    async with single_get_upstream(interval_ms=600_000) as (up, get_streams):
        a = await sidecar_factory(
            up, control_plane=control_plane.address, owner="a", renew_interval=0.2
        )
        await watching(a)
        sid = await initialize(http, f"http://127.0.0.1:{a.port}")
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        sse = {**headers, "Accept": "text/event-stream"}
        await eventually(lambda: stored(control_plane, sid), timeout=10, what="session stored")
        async with http.get(f"http://127.0.0.1:{a.port}{MCP}", headers=sse) as on_a:
            assert on_a.status == 200
            await eventually(lambda: get_streams.get(sid) == 1, timeout=10, what="A's GET")
            async with grpc.aio.insecure_channel(control_plane.address) as channel:
                await SessionClient(channel).delete_session(SessionId(sid), timeout=5)
            try:
                async with asyncio.timeout(5):
                    rest = await on_a.content.read()
            except TimeoutError:
                pytest.fail("A's GET stream stayed open after the session was deleted")
        assert b": tether: stream ended: session deleted" in rest
        await eventually(
            lambda: not get_streams.get(sid), timeout=5, what="A's upstream GET stream closed"
        )
        await asyncio.sleep(1.0)  # five renewal intervals
        assert await stored(control_plane, sid) is None
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        async with http.post(f"http://127.0.0.1:{a.port}{MCP}", json=ping, headers=headers) as r:
            assert r.status == 404, await r.text()
