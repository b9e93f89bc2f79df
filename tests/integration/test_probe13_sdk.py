"""Outside probe of issue #13 against the demo server (official Python SDK 2.3) as a real
process: the defect it pinned (the server's keep-alives did not reach a listen's client) is
fixed (listen invariant 5)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.integration.conftest import SidecarFactory
from tests.integration.test_reissue import HEADERS, MCP, request
from tests.support.procs import ProcessPool, free_port, python_module

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

PING_INTERVAL_S = 1
"""The SDK server pings an idle SSE stream every 15 s (`_SSE_PING_INTERVAL`); the server here
is started with 1 s (tests/support/quick_ping_demo.py), so the test need not wait 15 s."""
PING_WAIT_S = 25.0
"""Allows one ping even at the SDK's default interval (on a loaded machine, many)."""


async def first_comment(http: aiohttp.ClientSession, url: str) -> bytes:
    """Open a listen at `url` and return the stream's bytes up to its first SSE comment."""
    body = request("subscriptions/listen", 7, notifications={"toolsListChanged": True})
    headers = {**HEADERS, "Mcp-Method": "subscriptions/listen"}
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        seen = b""
        async with asyncio.timeout(PING_WAIT_S):
            while not any(line.startswith(b":") for line in seen.splitlines()):
                chunk = await resp.content.readany()
                assert chunk, f"the listen stream ended: {seen!r}"
                seen += chunk
        return seen


async def test_the_sdk_servers_listen_pings_reach_the_client_through_the_sidecar(
    procs: ProcessPool, sidecar_factory: SidecarFactory
) -> None:
    port = free_port()
    argv = python_module(
        "tests.support.quick_ping_demo", "--ping-interval", PING_INTERVAL_S, "--port", port
    )
    await procs.start(argv, name="demo_server", ready_port=port)
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}")
    async with aiohttp.ClientSession() as http:
        direct, through = await asyncio.gather(
            first_comment(http, f"http://127.0.0.1:{port}{MCP}"),
            first_comment(http, f"http://127.0.0.1:{sidecar.port}{MCP}"),
            return_exceptions=True,
        )
    assert isinstance(direct, bytes), f"control: the server itself pings: {direct!r}"
    assert isinstance(through, bytes), f"through the sidecar: {through!r}"
