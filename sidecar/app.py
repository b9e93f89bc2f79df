"""Assembles the sidecar: the proxied port, the admin port, and a graceful run loop.

Health and metrics live only on the admin port so that nothing on the proxied port shadows a
path of the MCP server behind it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.accesslog import ACCESS_LOGGER, AccessLog, note_response
from sidecar.config import SidecarConfig
from sidecar.health import UpstreamProbe
from sidecar.metrics import Metrics
from sidecar.proxy import DRAIN_POLL_S, Proxy
from sidecar.readiness import Inputs, readiness
from sidecar.tracing import Tracing, tracing_from_env
from tether.ports import check_free
from tether.tasks import spawn

log = logging.getLogger("tether.sidecar")

PROXY_KEY = web.AppKey("proxy", Proxy)


class BadRequestLines(logging.Filter):
    """aiohttp logs every malformed request (a bad header, a missing Host) at ERROR with a
    traceback, though the client got its 400 and nothing failed here: anyone could flood the
    log. Such a record becomes one WARNING line saying what was wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "bad HTTP request refused (400): %s"
            record.args = (str(exc).splitlines()[0][:200],)
            record.exc_info = None
            record.exc_text = None
            record.levelno = logging.WARNING
            record.levelname = "WARNING"
        return True


_BAD_REQUEST_LINES = BadRequestLines()


def build_proxy_app(proxy: Proxy) -> web.Application:
    app = web.Application(client_max_size=proxy.config.max_request_body_bytes)
    app[PROXY_KEY] = proxy
    app.router.add_route("*", "/{tail:.*}", proxy.handle)

    async def close_when_draining(_: web.Request, response: web.StreamResponse) -> None:
        # `sidecar.drain` rule 2. The header is set here too: aiohttp (3.14) has written its
        # own `Connection` decision into the headers before this hook runs, so force_close
        # alone would close the connection without telling the client, which could send its
        # next request on it just as it closes.
        if not proxy.draining.keep_alive():
            response.force_close()
            response.headers["Connection"] = "close"

    app.on_response_prepare.append(close_when_draining)
    if proxy.config.access_log:
        app.on_response_prepare.append(note_response)
    return app


