"""The MCP group's upstream: an official-SDK (`mcp` 2.3) server with the tools it measures.

`python -m bench.mcp_server --port N` serves Streamable HTTP on `/mcp` with the SDK's
defaults (stateful: a 2025-11-25 client gets a session and SSE responses; a 2026-07-28 client is
answered without one), no event store, and DNS-rebinding protection off, since nginx sends its
upstream's name as the Host header. Tools:

- `noop()`: returns at once; a `tools/call` of it is the per-request cost of a path.
- `burst(n)`: reports `n` progress notifications back to back, then returns. Each is its own
  SSE event written on its own (the SDK writes one event per ASGI `send`), as real servers
  report progress; the harness counts them on arrival.
- `hold()`: waits until `release()` is called; the harness keeps 200 of them open to measure
  a proxy's memory per open call. `holding(k)` answers once k of them wait, so the harness
  reads RSS only when all of them have reached the server.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings


class Gate:
    """The calls of `hold` waiting for `release`. One event per round, so a release lets
    exactly the calls that were waiting go, and the next `hold` waits again."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.waiting = 0
        self.changed = asyncio.Condition()

    async def wait(self) -> None:
        opened = self.opened
        self.waiting += 1
        async with self.changed:
            self.changed.notify_all()
        try:
            await opened.wait()
        finally:
            self.waiting -= 1

    async def wait_for(self, count: int) -> int:
        async with self.changed:
            await self.changed.wait_for(lambda: self.waiting >= count)
        return self.waiting

    def release(self) -> int:
        released = self.waiting
        self.opened.set()
        self.opened = asyncio.Event()
        return released


def build_server() -> MCPServer[Any]:
    app: MCPServer[Any] = MCPServer("tether-bench", log_level="WARNING")
    gate = Gate()

    @app.tool()
    async def noop() -> str:
        """Return at once."""
        return "ok"

    @app.tool()
    async def burst(n: int, ctx: Context[Any, Any]) -> str:
        """Report n progress notifications back to back, then return."""
        for i in range(1, n + 1):
            await ctx.report_progress(i, n)
        return f"sent {n}"

    @app.tool()
    async def hold() -> str:
        """Wait until `release` is called."""
        await gate.wait()
        return "released"

    @app.tool()
    async def release() -> int:
        """Let every waiting `hold` return; how many there were."""
        return gate.release()

    @app.tool()
    async def holding(at_least: int) -> int:
        """Wait until at least `at_least` `hold` calls wait; how many do."""
        return await gate.wait_for(at_least)

    return app


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mcp_server", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    app = build_server().streamable_http_app(
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        backlog=2048,
        timeout_graceful_shutdown=1,
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
