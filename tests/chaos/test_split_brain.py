"""Split brain: a client behind a Service moves between two live sidecars of the same upstream,
every event or every 20 events, each move a claim of the session by the other sidecar. Both
sidecars stay up; the one left behind must stop writing for the session (fenced), and the
client must see every event exactly once, in order, with the store never going backwards."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from controlplane.config import SqliteUrl
from controlplane.server import RunningControlPlane
from sidecar.tracker import EventId
from tests.integration.conftest import SidecarFactory
from tests.integration.test_proxy import HEADERS, MCP, count_call, initialize
from tests.support.chaos import (
    ChaosRow,
    ChaosTable,
    PositionWatcher,
    assert_exactly_once,
    poll_persisted,
)
from tests.support.control_plane import control_plane_on_sqlite_and_etcd
from tests.support.sse_client import Received, events

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


control_plane = control_plane_on_sqlite_and_etcd  # SQLite, then a three-member etcd


@pytest.mark.parametrize("every", [1, 20])
async def test_client_alternates_between_two_live_sidecars(  # noqa: PLR0917 - fixtures
    every: int,
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    chaos_table: ChaosTable,
) -> None:
    """recover_s: the longest wait, after a move, for the first event from the other
    sidecar."""
    n = 60 if every == 1 else 300
    cp = control_plane.address
    async with numbered_upstream(interval_ms=2) as up:
        sidecars = [
            await sidecar_factory(up, control_plane=cp, owner=name) for name in ("pod-a", "pod-b")
        ]
        bases = [f"http://127.0.0.1:{s.port}" for s in sidecars]
        async with PositionWatcher(cp) as watcher:
            sid = await initialize(http, bases[0])
            headers = {**HEADERS, "Mcp-Session-Id": sid}
            got: list[Received] = []
            moves = 0
            worst = 0.0
            resp = await http.post(
                bases[0] + MCP, json=count_call(n, interval_ms=2), headers=headers
            )
            while True:
                moved_at = time.monotonic()
                first = True
                taken = 0
                async with resp:
                    assert resp.status == 200, await resp.text()
                    async for ev in events(resp):
                        if first:
                            worst = max(worst, time.monotonic() - moved_at)
                            first = False
                        got.append(ev)
                        taken += 1
                        if taken == every:
                            break
                if len(got) > n or (taken < every):
                    break  # the final result came (or the stream ended)
                moves += 1
                last = got[-1].id or ""
                resume = {**headers, "Accept": "text/event-stream", "Last-Event-ID": last}
                resp = await http.get(bases[moves % 2] + MCP, headers=resume)
            delivery = assert_exactly_once(got, n=n)
            last_id = EventId.parse(got[-1].id or "")
            assert last_id is not None
            await poll_persisted(cp, sid, last_id, watcher=watcher)
            await watcher.wait_position(sid, last_id)
            watcher.assert_never_backwards()
    store = "sqlite" if isinstance(control_plane.config.store, SqliteUrl) else "etcd x3"
    chaos_table.add(
        ChaosRow.of(
            f"client alternates between two live sidecars every {every} ({store})",
            delivery,
            worst,
        )
    )
    assert moves >= n // every - 1
