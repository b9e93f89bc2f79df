"""Outside probe of issue #13 (safe re-issue, kept listens, routing headers): defects found by
using a real sidecar against scripted upstreams on loopback, each pinned by a test that failed
until it was fixed (resilient rules 4-7, listen invariant 5, reissue rules 2-3):

1. A JSON answer to a safe request is held whole: no 5 s / 64 KiB bound (resilient rule 4).
2. A live, quiet listen carries no keep-alive to its client (the upstream's are dropped).
3. A listen whose upstream acknowledges and dies each time is listened to again forever.
4. Tool hints are keyed by tool name only, though every path (every MCP server) is proxied.
5. A duplicated `Mcp-Method` header is not refused; only its first value is checked.
6. A stop waits for a request being re-issued until the reconnect policy gives up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.reconnect import ReconnectConfig
from tests.integration.conftest import SidecarFactory, serve_app
from tests.integration.test_reissue import HEADERS, MCP, Script, request, sse
from tests.support.procs import free_port
from tests.support.waiting import eventually

FAST = ReconnectConfig(initial_delay=0.01, max_delay=0.05, max_attempts=3, max_elapsed=10)


def ack(rid: Any, params: dict[str, Any]) -> dict[str, Any]:
    return Script.ack(rid, {"notifications": {}, **params})


# -- rule 4: a JSON answer is held whole, with no time or size bound ----------------------------


async def test_a_slow_json_answer_to_a_safe_request_goes_out_after_the_hold(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """The upstream sends 100 KiB of a JSON answer (past HOLD_BYTES) and then waits (past
    COMMIT_HOLD): by rule 4 the answer goes out as it is once either bound passes."""
    finish = asyncio.Event()
    prefix = b'{"jsonrpc":"2.0","id":1,"result":{"tools":[' + b" " * (100 * 1024)

    async def mcp(req: web.Request) -> web.StreamResponse:
        await req.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(req)
        await resp.write(prefix)
        await finish.wait()
        await resp.write(b"]}}")
        return resp

    app = web.Application()
    app.router.add_post(MCP, mcp)
    async with serve_app(app) as up:
        sidecar = await sidecar_factory(up, reconnect=FAST)
        base = f"http://127.0.0.1:{sidecar.port}"
        try:
            async with asyncio.timeout(15):  # three times COMMIT_HOLD
                async with http.post(
                    base + MCP, json=request("tools/list"), headers=HEADERS
                ) as resp:
                    assert resp.status == 200
                    first = await resp.content.readexactly(len(prefix))
                    assert first == prefix
                    finish.set()
                    assert await resp.content.read() == b"]}}"
        finally:
            finish.set()


# -- listen streams: the upstream's keep-alives are swallowed ------------------------------------


async def test_a_quiet_listen_still_carries_keepalives_to_the_client(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    stop = asyncio.Event()

    async def mcp(req: web.Request) -> web.StreamResponse:
        msg = await req.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        await resp.write(sse(ack(msg["id"], msg["params"])))
        while not stop.is_set():  # an upstream that pings, like the SDK server (every 15 s)
            await resp.write(b": ping\r\n\r\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        return resp

    app = web.Application()
    app.router.add_post(MCP, mcp)
    async with serve_app(app) as up:
        sidecar = await sidecar_factory(up, reconnect=FAST)
        base = f"http://127.0.0.1:{sidecar.port}"
        body = request("subscriptions/listen", 7, notifications={"toolsListChanged": True})
        try:
            async with http.post(base + MCP, json=body, headers=HEADERS) as resp:
                assert resp.status == 200
                seen = b""
                async with asyncio.timeout(10):  # fifty upstream pings
                    while b"\n:" not in b"\n" + seen.split(b"\n\n", 1)[-1]:
                        chunk = await resp.content.readany()
                        assert chunk, "the listen stream ended"
                        seen += chunk
        finally:
            stop.set()


# -- listen streams: a server that acknowledges and dies is listened to forever ----------------


async def test_a_listen_whose_upstream_acks_and_dies_every_time_is_bounded(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    listens = Counter[str]()

    async def mcp(req: web.Request) -> web.StreamResponse:
        msg = await req.json()
        listens["listen"] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        await resp.write(sse(ack(msg["id"], msg["params"])))
        assert req.transport is not None
        req.transport.abort()  # the server dies right after acknowledging
        return resp

    app = web.Application()
    app.router.add_post(MCP, mcp)
    async with serve_app(app) as up:
        sidecar = await sidecar_factory(up, reconnect=FAST)  # max_attempts=3
        base = f"http://127.0.0.1:{sidecar.port}"
        body = request("subscriptions/listen", 7, notifications={"toolsListChanged": True})
        async with http.post(base + MCP, json=body, headers=HEADERS) as resp:
            assert resp.status == 200
            refetches = 0
            async with asyncio.timeout(20):
                async for line in resp.content:
                    refetches += b"tools/list_changed" in line
                    if refetches > 50:
                        break
        # Three failed re-listens allowed: not fifty refetch bursts.
        assert refetches <= FAST.max_attempts, (refetches, listens["listen"])


# -- tool hints are per sidecar, not per MCP server (path) ---------------------------------------


async def test_a_read_only_tool_on_one_path_does_not_make_another_paths_tool_safe(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    calls = Counter[str]()

    def server(prefix: str, read_only: bool) -> Any:
        async def mcp(req: web.Request) -> web.StreamResponse:
            msg = await req.json()
            if msg["method"] == "tools/list":
                tool = {
                    "name": "delete",
                    "inputSchema": {"type": "object"},
                    "annotations": {"readOnlyHint": read_only, "idempotentHint": read_only},
                }
                result = {"tools": [tool]}
                return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": result})
            calls[prefix] += 1
            assert req.transport is not None
            req.transport.abort()  # ran the tool, then the connection broke
            return web.Response()

        return mcp

    app = web.Application()
    app.router.add_post("/a/mcp", server("a", True))
    app.router.add_post("/b/mcp", server("b", False))
    async with serve_app(app) as up:
        sidecar = await sidecar_factory(up, reconnect=FAST)
        base = f"http://127.0.0.1:{sidecar.port}"
        for path in ("/b/mcp", "/a/mcp"):  # both listed; /a's listing is the later one
            async with http.post(base + path, json=request("tools/list"), headers=HEADERS) as r:
                assert r.status == 200
        async with http.post(
            base + "/b/mcp", json=request("tools/call", 2, name="delete"), headers=HEADERS
        ) as resp:
            assert resp.status == 502
        assert calls["b"] == 1  # /b's "delete" is not idempotent: never sent twice


# -- routing headers: duplicates --------------------------------------------------------------


async def test_a_duplicated_routing_header_is_refused_before_forwarding(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    hits = Counter[str]()

    async def mcp(req: web.Request) -> web.StreamResponse:
        msg = await req.json()
        hits[msg["method"]] += 1
        return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": {}})

    app = web.Application()
    app.router.add_post(MCP, mcp)
    async with serve_app(app) as up:
        sidecar = await sidecar_factory(up, reconnect=FAST)
        base = f"http://127.0.0.1:{sidecar.port}"
        headers = [*HEADERS.items(), ("Mcp-Method", "tools/list"), ("Mcp-Method", "tools/call")]
        async with http.post(
            base + MCP, data=json.dumps(request("tools/list", 3)), headers=headers
        ) as resp:
            status, answer = resp.status, await resp.json(content_type=None)
        assert status == 400
        assert answer["error"]["code"] == -32020
        assert sum(hits.values()) == 0


# -- stopping the sidecar while a request is being re-issued ----------------------------------


async def test_a_stop_does_not_wait_for_a_request_being_reissued(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    patient = ReconnectConfig(initial_delay=0.2, max_delay=0.4, max_attempts=1000, max_elapsed=60)
    sidecar = await sidecar_factory(f"http://127.0.0.1:{free_port()}", reconnect=patient)
    base = f"http://127.0.0.1:{sidecar.port}"

    async def ping() -> int:
        async with http.post(base + MCP, json=request("ping"), headers=HEADERS) as resp:
            await resp.read()
            return resp.status

    pending = asyncio.ensure_future(ping())
    try:
        await eventually(
            lambda: sidecar.proxy.metrics.reissues._value.get() >= 2, timeout=10, what="re-issues"
        )
        async with asyncio.timeout(10):  # a sixth of the policy's 60 s
            await sidecar.stop()
            [answer] = await asyncio.gather(pending, return_exceptions=True)
        # An answer (the sidecar's 502/503) or a cut connection: either way, not a wait.
        assert answer in (502, 503) or isinstance(answer, aiohttp.ClientError), answer
    finally:
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
