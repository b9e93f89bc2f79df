"""Draining (`sidecar.drain`, issue #12) against a real sidecar and a real upstream on
loopback: what the preStop hook (`GET /drain` on the admin port) does to readiness, to the
responses, to the streams, and when it answers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from tests.integration.conftest import SidecarFactory, serve_app
from tests.integration.test_proxy import HEADERS, MCP, count_call, initialize
from tests.support.sse_client import parse_sse
from tests.support.waiting import eventually


async def test_drain_waits_for_the_call_in_flight_and_sends_clients_elsewhere(
    numbered_upstream: Callable[..., Any],
    sidecar_factory: SidecarFactory,
    http: aiohttp.ClientSession,
) -> None:
    async with numbered_upstream(interval_ms=20) as upstream:
        sidecar = await sidecar_factory(upstream)
        base = f"http://127.0.0.1:{sidecar.port}"
        admin = f"http://127.0.0.1:{sidecar.admin_port}"
        sid = await initialize(http, base)
        session = {**HEADERS, "Mcp-Session-Id": sid}
        async with http.get(admin + "/readyz") as ready:
            assert ready.status == 200
        # A standalone stream, and a call whose answer streams for a while.
        standalone = await http.get(base + MCP, headers={**session, "Accept": "text/event-stream"})
        assert standalone.status == 200
        call = await http.post(base + MCP, json=count_call(40, interval_ms=50), headers=session)
        assert call.status == 200
        assert call.headers.get("Connection") != "close"  # before the drain: kept alive
        first = await call.content.readuntil(b"\n\n")
        assert b"progress" in first or b"id:" in first

        drain = asyncio.ensure_future(http.get(admin + "/drain"))
        await eventually(lambda: sidecar.proxy.draining.draining, timeout=10, what="draining")
        async with http.get(admin + "/readyz") as ready:
            assert ready.status == 503
            assert (await ready.json())["status"] == "draining"
        # The standalone stream ends cleanly (the client resumes it on another pod).
        rest = await standalone.read()
        assert standalone.content.at_eof()
        assert b"progress" not in rest
        # A request arriving meanwhile is served, and told to use a new connection.
        async with http.post(base + MCP, json=count_call(3, rid=8), headers=session) as late:
            assert late.status == 200
            assert late.headers["Connection"] == "close"
            assert b'"result"' in await late.read()
        # The call in flight holds the drain until its answer is complete.
        assert not drain.done()
        body = first + await call.read()
        progress = [e for e in parse_sse(body) if b"progress" in e.data]
        assert len(progress) == 40
        assert b'"result"' in body
        async with await drain as answer:
            assert answer.status == 200
            assert await answer.json() == {"status": "drained", "in_flight": 0}
        # A second call (a retried hook) answers at once; readiness never comes back.
        async with http.post(admin + "/drain") as again:
            assert (await again.json())["status"] == "drained"
        async with http.get(admin + "/readyz") as ready:
            assert ready.status == 503


async def test_drain_timeout_bounds_the_wait(
    numbered_upstream: Callable[..., Any],
    sidecar_factory: SidecarFactory,
    http: aiohttp.ClientSession,
) -> None:
    async with numbered_upstream(interval_ms=20) as upstream:
        sidecar = await sidecar_factory(upstream, drain_timeout=0.3)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        session = {**HEADERS, "Mcp-Session-Id": sid}
        call = await http.post(base + MCP, json=count_call(1000, interval_ms=50), headers=session)
        await call.content.readuntil(b"\n\n")
        assert await sidecar.drain() is False  # timed out, the call still running
        assert sidecar.proxy.draining.in_flight == 1
        call.close()


async def test_drain_ends_listen_streams_instead_of_waiting_for_them(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """A 2026-07-28 `subscriptions/listen` answer never ends by itself: it does not hold the
    drain, which ends it cleanly after what the upstream sent (the client listens again, on
    another pod)."""
    test_over = asyncio.Event()

    async def listen(request: web.Request) -> web.StreamResponse:
        assert (await request.json())["method"] == "subscriptions/listen"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}\n\n')
        await test_over.wait()  # a listen stream: nothing more, ever
        return resp

    app = web.Application()
    app.router.add_post("/mcp", listen)
    async with serve_app(app) as upstream:
        sidecar = await sidecar_factory(upstream)
        base = f"http://127.0.0.1:{sidecar.port}"
        body = {"jsonrpc": "2.0", "id": 1, "method": "subscriptions/listen", "params": {}}
        stream = await http.post(
            base + MCP, json=body, headers={**HEADERS, "MCP-Protocol-Version": "2026-07-28"}
        )
        assert stream.status == 200
        first = await stream.content.readuntil(b"\n\n")
        assert b"list_changed" in first
        assert sidecar.proxy.draining.in_flight == 0  # rule 3
        assert await sidecar.drain() is True
        assert await stream.read() == b""  # ended cleanly, nothing cut in half
        assert stream.content.at_eof()
        test_over.set()


async def test_a_client_calling_back_to_back_keeps_its_connection_and_a_parked_one_is_closed(
    numbered_upstream: Callable[..., Any], sidecar_factory: SidecarFactory
) -> None:
    """Rule 5: the connection a response just freed is left for the client's next request
    (served, `Connection: close`), not closed under it as it is sent; a connection left
    parked is closed once idle for the settle time."""
    async with numbered_upstream(interval_ms=20) as upstream:
        sidecar = await sidecar_factory(upstream, drain_timeout=10)
        base = f"http://127.0.0.1:{sidecar.port}"
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as caller,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as parked,
        ):
            sid = await initialize(caller, base)
            session = {**HEADERS, "Mcp-Session-Id": sid}
            async with parked.post(base + MCP, json=count_call(1, rid=2), headers=session) as r:
                assert r.connection is not None
                parked_transport = r.connection.transport
                await r.read()
            assert parked_transport is not None
            call = await caller.post(
                base + MCP, json=count_call(10, interval_ms=30), headers=session
            )
            assert call.connection is not None
            transport = call.connection.transport
            drain = asyncio.ensure_future(sidecar.drain())
            await eventually(lambda: sidecar.proxy.draining.draining, timeout=5, what="draining")
            await call.read()  # the call in flight ends during the drain ...
            async with caller.post(base + MCP, json=count_call(1, rid=9), headers=session) as nxt:
                # ... and the next one goes on the same connection at once, and is served.
                assert nxt.connection is not None
                assert nxt.connection.transport is transport
                assert nxt.status == 200
                assert nxt.headers["Connection"] == "close"
                assert b'"result"' in await nxt.read()
            await eventually(parked_transport.is_closing, timeout=5, what="parked one closed")
            assert await asyncio.wait_for(drain, 15) is True
