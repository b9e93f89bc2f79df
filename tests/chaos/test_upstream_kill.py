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
from tests.support.procs import ProcessPool, free_port, python_module

pytestmark = [pytest.mark.slow, pytest.mark.timeout(30)]


async def test_upstream_killed_and_restarted_with_event_store(
    procs: ProcessPool,
    sidecar_factory: SidecarFactory,
    control_plane: RunningControlPlane,
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
    assert sidecar.proxy.metrics.reconnects._value.get() >= 1
    chaos_table.add(
        ChaosRow.of(
            "upstream SIGKILL+restart, event store", got, client.first_arrival_after(healed)
        )
    )


async def test_upstream_killed_without_event_store(
    procs: ProcessPool,
    sidecar_factory: SidecarFactory,
    control_plane: RunningControlPlane,
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
        client = StreamConsumer()
        events_before = int(metrics.events_in._value.get())
        client.start(
            lambda: http.post(base + MCP, json=count_call(100, interval_ms=5), headers=headers)
        )
        try:
            await client.wait_count(10)
            upstream.kill()
            await client.finished()
            sent_before_death = int(metrics.events_in._value.get()) - events_before
            await upstream.wait_exit()
            await upstream.start(ready_port=port)
            healed = time.monotonic()
            first = list(client.received)
            # The session goes on: the next request on it is served in full.
            client.start(
                lambda: http.post(
                    base + MCP, json=count_call(5, interval_ms=1, rid=8), headers=headers
                )
            )
            await client.finished()
        finally:
            await client.aclose()
        second = client.received[len(first) :]

        progress = progress_of(first)
        assert progress == list(range(1, len(progress) + 1)), "gap or repeat before the error"
        assert len(progress) == sent_before_death, "an event the sidecar read did not reach"
        (error,) = results_of(first)
        assert error["id"] == 7
        assert "no event id" in error["error"]["message"]
        assert first[-1].json() == error, "the error is not the stream's last event"
        assert_sidecar_ids_in_order(first)
        assert_exactly_once(second, n=5)
        for part in (first, second):
            last = EventId.parse(part[-1].id or "")
            assert last is not None
            await poll_persisted(control_plane.address, sid, last, watcher=watcher)
        watcher.assert_never_backwards()

    dups = len(progress) - len(set(progress))
    recover = client.arrival[len(first)] - healed
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


def _sdk_call(rid: int, n: int, interval_ms: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "tools/call",
        "params": {
            "name": "count",
            "arguments": {"n": n, "interval_ms": interval_ms},
            "_meta": {"progressToken": f"tok-{rid}"},
        },
    }


async def test_sdk_server_without_event_store_killed_mid_stream(
    procs: ProcessPool,
    sidecar_factory: SidecarFactory,
    control_plane: RunningControlPlane,
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
        client = StreamConsumer()
        # The SDK answers every request as SSE: count only this stream's events.
        events_before = int(metrics.events_in._value.get())
        client.start(lambda: http.post(base + MCP, json=_sdk_call(7, 60, 20), headers=headers))
        try:
            await client.wait_count(10)
            server.kill()
            await client.finished()
            sent_before_death = int(metrics.events_in._value.get()) - events_before
            await server.wait_exit()
            await server.start(ready_port=port)
            healed = time.monotonic()
            first = list(client.received)
            client.start(lambda: http.post(base + MCP, json=_sdk_call(8, 5, 5), headers=headers))
            await client.finished()
        finally:
            await client.aclose()
        second = client.received[len(first) :]

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
        assert metrics.reinitializations._value.get() >= 1
        for part in (first, second):
            last = EventId.parse(part[-1].id or "")
            assert last is not None
            await poll_persisted(control_plane.address, sid, last, watcher=watcher)
        watcher.assert_never_backwards()

    d = delivery(first, sent=sent_before_death + 1)
    chaos_table.add(
        ChaosRow(
            "SDK server SIGKILL+restart, no event store",
            sent_before_death,
            len(progress),
            d.lost,
            d.duplicated,
            client.arrival[len(first)] - healed,
            note="open request gets an error; session re-initialized",
        )
    )
