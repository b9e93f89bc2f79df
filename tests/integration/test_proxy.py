"""The sidecar's data path against a real numbered upstream on loopback.

Every test talks HTTP to a real sidecar on port 0 in front of a real aiohttp upstream; the
resilience tests run the upstream as a separate process and SIGKILL it.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import RunningSidecar
from sidecar.tracker import EventId
from sidecar.upstream import UPSTREAM_IDLE_REUSE_S
from tests.integration.conftest import SidecarFactory, serve_app
from tests.support.metrics import counter_value
from tests.support.procs import ManagedProcess, ProcessPool, free_port, python_module
from tests.support.sse_client import Received, collect, events, parse_sse
from tests.support.waiting import eventually

MCP = "/mcp"
HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2025-11-25",
}


def count_call(n: int, *, interval_ms: int = 2, rid: int = 7, token: str = "tok") -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "tools/call",
        "params": {
            "name": "count",
            "arguments": {"n": n, "interval_ms": interval_ms},
            "_meta": {"progressToken": token},
        },
    }


async def initialize(http: aiohttp.ClientSession, base: str) -> str:
    body = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    async with http.post(base + MCP, json=body, headers=HEADERS) as resp:
        assert resp.status == 200, await resp.text()
        session_id = resp.headers["Mcp-Session-Id"]
        await resp.read()
    return session_id


def positions(received: list[Received]) -> list[tuple[str, int, int]]:
    """(stream, epoch, seq) of each event's sidecar id."""
    out = []
    for e in received:
        eid = EventId.parse(e.id or "")
        assert eid is not None, e.id
        out.append((str(eid.stream), eid.epoch, eid.seq))
    return out


def progress_numbers(received: list[Received]) -> list[int]:
    return [
        int(e.json()["params"]["progress"])
        for e in received
        if e.json().get("method") == "notifications/progress"
    ]


def final_results(received: list[Received]) -> list[Any]:
    return [e.json() for e in received if "result" in e.json() or "error" in e.json()]


