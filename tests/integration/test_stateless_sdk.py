"""The stateless revision (MCP 2026-07-28) end to end, across an upstream SIGKILL (issue 13).

The official SDK client (`mcp.Client`, which negotiates 2026-07-28 by default) talks to the
demo server as a real process, through an in-process sidecar or directly (the "without" row).
The server is killed with SIGKILL and started again on the same port. What the sidecar
promises for this revision, one test each:

1. A `subscriptions/listen` stream stays open across the restart: the iterator raises no
   `SubscriptionLost`, yields the sidecar's refetch events (the subscribed list changed, the
   subscribed resource updated), then what the restarted server publishes.
2. Directly against the server the same kill ends the iterator with `SubscriptionLost`.
3. `tools/list` and a call to a read-only tool sent while the server is down wait in the
   sidecar and are answered once it is back; so does a client connecting meanwhile (its
   `server/discover` probe).
4. A call to a tool that is neither read-only nor idempotent fails at once with the sidecar's
   "upstream unreachable" error, and never runs.
5. `Mcp-Method` / `Mcp-Name` headers that contradict the body are refused (400, -32020)
   without the request reaching the server.

And the bound of 1 and 3: past the sidecar's reconnect policy the listen stream is lost and a
waiting request fails, as they would without the sidecar.

No sleep here is a wait: the `asyncio.sleep`s are the outage's length (`OUTAGE_S`), and every
wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import mcp_types
import pytest
from mcp import Client
from mcp.client.subscriptions import ServerEvent, SubscriptionLost
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import ResourceUpdated, ToolsListChanged
from mcp_types import CLIENT_CAPABILITIES_META_KEY, HEADER_MISMATCH, PROTOCOL_VERSION_META_KEY

from sidecar.reconnect import ReconnectConfig
from tests.integration.conftest import SidecarFactory
from tests.integration.test_demo_server import start_demo, text_of
from tests.support.procs import ProcessPool
from tests.support.relay import Relay
from tether.demo_server import NOTIFY_URI_PREFIX

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

STATELESS = "2026-07-28"
TOPIC_A = f"{NOTIFY_URI_PREFIX}a"
TOPIC_B = f"{NOTIFY_URI_PREFIX}b"
WAIT_S = 20.0
"""Deadline for anything that should happen, a restart on a loaded machine included."""
OUTAGE_S = 1.0
"""How long the server stays down in the tests of requests sent meanwhile (the scenario, not a
wait)."""
PROMPT_S = 3.0
"""What "at once" allows a request the sidecar must not re-issue: far below what the default
policy's ten jittered attempts (about 13 s on average) would spend on re-issuing it."""
UNREACHABLE = "tether: upstream unreachable"
PATIENT = ReconnectConfig(initial_delay=0.05, max_delay=0.5, max_attempts=1000, max_elapsed=WAIT_S)
"""The reconnect policy of the tests that wait for a restart: the default's 10 attempts,
jittered between 0 and up to 5 s, average about 13 s in all and can be spent in a few, less
than a loaded machine takes to start the server again. Here the outage is what bounds it."""


def mcp_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/mcp"


async def next_events(events: AsyncIterator[ServerEvent], n: int) -> list[ServerEvent]:
    """The next `n` events of a listen stream, in arrival order, within WAIT_S."""
    async with asyncio.timeout(WAIT_S):
        return [await anext(events) for _ in range(n)]


def touched(topic_uri: str) -> list[ServerEvent]:
    """What the demo server's `touch` publishes, in its order."""
    return [ResourceUpdated(uri=topic_uri), ToolsListChanged()]


def structured(result: mcp_types.CallToolResult) -> dict[str, Any]:
    """A tool's structured result (a scalar comes wrapped as `{"result": value}`)."""
    assert not result.is_error, result
    content: dict[str, Any] | None = result.structured_content
    assert content is not None, result
    return content


# --- 1 and 2: a listen stream across the kill --------------------------------------------------


async def test_listen_survives_an_upstream_restart_through_the_sidecar(
    procs: ProcessPool, sidecar_factory: SidecarFactory
) -> None:
    server, port = await start_demo(procs)
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}", reconnect=PATIENT)
    async with Client(mcp_url(sidecar.port)) as client:
        assert client.protocol_version == STATELESS
        async with client.listen(
            tools_list_changed=True, resource_subscriptions=[TOPIC_A, TOPIC_B]
        ) as subscription:
            events = aiter(subscription)
            assert text_of(await client.call_tool("touch", {"topic": "a"})) == "touched a"
            assert await next_events(events, 2) == touched(TOPIC_A), "live before the kill"

            await server.restart()  # SIGKILL, then the same port

            # The sidecar re-listened upstream and tells the client to refetch everything it
            # subscribed to: events may have been published while the server was down.
            refetch = await next_events(events, 3)
            assert set(refetch) == {
                ToolsListChanged(),
                ResourceUpdated(TOPIC_A),
                ResourceUpdated(TOPIC_B),
            }
            # Then the restarted server's own events reach the same iterator. (Its order,
            # resource first, also tells them from a second refetch, which has no reason to
            # leave TOPIC_A out.)
            assert text_of(await client.call_tool("touch", {"topic": "b"})) == "touched b"
            assert await next_events(events, 2) == touched(TOPIC_B)


