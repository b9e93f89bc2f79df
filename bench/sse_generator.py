"""An SSE upstream that emits N events per POST as fast as it can (benchmark load source).

Events are pre-encoded and written in ~64 KiB batches so the generator is not the bottleneck.
Each response carries an `Mcp-Session-Id`, so a sidecar tracks it like a real session stream.
`python -m bench.sse_generator --port P`
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from aiohttp import web


def event(k: int, size: int) -> bytes:
    head = f'{{"jsonrpc":"2.0","method":"notifications/progress","params":{{"progress":{k},"pad":"'
    tail = '"}}'
    pad = max(0, size - len(head) - len(tail) - len(f"id: {k}\ndata: \n\n"))
    return f"id: {k}\ndata: {head}{'x' * pad}{tail}\n\n".encode()


async def handle(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    n = int(body["params"]["arguments"]["n"])
    size = int(body["params"]["arguments"].get("size", 256))
    rid = body.get("id", 1)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Mcp-Session-Id": "bench-session"}
    )
    await resp.prepare(request)
    batch: list[bytes] = []
    batch_bytes = 0
    for k in range(1, n + 1):
        ev = event(k, size)
        batch.append(ev)
        batch_bytes += len(ev)
        if batch_bytes >= 65536:
            await resp.write(b"".join(batch))
            batch, batch_bytes = [], 0
    final = json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"content": []}})
    batch.append(f"id: {n + 1}\ndata: {final}\n\n".encode())
    await resp.write(b"".join(batch))
    await resp.write_eof()
    return resp


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sse_generator")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    app = web.Application()
    app.router.add_post("/mcp", handle)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
