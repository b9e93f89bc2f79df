"""Ownership probes by an outside tester (issue 10): each test but the first (a sidecar
restarted under its own name, which holds) was a defect
when written, fixed since; its failing assertion is marked "Fixed"."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.config import ControlPlaneConfig, parse_store_url
from controlplane.server import RunningControlPlane, start_control_plane
from sidecar.guard import fingerprint
from tests.integration.conftest import SidecarFactory
from tests.integration.test_ownership import (
    running_control_plane,
    single_get_upstream,
    stored,
    watching,
)
from tests.integration.test_proxy import HEADERS, MCP, count_call, initialize
from tests.integration.test_proxy import progress_numbers as progress
from tests.integration.test_ts_sdk import (
    CLIENT_RETRY_MS,
    GET_STREAM_BACK_TIMEOUT_S,
    INTERVAL_MS,
    KILL_AFTER,
    NOTIFICATION_TIMEOUT_S,
    STEP_TIMEOUT_S,
    N,
    notification_of,
    progress_of,
)
from tests.support.control_plane import control_plane_on
from tests.support.etcd import start_etcd
from tests.support.procs import ProcessPool
from tests.support.sidecar_swap import SidecarSwap, resumes_get_stream, sidecar_argv
from tests.support.sse_client import Received, events
from tests.support.ts_client import TsClientError, TsSdkClient
from tests.support.waiting import eventually

INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}

pytestmark = pytest.mark.slow


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    async with control_plane_on("sqlite", tmp_path) as running:
        yield running


async def restart_same_name(swap: SidecarSwap) -> None:
    """SIGKILL the sidecar and start it again under the same owner name: a Kubernetes
    container restart (the pod, hence $POD_NAME and its projected token's pod, stays)."""
    owner = swap.sidecar.name
    swap.sidecar.kill(signal.SIGKILL)
    await swap.sidecar.wait_exit()
    swap.generation += 1
    swap.sidecar = await swap.procs.start(
        sidecar_argv(swap.port, swap.upstream, swap.control_plane, owner, *swap.extra_flags),
        name=f"{owner}-restart{swap.generation}",
        ready_port=swap.port,
    )


async def test_ts_sdk_client_survives_its_sidecar_restarted_under_the_same_name(
    control_plane: RunningControlPlane, procs: ProcessPool, tmp_path: Path
) -> None:
    swap = await SidecarSwap.start(
        procs, control_plane=control_plane.address, client_retry_ms=CLIENT_RETRY_MS
    )
    async with TsSdkClient.running(swap.url, log_dir=tmp_path) as client:
        await client.wait_for(
            lambda r: r["event"] == "get" and r["status"] == 200,
            timeout=STEP_TIMEOUT_S,
            what="the standalone GET stream open",
        )
        client.call("before", "notify", topic="before")
        await client.wait_for(
            notification_of("before"), timeout=STEP_TIMEOUT_S, what="the first notification"
        )
        client.call("count", "count", n=N, interval_ms=INTERVAL_MS)
        await client.wait_for(
            lambda r: progress_of("count")(r) and r["progress"] == KILL_AFTER,
            timeout=STEP_TIMEOUT_S,
            what=f"progress {KILL_AFTER}",
        )
        replaced_at = len(client.events)
        await restart_same_name(swap)
        result = await client.wait_for_result("count", timeout=STEP_TIMEOUT_S)
        assert result["text"] == f"counted {N}", client.describe()
        assert [r["progress"] for r in client.matching(progress_of("count"))] == list(
            range(1, N + 1)
        ), client.describe()
        try:
            await client.wait_for(
                lambda r: (
                    r["event"] == "get"
                    and r["status"] == 200
                    and resumes_get_stream(r["last_event_id"])
                ),
                since=replaced_at,
                timeout=GET_STREAM_BACK_TIMEOUT_S,
                what="the GET stream resumed through the restarted sidecar",
            )
        except TsClientError as e:
            raise AssertionError(f"{e}\n{swap.refused_resumes_summary()}") from None
        client.call("after", "notify", topic="after")
        await client.wait_for_result("after", timeout=STEP_TIMEOUT_S)
        await client.wait_for(
            notification_of("after"),
            timeout=NOTIFICATION_TIMEOUT_S,
            what="the notification sent on the GET stream after the restart",
        )


async def test_a_request_with_the_wrong_credential_does_not_take_the_session_over(
    tmp_path: Path,
    sidecar_factory: SidecarFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Alice's session lives on sidecar A, her GET stream open there. Mallory knows the
    session id (not Alice's credential) and sends a request naming it to sidecar B. B answers
    404 (the credential does not match), but only after claiming the session: the store moves
    it to B, and A ends Alice's stream ("taken over"). Any caller knowing a session id can, with
    no credential at all, move it and cut its client's streams, as often as it likes. The
    stored record holds the fingerprint, so B can refuse before claiming."""
    async with (
        running_control_plane(tmp_path) as cp,
        single_get_upstream(interval_ms=600_000) as (up, _),
    ):
        a = await sidecar_factory(up, control_plane=cp.address, owner="a")
        b = await sidecar_factory(up, control_plane=cp.address, owner="b")
        await watching(a)
        alice = {**HEADERS, "Authorization": "Bearer alice-secret"}
        async with http.post(f"http://127.0.0.1:{a.port}{MCP}", json=INIT, headers=alice) as r:
            assert r.status == 200
            sid = r.headers["Mcp-Session-Id"]
            await r.read()
        await eventually(lambda: stored(cp, sid), timeout=10, what="the session stored")
        sse = {**alice, "Mcp-Session-Id": sid, "Accept": "text/event-stream"}
        async with http.get(f"http://127.0.0.1:{a.port}{MCP}", headers=sse) as on_a:
            assert on_a.status == 200
            mallory = {**HEADERS, "Authorization": "Bearer mallory", "Mcp-Session-Id": sid}
            ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
            statuses = []
            for headers in (mallory, {k: v for k, v in mallory.items() if k != "Authorization"}):
                async with http.post(
                    f"http://127.0.0.1:{b.port}{MCP}", json=ping, headers=headers
                ) as resp:
                    statuses.append(resp.status)
            assert statuses == [404, 404]
            record = await stored(cp, sid)
            assert record is not None
            ended = b""
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    ended = await on_a.content.read()
        # Fixed: B claimed the session for requests it refused, and A cut Alice's stream.
        cut = b"taken over" in ended
        assert ((record.owner, record.owner_epoch), cut) == (("a", 1), False), (
            f"refused requests moved the session to {record.owner!r} "
            f"(epoch {record.owner_epoch}); Alice's stream on A got {ended[-120:]!r}"
        )


async def test_a_session_not_stored_yet_is_not_recreated_blank_by_another_sidecar(
    tmp_path: Path,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """Alice initializes through A and at once opens her GET stream, which the Service sends
    to B (the TypeScript SDK opens it right after `initialize`; a client without keep-alive
    lands on the other pod). A has not reported the session yet (it reports every
    `report_interval` after its last batch; 1 s here, after a first session, to make the
    window certain; 50 ms by default). B finds
    nothing stored, serves the stream anyway without a claim, and reports the session as its
    own at epoch 1 with no `initialize` body: two owners write at epoch 1 (invariant I6).
    Whichever upsert lands first wins. Mostly B's (its reporter is idle): A's upsert is then
    refused (rule 7: FENCED), A drops the session it created, and the stored record has lost
    its `initialize` (no re-initialization after an upstream restart). When A's wins, B
    remembers the session as unknown for `UNKNOWN_SESSION_TTL` and meanwhile forwards any
    credential's request for it unchecked (Mallory's ping: 200; see
    test_the_credential_binding_holds_while_the_control_plane_is_down)."""
    async with running_control_plane(tmp_path) as cp, numbered_upstream() as up:
        a = await sidecar_factory(up, control_plane=cp.address, owner="a", report_interval=1.0)
        b = await sidecar_factory(up, control_plane=cp.address, owner="b")
        await initialize(http, f"http://127.0.0.1:{a.port}")  # A's reporter sent a batch
        alice = {**HEADERS, "Authorization": "Bearer alice-secret"}
        async with http.post(f"http://127.0.0.1:{a.port}{MCP}", json=INIT, headers=alice) as r:
            assert r.status == 200
            sid = r.headers["Mcp-Session-Id"]
            await r.read()
        sse = {**alice, "Mcp-Session-Id": sid, "Accept": "text/event-stream"}
        async with http.get(f"http://127.0.0.1:{b.port}{MCP}", headers=sse) as on_b:
            get_status = on_b.status
        for s in (a, b):
            reporter = s.proxy.continuity.reporter
            assert reporter is not None
            await asyncio.wait_for(reporter.flushed(), 10)
        record = await stored(cp, sid)
        assert record is not None
        mallory = {**HEADERS, "Authorization": "Bearer mallory", "Mcp-Session-Id": sid}
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        async with http.post(f"http://127.0.0.1:{b.port}{MCP}", json=ping, headers=mallory) as r:
            mallory_status = r.status
        await sidecar_factory.stop_all()
    got = (
        record.owner_epoch > 1 or record.owner == "a",
        bool(record.initialize_request),
        record.credential_fingerprint == fingerprint("Bearer alice-secret", key=None),
        mallory_status,
    )
    # Fixed: B created the session at epoch 1 without its `initialize` (A fenced off), or
    # B served Mallory.
    assert got == (True, True, True, 404), (
        f"GET on B: {get_status}; stored: owner {record.owner!r} epoch {record.owner_epoch}, "
        f"initialize kept {got[1]}, Alice's fingerprint kept {got[2]}; "
        f"Mallory's ping on B: {mallory_status}"
    )


async def test_a_call_moved_before_its_session_is_stored_is_resumed(
    tmp_path: Path,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """A client starts a call through A right after `initialize`; its connection breaks after
    three events and it resumes (Last-Event-ID, which carries the upstream cursor) on B
    before A has reported the session (A reports every `report_interval` after its last
    batch: 1 s here, after a first session, to make the window certain; 50 ms by default,
    which a client moving within its first events hits). B answers 410 "names a stream this
    sidecar does not know", and remembers the session as unknown for `UNKNOWN_SESSION_TTL`,
    so the client's retries there are refused too, even once A has stored it. Each client
    resume is retried a few times, as the SDKs do, until the session is stored."""
    async with running_control_plane(tmp_path) as cp, numbered_upstream() as up:
        a = await sidecar_factory(up, control_plane=cp.address, owner="a", report_interval=1.0)
        b = await sidecar_factory(up, control_plane=cp.address, owner="b")
        await initialize(http, f"http://127.0.0.1:{a.port}")  # A's reporter sent a batch
        sid = await initialize(http, f"http://127.0.0.1:{a.port}")
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        got: list[Received] = []
        async with http.post(
            f"http://127.0.0.1:{a.port}{MCP}", json=count_call(30, interval_ms=20), headers=headers
        ) as resp:
            async for ev in events(resp):
                got.append(ev)
                if len(got) == 3:
                    break
        resume = {**headers, "Accept": "text/event-stream", "Last-Event-ID": got[-1].id or ""}
        statuses: list[int] = []
        for _ in range(3):
            async with http.get(f"http://127.0.0.1:{b.port}{MCP}", headers=resume) as resp:
                statuses.append(resp.status)
                if resp.status == 200:
                    async for ev in events(resp):
                        got.append(ev)
                    break
            reporter = a.proxy.continuity.reporter
            assert reporter is not None
            await asyncio.wait_for(reporter.flushed(), 10)
            assert await stored(cp, sid) is not None  # B may adopt it from now on
        await sidecar_factory.stop_all()
    # Fixed: 410 on the first resume, and again after A stored the session (B's cache).
    assert statuses[-1] == 200, f"resumes on B: {statuses}"
    assert progress(got) == list(range(1, 31))


async def test_the_credential_binding_holds_while_the_control_plane_is_down(
    tmp_path: Path,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """Alice's session lives on A and is stored. The control plane goes down. Mallory, who
    knows the session id but not Alice's credential, sends a request naming it to B. B cannot
    adopt the session ("unknown"), so it forwards the request as it is, with no credential
    check, into Alice's upstream session (the upstream knows it under the same id). The same
    happens while B remembers a session as unknown (`UNKNOWN_SESSION_TTL`, e.g. right after
    creation, before A reported it). A sidecar that cannot check the binding should refuse
    (503, retry) rather than fail open."""
    async with numbered_upstream(strict_sessions=True) as up:
        cp_cm = running_control_plane(tmp_path)
        cp = await cp_cm.__aenter__()
        try:
            a = await sidecar_factory(up, control_plane=cp.address, owner="a")
            b = await sidecar_factory(up, control_plane=cp.address, owner="b")
            alice = {**HEADERS, "Authorization": "Bearer alice-secret"}
            async with http.post(f"http://127.0.0.1:{a.port}{MCP}", json=INIT, headers=alice) as r:
                assert r.status == 200
                sid = r.headers["Mcp-Session-Id"]
                await r.read()
            await eventually(lambda: stored(cp, sid), timeout=10, what="the session stored")
        finally:
            await cp_cm.__aexit__(None, None, None)
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        statuses = {}
        for who, auth in (("alice on A", "Bearer alice-secret"), ("mallory on B", "Bearer x")):
            port = a.port if who.endswith("A") else b.port
            headers = {**HEADERS, "Authorization": auth, "Mcp-Session-Id": sid}
            async with http.post(f"http://127.0.0.1:{port}{MCP}", json=ping, headers=headers) as r:
                statuses[who] = r.status
                await r.read()
        await sidecar_factory.stop_all()
    assert statuses["alice on A"] == 200
    # Fixed: B forwards Mallory's request into Alice's session without checking the binding.
    assert statuses["mallory on B"] != 200, statuses


@pytest.mark.etcd
async def test_a_takeover_during_a_watch_gap_is_pushed_when_the_watch_returns(
    tmp_path: Path,
    sidecar_factory: SidecarFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Two control-plane replicas over one etcd; A talks to the first, B to the second.
    Alice's idle GET stream is on A. The first replica restarts (a rollout); meanwhile a
    request of Alice's through B claims the session. A's ownership watch comes back with a
    snapshot filtered to A's sessions, which no longer holds this one: nothing says A lost it
    (no reconciliation at SYNCED), so A keeps Alice's stream and the upstream's only GET
    stream until its next renewal is refused (`--renew-interval`, 30 s by default; 600 s
    here, so only the watch could tell). Every control-plane rollout opens this gap."""
    cluster = await asyncio.to_thread(start_etcd, tmp_path / "etcd", members=1)
    url = parse_store_url(cluster.url)
    cp1 = await start_control_plane(ControlPlaneConfig(listen="127.0.0.1:0", store=url))
    cp2 = await start_control_plane(ControlPlaneConfig(listen="127.0.0.1:0", store=url))
    try:
        async with single_get_upstream(interval_ms=600_000) as (up, get_streams):
            a = await sidecar_factory(
                up, control_plane=cp1.address, owner="a", renew_interval=600.0
            )
            b = await sidecar_factory(up, control_plane=cp2.address, owner="b")
            await watching(a)
            sid = await initialize(http, f"http://127.0.0.1:{a.port}")
            headers = {**HEADERS, "Mcp-Session-Id": sid}
            sse = {**headers, "Accept": "text/event-stream"}
            await eventually(lambda: stored(cp2, sid), timeout=10, what="session stored")
            async with http.get(f"http://127.0.0.1:{a.port}{MCP}", headers=sse) as on_a:
                assert on_a.status == 200
                await eventually(lambda: get_streams.get(sid) == 1, timeout=10, what="A's GET")
                port = cp1.port
                await cp1.stop()
                ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
                async with http.post(
                    f"http://127.0.0.1:{b.port}{MCP}", json=ping, headers=headers
                ) as resp:
                    assert resp.status == 200, await resp.text()
                record = await stored(cp2, sid)
                assert record is not None
                assert (record.owner, record.owner_epoch) == ("b", 2)
                cp1 = await start_control_plane(
                    ControlPlaneConfig(listen=f"127.0.0.1:{port}", store=url)
                )
                await watching(a)  # A's watch is back
                rest = b""
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        rest = await on_a.content.read()
            # Fixed: A never learns; Alice's stream and the upstream's GET stay with A.
            assert b"taken over by another sidecar" in rest, (
                f"A kept serving a session B owns at epoch 2 after its watch came back: "
                f"{a.proxy.continuity.takeovers} takeovers seen"
            )
            await sidecar_factory.stop_all()
    finally:
        await cp1.stop()
        await cp2.stop()
        await asyncio.to_thread(cluster.stop)