async def test_listen_without_the_sidecar_is_lost_when_the_server_dies(
    procs: ProcessPool,
) -> None:
    """The "without" row: the SDK gives no continuity of its own (no replay, no re-listen)."""
    server, port = await start_demo(procs)
    async with Client(mcp_url(port)) as client:
        assert client.protocol_version == STATELESS
        async with client.listen(resource_subscriptions=[TOPIC_A]) as subscription:
            events = aiter(subscription)
            assert text_of(await client.call_tool("touch", {"topic": "a"})) == "touched a"
            assert await next_events(events, 1) == [ResourceUpdated(TOPIC_A)]
            server.kill()
            with pytest.raises(SubscriptionLost):
                await next_events(events, 1)
        await server.wait_exit()
        # Recovery is the application's job: re-listen (and refetch) once the server is back.
        await server.start(ready_port=port)
        async with client.listen(resource_subscriptions=[TOPIC_A]) as subscription:
            assert text_of(await client.call_tool("touch", {"topic": "a"})) == "touched a"
            assert await next_events(aiter(subscription), 1) == [ResourceUpdated(TOPIC_A)]


# --- 3 and 4: requests while the server is down ----------------------------------------------


async def test_safe_requests_wait_for_the_restarted_server(
    procs: ProcessPool, sidecar_factory: SidecarFactory
) -> None:
    server, port = await start_demo(procs)
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}", reconnect=PATIENT)
    async with Client(mcp_url(sidecar.port)) as client:
        assert client.protocol_version == STATELESS
        # The listing passing through teaches the sidecar that `echo` is read-only.
        listed = await client.list_tools(cache_mode="bypass")
        (echo,) = [t for t in listed.tools if t.name == "echo"]
        assert echo.annotations is not None
        assert echo.annotations.read_only_hint
        first_pid = structured(await client.call_tool("server_info"))["pid"]

        server.kill()
        await server.wait_exit()
        async with asyncio.TaskGroup() as tg:
            # "bypass": the client's response cache must not answer; this listing must travel.
            listing = tg.create_task(client.list_tools(cache_mode="bypass"), name="tools/list")
            echoed = tg.create_task(client.call_tool("echo", {"text": "x"}), name="echo")
            await asyncio.sleep(OUTAGE_S)  # the outage itself: how long the server stays down
            assert not listing.done(), "tools/list was answered while the server was down"
            assert not echoed.done(), "echo was answered while the server was down"
            await server.start(ready_port=port)
            async with asyncio.timeout(WAIT_S):
                await asyncio.wait([listing, echoed])

        assert {t.name for t in listing.result().tools} == {t.name for t in listed.tools}
        assert text_of(echoed.result()) == "x"
        assert structured(await client.call_tool("server_info"))["pid"] != first_pid


async def test_a_client_connecting_during_the_outage_waits_for_the_server(
    procs: ProcessPool, sidecar_factory: SidecarFactory
) -> None:
    """`server/discover` is re-issued too, so a client that connects while the server is down
    gets the stateless revision once it is back. (Only if it is back within the SDK's probe
    timeout, `DISCOVER_TIMEOUT_SECONDS`, 10 s: past it the SDK falls back to `initialize`.)"""
    server, port = await start_demo(procs)
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}", reconnect=PATIENT)
    server.kill()
    await server.wait_exit()
    connected = asyncio.Event()

    async def connect_and_echo() -> tuple[str, str]:
        # One task enters and leaves the client: the SDK's cancel scopes require it.
        async with Client(mcp_url(sidecar.port)) as client:
            connected.set()
            echoed = text_of(await client.call_tool("echo", {"text": "x"}))
            return client.protocol_version, echoed

    async with asyncio.TaskGroup() as tg:
        session = tg.create_task(connect_and_echo(), name="connect")
        await asyncio.sleep(OUTAGE_S)  # the outage itself: how long the server stays down
        assert not connected.is_set(), "the client connected while the server was down"
        await server.start(ready_port=port)
        async with asyncio.timeout(WAIT_S):
            await asyncio.wait([session])
    assert session.result() == (STATELESS, "x")


