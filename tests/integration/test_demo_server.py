"""The bundled demo MCP server, as a real process, driven by the official SDK client.

Also pins the facts the sidecar relies on: the event store's id format and replay through
`Last-Event-ID`, the DNS-rebinding Host check and a clean exit on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import mcp_types
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.server.streamable_http import EventMessage

from tests.support.procs import ManagedProcess, ProcessPool, free_port, python_module
from tests.support.sse_client import RawEvent, read_sse, read_sse_for
from tether.demo_server import MemoryEventStore

pytestmark = pytest.mark.slow

MODERN_HANDSHAKE = "2025-11-25"
RESUMES = 5
"""How many times a test resumes a dropped stream before it gives up."""


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[ProcessPool]:
    async with ProcessPool(tmp_path) as pool:
        yield pool


async def start_demo(procs: ProcessPool, *flags: str) -> tuple[ManagedProcess, int]:
    port = free_port()
    argv = python_module("tether.demo_server", "--port", port, *flags)
    return await procs.start(argv, name="demo_server", ready_port=port), port


class Progress:
    def __init__(self) -> None:
        self.seen: list[tuple[float, float | None, str | None]] = []

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.seen.append((progress, total, message))


def text_of(result: mcp_types.CallToolResult) -> str:
    assert not result.is_error, result
    [content] = result.content
    assert isinstance(content, mcp_types.TextContent)
    return content.text


# --- through the SDK client ------------------------------------------------------------------


@pytest.mark.parametrize("flags", [(), ("--no-event-store",)], ids=["event-store", "no-store"])
async def test_count_reports_progress(procs: ProcessPool, flags: tuple[str, ...]) -> None:
    _, port = await start_demo(procs, *flags)
    async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
        tools = await client.list_tools()
        assert {"count", "echo", "add", "server_info"} <= {t.name for t in tools.tools}

        progress = Progress()
        result = await client.call_tool(
            "count", {"n": 5, "interval_ms": 5}, progress_callback=progress
        )
        assert text_of(result) == "counted 5"
        assert progress.seen == [(i, 5, f"tick {i}") for i in range(1, 6)]

        assert text_of(await client.call_tool("echo", {"text": "héllo"})) == "héllo"


async def test_legacy_sse_transport(procs: ProcessPool) -> None:
    _, port = await start_demo(procs, "--transport", "sse")
    # `sse_client` is an async context manager yielding (read, write) streams, which is what
    # `Client` accepts as a Transport; the legacy transport only speaks the handshake era.
    async with Client(sse_client(f"http://127.0.0.1:{port}/sse"), mode="legacy") as client:
        progress = Progress()
        result = await client.call_tool(
            "count", {"n": 3, "interval_ms": 5}, progress_callback=progress
        )
        assert text_of(result) == "counted 3"
        assert [p for p, _, _ in progress.seen] == [1, 2, 3]


async def test_sigterm_exits_cleanly(procs: ProcessPool) -> None:
    proc, port = await start_demo(procs)
    async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
        assert text_of(await client.call_tool("echo", {"text": "x"})) == "x"
    assert await proc.stop() == 0
    assert "demo MCP server ready on http://127.0.0.1:" in proc.log_tail()


# --- on the wire -----------------------------------------------------------------------------


def headers(session_id: str | None = None, host: str | None = None) -> dict[str, str]:
    h = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN_HANDSHAKE,
    }
    if session_id:
        h["Mcp-Session-Id"] = session_id
    if host:
        h["Host"] = host
    return h


def initialize_body() -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": MODERN_HANDSHAKE,
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "0"},
        },
    }


async def open_session(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(url, json=initialize_body(), headers=headers()) as resp:
        assert resp.status == 200, await resp.text()
        session_id = resp.headers["Mcp-Session-Id"]
        await resp.read()
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with http.post(url, json=note, headers=headers(session_id)) as resp:
        assert resp.status == 202
    return session_id


def progress_of(events: list[RawEvent]) -> list[int]:
    return [
        e.json()["params"]["progress"]
        for e in events
        if e.data and e.json().get("method") == "notifications/progress"
    ]


async def read_through_response(resp: aiohttp.ClientResponse, *, rpc_id: int) -> list[RawEvent]:
    """Events with data, up to and including the JSON-RPC response to `rpc_id`, or up to the
    end of the stream if it ends first."""
    events: list[RawEvent] = []
    async with asyncio.timeout(10):
        while True:
            got = await read_sse(resp, max_events=1)
            if not got:
                return events
            [event] = got
            if event.data:
                events.append(event)
                if event.json().get("id") == rpc_id:
                    return events


async def test_event_store_resumes_a_dropped_post_stream(procs: ProcessPool) -> None:
    _, port = await start_demo(procs, "--retry-interval-ms", "500")
    url = f"http://127.0.0.1:{port}/mcp"
    call = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {
            "name": "count",
            "arguments": {"n": 6, "interval_ms": 30},
            "_meta": {"progressToken": "tok"},
        },
    }
    async with aiohttp.ClientSession() as http:
        session_id = await open_session(http, url)
        async with http.post(url, json=call, headers=headers(session_id)) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            first = await read_sse(resp, max_events=3)  # priming, then progress 1 and 2
        priming = first[0]
        assert priming.data == b""
        assert priming.retry == 500
        assert all(e.id is not None and re.fullmatch(r"7:\d+", e.id) for e in first)
        assert progress_of(first) == [1, 2]

        # Resume as an SSE client does: from the last id seen, again (after the server's
        # `retry:`) when a resumed stream ends before the response. The SDK server ends a
        # resume at once, after replaying what it stored, while it still holds the dropped POST
        # stream (it has not yet noticed the disconnect: seen on a loaded machine).
        rest: list[RawEvent] = []
        for _ in range(RESUMES):
            resume = {**headers(session_id), "Last-Event-ID": (rest or first)[-1].id or ""}
            async with http.get(url, headers=resume) as resp:
                assert resp.status == 200
                # The SDK keeps a resumed stream open after the final response: read up to it.
                rest += await read_through_response(resp, rpc_id=7)
            if rest and rest[-1].json().get("id") == 7:
                break
            await asyncio.sleep(priming.retry / 1000)  # the reconnection delay the server set
        assert progress_of(rest) == [3, 4, 5, 6]
        final = rest[-1].json()
        assert final["id"] == 7
        assert final["result"]["content"][0]["text"] == "counted 6"


async def test_event_store_never_replays_another_sessions_events(procs: ProcessPool) -> None:
    """The SDK gives every session's transport the same store and names streams by request id
    ("7" in both sessions here, "_GET_stream" for every GET stream), so a store keyed by
    stream id alone replays one session's events into another's resume (other MCP SDKs have
    had the same advisory). Both sessions below drop the same-named stream mid-call."""
    _, port = await start_demo(procs, "--retry-interval-ms", "500")
    url = f"http://127.0.0.1:{port}/mcp"

    def call(n: int) -> dict[str, Any]:
        arguments = {"n": n, "interval_ms": 40}
        return {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "count", "arguments": arguments, "_meta": {"progressToken": n}},
        }

    async with aiohttp.ClientSession() as http:
        a, b = await open_session(http, url), await open_session(http, url)
        async with (
            http.post(url, json=call(6), headers=headers(a)) as resp_a,
            http.post(url, json=call(5), headers=headers(b)) as resp_b,
        ):
            first_a = await read_sse(resp_a, max_events=2)  # priming, progress 1
            await read_sse(resp_b, max_events=2)
        # The scenario, not a wait: both calls go on, and finish (6 x 40 ms), with nobody
        # connected; their end is not observable from outside the server.
        await asyncio.sleep(0.4)
        assert progress_of(first_a) == [1]

        resume = {**headers(a), "Last-Event-ID": first_a[-1].id or ""}
        async with http.get(url, headers=resume) as resp:
            assert resp.status == 200
            rest = await read_through_response(resp, rpc_id=7)
        assert progress_of(rest) == [2, 3, 4, 5, 6]
        assert {e.json()["params"]["progressToken"] for e in rest[:-1]} == {6}
        assert rest[-1].json()["result"]["content"][0]["text"] == "counted 6"

        # Session B presenting A's event id gets nothing of A's.
        stolen = {**headers(b), "Last-Event-ID": first_a[-1].id or ""}
        async with http.get(url, headers=stolen) as resp:
            events = await read_sse_for(resp, seconds=0.5)
        assert not any(e.data and b"counted 6" in e.data for e in events)
        assert all(
            e.json()["params"]["progressToken"] != 6
            for e in events
            if e.data and e.json().get("method")
        )


@pytest.mark.parametrize(
    ("flags", "host", "status"),
    [
        ((), "127.0.0.1:1", 200),  # a proxy keeps the upstream's host; any port is fine
        ((), "localhost:8931", 200),
        ((), "demo.tether.svc:8931", 421),
        (("--allowed-host", "demo.tether.svc:*"), "demo.tether.svc:8931", 200),
        (("--allowed-host", "*"), "anything.example", 200),
    ],
)
async def test_dns_rebinding_host_check(
    procs: ProcessPool, flags: tuple[str, ...], host: str, status: int
) -> None:
    _, port = await start_demo(procs, *flags)
    url = f"http://127.0.0.1:{port}/mcp"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=initialize_body(), headers=headers(host=host)) as resp,
    ):
        assert resp.status == status, await resp.text()


# --- the event store on its own --------------------------------------------------------------


def note(k: int) -> mcp_types.JSONRPCNotification:
    return mcp_types.JSONRPCNotification(jsonrpc="2.0", method="n", params={"k": k})


class Replay:
    def __init__(self) -> None:
        self.sent: list[EventMessage] = []

    async def __call__(self, event: EventMessage) -> None:
        self.sent.append(event)

    def ks(self) -> list[int]:
        out = []
        for e in self.sent:
            assert isinstance(e.message, mcp_types.JSONRPCNotification)
            assert e.message.params is not None
            out.append(e.message.params["k"])
        return out


async def test_memory_event_store_replays_one_stream_after_an_id() -> None:
    store = MemoryEventStore()
    priming = await store.store_event("a", None)
    ids = [await store.store_event("a", note(k)) for k in (1, 2, 3)]
    await store.store_event("b", note(99))
    assert priming == "a:1"
    assert ids == ["a:2", "a:3", "a:4"]

    replay = Replay()
    assert await store.replay_events_after(priming, replay) == "a"
    assert replay.ks() == [1, 2, 3]  # the priming event itself is never replayed
    assert [e.event_id for e in replay.sent] == ids

    replay = Replay()
    assert await store.replay_events_after("a:3", replay) == "a"
    assert replay.ks() == [3]


async def test_memory_event_store_refuses_what_it_cannot_replay_completely() -> None:
    store = MemoryEventStore(max_events=3)
    await store.store_event("a", note(1))  # a:1, evicted below
    await store.store_event("a", note(2))  # a:2, evicted below
    for k in (3, 4, 5):
        await store.store_event("a", note(k))
    assert store.event_count == 3
    for unknown in ("a:1", "nope:1", "a", "a:x", ""):
        assert await store.replay_events_after(unknown, Replay()) is None, unknown
    replay = Replay()
    assert await store.replay_events_after("a:2", replay) == "a"  # nothing after a:2 was lost
    assert replay.ks() == [3, 4, 5]


async def test_memory_event_store_replays_events_stored_while_it_replays() -> None:
    """The SDK transport registers a resumed stream for live delivery only after the replay
    returns, so an event stored during the replay (the client is slow, the tool keeps going)
    must be part of the replay. A snapshot taken up front lost it (seen in CI)."""
    store = MemoryEventStore()
    first = await store.store_event("a", note(1))
    await store.store_event("a", note(2))
    replay = Replay()
    stored_meanwhile = iter((3, 4))

    async def slow_client(event: EventMessage) -> None:
        await replay(event)
        k = next(stored_meanwhile, None)
        if k is not None:
            await store.store_event("a", note(k))
            await store.store_event("b", note(100 + k))  # another stream: not replayed

    assert await store.replay_events_after(first, slow_client) == "a"
    assert replay.ks() == [2, 3, 4]


async def test_memory_event_store_fails_a_replay_that_eviction_overtook() -> None:
    """Eviction racing a replay must not yield a silently incomplete one."""
    store = MemoryEventStore(max_events=3)
    first = await store.store_event("a", note(1))
    await store.store_event("a", note(2))
    replay = Replay()

    async def slow_client(event: EventMessage) -> None:
        await replay(event)
        for k in range(10, 14):  # pushes a:2's successors out before they are replayed
            await store.store_event("a", note(k))

    with pytest.raises(LookupError, match="evicted mid-replay"):
        await store.replay_events_after(first, slow_client)
    assert replay.ks() == [2]


async def test_memory_event_store_ids_survive_colons_in_stream_ids() -> None:
    store = MemoryEventStore()
    first = await store.store_event("x:y", note(1))
    await store.store_event("x:y", note(2))
    replay = Replay()
    assert await store.replay_events_after(first, replay) == "x:y"
    assert replay.ks() == [2]
    assert json.loads(replay.sent[0].message.model_dump_json())["params"] == {"k": 2}


async def test_sigterm_with_open_streams_still_exits_cleanly(procs: ProcessPool) -> None:
    proc, port = await start_demo(procs)
    url = f"http://127.0.0.1:{port}/mcp"
    async with aiohttp.ClientSession() as http:
        session_id = await open_session(http, url)
        async with http.get(url, headers=headers(session_id)) as standalone:
            # No priming event on the standalone stream (only on POST streams), so nothing
            # to read: being connected is enough.
            assert standalone.status == 200
            proc.kill(signal.SIGTERM)
            # uvicorn cancels streams still open after its grace period, then the process ends.
            assert await proc.wait_exit(timeout=10) == 0


async def test_without_event_store_streams_carry_no_ids(procs: ProcessPool) -> None:
    _, port = await start_demo(procs, "--no-event-store")
    url = f"http://127.0.0.1:{port}/mcp"
    async with aiohttp.ClientSession() as http:
        session_id = await open_session(http, url)
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "count", "arguments": {"n": 2, "interval_ms": 1}},
        }
        async with http.post(url, json=call, headers=headers(session_id)) as resp:
            body = await resp.read()
    assert b"id:" not in body.replace(b'"id":', b"")
    assert b"counted 2" in body
