"""The official `mcp` SDK client and server, with a real sidecar between them.

The SDK server runs as its own process (`python -m tether.demo_server`); the client is
`mcp.Client`, in the session revision (mode="legacy" negotiates 2025-11-25), the stateless
revision (the default, 2026-07-28) and over the 2024-11-05 HTTP+SSE transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import mcp_types
import pytest
import pytest_asyncio
from mcp import Client
from mcp.client.sse import sse_client

from tests.integration.conftest import SidecarFactory
from tests.support.metrics import counter_value
from tests.support.procs import ProcessPool, free_port, python_module
from tests.support.relay import Relay

pytestmark = pytest.mark.slow


class Progress:
    def __init__(self) -> None:
        self.seen: list[float] = []
        self.arrived = asyncio.Event()

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.seen.append(progress)
        self.arrived.set()


def text_of(result: mcp_types.CallToolResult) -> str:
    assert not result.is_error, result
    [content] = result.content
    assert isinstance(content, mcp_types.TextContent)
    return content.text


async def start_server(procs: ProcessPool, *flags: str) -> str:
    port = free_port()
    await procs.start(
        python_module("tether.demo_server", "--port", port, "--log-level", "WARNING", *flags),
        name="mcp-server",
        ready_port=port,
    )
    return f"http://127.0.0.1:{port}"


@asynccontextmanager
async def shared_server(
    tmp_path_factory: pytest.TempPathFactory, *flags: str
) -> AsyncIterator[str]:
    """A demo server for the tests of this module that only talk to it (none stops or
    restarts it; each opens sessions of its own through a sidecar of its own): its URL."""
    async with ProcessPool(tmp_path_factory.mktemp("mcp-server")) as procs:
        yield await start_server(procs, *flags)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[bool, str]]:
    """The module's two demo servers, by whether they keep an event store."""
    async with (
        shared_server(tmp_path_factory) as with_store,
        shared_server(tmp_path_factory, "--no-event-store") as without_store,
    ):
        yield {True: with_store, False: without_store}


@pytest.mark.parametrize("event_store", [True, False])
async def test_session_revision_through_sidecar(
    servers: dict[bool, str], sidecar_factory: SidecarFactory, event_store: bool
) -> None:
    upstream = servers[event_store]
    sidecar = await sidecar_factory(upstream)
    progress = Progress()
    async with Client(f"http://127.0.0.1:{sidecar.port}/mcp", mode="legacy") as client:
        tools = await client.list_tools()
        assert {"count", "echo"} <= {t.name for t in tools.tools}
        result = await client.call_tool(
            "count", {"n": 20, "interval_ms": 5}, progress_callback=progress
        )
        assert text_of(result) == "counted 20"
        assert text_of(await client.call_tool("echo", {"text": "héllo"})) == "héllo"
        (session,) = sidecar.proxy.registry.sessions.values()
        assert session.initialize_request is not None
        assert session.protocol_version == "2025-11-25"
    assert progress.seen == [float(i) for i in range(1, 21)]
    # The client's DELETE on exit ends the session in the sidecar too.
    assert not sidecar.proxy.registry.sessions


async def test_stateless_revision_through_sidecar(
    servers: dict[bool, str], sidecar_factory: SidecarFactory
) -> None:
    upstream = servers[True]
    sidecar = await sidecar_factory(upstream)
    progress = Progress()
    async with Client(f"http://127.0.0.1:{sidecar.port}/mcp") as client:
        result = await client.call_tool(
            "count", {"n": 10, "interval_ms": 5}, progress_callback=progress
        )
        assert text_of(result) == "counted 10"
    assert progress.seen == [float(i) for i in range(1, 11)]
    assert not sidecar.proxy.registry.sessions
    assert not sidecar.proxy.registry.streams


async def test_legacy_sse_transport_through_sidecar(
    procs: ProcessPool, sidecar_factory: SidecarFactory
) -> None:
    upstream = await start_server(procs, "--transport", "sse")
    sidecar = await sidecar_factory(upstream)
    progress = Progress()
    url = f"http://127.0.0.1:{sidecar.port}/sse"
    async with Client(sse_client(url), mode="legacy") as client:
        result = await client.call_tool(
            "count", {"n": 8, "interval_ms": 5}, progress_callback=progress
        )
        assert text_of(result) == "counted 8"
        assert text_of(await client.call_tool("echo", {"text": "x"})) == "x"
    assert progress.seen == [float(i) for i in range(1, 9)]
    (stream,) = [s for s in sidecar.proxy.registry.streams.values() if s.legacy_session]
    assert stream.legacy_session


@pytest.mark.parametrize("event_store", [True, False])
async def test_client_network_blip_mid_tool_call(
    servers: dict[bool, str], sidecar_factory: SidecarFactory, event_store: bool
) -> None:
    """Cut the client's connection mid-stream: the SDK client resumes with Last-Event-ID and
    every progress notification arrives exactly once, in order, whether or not the server
    keeps an event store (the sidecar's replay buffer covers it)."""
    upstream = servers[event_store]
    sidecar = await sidecar_factory(upstream)
    async with Relay("127.0.0.1", sidecar.port) as relay:
        progress = Progress()
        async with Client(f"http://127.0.0.1:{relay.port}/mcp", mode="legacy") as client:
            call = asyncio.ensure_future(
                client.call_tool("count", {"n": 30, "interval_ms": 20}, progress_callback=progress)
            )
            while len(progress.seen) < 5:
                progress.arrived.clear()
                await asyncio.wait_for(progress.arrived.wait(), 10)
            relay.cut()
            result: Any = await asyncio.wait_for(call, 30)
            assert text_of(result) == "counted 30"
    assert progress.seen == [float(i) for i in range(1, 31)]
    assert counter_value(sidecar.proxy.metrics, "client_resumes") >= 1
