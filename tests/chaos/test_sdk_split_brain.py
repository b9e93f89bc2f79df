"""Split brain with the official SDK clients: the Python SDK (mcp) and the TypeScript SDK
(@modelcontextprotocol/sdk, tests/ts) behind a connection-level balancer over two live
sidecars of one upstream (the demo MCP server, official Python SDK with an event store) and one
control plane (SQLite). Issue #10; the raw-SSE twin is test_split_brain.py.

The clients keep no connection alive, so the balancer (tests/support/balancer.py, round robin
per new connection, like kube-proxy) sends each request to the other sidecar, and it cuts a
response stream after every K events, so the SDK resumes it (GET, Last-Event-ID) on a new
connection, which lands on the other sidecar: the session moves between the sidecars all the
time. (Each request that reaches the other sidecar claims the session there, and the sidecar
left behind ends its streams of it, so streams also break, and resume elsewhere, well before
the balancer's 20th event: at 20 the moves come mostly from those claims.)

The user must not notice: the `count` call completes with its result and every progress
notification exactly once, in order.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

import httpx2
import mcp_types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from controlplane.server import RunningControlPlane
from sidecar.app import RunningSidecar
from tests.integration.conftest import SidecarFactory
from tests.support.balancer import Balancer
from tests.support.procs import ProcessPool, free_port, python_module
from tests.support.ts_client import TsSdkClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

INTERVAL_MS = 30
PYTHON_INTERVAL_MS = 100  # see UPSTREAM_REPLAY_WINDOW
# What the sidecars tell clients to wait before resuming (`retry:`): both SDKs obey it.
CLIENT_RETRY_MS = 50
CALL_TIMEOUT_S = 60.0
# The Tether gap these tests found, since fixed (`StreamCore.priming` now stands for the
# upstream's own priming event): a POST response's stream started with the sidecar's own
# priming event (`StreamTracker.priming_event`), written before the
# upstream's first event, so its id carries no upstream cursor (`p<stream>.<epoch>.0`). When the
# stream breaks right after it (the balancer's cut at 1 event, or the sidecar left behind
# dropping the session's streams because the client's GET stream was claimed by the other
# sidecar), the client resumes with that id and both sidecars refuse for good: the new one
# "the upstream gave this response no event id to resume from" (resume.py `_adopt_stream`),
# the old one "unknown stream" (it dropped it). 410 on every retry: the call never completes,
# although the demo server's event store has ids for every event of that response.
NOT_YET_RELIABLE = (
    "issue #10, open: passes in most runs (7 of 8 here) since priming ids carry the upstream "
    "cursor and in-flight POST responses finish on takeover; the rare loss is not yet explained"
)
TS_STALLS = (
    "issue #10, open: with a move every 20 events the TypeScript SDK's call stalls mid-way in "
    "most runs (progress stops, no result); cause not found yet"
)
PY_SDK_ORIGINAL_ID = (
    "the official Python SDK (mcp 2.3) resumes a broken resumption with the ORIGINAL "
    "Last-Event-ID (mcp/client/streamable_http.py, _handle_reconnection is given last_event_id,"
    " not the id it received since), so the sidecar rightly replays an event it already had"
)
# INITIALIZE_NOT_CUT: the balancer starts cutting once the client is initialized. The demo
# server gives its `initialize` response no event id, so the sidecar's own priming id for that
# response carries no upstream cursor, and another sidecar refuses to resume it (410, "the
# upstream gave this response no event id to resume from"): the known limit in
# docs/ownership.md, "Resume" ("only a POST response whose upstream gave no id at all cannot be
# resumed elsewhere"). Cut after that priming event, a client never initializes.


@dataclass
class TwoSidecars:
    sidecars: list[RunningSidecar]

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.sidecars]

    def adoptions(self) -> int:
        """How often a sidecar took over a session it did not serve: the session's moves."""
        return sum(s.proxy.continuity.adoptions for s in self.sidecars)


@pytest.fixture
async def two_sidecars(
    control_plane: RunningControlPlane, sidecar_factory: SidecarFactory, procs: ProcessPool
) -> TwoSidecars:
    """The demo MCP server (a process) behind two in-process sidecars sharing a control
    plane."""
    up_port = free_port()
    await procs.start(
        python_module("tether.demo_server", "--port", up_port, "--log-level", "WARNING"),
        name="mcp-server",
        ready_port=up_port,
    )
    upstream = f"http://127.0.0.1:{up_port}"
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


def transcript(lb: Balancer) -> str:
    """Per connection: its sidecar and, per SSE event it carried, the id and the progress
    number (or the JSON-RPC id of a result): what the client was sent."""
    out = []
    for backend, sent in lb.downstream:
        summary = []
        for event in bytes(sent).split(b"\n\n"):
            id_ = re.search(rb"^id: ?(\S+)", event, re.M)
            progress = re.search(rb'"progress": ?([0-9.]+)', event)
            result = b'"result"' in event
            if id_ or progress or result:
                what = progress.group(1).decode() if progress else ("result" if result else "-")
                summary.append(f"{id_.group(1).decode() if id_ else '?'}={what}")
        out.append(f"  :{backend} {' '.join(summary)}")
    return "\n".join(out)


