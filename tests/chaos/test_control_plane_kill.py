"""SIGKILL of the control plane mid-stream: the sidecar keeps serving the client, and once the
control plane is back (same port, same SQLite file) the sidecar's positions are flushed to it.
The persisted position ends equal to the last event the client got, and never goes back
(the restarted control plane has not lost what it acknowledged)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.tracker import EventId
from tests.integration.conftest import SidecarFactory
from tests.support.chaos import (
    ChaosRow,
    ChaosTable,
    PositionWatcher,
    assert_delivered_and_persisted,
    poll_persisted,
    start_count_stream,
)
from tests.support.procs import ProcessPool, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(30)]


def control_plane_argv(port: int, db: Path) -> list[str]:
    listen = f"127.0.0.1:{port}"
    return [
        sys.executable,
        "-m",
        "tether.cli",
        "control-plane",
        "--listen",
        listen,
        "--store",
        f"sqlite:///{db}",
    ]


async def test_control_plane_killed_sidecar_keeps_serving(
    procs: ProcessPool,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    chaos_table: ChaosTable,
) -> None:
    """recover_s: from the restarted control plane listening to the store holding the
    position the client had reached at that moment (the backlog flushed)."""
    cp_port = free_port()
    cp_address = f"127.0.0.1:{cp_port}"
    cp = await procs.start(
        control_plane_argv(cp_port, procs.log_dir / "cp.db"),
        name="control-plane",
        ready_port=cp_port,
    )
    n = 150
    async with numbered_upstream(interval_ms=10) as upstream:
        sidecar = await sidecar_factory(upstream, control_plane=cp_address, owner="chaos")
        base = f"http://127.0.0.1:{sidecar.port}"
        async with PositionWatcher(cp_address) as watcher:
            sid, _headers, client = await start_count_stream(http, base, n=n, interval_ms=10)
            try:
                await client.wait_count(20)
                reached = EventId.parse(client.last_id)
                assert reached is not None
                await watcher.wait_position(sid, reached)
                cp.kill()
                await cp.wait_exit()
                # The sidecar keeps serving while its control plane is gone.
                down_at = len(client.received)
                await client.wait_count(down_at + 30)
                await cp.start(ready_port=cp_port)
                healed = time.monotonic()
                # What the sidecar held back while the control plane was away is flushed.
                backlog = EventId.parse(client.last_id)
                assert backlog is not None
                await poll_persisted(cp_address, sid, backlog, watcher=watcher, exact=False)
                recovered = time.monotonic() - healed
                await client.finished()
            finally:
                await client.aclose()
            got, last, _ = await assert_delivered_and_persisted(
                client, n=n, address=cp_address, session_id=sid, watcher=watcher
            )
            await watcher.wait_position(sid, last)
            assert watcher.watches_opened >= 2, "the watch should have been re-opened"
            watcher.assert_never_backwards()
    chaos_table.add(ChaosRow.of("control plane SIGKILL+restart (SQLite)", got, recovered))
