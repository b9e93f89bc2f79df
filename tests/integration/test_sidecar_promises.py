"""The sidecar's promises where outside testing broke them: exactly-once under backpressure
whatever the upstream's ids, ids that cannot round-trip, upstreams that never answer, and
forwarded and Host headers. A real sidecar in front of a real aiohttp upstream on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.tracker import EventId
from tests.integration.conftest import SidecarFactory, serve_app
from tests.integration.test_proxy import (
    HEADERS,
    MCP,
    dechunk,
    initialize,
    post_unread,
    progress_numbers,
)
from tests.support.metrics import counter_value
from tests.support.sse_client import Received, collect, parse_sse
from tests.support.waiting import eventually

IdOf = Callable[[int], str]


def progress(k: int, n: int) -> bytes:
    note = {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": "t", "progress": k, "total": n},
    }
    return json.dumps(note, separators=(",", ":")).encode()


class OddUpstream:
    """A Streamable HTTP server whose `tools/call` streams `n` progress events with ids
    `id_of(k)`, 200 events per write, then the answer; a GET with `Last-Event-ID` resumes
    after it. `hang` makes every POST but `initialize` wait forever. It records the request
    headers it saw."""

    def __init__(self, id_of: IdOf, n: int, *, hang: bool = False) -> None:
        self.id_of = id_of
        self.n = n
        self.hang = hang
        self.seen: list[dict[str, str]] = []
        self.gets: list[str | None] = []
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/mcp", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(dict(request.headers))
        if request.method == "GET":
            last = request.headers.get("Last-Event-ID")
            self.gets.append(last)
            ks = [k for k in range(1, self.n + 2) if self.id_of(k) == last]
            return await self.stream(request, (ks[0] + 1) if ks else 1)
        body = await request.json()
        if body.get("method") == "initialize":
            answer = {"jsonrpc": "2.0", "id": body["id"], "result": {"protocolVersion": "x"}}
            return web.json_response(answer, headers={"Mcp-Session-Id": "s1"})
        if body.get("method") == "echo":
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {}})
        if self.hang:
            await self.release.wait()
        return await self.stream(request, 1)

    async def stream(self, request: web.Request, first: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        batch: list[bytes] = []
        for k in range(first, self.n + 1):
            batch.append(b"id: " + self.id_of(k).encode() + b"\ndata: " + progress(k, self.n))
            if len(batch) == 200:
                await resp.write(b"\n\n".join(batch) + b"\n\n")
                batch = []
        if batch:
            await resp.write(b"\n\n".join(batch) + b"\n\n")
        final = {"jsonrpc": "2.0", "id": 7, "result": {"content": []}}
        done = self.id_of(self.n + 1).encode()
        await resp.write(b"id: " + done + b"\ndata: " + json.dumps(final).encode() + b"\n\n")
        await resp.write_eof()
        return resp


@asynccontextmanager
async def odd_upstream(id_of: IdOf, n: int, **kw: bool) -> AsyncIterator[tuple[str, OddUpstream]]:
    up = OddUpstream(id_of, n, **kw)
    async with serve_app(up.app()) as url:
        try:
            yield url, up
        finally:
            up.release.set()


CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "count"}}


# -- 1. no loss under backpressure, whatever the ids ---------------------------------------


async def test_slow_client_loses_nothing_when_upstream_ids_are_not_ascii(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """Non-ASCII ids send runs down the event path in the middle of a chunk; a pause there
    used to drop the rest of the chunk (1,544 of 20,000 events lost with default settings)."""
    n = 20_000
    async with odd_upstream(lambda k: f"é{k}", n) as (url, _):
        sidecar = await sidecar_factory(url)
        sid = await initialize(http, f"http://127.0.0.1:{sidecar.port}")
        reader, writer = await post_unread(sidecar.port, {**HEADERS, "Mcp-Session-Id": sid}, CALL)
        metrics = sidecar.proxy.metrics
        await eventually(lambda: counter_value(metrics, "upstream_paused") >= 1, timeout=30)
        async with asyncio.timeout(60):
            raw = await reader.read()
        writer.close()
        _, sse = dechunk(raw)
        got = [
            Received(e.id, e.event or "message", e.data.decode()) for e in parse_sse(sse) if e.data
        ]
        assert progress_numbers(got) == list(range(1, n + 1))
        seqs = [EventId.parse(r.id or "") for r in got]
        assert [s.seq for s in seqs if s is not None] == list(range(1, n + 2))
        assert counter_value(metrics, "slow_clients_dropped") == 0


# -- 4. ids that cannot round-trip ---------------------------------------------------------


async def test_an_id_too_long_to_round_trip_ends_the_stream_with_a_clear_error(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """A few thousand characters used to be put into ids the sidecar could not parse back,
    so a resume silently restarted the stream from its first event."""
    long_id = "k" * 3000
    async with odd_upstream(lambda k: f"{long_id}{k}" if k > 2 else f"ok{k}", 5) as (url, _):
        sidecar = await sidecar_factory(url)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        async with http.post(base + MCP, json=CALL, headers=headers) as resp:
            assert resp.status == 200
            raw = await resp.read()
    got = [e for e in parse_sse(raw) if e.data]
    assert progress_numbers([Received(e.id, "message", e.data.decode()) for e in got]) == [1, 2]
    error = json.loads(got[-1].data)
    assert error["id"] == 7
    assert "exceeds 2048" in error["error"]["message"]
    assert b": tether: stream ended: upstream event id of 3001 bytes exceeds 2048" in raw
    for e in got:
        parsed = EventId.parse(e.id or "")
        assert parsed is not None
        assert str(parsed) == e.id  # every id we sent parses back exactly


async def test_control_characters_in_an_id_fail_clearly_and_resume_never_crashes(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """An id with VT/FF cannot be sent back as `Last-Event-ID` (aiohttp raised ValueError in
    the pump on adoption and the client got an empty 200): now it is refused when it comes."""
    async with odd_upstream(lambda k: f"v\x0bt{k}" if k == 3 else f"ok{k}", 5) as (url, up):
        sidecar = await sidecar_factory(url)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        async with http.post(base + MCP, json=CALL, headers=headers) as resp:
            raw = await resp.read()
        got = [e for e in parse_sse(raw) if e.data]
        assert "control character" in json.loads(got[-1].data)["error"]["message"]
        assert b"tether: stream ended:" in raw
        # Resuming after the last good event gets the rest of the buffer and the same end,
        # not a crash: the refused id never became a cursor.
        last_good = got[1].id or ""
        async with http.get(base + MCP, headers={**headers, "Last-Event-ID": last_good}) as resumed:
            assert resumed.status == 200
            again = [e for e in parse_sse(await resumed.read()) if e.data]
        assert again
        assert all("\x0b" not in (g or "") for g in up.gets)


# -- 5. an upstream that never answers ----------------------------------------------------


async def test_hung_upstream_gets_504_and_in_flight_requests_are_capped(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    async with odd_upstream(str, 1, hang=True) as (url, _):
        sidecar = await sidecar_factory(url, upstream_response_timeout=0.5, max_upstream_requests=3)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        async with http.post(base + MCP, json=CALL, headers=headers) as resp:
            assert resp.status == 504
            assert "upstream timed out" in (await resp.json())["error"]["message"]
        # Four at once against a limit of three: one is turned away at once.
        calls = [
            asyncio.ensure_future(http.post(base + MCP, json=CALL, headers=headers))
            for _ in range(4)
        ]
        await eventually(lambda: sidecar.proxy.upstream.waiting == 3, timeout=10)
        done = await asyncio.gather(*calls)
        statuses = sorted(r.status for r in done)
        for r in done:
            r.release()
        assert statuses == [503, 504, 504, 504]
        assert counter_value(sidecar.proxy.metrics, "refused", reason="too_many_requests") == 1
        assert sidecar.proxy.upstream.waiting == 0
        # And it keeps serving.
        echo = {"jsonrpc": "2.0", "id": 9, "method": "echo"}
        async with http.post(base + MCP, json=echo, headers=headers) as resp:
            assert resp.status == 200


# -- 6. forwarded headers and Host --------------------------------------------------------


async def test_forwarded_headers_are_what_the_sidecar_saw_unless_the_peer_is_trusted(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    forged = {
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
    }
    family = {"Forwarded": "for=6.6.6.6;host=evil.example", "X-Real-IP": "6.6.6.6"}
    echo = {"jsonrpc": "2.0", "id": 9, "method": "echo"}
    async with odd_upstream(str, 1) as (url, up):
        untrusting = await sidecar_factory(url)
        trusting = await sidecar_factory(url, trusted_proxies=("127.0.0.0/8",))
        for sidecar, expected in (
            (untrusting, ("127.0.0.1", "http", f"127.0.0.1:{untrusting.port}")),
            (trusting, ("6.6.6.6, 127.0.0.1", "https", "evil.example")),
        ):
            base = f"http://127.0.0.1:{sidecar.port}"
            sent = {**HEADERS, **forged, **family}
            async with http.post(base + MCP, json=echo, headers=sent) as r:
                assert r.status == 200
            seen = up.seen[-1]
            got = (seen["X-Forwarded-For"], seen["X-Forwarded-Proto"], seen["X-Forwarded-Host"])
            assert got == expected
            passed_on = {k: seen[k] for k in family if k in seen}
            assert passed_on == (family if sidecar is trusting else {})


async def test_host_header_is_checked_against_the_allow_list(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """The sidecar rewrites Host for the upstream, which neutralises the upstream's own
    DNS-rebinding check, so it checks the client's Host itself."""
    echo = {"jsonrpc": "2.0", "id": 9, "method": "echo"}
    async with odd_upstream(str, 1) as (url, up):
        sidecar = await sidecar_factory(url, allowed_hosts=("mcp.team.svc", "*.example.org"))
        base = f"http://127.0.0.1:{sidecar.port}"

        async def status(host: str) -> int:
            async with http.post(base + MCP, json=echo, headers={**HEADERS, "Host": host}) as r:
                await r.read()
                return r.status

        before = len(up.seen)
        assert await status("rebind.attacker.example") == 421
        assert await status("attacker.example:80") == 421
        assert len(up.seen) == before  # refused before anything reached the upstream
        assert await status(f"127.0.0.1:{sidecar.port}") == 200
        assert await status(f"localhost:{sidecar.port}") == 200
        assert await status("mcp.team.svc:8080") == 200
        assert await status("api.example.org") == 200
        assert counter_value(sidecar.proxy.metrics, "refused", reason="host") == 2