async def test_post_sse_stream_is_relayed_with_sidecar_ids(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream(interval_ms=1) as up:
        sidecar = await sidecar_factory(up)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        async with http.post(
            base + MCP, json=count_call(25), headers={**HEADERS, "Mcp-Session-Id": sid}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            got = [e async for e in events(resp, include_priming=True)]
    priming, rest = got[0], got[1:]
    assert priming.data == ""
    assert priming.id is not None
    assert priming.id.endswith(".1.0")
    assert progress_numbers(rest) == list(range(1, 26))
    assert final_results(rest) == [
        {"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "counted 25"}]}}
    ]
    assert positions(rest) == [(priming.id.split(".")[0], 1, k) for k in range(1, 27)]


async def test_json_responses_headers_and_status_pass_through(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    from aiohttp import web

    seen: dict[str, Any] = {}

    async def echo(request: web.Request) -> web.Response:
        seen["headers"] = dict(request.headers)
        seen["path"] = request.path_qs
        seen["body"] = await request.read()
        return web.json_response(
            {"ok": True},
            status=418,
            headers={"Mcp-Session-Id": "s1", "X-Upstream": "yes", "Connection": "close"},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    async with serve_app(app) as up:
        sidecar = await sidecar_factory(up + "/base")
        async with http.post(
            f"http://127.0.0.1:{sidecar.port}/mcp/x?q=1",
            data=b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
            headers={
                "Authorization": "Bearer secret",
                "Mcp-Session-Id": "s1",
                "Content-Type": "application/json",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "must not pass",
                "Keep-Alive": "timeout=5",
            },
        ) as resp:
            assert resp.status == 418
            assert resp.headers["X-Upstream"] == "yes"
            assert resp.headers["Mcp-Session-Id"] == "s1"
            assert await resp.json() == {"ok": True}
    assert seen["path"] == "/base/mcp/x?q=1"
    assert seen["body"] == b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
    h = seen["headers"]
    assert h["Authorization"] == "Bearer secret"
    assert h["Mcp-Session-Id"] == "s1"
    assert "X-Hop" not in h
    assert "Keep-Alive" not in h
    assert h["X-Forwarded-For"] == "127.0.0.1"
    assert h["Host"] == up.removeprefix("http://")


async def test_request_body_over_the_limit_is_refused(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream() as up:
        sidecar = await sidecar_factory(up, max_request_body_bytes=4096)
        base = f"http://127.0.0.1:{sidecar.port}"
        async with http.post(base + MCP, data=b"x" * 10_000, headers=HEADERS) as resp:
            assert resp.status == 413
            assert "exceeds 4096 bytes" in (await resp.json())["error"]["message"]

        async def chunked() -> Any:
            for _ in range(10):
                yield b"y" * 1000

        async with http.post(base + MCP, data=chunked(), headers=HEADERS) as resp:
            assert resp.status == 413
        # Still serving.
        await initialize(http, base)


async def test_unreachable_upstream_is_a_clear_502(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await sidecar_factory(f"http://127.0.0.1:{free_port()}")
    async with http.post(
        f"http://127.0.0.1:{sidecar.port}/mcp", json={"jsonrpc": "2.0"}, headers=HEADERS
    ) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["message"].startswith("tether: upstream unreachable")


async def test_stateless_revision_passes_through_untouched(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    stateless = {**HEADERS, "MCP-Protocol-Version": "2026-07-28"}
    async with numbered_upstream(interval_ms=1) as up:
        async with http.post(up + MCP, json=count_call(5), headers=stateless) as resp:
            direct = await resp.read()
        sidecar = await sidecar_factory(up)
        async with http.post(
            f"http://127.0.0.1:{sidecar.port}{MCP}", json=count_call(5), headers=stateless
        ) as resp:
            assert "Mcp-Session-Id" not in resp.headers
            proxied = await resp.read()
    assert proxied == direct
    assert b"count." in proxied  # the upstream's own ids, not the sidecar's
    assert not sidecar.proxy.registry.streams


async def test_client_resumes_with_last_event_id_from_the_replay_buffer(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    """The upstream keeps no ids at all, yet the client misses nothing: the sidecar buffers."""
    async with numbered_upstream(interval_ms=5, no_ids=True) as up:
        sidecar = await sidecar_factory(up)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        async with http.post(base + MCP, json=count_call(60), headers=headers) as resp:
            first = await collect(resp, limit=20)
        # Client connection dropped after 20 events; the stream goes on upstream meanwhile:
        # wait until the sidecar has read events the client has not seen.
        last = first[-1].id
        assert last is not None
        await eventually(
            lambda: counter_value(sidecar.proxy.metrics, "events_received") >= 30,
            timeout=10,
            what="events read while the client is away",
        )
        async with http.get(
            base + MCP, headers={**headers, "Last-Event-ID": last, "Accept": "text/event-stream"}
        ) as resp:
            assert resp.status == 200
            rest = await collect(resp)
    got = first + rest
    assert progress_numbers(got) == list(range(1, 61))
    assert len(final_results(got)) == 1
    ids = [e.id for e in got]
    assert len(set(ids)) == len(ids)
    assert counter_value(sidecar.proxy.metrics, "client_resumes") == 1


async def test_resume_with_unknown_or_foreign_stream_is_refused(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream(interval_ms=1) as up:
        sidecar = await sidecar_factory(up)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        get = {**HEADERS, "Mcp-Session-Id": sid, "Accept": "text/event-stream"}
        async with http.get(base + MCP, headers={**get, "Last-Event-ID": "nosuch.1.4"}) as resp:
            assert resp.status == 410
            assert "does not know" in (await resp.json())["error"]["message"]
        async with http.post(
            base + MCP, json=count_call(3), headers={**HEADERS, "Mcp-Session-Id": sid}
        ) as resp:
            got = await collect(resp)
        assert got[0].id is not None
        other = {**get, "Mcp-Session-Id": "someone-else", "Last-Event-ID": got[0].id}
        async with http.get(base + MCP, headers=other) as resp:
            assert resp.status == 404


async def test_upstream_polling_close_is_followed_transparently(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    """A 2025-11-25 server closes the stream every 7 events after a `retry:`; the client sees
    one uninterrupted stream and nothing twice."""
    async with numbered_upstream(interval_ms=1, poll_every=7, overlap=2) as up:
        sidecar = await sidecar_factory(up)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        async with http.post(
            base + MCP, json=count_call(40), headers={**HEADERS, "Mcp-Session-Id": sid}
        ) as resp:
            got = await collect(resp)
    assert progress_numbers(got) == list(range(1, 41))
    assert len(final_results(got)) == 1
    assert counter_value(sidecar.proxy.metrics, "upstream_reconnects") >= 5
    assert counter_value(sidecar.proxy.metrics, "duplicates_dropped") >= 10


async def test_malformed_upstream_event_ends_stream_cleanly(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream(interval_ms=1, malformed=True) as up:
        sidecar = await sidecar_factory(up)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        async with http.post(
            base + MCP, json=count_call(10), headers={**HEADERS, "Mcp-Session-Id": sid}
        ) as resp:
            got = await collect(resp)
        assert progress_numbers(got) == [1, 2, 3]
        (err,) = final_results(got)
        assert err["id"] == 7
        assert "bad event" in err["error"]["message"]
        # The sidecar keeps serving.
        await initialize(http, base)


async def test_oversized_upstream_event_ends_stream_cleanly(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream(interval_ms=1, oversized=200_000) as up:
        sidecar = await sidecar_factory(up, max_event_bytes=64 * 1024)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        async with http.post(
            base + MCP, json=count_call(10), headers={**HEADERS, "Mcp-Session-Id": sid}
        ) as resp:
            got = await collect(resp)
    assert progress_numbers(got) == [1, 2]
    (err,) = final_results(got)
    assert "65536" in err["error"]["message"]


def dechunk(raw: bytes) -> tuple[bytes, bytes]:
    """Split a raw HTTP/1.1 response into (head, de-chunked body); a response cut anywhere
    gives its whole chunks only.

    It walks the body by offsets: slicing off each chunk copied the rest of the body every
    time, which made a 6 MB response of small chunks take seconds."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    body = bytearray()
    at = 0
    while True:
        line_end = rest.find(b"\r\n", at)
        if line_end == -1:
            break
        size = int(rest[at:line_end].split(b";")[0], 16)
        start = line_end + 2
        if size == 0 or len(rest) < start + size + 2:
            break
        body += rest[start : start + size]
        at = start + size + 2
    return head, bytes(body)


async def post_unread(
    port: int, headers: dict[str, str], call: object
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """POST `call` on a raw connection with a small receive buffer (no autotuning), and read
    nothing: a client that stops reading. The caller reads or closes it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = json.dumps(call).encode()
    writer.write(
        (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n"
        ).encode()
        + body
    )
    await writer.drain()
    return reader, writer


def count_writes(transport: asyncio.BaseTransport | None) -> list[bytes]:
    """What is written on `transport` from now on, one item per `write` or `writelines`."""
    assert isinstance(transport, asyncio.WriteTransport)
    seen: list[bytes] = []
    write, writelines = transport.write, transport.writelines

    def counted_write(data: bytes | bytearray | memoryview) -> None:
        seen.append(bytes(data))
        write(data)

    def counted_writelines(chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        chunks = list(chunks)
        seen.append(b"".join(chunks))
        writelines(chunks)

    transport.write = counted_write  # type: ignore[method-assign]
    transport.writelines = counted_writelines  # type: ignore[method-assign,assignment]
    return seen


async def test_a_short_answer_reaches_the_client_in_one_write(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    """`sidecar.writer` rule 5: the headers, the priming event, the answer and the end of the
    response leave in one write, so a client waiting on its socket reads them all at once.
    The upstream answers 100 ms after the request: headers sent ahead of the answer would
    reach the client alone. The sidecar's writes on the client's connection are also
    counted (the real transport, its methods wrapped while the upstream is thinking): the
    client runs on the sidecar's own event loop here, so two writes in one step of the
    sidecar would reach its socket together and its first read could not tell them apart."""
    async with numbered_upstream() as up:
        sidecar = await sidecar_factory(up)
        sid = await initialize(http, f"http://127.0.0.1:{sidecar.port}")
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        reader, writer = await post_unread(sidecar.port, headers, count_call(0, interval_ms=100))
        busy = sidecar.proxy.busy_connections
        await eventually(lambda: len(busy) == 1, timeout=5, what="the call under way")
        writes = count_writes(next(iter(busy)).transport)
        try:
            async with asyncio.timeout(10):
                first = await reader.read(1 << 16)
                rest = await reader.read()
        finally:
            writer.close()
    assert writes == [first], writes
    head, body = dechunk(first)
    assert head.startswith(b"HTTP/1.1 200"), first
    priming, answer = parse_sse(body)
    assert priming.id, first
    assert not priming.data, first
    assert json.loads(answer.data)["result"]["content"][0]["text"] == "counted 0", first
    assert first.endswith(b"\r\n0\r\n\r\n"), first  # the end of the chunked body
    assert rest == b""


async def test_slow_client_gets_backpressure_not_loss(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    """A client that stops reading: the sidecar stops reading the upstream once half its
    bounded buffer is unsent (memory stays bounded), serves other clients meanwhile, and
    when the client reads again it gets every event, once, in order."""
    limit = 256 * 1024
    n = 40_000  # ~6 MB: more than the kernel's socket buffers can hide
    async with numbered_upstream(interval_ms=0) as up:
        sidecar = await sidecar_factory(
            up, tracker=_limits(replay_max_bytes=limit), max_event_bytes=64 * 1024
        )
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        metrics = sidecar.proxy.metrics

        reader, writer = await post_unread(sidecar.port, headers, count_call(n, interval_ms=0))
        # Not reading. The pump must pause instead of evicting unsent events.
        await eventually(
            lambda: counter_value(metrics, "upstream_paused") >= 1,
            timeout=30,
            what="the pump paused",
        )
        (stream,) = sidecar.proxy.registry.streams.values()
        assert not stream.ended
        assert stream.tracker.buffered_bytes <= limit
        # Another client is served meanwhile.
        async with http.post(base + MCP, json=count_call(3, rid=8), headers=headers) as r:
            assert progress_numbers(await collect(r)) == [1, 2, 3]
        async with asyncio.timeout(60):
            raw = await reader.read()
        writer.close()
        head, sse = dechunk(raw)
        assert head.startswith(b"HTTP/1.1 200")
        got = [
            Received(e.id, e.event or "message", e.data.decode()) for e in parse_sse(sse) if e.data
        ]
        assert progress_numbers(got) == list(range(1, n + 1))
        assert len(final_results(got)) == 1
        assert stream.tracker.buffered_bytes <= limit
        assert counter_value(metrics, "slow_clients_dropped") == 0


async def test_a_client_that_stops_reading_is_cut_off_and_resumes_losing_nothing(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    """`client_write_timeout`: a client that reads nothing for that long is disconnected (the
    sidecar's writes to it only skip the timeout when they cannot wait: `sidecar.writer`
    rule 1); its stream stays, and resuming from the last event it got delivers the rest, each
    event once, in order."""
    n = 40_000
    async with numbered_upstream(interval_ms=0) as up:
        sidecar = await sidecar_factory(
            up,
            tracker=_limits(replay_max_bytes=256 * 1024),
            max_event_bytes=64 * 1024,
            client_write_timeout=0.5,
        )
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        reader, writer = await post_unread(sidecar.port, headers, count_call(n, interval_ms=0))
        await eventually(
            lambda: len(sidecar.proxy.registry.streams) == 1,
            timeout=30,
            what="the stream opened",
        )
        (stream,) = sidecar.proxy.registry.streams.values()
        await eventually(lambda: stream.clients == 0, timeout=30, what="the client cut off")
        assert not stream.ended  # the stream stays for the client to resume
        async with asyncio.timeout(30):
            raw = await reader.read()  # what reached the socket before the cut
        writer.close()
        first = [
            Received(e.id, e.event or "message", e.data.decode())
            for e in parse_sse(dechunk(raw)[1])
            if e.data
        ]
        assert 0 < len(first) < n
        async with http.get(
            base + MCP, headers={**headers, "Last-Event-ID": first[-1].id or ""}
        ) as resp:
            assert resp.status == 200
            rest = await collect(resp)
        got = first + [e for e in rest if e.data]
        assert progress_numbers(got) == list(range(1, n + 1))
        assert len(final_results(got)) == 1


def initialized(body: dict[str, Any]) -> web.Response:
    """A minimal upstream's answer to `initialize`: its session is "up-1"."""
    answer = {"jsonrpc": "2.0", "id": body["id"], "result": {"protocolVersion": "x"}}
    return web.json_response(answer, headers={"Mcp-Session-Id": "up-1"})


async def test_answered_streams_leave_their_upstream_connection_open_for_the_next(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """`sidecar.upstream` rule 4: a POST stream ends for the client at its answer; its upstream
    body, which a server ends a moment later (the official SDK's does), is read to its end
    before release, so the calls of a session share one upstream connection instead of one
    each."""
    peers: list[object] = []

    async def mcp(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        body = await request.json()
        if body["method"] == "initialize":
            return initialized(body)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        answer = {"jsonrpc": "2.0", "id": body["id"], "result": {"content": []}}
        await out.write(f"data: {json.dumps(answer)}\n\n".encode())
        await asyncio.sleep(0.05)  # the SDK server ends its stream after the answer, not with it
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_post(MCP, mcp)
    async with serve_app(app) as up:
        sidecar = await sidecar_factory(up)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        for rid in range(10, 20):
            async with http.post(base + MCP, json=count_call(1, rid=rid), headers=headers) as r:
                assert len(final_results(await collect(r))) == 1

            def pumps_done() -> bool:
                streams = sidecar.proxy.registry.streams.values()
                return all(s.pump is None or s.pump.done() for s in streams)

            await eventually(pumps_done, timeout=10, what="the call's pump done")
    calls = peers[1:]  # after the initialize
    assert len(calls) == 10
    assert len(set(calls)) == 1, f"upstream connections: {set(calls)}"


async def test_an_upstream_connection_idle_past_its_bound_is_not_reused(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """`sidecar.upstream` rule 5: a call after the upstream connection idled for more than
    `UPSTREAM_IDLE_REUSE_S` goes on a new connection (the server may be closing the old one:
    uvicorn and Node close theirs after 5 s), while calls close together share one. The bench
    met the race: 200 calls' connections idle for 5 s, the next call through the sidecar a
    502."""
    peers: list[object] = []

    async def mcp(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return initialized(await request.json())

    app = web.Application()
    app.router.add_post(MCP, mcp)
    async with serve_app(app) as up:
        sidecar = await sidecar_factory(up)
        base = f"http://127.0.0.1:{sidecar.port}"
        for pause in (0.0, 0.5, UPSTREAM_IDLE_REUSE_S + 0.3, 0.5):
            await asyncio.sleep(pause)
            await initialize(http, base)
    first, soon, after_idle, soon_again = peers
    assert soon == first
    assert after_idle != first
    assert soon_again == after_idle


async def test_idle_streams_get_keepalives_and_busy_ones_do_not(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """`heartbeat_interval` (`sidecar.writer` rule 3): a client stream with nothing to send
    gets a keep-alive comment each interval, timed from the last write, so a stream whose
    events come faster than that gets none."""
    done = asyncio.Event()

    async def mcp(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":  # an idle standalone stream
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            await done.wait()
            return out
        body = await request.json()
        if body["method"] == "initialize":
            return initialized(body)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for i in range(12):  # an event every 100 ms, faster than the 400 ms heartbeat
            note = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"n": i}}
            await out.write(f"data: {json.dumps(note)}\n\n".encode())
            await asyncio.sleep(0.1)
        answer = {"jsonrpc": "2.0", "id": body["id"], "result": {"content": []}}
        await out.write(f"data: {json.dumps(answer)}\n\n".encode())
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_route("*", MCP, mcp)
    async with serve_app(app) as up:
        sidecar = await sidecar_factory(up, heartbeat_interval=0.4)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        async with http.post(base + MCP, json=count_call(1), headers=headers) as busy:
            raw = await busy.read()
        assert b"notifications/progress" in raw
        assert b": keepalive" not in raw
        idle_headers = {**headers, "Accept": "text/event-stream"}
        comments = 0
        try:
            async with http.get(base + MCP, headers=idle_headers) as idle:
                assert idle.status == 200
                async with asyncio.timeout(10):
                    async for line in idle.content:
                        comments += line.startswith(b": keepalive")
                        if comments == 3:
                            break
        finally:
            done.set()
        assert comments == 3


async def test_write_through_delivers_every_event_once_in_order_to_one_or_two_clients(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    """`sidecar.writer` rule 4: a caught-up only client gets events written by the pump's
    relay itself (no wake of its writer per event); a second client on the same stream (a
    resume while the first still reads) turns it off and on again. Each client gets every
    event after its position once, in order, whoever wrote it."""
    n = 400
    async with numbered_upstream(interval_ms=0) as up:
        sidecar = await sidecar_factory(up)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        async with http.post(base + MCP, json=count_call(n, interval_ms=2), headers=headers) as a:
            first = await collect(a, limit=50)
            assert progress_numbers(first) == list(range(1, 51))
            second: list[Received] = []
            resume = {**headers, "Accept": "text/event-stream", "Last-Event-ID": first[9].id or ""}
            async with http.get(base + MCP, headers=resume) as b:
                assert b.status == 200
                # Two clients now: both read at once until the stream ends.
                rest_a, second = await asyncio.gather(collect(a), collect(b))
        got_a = first + rest_a
        assert sidecar.proxy.writer.written_through > 0  # rule 4 was in use
        assert progress_numbers(got_a) == list(range(1, n + 1))
        assert len(final_results(got_a)) == 1
        assert progress_numbers(second) == list(range(11, n + 1))
        assert len(final_results(second)) == 1
        ids = [e.id for e in got_a if e.data]
        assert len(set(ids)) == len(ids)


def _limits(**kw: int) -> Any:
    from sidecar.tracker import TrackerLimits

    return TrackerLimits(**kw)


async def through_numbered_upstream(
    procs: ProcessPool,
    sidecar_factory: SidecarFactory,
    http: aiohttp.ClientSession,
    *flags: str | int,
) -> tuple[ManagedProcess, int, RunningSidecar, str, str]:
    """A numbered upstream process (`flags` are its options) behind a sidecar, and a session
    through it: (upstream, its port, sidecar, the sidecar's base URL, session id)."""
    port = free_port()
    argv = python_module("tests.support.numbered_upstream", "--port", port, *flags)
    upstream = await procs.start(argv, name="numbered", ready_port=port)
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}")
    base = f"http://127.0.0.1:{sidecar.port}"
    return upstream, port, sidecar, base, await initialize(http, base)


async def read_killing_upstream(
    resp: aiohttp.ClientResponse,
    upstream: ManagedProcess,
    *,
    kill_at: int,
    restart_port: int | None = None,
    stop_at: int | None = None,
) -> list[Received]:
    """Read `resp`; SIGKILL the upstream once `kill_at` events arrived (and start it again on
    `restart_port`, if given); stop after `stop_at` events or at the end."""
    got: list[Received] = []
    async for ev in events(resp):
        got.append(ev)
        if len(got) == kill_at:
            upstream.kill()
            if restart_port is not None:
                await upstream.wait_exit()
                await upstream.start(ready_port=restart_port)
        if len(got) == stop_at:
            break
    return got


@pytest.mark.parametrize("overlap", [0, 3])
async def test_upstream_killed_mid_stream_and_restarted(
    sidecar_factory: SidecarFactory, procs: ProcessPool, http: aiohttp.ClientSession, overlap: int
) -> None:
    """SIGKILL the upstream process mid-stream and restart it: the client's connection stays
    open and it receives 1..N exactly once, in order."""
    upstream, port, sidecar, base, sid = await through_numbered_upstream(
        procs, sidecar_factory, http, "--overlap", overlap
    )
    n = 120
    async with http.post(
        base + MCP, json=count_call(n, interval_ms=5), headers={**HEADERS, "Mcp-Session-Id": sid}
    ) as resp:
        got = await read_killing_upstream(resp, upstream, kill_at=40, restart_port=port)
    assert progress_numbers(got) == list(range(1, n + 1))
    assert len(final_results(got)) == 1
    assert counter_value(sidecar.proxy.metrics, "upstream_reconnects") >= 1
    if overlap:
        assert counter_value(sidecar.proxy.metrics, "duplicates_dropped") >= 1


async def test_upstream_without_ids_killed_gives_a_clear_end(
    sidecar_factory: SidecarFactory, procs: ProcessPool, http: aiohttp.ClientSession
) -> None:
    upstream, _, _, base, sid = await through_numbered_upstream(
        procs, sidecar_factory, http, "--no-ids"
    )
    async with http.post(
        base + MCP, json=count_call(100, interval_ms=5), headers={**HEADERS, "Mcp-Session-Id": sid}
    ) as resp:
        got = await read_killing_upstream(resp, upstream, kill_at=10)
    assert progress_numbers(got)[:10] == list(range(1, 11))
    (err,) = final_results(got)
    assert err["id"] == 7
    assert "no event id" in err["error"]["message"]


async def test_standalone_get_stream_survives_upstream_restart(
    sidecar_factory: SidecarFactory, procs: ProcessPool, http: aiohttp.ClientSession
) -> None:
    upstream, port, _, base, sid = await through_numbered_upstream(
        procs, sidecar_factory, http, "--interval-ms", 5
    )
    async with http.get(
        base + MCP, headers={**HEADERS, "Mcp-Session-Id": sid, "Accept": "text/event-stream"}
    ) as resp:
        got = await read_killing_upstream(resp, upstream, kill_at=15, restart_port=port, stop_at=40)
    numbers = [e.json()["params"]["data"]["k"] for e in got]
    assert numbers == list(range(1, 41))


async def _stream_of_60_with_client_gone_after_3(
    sidecar_factory: SidecarFactory, up: str, http: aiohttp.ClientSession
) -> tuple[str, dict[str, str], list[Received], Any]:
    sidecar = await sidecar_factory(up, tracker=_limits(replay_max_events=5))
    base = f"http://127.0.0.1:{sidecar.port}"
    sid = await initialize(http, base)
    headers = {**HEADERS, "Mcp-Session-Id": sid}
    async with http.post(base + MCP, json=count_call(60, interval_ms=1), headers=headers) as resp:
        # Everything is written into this connection (socket buffers hold it all) before the
        # client has read more than 3 events and the connection dies.
        (stream,) = sidecar.proxy.registry.streams.values()
        await eventually(lambda: stream.finished, timeout=10, what="the stream finished")
        first = await collect(resp, limit=3)
    return base, headers, first, sidecar


async def test_resume_older_than_buffer_is_served_through_the_upstream(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    """The buffer holds only the last 5 events; a client back from event 3 gets 4..60 from
    the upstream (re-labelled with the ids it would have had), then the buffer."""
    async with numbered_upstream(interval_ms=1, overlap=2) as up:
        base, headers, first, _ = await _stream_of_60_with_client_gone_after_3(
            sidecar_factory, up, http
        )
        last = first[-1].id
        assert last is not None
        async with http.get(
            base + MCP, headers={**headers, "Last-Event-ID": last, "Accept": SSE}
        ) as resp:
            assert resp.status == 200
            rest = await collect(resp)
    got = first + rest
    assert progress_numbers(got) == list(range(1, 61))
    assert len(final_results(got)) == 1
    assert positions(got) == [(last.split(".")[0], 1, k) for k in range(1, 62)]


async def test_resume_older_than_buffer_without_upstream_ids_is_a_clear_410(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream(interval_ms=1, no_ids=True) as up:
        base, headers, first, _ = await _stream_of_60_with_client_gone_after_3(
            sidecar_factory, up, http
        )
        last = first[-1].id
        assert last is not None
        async with http.get(
            base + MCP, headers={**headers, "Last-Event-ID": last, "Accept": SSE}
        ) as resp:
            assert resp.status == 410
            assert "older than the replay buffer" in (await resp.json())["error"]["message"]


SSE = "text/event-stream"


async def test_standalone_stream_without_ids_is_reopened_afresh(
    sidecar_factory: SidecarFactory, procs: ProcessPool, http: aiohttp.ClientSession
) -> None:
    """An upstream whose GET stream carries no ids cannot be resumed, but it can be opened
    again, as a client would: the client's connection stays and events keep coming."""
    upstream, port, _, base, sid = await through_numbered_upstream(
        procs, sidecar_factory, http, "--interval-ms", 5, "--no-ids"
    )
    async with http.get(
        base + MCP, headers={**HEADERS, "Mcp-Session-Id": sid, "Accept": SSE}
    ) as resp:
        got = await read_killing_upstream(resp, upstream, kill_at=10, restart_port=port, stop_at=25)
    numbers = [e.json()["params"]["data"]["k"] for e in got]
    assert numbers[:10] == list(range(1, 11))
    assert numbers[10] == 1  # a new upstream stream: it starts over
    seqs = [seq for _, _, seq in positions(got)]
    assert seqs == list(range(1, 26))  # one client-facing stream throughout
