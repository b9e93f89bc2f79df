"""The MCP group's upstream (`bench/mcp_server.py`) does what the harness relies on, driven by
the official SDK client in process: every progress notification of a burst arrives, in order,
and `hold` calls wait until `release`, which frees exactly those that wait. No timing."""

from __future__ import annotations

import asyncio

import mcp_types
import pytest
from mcp import Client

from bench.mcp_group import burst, text
from bench.mcp_server import build_server

WAIT_S = 10.0


async def test_burst_delivers_every_notification_in_order() -> None:
    async with Client(build_server()) as client:
        assert await burst(client, 50) == 50  # raises unless 1..50 arrived, then the result


async def test_hold_waits_until_release_frees_those_waiting() -> None:
    async with Client(build_server()) as client, asyncio.TaskGroup() as group:
        first = [
            group.create_task(client.call_tool("hold", {}), name=f"hold-{i}") for i in range(3)
        ]
        async with asyncio.timeout(WAIT_S):
            assert text(await client.call_tool("holding", {"at_least": 3})) == "3"
        assert not any(c.done() for c in first)
        assert text(await client.call_tool("release", {})) == "3"
        async with asyncio.timeout(WAIT_S):
            assert [text(await c) for c in first] == ["released"] * 3
        # A call made after the release waits for the next one.
        late = group.create_task(client.call_tool("hold", {}), name="hold-late")
        async with asyncio.timeout(WAIT_S):
            assert text(await client.call_tool("holding", {"at_least": 1})) == "1"
        assert not late.done()
        assert text(await client.call_tool("release", {})) == "1"
        async with asyncio.timeout(WAIT_S):
            assert text(await late) == "released"


@pytest.mark.parametrize("bad", [[], ["oops"]])
def test_text_refuses_anything_but_one_text_answer(bad: list[str]) -> None:
    result = mcp_types.CallToolResult(
        content=[mcp_types.TextContent(type="text", text=t) for t in bad], is_error=bool(bad)
    )
    with pytest.raises(RuntimeError, match="tool call failed"):
        text(result)
