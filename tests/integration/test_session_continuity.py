"""Sessions outlive sidecars and upstream restarts: the control plane's reason to exist.

Real processes: sidecars (`tether sidecar --control-plane`), the numbered upstream, the
official SDK server; a real control plane over a SQLite file or a real etcd.
"""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx2
import mcp_types
import pytest
from mcp import Client
from mcp.client.session import IncomingMessage
from mcp.client.streamable_http import streamable_http_client

from controlplane.server import RunningControlPlane
from sidecar.tracker import EventId
from tests.integration.conftest import SidecarFactory
from tests.integration.test_proxy import HEADERS, MCP, count_call, final_results, initialize
from tests.integration.test_proxy import progress_numbers as progress
from tests.support.control_plane import control_plane_on
from tests.support.metrics import counter_value
from tests.support.procs import ManagedProcess, ProcessPool, free_port, python_module
from tests.support.sidecar_swap import (
    GetStreamBeforeKill,
    SidecarSwap,
    resumes_get_stream,
    sidecar_argv,
)
from tests.support.sse_client import Received, events
from tests.support.waiting import eventually
from tether.api.client import SessionClient
from tether.demo_server import NOTIFY_URI_PREFIX
from tether.model import SessionId

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
async def control_plane(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[RunningControlPlane]:
    async with control_plane_on(request.param, tmp_path) as running:
        yield running


async def test_new_sidecar_resumes_a_stream_after_the_old_one_is_killed(
    control_plane: RunningControlPlane, procs: ProcessPool, http: aiohttp.ClientSession
) -> None:
    """Client streams through sidecar A; A is SIGKILLed; B starts on the same address with
    the same control plane; the client reconnects with Last-Event-ID and gets every event
    exactly once, in order."""
    up_port = free_port()
    await procs.start(
        python_module("tests.support.numbered_upstream", "--port", up_port),
        name="upstream",
        ready_port=up_port,
    )
    upstream = f"http://127.0.0.1:{up_port}"
    port = free_port()
    sidecar_a = await procs.start(
        sidecar_argv(port, upstream, control_plane.address, "sidecar-a"),
        name="sidecar-a",
        ready_port=port,
    )
    base = f"http://127.0.0.1:{port}"
    sid = await initialize(http, base)
    headers = {**HEADERS, "Mcp-Session-Id": sid}
    n = 150
    got: list[Received] = []
    async with http.post(base + MCP, json=count_call(n, interval_ms=10), headers=headers) as resp:
        try:
            async for ev in events(resp):
                got.append(ev)
                if len(got) == 40:
                    sidecar_a.kill(signal.SIGKILL)
        except aiohttp.ClientPayloadError:
            pass  # the connection died with sidecar A
    assert 40 <= len(got) < n
    await sidecar_a.wait_exit()

    sidecar_b = await procs.start(
        sidecar_argv(port, upstream, control_plane.address, "sidecar-b"),
        name="sidecar-b",
        ready_port=port,
    )
    last = got[-1].id
    assert last is not None
    async with http.get(
        base + MCP,
        headers={**headers, "Accept": "text/event-stream", "Last-Event-ID": last},
    ) as resp:
        assert resp.status == 200, await resp.text()
        got += [ev async for ev in events(resp)]
    assert progress(got) == list(range(1, n + 1))
    assert len(final_results(got)) == 1
    ids = [EventId.parse(e.id or "") for e in got]
    assert all(i is not None for i in ids)
    assert len({str(i) for i in ids}) == len(ids)
    orders = [i.order for i in ids if i is not None]
    assert orders == sorted(orders)

    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        record = await SessionClient(channel).get_session(SessionId(sid))
    assert record is not None
    assert record.owner == "sidecar-b"
    assert record.owner_epoch == 2
    assert sidecar_b.running


async def test_stale_owner_is_fenced_after_a_claim(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """Sidecar B takes a session over while A still runs: A learns it at once from its
    ownership watch (it reports nothing meanwhile) and stops serving the session (a zombie
    must not write); the store keeps B as the owner."""
    async with numbered_upstream(interval_ms=2) as up:
        a = await sidecar_factory(up, control_plane=control_plane.address, owner="a")
        b = await sidecar_factory(up, control_plane=control_plane.address, owner="b")
        await asyncio.wait_for(a.proxy.continuity.watch_synced.wait(), 10)
        sid = await initialize(http, f"http://127.0.0.1:{a.port}")
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        assert a.proxy.continuity.reporter is not None
        await a.proxy.continuity.reporter.flushed()
        # B adopts the session on its first request.
        async with http.post(
            f"http://127.0.0.1:{b.port}{MCP}", json=count_call(3), headers=headers
        ) as resp:
            assert progress([e async for e in events(resp)]) == [1, 2, 3]
        assert b.proxy.continuity.adoptions == 1
        await eventually(
            lambda: sid in a.proxy.continuity.fenced_sessions, timeout=10, what="A fenced off"
        )
        assert sid not in a.proxy.registry.sessions
        await a.proxy.continuity.reporter.flushed()
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        record = await SessionClient(channel).get_session(SessionId(sid))
    assert record is not None
    assert (record.owner, record.owner_epoch) == ("b", 2)


def text_of(result: mcp_types.CallToolResult) -> str:
    assert not result.is_error, result
    [content] = result.content
    assert isinstance(content, mcp_types.TextContent)
    return content.text


async def test_upstream_restart_without_persistence_is_invisible_to_the_client(
    procs: ProcessPool, sidecar_factory: SidecarFactory
) -> None:
    """The SDK server (no event store) is SIGKILLed and restarted: it has forgotten the
    session; the sidecar re-initializes it with the stored initialize request and the SDK
    client carries on with the same session."""
    port = free_port()
    server: ManagedProcess = await procs.start(
        python_module("tether.demo_server", "--port", port, "--no-event-store"),
        name="mcp-server",
        ready_port=port,
    )
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}")
    async with Client(f"http://127.0.0.1:{sidecar.port}/mcp", mode="legacy") as client:
        assert text_of(await client.call_tool("echo", {"text": "before"})) == "before"
        (sess,) = sidecar.proxy.registry.sessions.values()
        first_upstream = sess.upstream_session_id
        await server.restart()
        assert text_of(await client.call_tool("echo", {"text": "after"})) == "after"
        got: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            got.append(progress)

        result = await client.call_tool(
            "count", {"n": 5, "interval_ms": 5}, progress_callback=on_progress
        )
        assert text_of(result) == "counted 5"
        assert got == [1.0, 2.0, 3.0, 4.0, 5.0]
        (same,) = sidecar.proxy.registry.sessions.values()
        assert same is sess
        assert sess.upstream_session_id != first_upstream
    assert counter_value(sidecar.proxy.metrics, "upstream_reinitializations") >= 1


# The Python SDK tries a GET stream twice after it breaks, `retry:` apart (its
# MAX_RECONNECTION_ATTEMPTS): B must be listening within that. It starts in about 0.5 s here.
SDK_CLIENT_RETRY_MS = 2000


@pytest.mark.parametrize("before_kill", list(GetStreamBeforeKill), ids=lambda v: v.value)
async def test_sdk_client_survives_its_sidecar_being_killed(
    control_plane: RunningControlPlane, procs: ProcessPool, before_kill: GetStreamBeforeKill
) -> None:
    """As a user would see it: the official SDK client in the middle of a tool call, its
    sidecar SIGKILLed and a new one started at the same address; the call completes with
    every progress notification exactly once, in order, and a server notification sent on the
    GET stream after the replacement arrives. (The TypeScript SDK's twin: test_ts_sdk.py.)"""
    swap = await SidecarSwap.start(
        procs, control_plane=control_plane.address, client_retry_ms=SDK_CLIENT_RETRY_MS
    )
    got: list[float] = []
    first_ten = asyncio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        got.append(progress)
        if len(got) == 10:
            first_ten.set()

    notified: list[str] = []
    arrived: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, mcp_types.ResourceUpdatedNotification):
            notified.append(message.params.uri)
            arrived[message.params.uri].set()

    # (Last-Event-ID, status) of every GET the SDK's transport made.
    gets: list[tuple[str | None, int]] = []

    async def on_response(response: httpx2.Response) -> None:
        if response.request.method == "GET":
            gets.append((response.request.headers.get("last-event-id"), response.status_code))

    async def notify(client: Client, topic: str) -> None:
        assert text_of(await client.call_tool("notify", {"topic": topic})) == f"notified {topic}"
        uri = f"{NOTIFY_URI_PREFIX}{topic}"
        await asyncio.wait_for(arrived[uri].wait(), 10)

    # The SDK's own timeouts (30 s, 300 s to read a stream), plus a hook that sees its GETs.
    timeout = httpx2.Timeout(30.0, read=300.0)
    async with (
        httpx2.AsyncClient(timeout=timeout, event_hooks={"response": [on_response]}) as http,
        Client(
            streamable_http_client(swap.url, http_client=http),
            mode="legacy",
            message_handler=on_message,
        ) as client,
    ):
        await eventually(lambda: (None, 200) in gets, timeout=20, what="the GET stream open")
        if before_kill is GetStreamBeforeKill.CARRIED_EVENTS:
            await notify(client, "before")
        call = asyncio.ensure_future(
            client.call_tool("count", {"n": 40, "interval_ms": 50}, progress_callback=on_progress)
        )
        await asyncio.wait_for(first_ten.wait(), 20)
        replaced_at = len(gets)
        await swap.replace()
        result = await asyncio.wait_for(call, 30)
        assert text_of(result) == "counted 40"
        assert got == [float(i) for i in range(1, 41)]
        # The GET stream comes back through B, resumed from its last id (see test_ts_sdk.py on
        # why a notification is sent only then).
        try:
            await eventually(
                lambda: any(
                    status == 200 and resumes_get_stream(last_id)
                    for last_id, status in gets[replaced_at:]
                ),
                timeout=15,
                what=f"the GET stream resumed through {swap.name}",
            )
        except TimeoutError as e:
            raise AssertionError(
                f"{e}; the SDK's GETs (Last-Event-ID, status): {gets}\n"
                + swap.refused_resumes_summary()
            ) from None
        # Sent now that B serves the session: it can only arrive on the GET stream through B.
        await notify(client, "after")
    topics = ["after"] if before_kill is GetStreamBeforeKill.ONLY_PRIMING else ["before", "after"]
    assert notified == [f"{NOTIFY_URI_PREFIX}{t}" for t in topics]


