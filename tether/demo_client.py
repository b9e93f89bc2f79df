"""A small MCP client for the demo: calls the `count` tool and prints each notification.

`python -m tether.demo_client http://127.0.0.1:8930/mcp --n 100` uses the official SDK in the
session revision (2025-11-25), the one Tether keeps alive across failures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

from mcp import Client, MCPError


async def run(url: str, n: int, interval_ms: int, calls: int = 1) -> int:
    started = time.monotonic()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        print(f"{time.monotonic() - started:7.2f}s  progress {progress:g}/{total:g}  {message}")

    failures = 0
    async with Client(url, mode="legacy") as client:
        print(f"connected to {url} (MCP {client.session.protocol_version})")
        for call in range(1, calls + 1):
            try:
                result = await client.call_tool(
                    "count", {"n": n, "interval_ms": interval_ms}, progress_callback=on_progress
                )
            except MCPError as exc:
                failures += 1
                print(f"call {call}: error: {exc}")
                continue
            texts = [getattr(c, "text", "") for c in result.content]
            failures += bool(result.is_error)
            print(f"call {call}: {' '.join(texts)}{' (error)' if result.is_error else ''}")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tether.demo_client", description=__doc__)
    p.add_argument("url", help="MCP endpoint, e.g. http://127.0.0.1:8930/mcp")
    p.add_argument("--n", type=int, default=50, help="notifications to ask for")
    p.add_argument("--interval-ms", type=int, default=200, help="pause between them")
    p.add_argument("--calls", type=int, default=1, help="calls to make, one after another")
    args = p.parse_args(argv)
    try:
        return asyncio.run(run(args.url, args.n, args.interval_ms, args.calls))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