async def test_a_call_that_must_not_repeat_fails_at_once(
    procs: ProcessPool, sidecar_factory: SidecarFactory
) -> None:
    server, port = await start_demo(procs)
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}")
    async with Client(mcp_url(sidecar.port)) as client:
        assert client.protocol_version == STATELESS
        listed = await client.list_tools(cache_mode="bypass")
        (remember,) = [t for t in listed.tools if t.name == "remember"]
        assert remember.annotations is not None
        assert remember.annotations.read_only_hint is False
        assert remember.annotations.idempotent_hint is False
        assert structured(await client.call_tool("remember", {"text": "kept"})) == {"result": 1}

        server.kill()
        await server.wait_exit()
        with pytest.raises(MCPError) as failed:
            async with asyncio.timeout(PROMPT_S):
                await client.call_tool("remember", {"text": "lost"})
        assert failed.value.message.startswith(UNREACHABLE), failed.value.message

        await server.start(ready_port=port)
        # The new process starts with an empty list: had the sidecar sent "lost" on to it,
        # this would be its second entry.
        assert structured(await client.call_tool("remember", {"text": "after"})) == {"result": 1}


async def test_past_the_reconnect_policy_the_client_is_told(
    procs: ProcessPool, sidecar_factory: SidecarFactory
) -> None:
    """The bound of 1 and 3: a server that stays down loses the listen stream (abruptly, as
    the server's own death would) and fails a waiting request with the sidecar's error."""
    server, port = await start_demo(procs)
    short = ReconnectConfig(initial_delay=0.05, max_delay=0.2, max_attempts=3, max_elapsed=2.0)
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}", reconnect=short)
    async with Client(mcp_url(sidecar.port)) as client:
        assert client.protocol_version == STATELESS
        await client.list_tools(cache_mode="bypass")
        async with client.listen(resource_subscriptions=[TOPIC_A]) as subscription:
            server.kill()
            await server.wait_exit()
            with pytest.raises(SubscriptionLost):
                await next_events(aiter(subscription), 1)
        with pytest.raises(MCPError) as failed:
            async with asyncio.timeout(WAIT_S):
                await client.call_tool("echo", {"text": "x"})
        assert failed.value.message.startswith(UNREACHABLE), failed.value.message


# --- 5: routing headers that contradict the body ---------------------------------------------


def envelope(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A valid 2026-07-28 request body (the per-request `_meta` envelope)."""
    meta = {PROTOCOL_VERSION_META_KEY: STATELESS, CLIENT_CAPABILITIES_META_KEY: {}}
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": method,
        "params": {**(params or {}), "_meta": meta},
    }


def routing_headers(method: str, name: str | None = None) -> dict[str, str]:
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": STATELESS,
        "Mcp-Method": method,
    }
    if name is not None:
        headers["Mcp-Name"] = name
    return headers


def b64_header(value: str) -> str:
    return f"=?base64?{base64.b64encode(value.encode()).decode()}?="


ECHO_CALL = envelope("tools/call", {"name": "echo", "arguments": {"text": "x"}})


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(envelope("tools/list"), routing_headers("tools/call"), id="method"),
        pytest.param(ECHO_CALL, routing_headers("tools/call", "remember"), id="name"),
        pytest.param(
            ECHO_CALL, routing_headers("tools/call", b64_header("remember")), id="b64-name"
        ),
        pytest.param(
            envelope("resources/read", {"uri": TOPIC_A}),
            routing_headers("resources/read", TOPIC_B),
            id="uri",
        ),
    ],
)
async def test_contradicting_routing_headers_are_refused_before_the_server(
    procs: ProcessPool,
    sidecar_factory: SidecarFactory,
    http: aiohttp.ClientSession,
    body: dict[str, Any],
    headers: dict[str, str],
) -> None:
    _, port = await start_demo(procs)
    # The relay counts the sidecar's connections to the server: none may open for a refusal
    # (the readiness probe's connects would count too: off here).
    async with Relay("127.0.0.1", port) as relay:
        sidecar = await sidecar_factory(f"http://127.0.0.1:{relay.port}", upstream_probe_interval=0)
        async with http.post(mcp_url(sidecar.port), json=body, headers=headers) as resp:
            assert resp.status == 400, await resp.text()
            reply = await resp.json()
        assert reply["error"]["code"] == HEADER_MISMATCH, reply
        assert relay.connections == 0, "the refused request reached the server"

        # The same body with headers that agree with it is served (a name as a base64
        # sentinel included): only the headers were wrong.
        if body["method"] != "resources/read":  # the demo server has no resources to read
            name = body["params"].get("name")
            agreeing = routing_headers(body["method"], None if name is None else b64_header(name))
            async with http.post(mcp_url(sidecar.port), json=body, headers=agreeing) as resp:
                assert resp.status == 200, await resp.text()
                assert '"result"' in await resp.text()
        async with Client(mcp_url(sidecar.port)) as client:
            assert client.protocol_version == STATELESS
        assert relay.connections >= 1, "the relay never carried anything: the check above is void"
