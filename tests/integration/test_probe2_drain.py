"""Outside probes of the drain (issue 12) against a real sidecar and real upstreams on
loopback. Each test showed one defect when written, fixed since;
its failing assertion is marked "Fixed"."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from tests.integration.conftest import SidecarFactory, serve_app
from tests.integration.test_proxy import HEADERS, MCP, count_call, initialize
from tests.support.waiting import eventually

NEW = {**HEADERS, "MCP-Protocol-Version": "2026-07-28"}
DEADLINE = 20.0


def listening_upstream(test_over: asyncio.Event) -> web.Application:
    """A 2026-07-28 server: `subscriptions/listen` streams a notification every 10 ms until
    the test ends (as a busy server does); anything else is answered at once, with its id."""

    async def mcp(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["method"] == "subscriptions/listen":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            n = 0
            while not test_over.is_set():
                n += 1
                note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"n": n}}
                await resp.write(f"data: {json.dumps(note)}\n\n".encode())
                await asyncio.sleep(0.01)
            return resp
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {"ok": body["id"]}})

    app = web.Application()
    app.router.add_post("/mcp", mcp)
    return app


async def test_a_listen_stream_ended_by_a_drain_does_not_poison_the_upstream_connection(
    sidecar_factory: SidecarFactory,
    http: aiohttp.ClientSession,
) -> None:
    """The drain ends a listen stream by marking the upstream response's body at EOF
    (`feed_eof`) while its upstream keeps sending. Requests that arrive during the drain are
    still to be served (drain rule 2), each with its own answer, and nothing may go wrong
    with the connection the listen stream used."""
    test_over = asyncio.Event()
    async with serve_app(listening_upstream(test_over)) as upstream:
        sidecar = await sidecar_factory(upstream)
        base = f"http://127.0.0.1:{sidecar.port}"
        listen = {"jsonrpc": "2.0", "id": 1, "method": "subscriptions/listen", "params": {}}
        stream = await http.post(base + MCP, json=listen, headers=NEW)
        assert stream.status == 200
        await stream.content.readuntil(b"\n\n")
        async with asyncio.timeout(DEADLINE):
            assert await sidecar.drain() is True
            await stream.read()
        stream.release()
        await asyncio.sleep(0.2)  # the upstream keeps writing on the old connection
        # Requests arriving on open connections during the drain are still served.
        answers = []
        async with asyncio.timeout(DEADLINE):
            for rid in range(10, 20):
                call = {"jsonrpc": "2.0", "id": rid, "method": "tools/list", "params": {}}
                async with (
                    aiohttp.ClientSession() as fresh,
                    fresh.post(base + MCP, json=call, headers=NEW) as resp,
                ):
                    answers.append((resp.status, await resp.text()))
        test_over.set()
    wrong = [
        (status, text)
        for (status, text), rid in zip(answers, range(10, 20), strict=True)
        if status != 200 or f'"ok": {rid}' not in text
    ]
    # Seen: a 502 "Bad status line ... b'52'": the listen stream's upstream connection went
    # back to the pool with the stream still arriving on it, and the next request read it.
    assert not wrong, f"answers that are not their own: {wrong[:3]}"  # Fixed


async def test_sigterm_during_a_drain_ends_the_drain_and_the_stop(
    numbered_upstream: Callable[..., Any],
    sidecar_factory: SidecarFactory,
    http: aiohttp.ClientSession,
) -> None:
    """The kubelet's preStop hook can give up (grace period) and SIGTERM follow while the
    drain still waits for a call: the stop ends the call's stream (the client resumes it
    elsewhere), and the drain answers instead of holding the stop up."""
    async with numbered_upstream(interval_ms=20) as upstream:
        sidecar = await sidecar_factory(upstream, drain_timeout=600)
        base = f"http://127.0.0.1:{sidecar.port}"
        admin = f"http://127.0.0.1:{sidecar.admin_port}"
        sid = await initialize(http, base)
        session = {**HEADERS, "Mcp-Session-Id": sid}
        call = await http.post(base + MCP, json=count_call(10_000, interval_ms=50), headers=session)
        await call.content.readuntil(b"\n\n")
        hook = asyncio.ensure_future(http.get(admin + "/drain"))
        await eventually(lambda: sidecar.proxy.draining.draining, timeout=10, what="draining")
        async with asyncio.timeout(DEADLINE):
            await sidecar.stop()  # what SIGTERM runs
            await call.read()
        assert call.content.at_eof()
        with contextlib.suppress(aiohttp.ClientError):
            async with asyncio.timeout(DEADLINE):
                async with await hook as answer:
                    assert answer.status == 200
        call.close()
