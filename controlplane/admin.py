"""The control plane's admin port (`--admin-listen`): `/metrics` for Prometheus, `/healthz`.

Plain HTTP on its own port, like the sidecar's: the gRPC port keeps its TLS and credentials,
and a NetworkPolicy opens this one only to the pods that scrape (`deploy/`). It shows counts
and durations, never a session's contents.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane.metrics import ControlPlaneMetrics

log = logging.getLogger(__name__)


def parse_listen(value: str, *, what: str = "--admin-listen") -> tuple[str, int]:
    """Split `HOST:PORT` (IPv6 as `[::1]:PORT`); ValueError naming `what` otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@dataclass
class AdminServer:
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


def build_admin_app(
    metrics: ControlPlaneMetrics, *, count_sessions: Callable[[], Awaitable[int]]
) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def serve_metrics(_: web.Request) -> web.Response:
        await metrics.refresh_sessions(count_sessions)
        resp = web.Response(body=generate_latest(metrics.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", serve_metrics)
    return app


async def start_admin(
    listen: str,
    metrics: ControlPlaneMetrics,
    *,
    count_sessions: Callable[[], Awaitable[int]],
) -> AdminServer:
    """Serve the admin app on `listen` (port 0 picks one); OSError if it cannot bind."""
    host, port = parse_listen(listen)
    runner = web.AppRunner(build_admin_app(metrics, count_sessions=count_sessions), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    log.info("control plane admin (/metrics, /healthz) on %s:%d", host, bound)
    return AdminServer(runner, int(bound))
