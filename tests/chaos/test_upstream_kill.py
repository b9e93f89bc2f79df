"""SIGKILL of the upstream MCP server mid-stream, then a restart on the same port.

With an event store (the numbered upstream regenerates any stream from its ids) the client
gets every event exactly once, in order, on the connection it already has. Without one,
exactly-once cannot hold across the server's death for the open request: Tether promises no
duplicates, order, a JSON-RPC error for that request, and a session that goes on.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from controlplane.server import RunningControlPlane
from sidecar.tracker import EventId
from tests.integration.conftest import SidecarFactory
from tests.integration.test_proxy import HEADERS, MCP, count_call, initialize
from tests.support.chaos import (
    ChaosRow,
    ChaosTable,
    PositionWatcher,
    StreamConsumer,
    assert_delivered_and_persisted,
    assert_exactly_once,
    assert_sidecar_ids_in_order,
    delivery,
    poll_persisted,
    progress_of,
    results_of,
    start_count_stream,
)
from tests.support.metrics import counter_value
from tests.support.procs import ManagedProcess, ProcessPool, free_port, python_module
from tests.support.sse_client import Received

pytestmark = [pytest.mark.slow, pytest.mark.timeout(30)]


async def _kill_mid_request_then_call_again(
    http: aiohttp.ClientSession,
    url: str,
    *,
    headers: dict[str, str],
    server: ManagedProcess,
    port: int,
    metrics: Any,
    first_call: dict[str, Any],
    second_call: dict[str, Any],
) -> tuple[list[Received], list[Received], int, float]:
    """Send `first_call`, SIGKILL `server` after 10 of its events, restart it on `port`, then
    send `second_call` on the same session. Returns each call's events, how many events the
    sidecar read from the upstream for the first one, and the seconds from the server
    listening again to the second call's first event (recover_s)."""
    client = StreamConsumer()
    # The upstream may answer other requests as SSE too: count only this stream's events.
    events_before = int(counter_value(metrics, "events_received"))
    client.start(lambda: http.post(url, json=first_call, headers=headers))
    try:
        await client.wait_count(10)
        server.kill()
        await client.finished()
        sent_before_death = int(counter_value(metrics, "events_received")) - events_before
        await server.wait_exit()
        await server.start(ready_port=port)
        healed = time.monotonic()
        first = list(client.received)
        # The session goes on: the next request on it is served in full.
        client.start(lambda: http.post(url, json=second_call, headers=headers))
        await client.finished()
    finally:
        await client.aclose()
    recover_s = client.arrival[len(first)] - healed
    return first, client.received[len(first) :], sent_before_death, recover_s


async def _assert_each_persisted(
    parts: tuple[list[Received], ...], address: str, sid: str, watcher: PositionWatcher
) -> None:
    """The store holds each call's stream at that stream's last event."""
    for part in parts:
        last = EventId.parse(part[-1].id or "")
        assert last is not None
        await poll_persisted(address, sid, last, watcher=watcher)


async def test_upstream_killed_and_restarted_with_event_store(
    control_plane: RunningControlPlane,
    procs: ProcessPool,
    sidecar_factory: SidecarFactory,
    http: aiohttp.ClientSession,
    chaos_table: ChaosTable,
) -> None:
    """recover_s: from the restarted upstream listening to the client's next event."""
    port = free_port()
    argv = python_module("tests.support.numbered_upstream", "--port", port, "--overlap", 2)
    upstream = await procs.start(argv, name="upstream", ready_port=port)
    sidecar = await sidecar_factory(
        f"http://127.0.0.1:{port}", control_plane=control_plane.address, owner="chaos"
    )
    base = f"http://127.0.0.1:{sidecar.port}"
    n = 120
    async with PositionWatcher(control_plane.address) as watcher:
        sid, _headers, client = await start_count_stream(http, base, n=n, interval_ms=5)
        try:
            await client.wait_count(40)
            upstream.kill()
            await upstream.wait_exit()
            await upstream.start(ready_port=port)
            healed = time.monotonic()
            await client.finished()
        finally:
            await client.aclose()
        got, last, _ = await assert_delivered_and_persisted(
            client, n=n, address=control_plane.address, session_id=sid, watcher=watcher
        )
        await watcher.wait_position(sid, last)
        watcher.assert_never_backwards()
    assert counter_value(sidecar.proxy.metrics, "upstream_reconnects") >= 1
    chaos_table.add(
        ChaosRow.of(
            "upstream SIGKILL+restart, event store", got, client.first_arrival_after(healed)
        )
    )


