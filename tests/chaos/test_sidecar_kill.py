"""SIGKILL of the sidecar mid-stream; a new sidecar takes the session over from the control
plane and the client resumes with its `Last-Event-ID`, missing nothing and seeing nothing
twice; the persisted position moves from owner epoch 1 to 2 and never back."""

from __future__ import annotations

import signal
import time
from typing import Any

import aiohttp
import pytest

from controlplane.server import RunningControlPlane
from tests.integration.test_proxy import MCP
from tests.support.chaos import (
    ChaosRow,
    ChaosTable,
    PositionWatcher,
    assert_delivered_and_persisted,
    start_count_stream,
)
from tests.support.procs import ProcessPool, free_port
from tests.support.sidecar_swap import sidecar_argv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(30)]


async def test_sidecar_killed_new_sidecar_resumes(
    control_plane: RunningControlPlane,
    procs: ProcessPool,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    chaos_table: ChaosTable,
) -> None:
    """recover_s: from the new sidecar listening to the first event of the resumed stream."""
    n = 150
    async with numbered_upstream(interval_ms=5) as upstream:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        argv_a = sidecar_argv(port, upstream, control_plane.address, "sidecar-a")
        sidecar_a = await procs.start(argv_a, name="sidecar-a", ready_port=port)
        async with PositionWatcher(control_plane.address) as watcher:
            sid, headers, client = await start_count_stream(http, base, n=n, interval_ms=5)
            try:
                await client.wait_count(40)
                sidecar_a.kill(signal.SIGKILL)
                await client.finished()
                assert client.broken, "the connection should have died with sidecar A"
                killed_at = len(client.received)
                assert killed_at < n
                await sidecar_a.wait_exit()

                argv_b = sidecar_argv(port, upstream, control_plane.address, "sidecar-b")
                await procs.start(argv_b, name="sidecar-b", ready_port=port)
                healed = time.monotonic()
                resume = {**headers, "Accept": "text/event-stream", "Last-Event-ID": client.last_id}
                client.start(lambda: http.get(base + MCP, headers=resume))
                await client.finished()
            finally:
                await client.aclose()
            got, last, persisted = await assert_delivered_and_persisted(
                client, n=n, address=control_plane.address, session_id=sid, watcher=watcher
            )
            assert last.epoch == 2, "sidecar B numbers the rest under the next owner epoch"
            assert persisted.owner_epoch == 2
            await watcher.wait_position(sid, last)
            watcher.assert_never_backwards()
    chaos_table.add(
        ChaosRow.of(
            "sidecar SIGKILL, new sidecar, client resumes", got, client.first_arrival_after(healed)
        )
    )
