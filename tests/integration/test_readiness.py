"""`/readyz` tells the truth (`sidecar.readiness`): not ready while the upstream refuses
connections, ready again once it is back; a control plane outage shows in the body and only
fails readiness with `ready_requires_control_plane`. In-process sidecars, a real aiohttp
upstream that is stopped and started again on the same port."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from tests.integration.conftest import SidecarFactory
from tests.support.numbered_upstream import make_app
from tests.support.procs import free_port
from tests.support.waiting import eventually

PROBE = {"upstream_probe_interval": 0.05, "upstream_probe_timeout": 1.0}


async def start_upstream(port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def ready(http: aiohttp.ClientSession, admin_port: int | None) -> tuple[int, Any]:
    async with http.get(f"http://127.0.0.1:{admin_port}/readyz") as resp:
        return resp.status, await resp.json()


async def test_not_ready_while_the_upstream_is_unreachable(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    upstream = await start_upstream(port)
    try:
        sidecar = await sidecar_factory(f"http://127.0.0.1:{port}", **PROBE)
        status, body = await ready(http, sidecar.admin_port)
        assert (status, body["status"], body["upstream"]) == (200, "ready", "reachable")
    finally:
        await upstream.cleanup()

    async def unready() -> Any:
        status, body = await ready(http, sidecar.admin_port)
        return body if status == 503 else None

    body = await eventually(unready, timeout=10, what="/readyz 503 with the upstream down")
    assert (body["status"], body["upstream"]) == ("upstream unreachable", "unreachable")
    assert f"127.0.0.1:{port}" in body["detail"]
    async with http.get(f"http://127.0.0.1:{sidecar.admin_port}/metrics") as resp:
        assert "tether_sidecar_upstream_reachable 0.0" in await resp.text()

    upstream = await start_upstream(port)
    try:

        async def ready_again() -> bool:
            return (await ready(http, sidecar.admin_port))[0] == 200

        await eventually(ready_again, timeout=10, what="/readyz 200 with the upstream back")
    finally:
        await sidecar_factory.stop_all()
        await upstream.cleanup()


async def test_a_sidecar_started_before_its_upstream_is_not_ready(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}", **PROBE)
    status, body = await ready(http, sidecar.admin_port)
    assert (status, body["status"]) == (503, "upstream unreachable")


async def test_a_control_plane_outage_shows_but_fails_readiness_only_if_asked(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession, numbered_upstream: Any
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    async with numbered_upstream() as url:
        lenient = await sidecar_factory(url, control_plane=dead, **PROBE)
        strict = await sidecar_factory(
            url, control_plane=dead, ready_requires_control_plane=True, **PROBE
        )
        status, body = await ready(http, lenient.admin_port)
        assert (status, body["status"], body["control_plane"]) == (200, "ready", "unreachable")
        status, body = await ready(http, strict.admin_port)
        assert (status, body["status"]) == (503, "control plane unreachable")
        await sidecar_factory.stop_all()