async def test_upstream_killed_without_event_store(
    control_plane: RunningControlPlane,
    procs: ProcessPool,
    sidecar_factory: SidecarFactory,
    http: aiohttp.ClientSession,
    chaos_table: ChaosTable,
) -> None:
    """The upstream's events carry no ids, so the open POST stream cannot be resumed: the
    client gets the events the upstream sent, once, in order, then a JSON-RPC error for its
    request; the next request on the same session works. recover_s: from the restarted
    upstream listening to the next request's first event."""
    port = free_port()
    argv = python_module("tests.support.numbered_upstream", "--port", port, "--no-ids")
    upstream = await procs.start(argv, name="upstream", ready_port=port)
    sidecar = await sidecar_factory(
        f"http://127.0.0.1:{port}", control_plane=control_plane.address, owner="chaos"
    )
    metrics = sidecar.proxy.metrics
    base = f"http://127.0.0.1:{sidecar.port}"
    async with PositionWatcher(control_plane.address) as watcher:
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        first, second, sent_before_death, recover = await _kill_mid_request_then_call_again(
            http,
            base + MCP,
            headers=headers,
            server=upstream,
            port=port,
            metrics=metrics,
            first_call=count_call(100, interval_ms=5),
            second_call=count_call(5, interval_ms=1, rid=8),
        )

        progress = progress_of(first)
        assert progress == list(range(1, len(progress) + 1)), "gap or repeat before the error"
        assert len(progress) == sent_before_death, "an event the sidecar read did not reach"
        (error,) = results_of(first)
        assert error["id"] == 7
        assert "no event id" in error["error"]["message"]
        assert first[-1].json() == error, "the error is not the stream's last event"
        assert_sidecar_ids_in_order(first)
        assert_exactly_once(second, n=5)
        await _assert_each_persisted((first, second), control_plane.address, sid, watcher)
        watcher.assert_never_backwards()

    dups = len(progress) - len(set(progress))
    chaos_table.add(
        ChaosRow(
            "upstream SIGKILL+restart, no event store",
            sent_before_death,
            len(progress),
            sent_before_death - len(set(progress)),
            dups,
            recover,
            note="open request gets a JSON-RPC error",
        )
    )


async def test_sdk_server_without_event_store_killed_mid_stream(
    control_plane: RunningControlPlane,
    procs: ProcessPool,
    sidecar_factory: SidecarFactory,
    http: aiohttp.ClientSession,
    chaos_table: ChaosTable,
) -> None:
    """The official SDK server without event store dies mid-stream and comes back having
    forgotten the session: the open request gets a JSON-RPC error, the next one is served on
    the same client session (the sidecar re-initializes it upstream). recover_s: from the
    restarted server listening to the next request's first event."""
    port = free_port()
    server = await procs.start(
        python_module("tether.demo_server", "--port", port, "--no-event-store"),
        name="sdk-server",
        ready_port=port,
    )
    sidecar = await sidecar_factory(
        f"http://127.0.0.1:{port}", control_plane=control_plane.address, owner="chaos"
    )
    metrics = sidecar.proxy.metrics
    base = f"http://127.0.0.1:{sidecar.port}"
    async with PositionWatcher(control_plane.address) as watcher:
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with http.post(base + MCP, json=initialized, headers=headers) as resp:
            assert resp.status == 202, await resp.text()
        first, second, sent_before_death, recover = await _kill_mid_request_then_call_again(
            http,
            base + MCP,
            headers=headers,
            server=server,
            port=port,
            metrics=metrics,
            first_call=count_call(60, interval_ms=20, rid=7, token="tok-7"),
            second_call=count_call(5, interval_ms=5, rid=8, token="tok-8"),
        )

        progress = progress_of(first)
        assert progress == list(range(1, len(progress) + 1)), "gap or repeat before the error"
        assert len(progress) == sent_before_death
        (error,) = results_of(first)
        assert error["id"] == 7
        assert "tether:" in error["error"]["message"]
        assert_sidecar_ids_in_order(first)
        assert progress_of(second) == [1, 2, 3, 4, 5]
        (result,) = results_of(second)
        assert result["result"]["content"][0]["text"] == "counted 5"
        assert counter_value(metrics, "upstream_reinitializations") >= 1
        await _assert_each_persisted((first, second), control_plane.address, sid, watcher)
        watcher.assert_never_backwards()

    d = delivery(first, sent=sent_before_death + 1)
    chaos_table.add(
        ChaosRow(
            "SDK server SIGKILL+restart, no event store",
            sent_before_death,
            len(progress),
            d.lost,
            d.duplicated,
            recover,
            note="open request gets an error; session re-initialized",
        )
    )
