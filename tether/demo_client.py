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

from mcp import Client


async def run(url: str, n: int, interval_ms: int) -> int:
    started = time.monotonic()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        print(f"{time.monotonic() - started:7.2f}s  progress {progress:g}/{total:g}  {message}")

    async with Client(url, mode="legacy") as client:
        print(f"connected to {url} (MCP {client.session.protocol_version})")
        result = await client.call_tool(
            "count", {"n": n, "interval_ms": interval_ms}, progress_callback=on_progress
        )
        texts = [getattr(c, "text", "") for c in result.content]
        print(f"result: {' '.join(texts)}{' (error)' if result.is_error else ''}")
        return 1 if result.is_error else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tether.demo_client", description=__doc__)
    p.add_argument("url", help="MCP endpoint, e.g. http://127.0.0.1:8930/mcp")
    p.add_argument("--n", type=int, default=50, help="notifications to ask for")
    p.add_argument("--interval-ms", type=int, default=200, help="pause between them")
    args = p.parse_args(argv)
    try:
        return asyncio.run(run(args.url, args.n, args.interval_ms))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
