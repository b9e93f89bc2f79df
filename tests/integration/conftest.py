"""Integration fixtures: real servers on loopback port 0, and a leak check for tasks."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
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


SidecarFactory = Callable[..., Awaitable[RunningSidecar]]


@pytest.fixture
async def sidecar_factory() -> AsyncIterator[SidecarFactory]:
    """Start sidecars on port 0 (proxied and admin); all are stopped after the test."""
    started: list[RunningSidecar] = []

    async def factory(upstream: str, **overrides: Any) -> RunningSidecar:
        config = SidecarConfig(
            listen_host="127.0.0.1",
            listen_port=0,
            upstream=upstream,
            admin_host="127.0.0.1",
            admin_port=0,
        )
        config = dataclasses.replace(config, **overrides)
        sidecar = await start_sidecar(config)
        started.append(sidecar)
        return sidecar

    yield factory
    for s in started:
        await s.stop()


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