async def test_a_stream_is_resumed_elsewhere_from_the_clients_id_alone(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """A client that has only the first ids of a POST stream (its priming events) moves to
    another live sidecar before anything was reported: the new sidecar resumes the upstream
    from the cursor in the client's id, and the client gets every event once. The stored
    position used to be a precondition (410 for the first ~100 ms of every stream)."""
    async with numbered_upstream(interval_ms=5, priming=True) as up:
        cp = control_plane.address
        a = await sidecar_factory(up, control_plane=cp, owner="a", report_interval=30.0)
        b = await sidecar_factory(up, control_plane=cp, owner="b")
        sid = await initialize(http, f"http://127.0.0.1:{a.port}")
        assert a.proxy.continuity.reporter is not None
        await a.proxy.continuity.reporter.flushed()  # the session exists; no stream yet
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        first: list[Received] = []
        async with http.post(
            f"http://127.0.0.1:{a.port}{MCP}", json=count_call(40), headers=headers
        ) as resp:
            async for ev in events(resp, include_priming=True):
                first.append(ev)
                break  # only the very first event: the priming one
        assert [e for e in first if e.data] == []  # no message yet
        parsed = EventId.parse(first[0].id or "")
        assert parsed is not None
        assert parsed.upstream  # it already carries the upstream's cursor
        last = first[-1].id
        assert last is not None
        async with http.get(
            f"http://127.0.0.1:{b.port}{MCP}", headers={**headers, "Last-Event-ID": last}
        ) as resp:
            assert resp.status == 200, await resp.text()
            rest = [e async for e in events(resp)]
        assert progress(rest) == list(range(1, 41))
        assert len(final_results(rest)) == 1


async def test_a_get_stream_with_nothing_delivered_is_reopened_elsewhere(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """The official SDKs open the standalone GET stream and get only the sidecar's priming
    event before a move; refused with 410 twice, they gave up their GET stream for the rest of
    the session and every server notification was lost. Now it is reopened upstream."""
    async with numbered_upstream(interval_ms=20) as up:
        cp = control_plane.address
        a = await sidecar_factory(up, control_plane=cp, owner="a")
        b = await sidecar_factory(up, control_plane=cp, owner="b")
        sid = await initialize(http, f"http://127.0.0.1:{a.port}")
        assert a.proxy.continuity.reporter is not None
        await a.proxy.continuity.reporter.flushed()
        headers = {**HEADERS, "Mcp-Session-Id": sid, "Accept": "text/event-stream"}
        priming: list[Received] = []
        async with http.get(f"http://127.0.0.1:{a.port}{MCP}", headers=headers) as resp:
            async for ev in events(resp, include_priming=True):
                priming.append(ev)  # the sidecar's own priming event; then the client leaves
                break
        parsed = EventId.parse(priming[0].id or "")
        assert parsed is not None
        assert (parsed.seq, parsed.upstream) == (0, "")
        async with http.get(
            f"http://127.0.0.1:{b.port}{MCP}",
            headers={**headers, "Last-Event-ID": priming[0].id or ""},
        ) as resp:
            assert resp.status == 200, await resp.text()
            got: list[Received] = []
            async for ev in events(resp):
                got.append(ev)
                if len(got) == 3:
                    break
        ids = [EventId.parse(e.id or "") for e in got]
        assert [i.seq for i in ids if i is not None] == [1, 2, 3]
        assert all(i is not None and i.stream == parsed.stream for i in ids)


async def test_the_id_a_stream_was_taken_over_at_stays_valid_on_the_new_owner(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """A client moves to B, which takes the stream over from its id, and reconnects to B
    before any new event reached it (same id, the previous owner's epoch): it used to get 410
    (found by the ownership protocol test)."""
    async with numbered_upstream(interval_ms=20) as up:
        cp = control_plane.address
        a = await sidecar_factory(up, control_plane=cp, owner="a")
        b = await sidecar_factory(up, control_plane=cp, owner="b")
        sid = await initialize(http, f"http://127.0.0.1:{a.port}")
        headers = {**HEADERS, "Mcp-Session-Id": sid, "Accept": "text/event-stream"}
        async with http.get(f"http://127.0.0.1:{a.port}{MCP}", headers=headers) as resp:
            first = [ev async for ev in _take(events(resp), 2)]
        last = first[-1].id or ""
        resume = {**headers, "Last-Event-ID": last}
        async with http.get(f"http://127.0.0.1:{b.port}{MCP}", headers=resume) as resp:
            assert resp.status == 200, await resp.text()  # B takes over; the client leaves
        async with http.get(f"http://127.0.0.1:{b.port}{MCP}", headers=resume) as resp:
            assert resp.status == 200, await resp.text()
            rest = [ev async for ev in _take(events(resp), 3)]
        ids = [EventId.parse(e.id or "") for e in first + rest]
        assert [i.seq for i in ids if i is not None] == [1, 2, 3, 4, 5]
        assert [i.epoch for i in ids if i is not None] == [1, 1, 2, 2, 2]


async def _take(it: AsyncIterator[Received], n: int) -> AsyncIterator[Received]:
    """The first `n` items of `it`, then stop reading."""
    got = 0
    async for item in it:
        yield item
        got += 1
        if got == n:
            return
