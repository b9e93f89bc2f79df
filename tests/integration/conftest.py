"""Integration fixtures: real servers on loopback port 0, and a leak check for tasks."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import RunningSidecar, start_sidecar
from sidecar.config import SidecarConfig
from tests.support.leaks import _no_leaked_tasks  # noqa: F401 - autouse fixture
from tests.support.numbered_upstream import make_app
from tests.support.procs import ProcessPool


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve an aiohttp app on 127.0.0.1:0; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class SidecarFactory:
    """Starts sidecars on port 0 (proxied and admin): `await sidecar_factory(upstream, **config)`.

    A stopping sidecar flushes its last positions to its control plane and waits up to 5 s for
    the acknowledgements, so sidecars must stop before their control plane: request a
    `control_plane` fixture before this one (fixtures are torn down in reverse), or call
    `stop_all()` before stopping a control plane the test started itself.
    """

    def __init__(self) -> None:
        self._started: list[RunningSidecar] = []

    async def __call__(self, upstream: str, **overrides: Any) -> RunningSidecar:
        config = SidecarConfig(
            listen_host="127.0.0.1",
            listen_port=0,
            upstream=upstream,
            admin_host="127.0.0.1",
            admin_port=0,
        )
        config = dataclasses.replace(config, **overrides)
        sidecar = await start_sidecar(config)
        self._started.append(sidecar)
        return sidecar

    async def stop_all(self) -> None:
        """Stop every sidecar started so far, in the order they were started."""
        started, self._started = self._started, []
        for s in started:
            await s.stop()


@pytest.fixture
async def sidecar_factory() -> AsyncIterator[SidecarFactory]:
    """Start sidecars on port 0 (proxied and admin); all are stopped after the test."""
    factory = SidecarFactory()
    yield factory
    await factory.stop_all()


@pytest.fixture
def numbered_upstream() -> Callable[..., Any]:
    """In-process numbered upstream: `async with numbered_upstream(**flags) as url`."""

    @asynccontextmanager
    async def start(**flags: Any) -> AsyncIterator[str]:
        async with serve_app(make_app(**flags)) as url:
            yield url

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[ProcessPool]:
    async with ProcessPool(tmp_path) as pool:
        yield pool