def build_admin_app(
    proxy: Proxy,
    ready: asyncio.Event,
    drain: Callable[[], Coroutine[Any, Any, bool]] | None = None,
    *,
    probe: UpstreamProbe | None = None,
) -> web.Application:
    """`drain`: what `/drain` runs (`drain_sidecar`); None: only the proxy's own drain.
    `probe`: the upstream probe readiness follows (`sidecar.readiness`); None: not probed."""
    run_drain = drain if drain is not None else proxy.drain

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        reporter = proxy.continuity.reporter
        verdict = readiness(
            Inputs(
                started=ready.is_set(),
                draining=proxy.draining.draining,
                upstream_up=probe.state.up if probe is not None else True,
                upstream_detail=probe.state.detail if probe is not None else "",
                control_plane_connected=reporter.connected if reporter is not None else None,
                ready_requires_control_plane=proxy.config.ready_requires_control_plane,
                streams=len(proxy.registry.streams),
            )
        )
        return web.json_response(verdict.body, status=verdict.http_status)

    async def drain_handler(_: web.Request) -> web.Response:
        """The preStop hook: answers once drained (`sidecar.drain`), so the kubelet stops the
        MCP server only when nothing is in flight. GET for `httpGet` hooks, POST for people."""
        # Shielded: a hook that gives up (its own timeout) does not cancel the drain.
        clean = await asyncio.shield(spawn(run_drain(), name="sidecar-drain"))
        return web.json_response(
            {"status": "drained" if clean else "timed out", "in_flight": proxy.draining.in_flight}
        )

    async def metrics(_: web.Request) -> web.Response:
        proxy.metrics.refresh(proxy.registry)
        proxy.metrics.upstream_reachable.set(
            1 if probe is None or probe.state.up else 0  # read at scrape time
        )
        body = generate_latest(proxy.metrics.registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/drain", drain_handler)
    app.router.add_post("/drain", drain_handler)
    return app


@dataclass
class RunningSidecar:
    """A started sidecar; `port` and `admin_port` are the bound ports (useful with port 0)."""

    proxy: Proxy
    port: int
    admin_port: int | None
    _runners: list[web.AppRunner]
    ready: asyncio.Event
    probe: UpstreamProbe

    async def drain(self) -> bool:
        """What `/drain` on the admin port does (`sidecar.drain`); False on the timeout."""
        return await drain_sidecar(self.proxy, self._runners[-1:])

    async def stop(self) -> None:
        """Graceful: not ready, streams ended (clients resume elsewhere), listeners closed,
        final positions flushed. Ending the streams first matters: aiohttp's cleanup waits for
        handlers, and a streaming handler only returns once its stream ends."""
        self.ready.clear()
        await self.probe.stop()
        await self.proxy.end_streams()
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.proxy.stop()


async def drain_sidecar(proxy: Proxy, proxied: list[web.AppRunner]) -> bool:
    """Drain (`sidecar.drain`): the proxy stops being ready and waits for what is in flight;
    from the start until the sidecar stops, the proxied port's connections that stay idle for
    the settle time are closed (rule 5), so clients open new ones elsewhere. False if the
    drain timed out."""
    if proxy.shedder is None:
        proxy.shedder = spawn(_shed_parked(proxy, proxied), name="sidecar-drain-shedder")
    return await spawn(proxy.drain(), name="sidecar-drain")


async def _shed_parked(proxy: Proxy, proxied: list[web.AppRunner]) -> None:
    """`sidecar.drain` rule 5, until cancelled by the sidecar's stop."""
    await asyncio.sleep(0)  # the drain has begun: responses say `Connection: close`
    while True:
        live = [c for r in proxied if r.server is not None for c in r.server.connections]
        for conn in proxy.parking.to_close(live, proxy.busy_connections, time.monotonic()):
            conn.force_close()  # idle: `close()` would wait for a request that never comes
        await asyncio.sleep(DRAIN_POLL_S)


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    raise RuntimeError("listener has no TCP address")


async def start_sidecar(config: SidecarConfig, *, tracing: Tracing | None = None) -> RunningSidecar:
    """Start the proxied and admin listeners; returns once both accept connections. A busy
    address raises `PortInUseError` (one line) before anything starts. `tracing`: None for
    what `config.tracing` and the `OTEL_*` variables say."""
    if config.admin_host is not None and config.admin_port is not None:
        check_free(config.admin_host, config.admin_port, what="--admin-listen")
    check_free(config.listen_host, config.listen_port, what="--listen")
    logging.getLogger("aiohttp.server").addFilter(_BAD_REQUEST_LINES)  # once: same object
    metrics = Metrics()
    if tracing is None:
        tracing = tracing_from_env(config.tracing)
    proxy = Proxy(config, metrics, tracing=tracing)
    await proxy.start()
    ready = asyncio.Event()
    runners: list[web.AppRunner] = []
    probe = UpstreamProbe(
        config.upstream,
        interval=config.upstream_probe_interval,
        timeout=config.upstream_probe_timeout,
    )
    try:
        # The admin port comes up first: liveness answers at once, readiness once the
        # proxied port is bound.
        admin_port: int | None = None
        if config.admin_host is not None and config.admin_port is not None:
            # `/drain` closes the proxied port's connections: the last runner, once started.
            admin_app = build_admin_app(
                proxy, ready, lambda: drain_sidecar(proxy, runners[-1:]), probe=probe
            )
            admin = web.AppRunner(admin_app, access_log=None)
            await admin.setup()
            runners.append(admin)
            await web.TCPSite(admin, config.admin_host, config.admin_port).start()
            admin_port = _bound_port(admin)
        # handler_cancellation: a client that disconnects cancels its handler at once, so an
        # idle stream notices and its upstream pump starts the orphan clock.
        runner = web.AppRunner(
            build_proxy_app(proxy),
            handler_cancellation=True,
            access_log=ACCESS_LOGGER if config.access_log else None,
            access_log_class=AccessLog,
        )
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, config.listen_host, config.listen_port).start()
        port = _bound_port(runner)
        await probe.start()
    except BaseException:
        await probe.stop()
        for r in runners:
            await r.cleanup()
        await proxy.stop()
        raise
    ready.set()
    if config.control_plane and config.session_binding and config.fingerprint_key is None:
        log.warning(
            "credential fingerprints sent to the control plane are unkeyed SHA-256 "
            "(development only): give every sidecar the same --fingerprint-key-file"
        )
    log.info(
        "sidecar listening on %s:%d, upstream %s%s",
        config.listen_host,
        port,
        config.upstream,
        f", admin on {config.admin_host}:{admin_port}" if admin_port else "",
    )
    return RunningSidecar(proxy, port, admin_port, runners, ready, probe)


async def run_until_signalled(config: SidecarConfig) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sidecar = await start_sidecar(config)
    try:
        await stop.wait()
        log.info("sidecar stopping")
    finally:
        await sidecar.stop()
