"""Who may use the proxied port: origins, session binding to a credential, stream limits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.server import start_control_plane
from tests.integration.conftest import SidecarFactory, serve_app
from tests.integration.test_proxy import HEADERS, MCP, count_call, progress_numbers
from tests.support.metrics import counter_value
from tests.support.sse_client import collect
from tests.support.waiting import eventually

INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t"}},
}


async def initialize_as(http: aiohttp.ClientSession, base: str, token: str) -> str:
    async with http.post(
        base + MCP, json=INIT, headers={**HEADERS, "Authorization": f"Bearer {token}"}
    ) as resp:
        assert resp.status == 200
        await resp.read()
        return resp.headers["Mcp-Session-Id"]


async def test_browser_origins_are_checked(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream() as up:
        default = await sidecar_factory(up)
        listed = await sidecar_factory(up, allowed_origins=("https://app.example",))
        for sidecar, origin, status in [
            (default, "http://evil.example", 403),
            (default, "http://localhost:5173", 200),
            (listed, "https://app.example", 200),
            (listed, "http://localhost:5173", 403),
        ]:
            async with http.post(
                f"http://127.0.0.1:{sidecar.port}{MCP}",
                json=INIT,
                headers={**HEADERS, "Origin": origin},
            ) as resp:
                assert resp.status == status, origin
                if status == 403:
                    assert "not allowed" in (await resp.json())["error"]["message"]
        # No Origin header: not a browser, not checked.
        async with http.post(
            f"http://127.0.0.1:{listed.port}{MCP}", json=INIT, headers=HEADERS
        ) as r:
            assert r.status == 200


async def test_a_session_belongs_to_the_credential_that_created_it(
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Another credential is told the session does not exist: on the sidecar that created it,
    and on a new sidecar that adopted it from the control plane."""
    cp = await start_control_plane(
        ControlPlaneConfig(listen="127.0.0.1:0", store=SqliteUrl(tmp_path / "s.db"))
    )
    try:
        async with numbered_upstream(interval_ms=1) as up:
            a = await sidecar_factory(up, control_plane=cp.address, owner="a")
            b = await sidecar_factory(up, control_plane=cp.address, owner="b")
            base_a, base_b = f"http://127.0.0.1:{a.port}", f"http://127.0.0.1:{b.port}"
            sid = await initialize_as(http, base_a, "alice")
            alice = {**HEADERS, "Mcp-Session-Id": sid, "Authorization": "Bearer alice"}
            mallory = {**alice, "Authorization": "Bearer mallory"}
            anonymous = {k: v for k, v in alice.items() if k != "Authorization"}

            async with http.post(base_a + MCP, json=count_call(3), headers=alice) as resp:
                got = await collect(resp)
            assert progress_numbers(got) == [1, 2, 3]
            first_id = got[0].id
            assert first_id is not None
            for intruder in (mallory, anonymous):
                async with http.post(base_a + MCP, json=count_call(3), headers=intruder) as resp:
                    assert resp.status == 404
                resume = {**intruder, "Accept": "text/event-stream", "Last-Event-ID": first_id}
                async with http.get(base_a + MCP, headers=resume) as resp:
                    assert resp.status == 404

            assert a.proxy.continuity.reporter is not None
            await a.proxy.continuity.reporter.flushed()
            async with http.post(base_b + MCP, json=count_call(2), headers=mallory) as resp:
                assert resp.status == 404  # refused on the adopting sidecar too
            async with http.post(base_b + MCP, json=count_call(2), headers=alice) as resp:
                assert progress_numbers(await collect(resp)) == [1, 2]
        refused = counter_value(a.proxy.metrics, "refused", reason="credential")
        assert refused == 4
    finally:
        await sidecar_factory.stop_all()  # before their control plane (see SidecarFactory)
        await cp.stop()


async def test_too_many_streams_are_answered_503(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream(interval_ms=50) as up:
        sidecar = await sidecar_factory(up, max_streams=2)
        base = f"http://127.0.0.1:{sidecar.port}"
        sessions = [await initialize_as(http, base, "t") for _ in range(3)]
        get = {**HEADERS, "Accept": "text/event-stream", "Authorization": "Bearer t"}
        first = await http.get(base + MCP, headers={**get, "Mcp-Session-Id": sessions[0]})
        second = await http.get(base + MCP, headers={**get, "Mcp-Session-Id": sessions[1]})
        try:
            await eventually(
                lambda: sidecar.proxy.active_streams >= 2, timeout=10, what="two open streams"
            )
            async with http.get(base + MCP, headers={**get, "Mcp-Session-Id": sessions[2]}) as r:
                assert r.status == 503
                assert r.headers["Retry-After"] == "1"
        finally:
            first.close()
            second.close()
        await eventually(
            lambda: not sidecar.proxy.active_streams, timeout=10, what="no open streams"
        )
        async with http.get(base + MCP, headers={**get, "Mcp-Session-Id": sessions[2]}) as r:
            assert r.status == 200


async def test_huge_headers_get_a_clear_error_and_the_sidecar_keeps_serving(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream() as up:
        sidecar = await sidecar_factory(up)
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        writer.write(b"GET /mcp HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        assert status.split()[1] in (b"400", b"431")
        async with http.post(
            f"http://127.0.0.1:{sidecar.port}{MCP}", json=INIT, headers=HEADERS
        ) as r:
            assert r.status == 200


async def test_a_legacy_sse_session_belongs_to_its_credential_too(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """2024-11-05 HTTP+SSE: POSTs to the session's endpoint and resumes of its stream are
    refused to any credential but the one that opened GET /sse."""
    posted: list[str] = []
    release = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"event: endpoint\ndata: /messages/?session_id=abc\n\n")
        await resp.write(b'event: message\ndata: {"jsonrpc":"2.0","method":"x"}\n\n')
        await release.wait()  # the stream stays open, as a legacy session's does
        return resp

    async def message(request: web.Request) -> web.Response:
        posted.append(request.headers.get("Authorization", ""))
        return web.Response(status=202, text="Accepted")

    app = web.Application()
    app.router.add_get("/sse", sse)
    app.router.add_post("/messages/", message)
    async with serve_app(app) as up:
        sidecar = await sidecar_factory(up)
        base = f"http://127.0.0.1:{sidecar.port}"
        alice = {"Authorization": "Bearer alice"}
        mallory = {"Authorization": "Bearer mallory"}
        stream = await http.get(base + "/sse", headers={**alice, "Accept": "text/event-stream"})
        try:
            got = await collect(stream, limit=2)
            assert got[0].data == "/messages/?session_id=abc"
            async with http.post(base + "/messages/?session_id=abc", json={}, headers=mallory) as r:
                assert r.status == 404
            async with http.post(base + "/messages/?session_id=abc", json={}) as r:
                assert r.status == 404  # no credential is another credential
            async with http.post(base + "/messages/?session_id=abc", json={}, headers=alice) as r:
                assert r.status == 202
            last = got[-1].id
            assert last is not None
            resume = {"Accept": "text/event-stream", "Last-Event-ID": last}
            async with http.get(base + "/sse", headers={**mallory, **resume}) as r:
                assert r.status == 404
        finally:
            stream.close()
            release.set()
    assert posted == ["Bearer alice"]
