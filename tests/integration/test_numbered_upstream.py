"""The numbered fake upstream: its wire format, its flags, and resuming across a real SIGKILL.

The resilience tests trust this server to be a faithful, deterministic MCP Streamable HTTP
server; these tests are what earns that trust.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.numbered_upstream import (
    STATELESS_VERSION,
    count_stream,
    event_id,
    make_app,
    parse_event_id,
)
from tests.support.procs import ManagedProcess, ProcessPool, free_port, python_module
from tests.support.sse_client import RawEvent, parse_sse, read_sse

PROTOCOL = "2025-11-25"


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[ProcessPool]:
    async with ProcessPool(tmp_path) as pool:
        yield pool


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@asynccontextmanager
async def serve(**flags: Any) -> AsyncIterator[str]:
    """The upstream in-process on 127.0.0.1:0; yields the /mcp URL."""
    runner = web.AppRunner(make_app(**flags), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/mcp"
    finally:
        await runner.cleanup()


async def start_process(procs: ProcessPool, *flags: str | int) -> tuple[ManagedProcess, str]:
    port = free_port()
    argv = python_module("tests.support.numbered_upstream", "--port", port, *flags)
    proc = await procs.start(argv, name="numbered", ready_port=port)
    return proc, f"http://127.0.0.1:{port}/mcp"


def headers(session_id: str | None, **extra: str) -> dict[str, str]:
    h = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": PROTOCOL}
    if session_id:
        h["Mcp-Session-Id"] = session_id
    return {**h, **extra}


def count_call(n: int, *, rpc_id: Any = 1, token: Any = "tok", interval_ms: int = 1) -> Any:
    return {
        "jsonrpc": "2.0",
        "id": rpc_id,
        "method": "tools/call",
        "params": {
            "name": "count",
            "arguments": {"n": n, "interval_ms": interval_ms},
            "_meta": {"progressToken": token},
        },
    }


async def initialize(http: aiohttp.ClientSession, url: str) -> str:
    body = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}
    async with http.post(url, json=body, headers=headers(None)) as resp:
        assert resp.status == 200
        assert (await resp.json())["result"]["serverInfo"]["name"] == "numbered-upstream"
        session_id = resp.headers["Mcp-Session-Id"]
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with http.post(url, json=note, headers=headers(session_id)) as resp:
        assert resp.status == 202
    return session_id


def numbers(events: list[RawEvent]) -> list[int]:
    """Progress (or log `k`) of each data event; the final response counts as -1."""
    out = []
    for e in events:
        if not e.data:
            continue
        msg = e.json()
        if "result" in msg:
            out.append(-1)
        elif msg["method"] == "notifications/progress":
            out.append(msg["params"]["progress"])
        else:
            out.append(msg["params"]["data"]["k"])
    return out


def expected(first: int, n: int) -> list[int]:
    return [*range(first, n + 1), -1]


# --- a real process, killed and restarted ----------------------------------------------------


async def test_post_streams_numbered_progress_then_the_response(
    procs: ProcessPool, http: aiohttp.ClientSession
) -> None:
    _, url = await start_process(procs)
    session_id = await initialize(http, url)
    async with http.post(url, json=count_call(5, rpc_id=9), headers=headers(session_id)) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Mcp-Session-Id"] == session_id
        events = await read_sse(resp)
    stream = count_stream(5, 1, 9, "tok")
    assert [e.id for e in events] == [event_id(stream, k) for k in range(1, 7)]
    assert events[0].json() == {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": "tok", "progress": 1, "total": 5},
    }
    assert events[-1].json() == {
        "jsonrpc": "2.0",
        "id": 9,
        "result": {"content": [{"type": "text", "text": "counted 5"}]},
    }
    assert numbers(events) == expected(1, 5)

    async with http.delete(url, headers=headers(session_id)) as resp:
        assert resp.status == 200


async def test_resumes_a_stream_after_sigkill_and_restart(
    procs: ProcessPool, http: aiohttp.ClientSession
) -> None:
    proc, url = await start_process(procs)
    session_id = await initialize(http, url)
    call = count_call(30, rpc_id="a/b:c", token=7, interval_ms=20)
    async with http.post(url, json=call, headers=headers(session_id)) as resp:
        before = await read_sse(resp, max_events=3)
        proc.kill(signal.SIGKILL)
        assert await proc.wait_exit() == -signal.SIGKILL
    assert numbers(before) == [1, 2, 3]

    await proc.restart()
    resume = headers(session_id, **{"Last-Event-ID": before[-1].id or ""})
    async with http.get(url, headers=resume) as resp:
        assert resp.status == 200
        after = await read_sse(resp)
    assert numbers(after) == expected(4, 30)
    assert after[-1].json()["id"] == "a/b:c"


async def test_die_after_crashes_mid_stream_and_restarts_finish_it(
    procs: ProcessPool, http: aiohttp.ClientSession
) -> None:
    proc, url = await start_process(procs, "--die-after", 4)
    session_id = await initialize(http, url)
    seen: list[RawEvent] = []
    async with http.post(url, json=count_call(10), headers=headers(session_id)) as resp:
        seen += await read_sse(resp, max_events=4)
    while numbers(seen)[-1] != -1:
        assert await proc.wait_exit() == 1
        await proc.restart()
        resume = headers(session_id, **{"Last-Event-ID": seen[-1].id or ""})
        async with http.get(url, headers=resume) as resp:
            seen += await read_sse(resp, max_events=4)
    assert numbers(seen) == expected(1, 10)  # every event once, in order, across 3 crashes
    assert proc.starts == 3


# --- flags, in-process -----------------------------------------------------------------------


async def test_overlap_resends_the_last_events_on_resume(http: aiohttp.ClientSession) -> None:
    async with serve(overlap=2) as url:
        async with http.post(url, json=count_call(6), headers=headers("s")) as resp:
            first = await read_sse(resp, max_events=3)
        resume = headers("s", **{"Last-Event-ID": first[-1].id or ""})
        async with http.get(url, headers=resume) as resp:
            rest = await read_sse(resp)
    assert numbers(first) == [1, 2, 3]
    assert numbers(rest) == [2, 3, *expected(4, 6)]


async def test_poll_every_closes_cleanly_with_retry(http: aiohttp.ClientSession) -> None:
    async with serve(poll_every=3) as url:
        async with http.post(url, json=count_call(7), headers=headers("s")) as resp:
            legs = [await read_sse(resp)]
        while numbers(legs[-1])[-1] != -1:
            poll = legs[-1][-1]
            assert poll.data == b""
            assert poll.retry == 50
            assert poll.id == legs[-1][-2].id  # resume after the last event sent
            resume = headers("s", **{"Last-Event-ID": poll.id or ""})
            async with http.get(url, headers=resume) as resp:
                legs.append(await read_sse(resp))
    assert [numbers(leg) for leg in legs] == [[1, 2, 3], [4, 5, 6], [7, -1]]


async def test_standalone_get_stream_is_numbered_and_resumable(
    http: aiohttp.ClientSession,
) -> None:
    async with serve(interval_ms=1) as url:
        async with http.get(url, headers=headers("s")) as resp:
            first = await read_sse(resp, max_events=3)
        assert [e.id for e in first] == ["get/1", "get/2", "get/3"]
        assert numbers(first) == [1, 2, 3]
        async with http.get(url, headers=headers("s", **{"Last-Event-ID": "get/3"})) as resp:
            assert numbers(await read_sse(resp, max_events=2)) == [4, 5]


async def test_stateless_revision_gets_no_session(http: aiohttp.ClientSession) -> None:
    stateless = {"Accept": "application/json, text/event-stream"}
    stateless["MCP-Protocol-Version"] = STATELESS_VERSION
    async with serve(strict_sessions=True) as url:
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}
        async with http.post(url, json=init, headers=stateless) as resp:
            assert resp.status == 200
            assert "Mcp-Session-Id" not in resp.headers
        async with http.post(url, json=count_call(2), headers=stateless) as resp:
            assert "Mcp-Session-Id" not in resp.headers
            assert numbers(await read_sse(resp)) == expected(1, 2)
        async with http.get(url, headers=stateless) as resp:
            assert resp.status == 405


async def test_strict_sessions_reject_unknown_ids(http: aiohttp.ClientSession) -> None:
    async with serve(strict_sessions=True) as url:
        for sid in (None, "made-up"):
            async with http.post(url, json=count_call(1), headers=headers(sid)) as resp:
                assert resp.status == 404
            async with http.get(url, headers=headers(sid)) as resp:
                assert resp.status == 404
        session_id = await initialize(http, url)
        async with http.post(url, json=count_call(1), headers=headers(session_id)) as resp:
            assert numbers(await read_sse(resp)) == expected(1, 1)
        async with http.delete(url, headers=headers(session_id)) as resp:
            assert resp.status == 200
        async with http.post(url, json=count_call(1), headers=headers(session_id)) as resp:
            assert resp.status == 404


async def count_body(http: aiohttp.ClientSession, n: int, **flags: Any) -> bytes:
    async with (
        serve(**flags) as url,
        http.post(url, json=count_call(n), headers=headers("s")) as resp,
    ):
        return await resp.read()


async def test_wire_shape_flags(http: aiohttp.ClientSession) -> None:
    crlf = await count_body(http, 3, crlf=True)
    assert crlf.count(b"\r\n") == crlf.count(b"\n") > 0
    assert numbers(parse_sse(crlf)) == expected(1, 3)

    no_ids = await count_body(http, 3, no_ids=True)
    assert b"id:" not in no_ids
    assert numbers(parse_sse(no_ids)) == expected(1, 3)

    primed = parse_sse(await count_body(http, 2, priming=True))
    assert (primed[0].id or "").endswith("/0")
    assert primed[0].data == b""
    assert numbers(primed) == expected(1, 2)

    malformed = parse_sse(await count_body(http, 4, malformed=True))
    bad = malformed[3]
    assert bad.event == "malformed"
    assert bad.id is None
    with pytest.raises(UnicodeDecodeError):
        bad.data.decode()
    assert numbers([e for e in malformed if e is not bad]) == expected(1, 4)

    oversized = parse_sse(await count_body(http, 4, oversized=300_000))
    assert [len(e.data) for e in oversized][2] == 300_000
    assert numbers(oversized) == expected(1, 4)


async def test_json_as_sse_and_bad_requests(http: aiohttp.ClientSession) -> None:
    async with serve(json_as_sse=True) as url:
        body = {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}
        async with http.post(url, json=body, headers=headers("s")) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            [event] = parse_sse(await resp.read())
            assert event.json()["result"]["tools"][0]["name"] == "count"
        async with http.get(url, headers=headers("s", **{"Last-Event-ID": "nope/1"})) as resp:
            assert resp.status == 400
        async with http.post(url, data=b"{", headers=headers("s")) as resp:
            assert resp.status == 400


async def test_shutdown_ends_endless_streams_promptly(http: aiohttp.ClientSession) -> None:
    async with asyncio.timeout(5):
        async with serve(interval_ms=1) as url:
            resp = await http.get(url, headers=headers("s"))
            await read_sse(resp, max_events=1)
        # Cleanup did not wait out its timeout, and the stream was ended, not left hanging.
        await read_sse(resp)
        assert resp.content.at_eof()
        resp.release()


# --- the event-id codec ----------------------------------------------------------------------


@pytest.mark.parametrize("rpc_id", [1, "req-1", "a/b:c.d", None])
@pytest.mark.parametrize("token", ["tok", 42, {"nested": ["x"]}])
def test_event_ids_carry_everything_needed_to_resume(rpc_id: Any, token: Any) -> None:
    stream = count_stream(12, 5, rpc_id, token)
    assert parse_event_id(event_id(stream, 4), get_interval_ms=1) == (stream, 4)


@pytest.mark.parametrize(
    "bad",
    ["", "get", "get/x", "count.3.1.WzEsMV0/5", "count.3.1.!!!/1", "other.3.1.WzEsMV0/1", "x/1"],
)
def test_foreign_event_ids_are_rejected(bad: str) -> None:
    # count.3.1.WzEsMV0 is [1,1] with n=3: k=5 is past its final event (k=4).
    assert parse_event_id(bad, get_interval_ms=1) is None
