"""Split brain with the official SDK clients: the Python SDK (mcp) and the TypeScript SDK
(@modelcontextprotocol/sdk, tests/ts) behind a connection-level balancer over two live
sidecars of one upstream (the demo MCP server, official Python SDK with an event store) and one
control plane (SQLite, and a real three-member etcd). Issue #10; the raw-SSE twin is
test_split_brain.py.

The clients keep no connection alive, so the balancer (tests/support/balancer.py, round robin
per new connection, like kube-proxy) sends each request to the other sidecar, and it cuts a
response stream after every K messages, so the SDK resumes it (GET, Last-Event-ID) on a new
connection, which lands on the other sidecar: the call's stream moves between the sidecars
every K messages, and the session with it. (Each request that reaches the other sidecar claims
the session there, and the sidecar left behind ends its streams of it, so streams also move
well before the 20th message: at 20 most moves come from those claims.)

The user must not notice: the `count` call completes with its result and every progress
notification exactly once, in order.

How the cut looks to the client differs per SDK, because the Python SDK cannot survive a
broken connection in the middle of a resumed stream, with or without Tether (mcp 2.3,
mcp/client/streamable_http.py `_handle_reconnection`): on a read error it reconnects with the
Last-Event-ID it resumed FROM, not the last one it received (so the server rightly replays
events it already delivered), and it gives up after two such attempts in a row. The
TypeScript SDK resumes from the last id it got either way. So the TypeScript client's streams
are cut as a broken path (the response just stops), the Python client's as a clean end of the
response (what a server or proxy closing an SSE stream does, which MCP allows at any event;
the client then resumes from its last id).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import mcp_types
import pytest
import pytest_asyncio
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from controlplane.config import SqliteUrl
from controlplane.server import RunningControlPlane
from sidecar.app import RunningSidecar
from tests.integration.conftest import SidecarFactory
from tests.support.balancer import Balancer
from tests.support.chaos import ChaosRow, ChaosTable
from tests.support.control_plane import control_plane_on_sqlite_and_etcd
from tests.support.procs import ProcessPool, free_port, python_module
from tests.support.ts_client import TsSdkClient, longest_gap

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

INTERVAL_MS = 100  # see UPSTREAM_REPLAY_WINDOW
# UPSTREAM_REPLAY_WINDOW, not Tether nor the client SDK: each move makes the adopting sidecar
# resume the upstream with Last-Event-ID; the demo server (official Python SDK server, mcp
# 2.3) replays from its event store (mcp/server/streamable_http.py:964) and only then
# registers the live stream (:980, after minting a priming event; its comment calls this
# "replay→live-tail ordering window ... pre-existing and tracked separately"). An event the
# tool emits in between is stored (:1092) but not sent live (:1095), so that connection never
# carries it: seen about 1 run in 5-40 at 30 ms a tick (both SDK clients), as an upstream
# cursor skipping one. 100 ms a tick makes the window rarer; the assertion stays exact. Tether
# cannot see the gap: upstream ids are opaque to it.
# What the sidecars tell clients to wait before resuming (`retry:`): both SDKs obey it.
CLIENT_RETRY_MS = 50
CALL_TIMEOUT_S = 60.0
# INITIALIZE_NOT_CUT: the balancer starts cutting once the client is initialized. The demo
# server gives its `initialize` response no event id, so the sidecar's own priming id for that
# response carries no upstream cursor, and another sidecar refuses to resume it (410, "the
# upstream gave this response no event id to resume from"): the known limit in
# docs/ownership.md, "Resume" ("only a POST response whose upstream gave no id at all cannot be
# resumed elsewhere"). Cut after that priming event, a client never initializes.


control_plane = control_plane_on_sqlite_and_etcd  # SQLite, then a three-member etcd


@dataclass
class TwoSidecars:
    sidecars: list[RunningSidecar]

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.sidecars]

    def adoptions(self) -> int:
        """How often a sidecar took over a session it did not serve."""
        return sum(s.proxy.continuity.adoptions for s in self.sidecars)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mcp_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """The demo MCP server (a process), one for the module; its URL. Every test opens its own
    session on it (a new client), through sidecars and a control plane of its own, and none
    stops or restarts it: what a test reads is its own session's events."""
    async with ProcessPool(tmp_path_factory.mktemp("mcp-server")) as procs:
        up_port = free_port()
        await procs.start(
            python_module("tether.demo_server", "--port", up_port, "--log-level", "WARNING"),
            name="mcp-server",
            ready_port=up_port,
        )
        yield f"http://127.0.0.1:{up_port}"


