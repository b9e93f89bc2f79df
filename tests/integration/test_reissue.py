"""Issue #13 against a real sidecar and a scripted upstream on loopback: safe requests sent
again when the upstream fails before answering, nothing else ever sent twice, `Mcp-*` headers
checked against the body, and 2026-07-28 listen streams kept across upstream listens
(`sidecar.reissue`, `sidecar.resilient`, `sidecar.listen`).

The upstream is scripted per method: each request takes the next step of its method's plan
(the last step repeats), and every request it receives is counted, so "sent once" and "sent
again" are facts, not inferences."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.listen import ACKNOWLEDGED, SUBSCRIPTION_ID
from sidecar.reconnect import ReconnectConfig
from tests.integration.conftest import SidecarFactory, serve_app
from tests.support.procs import free_port
from tests.support.sse_client import parse_sse
from tests.support.waiting import eventually

MCP = "/mcp"
MODERN = "2026-07-28"
HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": MODERN,
}
FAST = ReconnectConfig(initial_delay=0.01, max_delay=0.05, max_attempts=8, max_elapsed=10)
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
}
TOOLS = [
    {"name": "read", "inputSchema": {"type": "object"}, "annotations": {"readOnlyHint": True}},
    {"name": "write", "inputSchema": {"type": "object"}, "annotations": {"readOnlyHint": False}},
]


def request(method: str, rid: int | str = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": {**params, "_meta": ENVELOPE}}


def sse(msg: dict[str, Any]) -> bytes:
    return f"event: message\r\ndata: {json.dumps(msg)}\r\n\r\n".encode()


@dataclass
class Script:
    """The upstream's plan per method, and what it received."""

    plans: dict[str, list[str]] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    listens: dict[str, list[Callable[[web.StreamResponse], Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def step(self, method: str) -> str:
        plan = self.plans.get(method, ["json"])
        n = self.hits[method] - 1
        return plan[min(n, len(plan) - 1)]

    def app(self) -> web.Application:
        async def mcp(req: web.Request) -> web.StreamResponse:
            msg = await req.json()
            method = msg["method"]
            self.hits[method] += 1
            answer = {"jsonrpc": "2.0", "id": msg["id"], "result": self.result(method)}
            step = self.step(method)
            if step == "reset":
                assert req.transport is not None
                req.transport.abort()
                return web.Response()  # never written
            if step.isdigit():
                return web.json_response({"detail": "busy"}, status=int(step))
            if step == "json":
                return web.json_response(answer)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(req)
            if step == "listen":
                await resp.write(sse(self.ack(msg["id"], msg["params"])))
                for action in self.listens[str(msg["id"])]:
                    await action(resp)
                await self.release.wait()  # then the graceful end: the listen's result
                meta = {SUBSCRIPTION_ID: msg["id"]}
                await resp.write(
                    sse({"jsonrpc": "2.0", "id": msg["id"], "result": {"_meta": meta}})
                )
                return resp
            if step == "break_before_event":
                await resp.write(b": warming up\r\n\r\n")
            elif step == "break_after_event":
                await resp.write(sse(self.progress(1)))
            else:  # "sse"
                await resp.write(sse(self.progress(1)))
                await resp.write(sse(answer))
                return resp
            assert req.transport is not None
            req.transport.abort()
            return resp

        app = web.Application()
        app.router.add_post(MCP, mcp)
        return app

    @staticmethod
    def result(method: str) -> dict[str, Any]:
        if method == "tools/list":
            return {"tools": TOOLS}
        return {"content": [{"type": "text", "text": method}]}

    @staticmethod
    def progress(n: int) -> dict[str, Any]:
        params = {"progressToken": "p", "progress": n}
        return {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}

    @staticmethod
    def ack(rid: Any, params: dict[str, Any]) -> dict[str, Any]:
        honoured = params["notifications"]
        meta = {SUBSCRIPTION_ID: rid}
        return {
            "jsonrpc": "2.0",
            "method": ACKNOWLEDGED,
            "params": {"notifications": honoured, "_meta": meta},
        }


@asynccontextmanager
async def scripted(script: Script, port: int | None = None) -> AsyncIterator[str]:
    if port is None:
        async with serve_app(script.app()) as url:
            yield url
        return
    # A short shutdown: stopping cuts the open listen streams, as a killed server would.
    runner = web.AppRunner(script.app(), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def post(
    http: aiohttp.ClientSession, base: str, body: dict[str, Any], **headers: str
) -> tuple[int, bytes]:
    async with http.post(base + MCP, json=body, headers={**HEADERS, **headers}) as resp:
        return resp.status, await resp.read()


async def test_a_safe_request_is_sent_again_until_the_upstream_answers(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """Reset, 503, a stream that breaks before its first event: none of it reached the
    client, so the client gets the fourth attempt's answer, exactly as the upstream sent it."""
    script = Script(plans={"tools/list": ["reset", "503", "break_before_event", "sse"]})
    async with scripted(script) as up:
        sidecar = await sidecar_factory(up, reconnect=FAST)
        status, body = await post(http, f"http://127.0.0.1:{sidecar.port}", request("tools/list"))
        assert status == 200
        answer = json.loads(parse_sse(body)[-1].data)
        assert answer["result"]["tools"] == TOOLS
        assert script.hits["tools/list"] == 4
        script.plans["tools/list"] = ["sse"]
        async with http.post(up + MCP, json=request("tools/list"), headers=HEADERS) as direct:
            assert await direct.read() == body  # byte for byte what the upstream sends
        assert sidecar.proxy.metrics.reissues._value.get() == 3


async def test_a_request_waits_for_an_upstream_that_is_not_listening_yet(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}", reconnect=FAST)
    base = f"http://127.0.0.1:{sidecar.port}"
    pending = asyncio.ensure_future(post(http, base, request("ping")))
    await eventually(
        lambda: sidecar.proxy.metrics.reissues._value.get() >= 2, timeout=10, what="retrying"
    )
    assert not pending.done()
    script = Script()
    async with scripted(script, port):
        status, body = await asyncio.wait_for(pending, 10)
    assert status == 200
    assert json.loads(body)["result"]["content"][0]["text"] == "ping"
    assert script.hits["ping"] == 1


async def test_what_is_not_known_to_be_safe_is_sent_once_and_answered_with_a_clear_error(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    script = Script(plans={"tools/call": ["reset"], "sampling/whatever": ["reset"]})
    async with scripted(script) as up:
        sidecar = await sidecar_factory(up, reconnect=FAST)
        base = f"http://127.0.0.1:{sidecar.port}"
        # Before any tools/list nothing is known of "read"; "write" is not safe once listed.
        status, body = await post(
            http, base, request("tools/call", name="read"), **{"Mcp-Name": "read"}
        )
        assert status == 502
        error = json.loads(body)
        assert error["error"]["message"].startswith("tether: upstream unreachable")
        assert error["id"] is None
        assert script.hits["tools/call"] == 1
        await post(http, base, request("tools/list"))
        status, _ = await post(http, base, request("tools/call", name="write"))
        assert status == 502
        assert script.hits["tools/call"] == 2
        status, _ = await post(http, base, request("sampling/whatever"))
        assert status == 502
        assert script.hits["sampling/whatever"] == 1
        assert sidecar.proxy.metrics.reissues._value.get() == 0


async def test_a_tool_listed_as_read_only_is_sent_again(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    script = Script(plans={"tools/call": ["503", "json"]})
    async with scripted(script) as up:
        sidecar = await sidecar_factory(up, reconnect=FAST)
        base = f"http://127.0.0.1:{sidecar.port}"
        status, _ = await post(http, base, request("tools/list"))  # JSON: learned from it
        assert status == 200
        status, body = await post(http, base, request("tools/call", name="read"))
        assert status == 200
        assert json.loads(body)["result"]["content"][0]["text"] == "tools/call"
        assert script.hits["tools/call"] == 2
        # "write" is not safe: the upstream's 503 goes to the client as it is, sent once.
        script.plans["tools/call"] = ["503"]
        status, body = await post(http, base, request("tools/call", name="write"))
        assert (status, json.loads(body)) == (503, {"detail": "busy"})
        assert script.hits["tools/call"] == 3


async def test_an_answer_that_reached_the_client_is_never_sent_again(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    script = Script(plans={"tools/list": ["break_after_event"]})
    async with scripted(script) as up:
        sidecar = await sidecar_factory(up, reconnect=FAST)
        base = f"http://127.0.0.1:{sidecar.port}"
        async with http.post(base + MCP, json=request("tools/list"), headers=HEADERS) as resp:
            assert resp.status == 200
            first = await resp.content.readuntil(b"\r\n\r\n")
            assert json.loads(parse_sse(first)[0].data)["method"] == "notifications/progress"
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()  # the upstream's break, passed on as a break
        assert script.hits["tools/list"] == 1  # and the request was not sent again


async def test_the_reconnect_policy_bounds_the_attempts(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    script = Script(plans={"resources/read": ["503"]})
    async with scripted(script) as up:
        policy = ReconnectConfig(initial_delay=0.01, max_delay=0.02, max_attempts=2)
        sidecar = await sidecar_factory(up, reconnect=policy)
        base = f"http://127.0.0.1:{sidecar.port}"
        status, body = await post(http, base, request("resources/read", uri="file:///x"))
        assert (status, json.loads(body)) == (503, {"detail": "busy"})  # the last answer
        assert script.hits["resources/read"] == 3


async def test_mcp_headers_that_disagree_with_the_body_are_refused_before_forwarding(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    script = Script()
    async with scripted(script) as up:
        sidecar = await sidecar_factory(up, reconnect=FAST)
        base = f"http://127.0.0.1:{sidecar.port}"
        for body, headers in (
            (request("tools/list", 5), {"Mcp-Method": "tools/call"}),
            (request("tools/call", 5, name="read"), {"Mcp-Method": "tools/call", "Mcp-Name": "rm"}),
            (request("resources/read", 5, uri="file:///a"), {"Mcp-Name": "=?base64?Zm9v?="}),
        ):
            status, answer = await post(http, base, body, **headers)
            assert status == 400
            error = json.loads(answer)
            assert error["id"] == 5
            assert error["error"]["code"] == -32020
        assert sum(script.hits.values()) == 0
        matching = {"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?cmVhZA==?="}  # "read"
        status, _ = await post(http, base, request("tools/call", name="read"), **matching)
        assert status == 200


@pytest.mark.parametrize("answer", ["sse", "json"])
async def test_a_session_request_is_sent_again_too(
    answer: str, sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """Older revisions: the same rules, on a session the upstream still has. A `tools/list`
    answered on a tracked session stream (ids rewritten) or in JSON teaches as well."""
    script = Script(plans={"tools/list": ["reset", answer], "tools/call": ["reset", "json"]})
    async with scripted(script) as up:
        sidecar = await sidecar_factory(up, reconnect=FAST)
        base = f"http://127.0.0.1:{sidecar.port}"
        old = {**HEADERS, "MCP-Protocol-Version": "2025-11-25", "Mcp-Session-Id": "s1"}
        async with http.post(base + MCP, json=request("tools/list"), headers=old) as resp:
            assert resp.status == 200
            body = await resp.read()
        if answer == "sse":
            events = parse_sse(body)
            assert all(e.id for e in events)  # a tracked stream: every event has our id
            assert json.loads(events[-1].data)["result"]["tools"] == TOOLS
        else:
            assert json.loads(body)["result"]["tools"] == TOOLS
        assert script.hits["tools/list"] == 2
        call = request("tools/call", 3, name="read")
        async with http.post(base + MCP, json=call, headers=old) as resp:
            assert resp.status == 200
        assert script.hits["tools/call"] == 2


# -- listen streams ----------------------------------------------------------------------------

LISTEN_FILTER = {"toolsListChanged": True, "resourceSubscriptions": ["file:///a"]}


async def read_events(resp: aiohttp.ClientResponse, n: int) -> list[dict[str, Any]]:
    """The next `n` messages of a stream (comments skipped), each bounded in time."""
    got: list[dict[str, Any]] = []
    buf = b""
    while len(got) < n:
        async with asyncio.timeout(10):
            chunk = await resp.content.readany()
        assert chunk, f"stream ended after {got}"
        buf += chunk
        *blocks, buf = buf.split(b"\n\n")
        for block in blocks:
            got += [json.loads(e.data) for e in parse_sse(block + b"\n\n") if e.data]
    return got


def changed(resp: web.StreamResponse) -> Any:
    msg = {
        "jsonrpc": "2.0",
        "method": "notifications/tools/list_changed",
        "params": {"_meta": {SUBSCRIPTION_ID: "L"}},
    }
    return resp.write(sse(msg))


async def test_a_listen_outlives_its_upstream_and_asks_for_a_refetch(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    script = Script(plans={"subscriptions/listen": ["listen"]})
    script.listens["L"] = [changed]
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}", reconnect=FAST)
    base = f"http://127.0.0.1:{sidecar.port}"
    body = request("subscriptions/listen", "L", notifications=LISTEN_FILTER)
    async with scripted(script, port):
        stream = await http.post(base + MCP, json=body, headers=HEADERS)
        assert stream.status == 200
        first = await read_events(stream, 2)
        assert [m["method"] for m in first] == [ACKNOWLEDGED, "notifications/tools/list_changed"]
    # The upstream is gone (its connections cut); the client's stream stays open.
    await eventually(
        lambda: sidecar.proxy.metrics.relistens._value.get() >= 1, timeout=10, what="relisten"
    )
    script.release = asyncio.Event()
    async with scripted(script, port):
        after = await read_events(stream, 3)
        assert [m["method"] for m in after] == [
            "notifications/tools/list_changed",  # the refetch of the subscribed list
            "notifications/resources/updated",  # and of the subscribed resource
            "notifications/tools/list_changed",  # then the new upstream's own events
        ]
        assert after[1]["params"]["uri"] == "file:///a"
        assert all(m["params"]["_meta"][SUBSCRIPTION_ID] == "L" for m in after)
        assert script.hits["subscriptions/listen"] == 2
        # The upstream's graceful end is the client's.
        script.release.set()
        (end,) = await read_events(stream, 1)
        assert end == {"jsonrpc": "2.0", "id": "L", "result": {"_meta": {SUBSCRIPTION_ID: "L"}}}
        assert await asyncio.wait_for(stream.read(), 10) == b""


async def test_a_listen_given_up_ends_without_a_response(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    script = Script(plans={"subscriptions/listen": ["listen"]})
    policy = ReconnectConfig(initial_delay=0.01, max_delay=0.02, max_attempts=2)
    port = free_port()
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}", reconnect=policy)
    base = f"http://127.0.0.1:{sidecar.port}"
    body = request("subscriptions/listen", "L", notifications=LISTEN_FILTER)
    async with scripted(script, port):
        stream = await http.post(base + MCP, json=body, headers=HEADERS)
        await read_events(stream, 1)
    rest = await asyncio.wait_for(stream.read(), 10)
    assert b"listening again" in rest  # the keep-alive comment
    assert [e for e in parse_sse(rest) if e.data] == []  # no response: the client listens anew


async def test_a_drain_ends_a_listen_waiting_for_its_upstream(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    script = Script(plans={"subscriptions/listen": ["listen"]})
    port = free_port()
    slow = ReconnectConfig(initial_delay=5, max_delay=5, max_attempts=10, max_elapsed=60)
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}", reconnect=slow)
    base = f"http://127.0.0.1:{sidecar.port}"
    body = request("subscriptions/listen", "L", notifications=LISTEN_FILTER)
    async with scripted(script, port):
        stream = await http.post(base + MCP, json=body, headers=HEADERS)
        await read_events(stream, 1)
    assert await asyncio.wait_for(sidecar.drain(), 10) is True
    await asyncio.wait_for(stream.read(), 10)
    assert stream.content.at_eof()


async def test_a_refused_relisten_ends_the_stream_with_the_servers_error(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    script = Script(plans={"subscriptions/listen": ["listen", "400"]})
    port = free_port()
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}", reconnect=FAST)
    base = f"http://127.0.0.1:{sidecar.port}"
    body = request("subscriptions/listen", 9, notifications=LISTEN_FILTER)
    async with scripted(script, port):
        stream = await http.post(base + MCP, json=body, headers=HEADERS)
        await read_events(stream, 1)
    async with scripted(script, port):
        (last,) = await read_events(stream, 1)
        assert last["id"] == 9
        assert "tether" in last["error"]["message"]
        assert await asyncio.wait_for(stream.read(), 10) == b""
