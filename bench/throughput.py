"""Events/s on one SSE stream: direct to the upstream vs through a `tether sidecar`, one run.

    python -m bench.throughput [--events 200000] [--sizes 256 4096] [--rounds 3]

Both paths run against the same generator process in the same run (the machine is noisy);
the table reports the best of `--rounds` for each path and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def one_stream(port: int, n: int, size: int) -> tuple[float, int]:
    """POST, read the SSE body to its end; returns (seconds, events seen)."""
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "gen", "arguments": {"n": n, "size": size}},
        }
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    start = time.perf_counter()
    writer.write(
        b"POST /mcp HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Accept: text/event-stream\r\nMcp-Session-Id: bench-session\r\n"
        b"MCP-Protocol-Version: 2025-06-18\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    events = 0
    tail = b""
    while chunk := await reader.read(1 << 18):
        events += (tail + chunk).count(b"\n\n")
        tail = chunk[-1:]
    elapsed = time.perf_counter() - start
    writer.close()
    return elapsed, events


async def run(args: argparse.Namespace) -> None:
    gen_port, side_port = free_port(), free_port()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.sse_generator", "--port", str(gen_port)
        ),
        await asyncio.create_subprocess_exec(
            *[
                sys.executable,
                "-m",
                "tether.cli",
                "--log-level",
                "WARNING",
                "sidecar",
                "--listen",
                f"127.0.0.1:{side_port}",
                "--upstream",
                f"http://127.0.0.1:{gen_port}",
            ]
        ),
    ]
    try:
        await wait_port(gen_port)
        await wait_port(side_port)
        rows = []
        for size in args.sizes:
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for name, port in (("direct", gen_port), ("tether sidecar", side_port)):
                    secs, seen = await one_stream(port, args.events, size)
                    if seen != args.events + 1:  # the events and the final response
                        raise SystemExit(f"{name}: stream cut short ({seen} events)")
                    rate = seen / secs
                    best[name] = max(best.get(name, 0.0), rate)
            rows.append((size, best["direct"], best["tether sidecar"]))
        print(f"\n`python -m bench.throughput --events {args.events}` (best of {args.rounds})\n")
        print("| event size | direct events/s | sidecar events/s | sidecar / direct |")
        print("|---:|---:|---:|---:|")
        for size, direct, side in rows:
            print(f"| {size} B | {direct:,.0f} | {side:,.0f} | {side / direct:.2f} |")
    finally:
        for p in procs:
            p.terminate()
            await p.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.throughput")
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