@pytest.fixture
async def two_sidecars(
    control_plane: RunningControlPlane, sidecar_factory: SidecarFactory, mcp_server: str
) -> TwoSidecars:
    """The module's demo MCP server behind two in-process sidecars sharing a control plane."""
    upstream = mcp_server
    return TwoSidecars(
        [
            await sidecar_factory(
                upstream,
                control_plane=control_plane.address,
                owner=owner,
                client_retry_ms=CLIENT_RETRY_MS,
            )
            for owner in ("pod-a", "pod-b")
        ]
    )


def text_of(result: mcp_types.CallToolResult) -> str:
    assert not result.is_error, result
    [content] = result.content
    assert isinstance(content, mcp_types.TextContent)
    return content.text


def sdk_row(
    sdk: str,
    *,
    every: int,
    control_plane: RunningControlPlane,
    n: int,
    progress: list[int],
    stall: float,
) -> ChaosRow:
    """The chaos-table row of a call whose progress was checked to be 1..n and whose result
    came (sent: n notifications and the result)."""
    store = "sqlite" if isinstance(control_plane.config.store, SqliteUrl) else "etcd x3"
    received = len(progress) + 1
    return ChaosRow(
        f"{sdk} SDK client alternates between two live sidecars every {every} ({store})",
        sent=n + 1,
        received=received,
        lost=n - len(set(progress)),
        duplicated=len(progress) - len(set(progress)),
        recover_s=stall,
    )


def call_moves(lb: Balancer) -> int:
    """How often the call's stream went on from the other sidecar: consecutive connections
    that carried any event of it (a resumed stream's marker counts: that connection was the
    client reading the call's stream there), on different backends."""
    carried = [(backend, _events(sent)) for backend, sent in lb.downstream]
    call = next(
        (id_.split(".")[0] for _, evs in carried for id_, what in evs if what[0].isdigit()), None
    )
    backends = [b for b, evs in carried if any(i.split(".")[0] == call for i, _ in evs)]
    return sum(a != b for a, b in itertools.pairwise(backends))


def _events(sent: bytearray) -> list[tuple[str, str]]:
    """(id, what) of each SSE event with an id a connection carried: what is the progress
    number, "result" for a JSON-RPC result, else "-"."""
    out = []
    for event in bytes(sent).split(b"\n\n"):
        id_ = re.search(rb"^id: ?(\S+)", event, re.M)
        if id_ is None:
            continue
        progress = re.search(rb'"progress": ?([0-9.]+)', event)
        what = (
            progress.group(1).decode() if progress else ("result" if b'"result"' in event else "-")
        )
        out.append((id_.group(1).decode(), what))
    return out


def transcript(lb: Balancer) -> str:
    """Per connection: its sidecar and, per SSE event it carried, the id and the progress
    number (or "result"): what the client was sent."""
    return "\n".join(
        f"  :{backend} {' '.join(f'{i}={what}' for i, what in _events(sent))}"
        for backend, sent in lb.downstream
    )


