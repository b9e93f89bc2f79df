"""The upstream probe: a TCP connect to the MCP server every `interval` seconds.

A connect is the cheapest question the upstream can answer without running MCP code: it says
whether something accepts connections on the upstream's port (a crashed or restarting server,
a wrong address). Outcomes go through `tether.probe.ProbeState`; `/readyz` reads its verdict
(`sidecar.readiness`), and each change is one log line. An interval of 0 turns it off
(the verdict is then always "reachable").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import urlsplit

from tether.probe import ProbeState
from tether.tasks import cancel_and_wait, spawn

log = logging.getLogger("tether.sidecar.health")


def upstream_address(url: str) -> tuple[str, int]:
    """Host and port of an http(s) base URL (80 and 443 by default)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port


async def connect_probe(host: str, port: int, timeout: float) -> str | None:
    """None if `host:port` accepted a TCP connection within `timeout`, else why not."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return f"connect to {host}:{port}: no answer within {timeout:g}s"
    except OSError as exc:
        return f"connect to {host}:{port}: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


class UpstreamProbe:
    """Runs `connect_probe` periodically and keeps the verdict."""

    def __init__(self, url: str, *, interval: float, timeout: float) -> None:
        self.host, self.port = upstream_address(url)
        self.interval = interval
        self.timeout = timeout
        self.state = ProbeState()
        if interval <= 0:
            self.state.observe(True)
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    async def check_once(self) -> None:
        why = await connect_probe(self.host, self.port, self.timeout)
        first = self.state.up is None
        change = self.state.observe(why is None, why or "")
        if change is None:
            return
        if change.up:
            if not first:  # the first verdict, up, is the normal start: nothing to say
                log.info("upstream %s:%d reachable again", self.host, self.port)
        else:
            log.warning("upstream unreachable: %s (not ready)", change.detail)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_once()

    async def start(self) -> None:
        """The first probe now (so readiness has a verdict), then one every `interval`."""
        if not self.enabled:
            return
        await self.check_once()
        self._task = spawn(self._run(), name="sidecar-upstream-probe")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