# --- the TypeScript SDK ------------------------------------------------------------------------


# Not reliable enough to gate CI yet: expected failures that are not strict, so each run shows
# XPASS or XFAIL with the reason (issue #10 stays open until they pass every time).
@pytest.mark.parametrize(
    "every",
    [
        pytest.param(1, marks=pytest.mark.xfail(strict=False, reason=NOT_YET_RELIABLE)),
        pytest.param(20, marks=pytest.mark.xfail(strict=False, reason=TS_STALLS)),
    ],
)
async def test_ts_sdk_client_alternates_between_two_live_sidecars(
    every: int, two_sidecars: TwoSidecars, tmp_path: Path
) -> None:
    """Cut every `every` events; the TypeScript transport resumes from the last id it got
    (its `_handleSseStream` keeps `lastEventId` per stream, whichever attempt it is)."""
    n = 40
    async with (
        Balancer(two_sidecars.ports) as lb,
        TsSdkClient.running(f"{lb.url}/mcp", log_dir=tmp_path, keepalive=False) as ts,
    ):
        lb.cut_after_events = every  # once initialized: see INITIALIZE_NOT_CUT
        before = two_sidecars.adoptions()
        ts.call("count", "count", n=n, interval_ms=INTERVAL_MS)
        result = await ts.wait_for_result("count", timeout=CALL_TIMEOUT_S)
        moves = two_sidecars.adoptions() - before
        assert result["text"] == f"counted {n}", ts.describe()
        progress = [r["progress"] for r in ts.matching(lambda r: r["event"] == "progress")]
        assert progress == list(range(1, n + 1)), ts.describe()
    # Each cut of the call's stream is a resume on a new connection, i.e. on the other sidecar
    # (and each claim ends the session's streams on the sidecar left behind: more moves).
    print(f"ts sdk, cut every {every}: {moves} moves, {lb.cuts} cuts")  # shown with -s
    assert moves >= n // every, (moves, lb.cuts, dict(lb.connections))


# --- the Python SDK ----------------------------------------------------------------------------


# UPSTREAM_REPLAY_WINDOW, not Tether nor the client SDK: each move makes the adopting sidecar
# resume the upstream with Last-Event-ID; the demo server (official Python SDK server, mcp
# 2.3) replays from its event store (mcp/server/streamable_http.py:964) and only then
# registers the live stream (:980, after minting a priming event; its comment calls this
# "replay→live-tail ordering window ... pre-existing and tracked separately"). An event the
# tool emits in between is stored (:1092) but not sent live (:1095), so that connection never
# carries it: seen about 1 run in 20-40 at 30 ms a tick, as an upstream cursor skipping one
# (p….4.5.2:7 then p….4.6.2:9, the sidecar's own numbering contiguous). 100 ms a tick makes the
# window rarer; the assertion stays exact. (A second cause, a claim ending a POST stream right
# after the sidecar's priming event, is fixed: the priming id carries the upstream cursor and
# an in-flight POST response finishes on the sidecar its client reads.)
# Every 1: the client SDK duplicates an event (PY_SDK_ORIGINAL_ID; the failure message shows
# each connection's Last-Event-ID and what it carried). Every 20: see NOT_YET_RELIABLE.
@pytest.mark.parametrize(
    "every",
    [
        pytest.param(1, marks=pytest.mark.xfail(strict=False, reason=PY_SDK_ORIGINAL_ID)),
        pytest.param(20, marks=pytest.mark.xfail(strict=False, reason=NOT_YET_RELIABLE)),
    ],
)
async def test_python_sdk_client_alternates_between_two_live_sidecars(
    every: int, two_sidecars: TwoSidecars
) -> None:
    """The official Python SDK (mcp) through the balancer, no connection kept alive."""
    n = 40
    got: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        got.append(progress)

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
        Balancer(two_sidecars.ports) as lb,
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
                    {"n": n, "interval_ms": PYTHON_INTERVAL_MS},
                    progress_callback=on_progress,
                ),
                CALL_TIMEOUT_S,
            )
        except MCPError as e:
            raise AssertionError(f"{e}\n{proof()}") from None
        moves = two_sidecars.adoptions() - before
    # Out of the client's task group, so a failure shows its whole message.
    assert text_of(result) == f"counted {n}", proof()
    assert got == [float(i) for i in range(1, n + 1)], proof()
    print(f"python sdk, cut every {every}: {moves} moves, {lb.cuts} cuts")  # shown with -s
    assert moves >= n // every, (moves, lb.cuts, dict(lb.connections))