# --- the TypeScript SDK ------------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 20])
async def test_ts_sdk_client_alternates_between_two_live_sidecars(
    every: int,
    two_sidecars: TwoSidecars,
    control_plane: RunningControlPlane,
    chaos_table: ChaosTable,
    tmp_path: Path,
) -> None:
    """Cut every `every` messages; the TypeScript transport resumes from the last id it got
    (its `_handleSseStream` keeps `lastEventId` per stream, whichever attempt it is).
    recover_s: the longest wait between two progress notifications."""
    n = 40
    async with (
        Balancer(two_sidecars.ports) as lb,
        TsSdkClient.running(f"{lb.url}/mcp", log_dir=tmp_path, keepalive=False) as ts,
    ):
        lb.cut_after_events = every  # once initialized: see INITIALIZE_NOT_CUT
        before = two_sidecars.adoptions()
        ts.call("count", "count", n=n, interval_ms=INTERVAL_MS)
        result = await ts.wait_for_result("count", timeout=CALL_TIMEOUT_S)
        adoptions = two_sidecars.adoptions() - before
        assert result["text"] == f"counted {n}", ts.describe()
        progress = [r["progress"] for r in ts.matching(lambda r: r["event"] == "progress")]
        assert progress == list(range(1, n + 1)), ts.describe()
    # Each cut of the call's stream is a resume on a new connection, i.e. on the other sidecar
    # (and each claim ends the session's streams on the sidecar left behind: more moves).
    print(f"ts sdk, cut every {every}: {call_moves(lb)} moves, {adoptions} adoptions")  # with -s
    assert call_moves(lb) >= n // every - 1, transcript(lb)
    stall = ts.longest_gap(lambda r: r["event"] == "progress")
    chaos_table.add(
        sdk_row(
            "TypeScript",
            every=every,
            control_plane=control_plane,
            n=n,
            progress=progress,
            stall=stall,
        )
    )


# --- the Python SDK ----------------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 20])
async def test_python_sdk_client_alternates_between_two_live_sidecars(
    every: int,
    two_sidecars: TwoSidecars,
    control_plane: RunningControlPlane,
    chaos_table: ChaosTable,
) -> None:
    """The official Python SDK (mcp) through the balancer, no connection kept alive.
    recover_s: the longest wait between two progress notifications."""
    n = 40
    got: list[float] = []
    arrived: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        got.append(progress)
        arrived.append(time.monotonic())

    # (method, Last-Event-ID, status) of every request the SDK's transport made: the proof of
    # what it resumed from when a delivery assertion fails.
    requests: list[tuple[str, str | None, int]] = []

    async def on_response(response: httpx2.Response) -> None:
        request = response.request
        requests.append(
            (request.method, request.headers.get("last-event-id"), response.status_code)
        )

    timeout = httpx2.Timeout(30.0, read=300.0)
    limits = httpx2.Limits(max_keepalive_connections=0)
    async with (
        Balancer(two_sidecars.ports, clean_cuts=True) as lb,  # see the module docstring
        httpx2.AsyncClient(
            timeout=timeout, limits=limits, event_hooks={"response": [on_response]}
        ) as http,
        Client(streamable_http_client(f"{lb.url}/mcp", http_client=http), mode="legacy") as c,
    ):
        lb.cut_after_events = every  # once initialized: see INITIALIZE_NOT_CUT
        before = two_sidecars.adoptions()

        def proof() -> str:
            return (
                f"progress {got}\nrequests (method, Last-Event-ID, status): {requests}\n"
                f"what each connection carried:\n{transcript(lb)}"
            )

        try:
            result = await asyncio.wait_for(
                c.call_tool(
                    "count",
                    {"n": n, "interval_ms": INTERVAL_MS},
                    progress_callback=on_progress,
                ),
                CALL_TIMEOUT_S,
            )
        except (MCPError, TimeoutError) as e:
            raise AssertionError(f"{e!r}\n{proof()}") from None
        adoptions = two_sidecars.adoptions() - before
    # Out of the client's task group, so a failure shows its whole message.
    assert text_of(result) == f"counted {n}", proof()
    assert got == [float(i) for i in range(1, n + 1)], proof()
    print(f"python sdk, cut every {every}: {call_moves(lb)} moves, {adoptions} adoptions")  # -s
    assert call_moves(lb) >= n // every - 1, transcript(lb)
    stall = longest_gap(arrived)
    chaos_table.add(
        sdk_row(
            "Python",
            every=every,
            control_plane=control_plane,
            n=n,
            progress=[int(p) for p in got],
            stall=stall,
        )
    )
