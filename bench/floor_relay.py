"""The framework floor of the MCP group: an aiohttp reverse proxy with no MCP logic at all.

`python -m bench.floor_relay --port N --upstream http://127.0.0.1:M` relays every request to
the upstream and every response back, chunk by chunk as it arrives, on the same aiohttp server
and client the sidecar is built on (one `ClientSession`, kept-alive upstream connections, no
access log). It parses no SSE, keeps no session, reports nothing, so it cannot resume anything:
it is not a proxy anyone should run. It is measured next to the sidecar so that the report can
tell what a Python/aiohttp relay costs by itself (the floor no sidecar code can go under) from
what the sidecar's own work adds on top of it.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

import aiohttp
from aiohttp import web

from sidecar.upstream import UPSTREAM_IDLE_REUSE_S

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
"""Headers a proxy does not pass on (RFC 9110 7.6.1), plus the two aiohttp sets itself."""


def _end_to_end(headers: aiohttp.typedefs.LooseHeaders) -> dict[str, str]:
    return {k: v for k, v in dict(headers).items() if k.lower() not in HOP_BY_HOP}


class Relay:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.client: aiohttp.ClientSession | None = None

    async def start(self, _app: web.Application) -> None:
        # The sidecar's connector settings that matter here: no limit, and no reuse of a
        # connection idle long enough for its server to be closing it (`sidecar.upstream`).
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_IDLE_REUSE_S)
        self.client = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def stop(self, _app: web.Application) -> None:
        if self.client is not None:
            await self.client.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.client is not None
        body = await request.read() if request.body_exists else None
        async with self.client.request(
            request.method,
            self.upstream + request.path_qs,
            headers=_end_to_end(request.headers),
            data=body,
            allow_redirects=False,
        ) as resp:
            out = web.StreamResponse(
                status=resp.status, reason=resp.reason, headers=_end_to_end(resp.headers)
            )
            await out.prepare(request)
            try:
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
            except ConnectionResetError:  # the client left (the SDK's, once it has its answer)
                pass
            return out


async def serve(port: int, upstream: str) -> None:
    relay = Relay(upstream)
    app = web.Application()
    app.on_startup.append(relay.start)
    app.on_cleanup.append(relay.stop)
    app.router.add_route("*", "/{tail:.*}", relay.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()  # until the harness stops the process
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.floor_relay", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    args = p.parse_args(argv)
    asyncio.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