async def test_collected_whole_stream_through_default_settings(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """The odd upstream itself, with ordinary ids, passes through whole (a control)."""
    async with odd_upstream(lambda k: f"id-{k}", 500) as (url, _):
        sidecar = await sidecar_factory(url)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        async with http.post(
            base + MCP, json=CALL, headers={**HEADERS, "Mcp-Session-Id": sid}
        ) as resp:
            got = await collect(resp)
    assert progress_numbers(got) == list(range(1, 501))
    assert json.loads(got[-1].data)["result"] == {"content": []}


async def test_a_last_event_id_that_is_not_ours_is_refused_not_served_afresh(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """Serving a fresh stream would silently skip whatever the client missed."""
    async with odd_upstream(str, 3) as (url, up):
        sidecar = await sidecar_factory(url)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        for bad in ("x" * 8000, "....", "p0.1.-1", "p0.1.1e3", "p0.1.2.~!!", "upstream-id-7"):
            headers = {**HEADERS, "Mcp-Session-Id": sid, "Last-Event-ID": bad}
            async with http.get(base + MCP, headers=headers) as resp:
                assert resp.status == 410, bad
                assert "not an event id Tether gave out" in await resp.text()
        assert up.gets == []  # nothing was opened upstream


async def test_every_origin_header_is_checked(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    echo = {"jsonrpc": "2.0", "id": 9, "method": "echo"}
    async with odd_upstream(str, 1) as (url, _):
        sidecar = await sidecar_factory(url)
        base = f"http://127.0.0.1:{sidecar.port}"
        for origins in (
            ["http://localhost:1", "http://evil.example"],
            ["http://evil.example", "http://localhost:1"],
        ):
            headers = CIMultiDict(HEADERS)
            for o in origins:
                headers.add("Origin", o)
            async with http.post(base + MCP, json=echo, headers=headers) as resp:
                assert resp.status == 403
        async with http.post(
            base + MCP, json=echo, headers={**HEADERS, "Origin": "http://localhost:1"}
        ) as resp:
            assert resp.status == 200


async def test_malformed_http_is_one_warning_line_not_a_traceback(
    sidecar_factory: SidecarFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with odd_upstream(str, 1) as (url, _):
        sidecar = await sidecar_factory(url)
        for raw in (
            b"GET /mcp HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
            b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
            writer.write(raw)
            await writer.drain()
            async with asyncio.timeout(10):
                answer = await reader.read()
            writer.close()
            await writer.wait_closed()
            assert answer.split(b" ", 2)[1] == b"400", answer[:100]
    server_records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert server_records
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in server_records)
    assert all("bad HTTP request refused (400)" in r.getMessage() for r in server_records)


async def test_finished_streams_kept_for_late_resumes_are_bounded_in_all(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """Each finished stream keeps its replay buffer for late resumes: one client making call
    after call must not grow the sidecar without bound (it used to reach +100 MB in 30
    calls). The longest-finished go first; the newest stays resumable."""
    budget = 200_000
    async with odd_upstream(lambda k: f"id-{k}", 400) as (url, _):
        sidecar = await sidecar_factory(url, linger_max_bytes=budget)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        lasts: list[str] = []
        for _ in range(8):  # each call's stream holds about 60 KB
            async with http.post(base + MCP, json=CALL, headers=headers) as resp:
                got = await collect(resp)
            assert progress_numbers(got) == list(range(1, 401))
            lasts.append(got[-1].id or "")

        def lingering() -> int:
            streams = sidecar.proxy.registry.streams.values()
            return sum(s.tracker.buffered_bytes for s in streams if s.ended)

        await eventually(lambda: 0 < lingering() <= budget, timeout=10)
        assert len(sidecar.proxy.registry.streams) < 8
        newest = {**headers, "Last-Event-ID": lasts[-1]}
        async with http.get(base + MCP, headers=newest) as resp:
            assert resp.status == 200
            assert await collect(resp) == []  # it had everything: the stream just ends
