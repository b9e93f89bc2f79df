"""The official TypeScript SDK client through a sidecar that is SIGKILLed and replaced mid-call.

Issue #10. Real processes: the demo MCP server (Python SDK, with an event store), sidecars A
and B (`tether sidecar`) one after the other on one port with a SQLite control plane, and
`node tests/ts/client.mjs` (`@modelcontextprotocol/sdk` as pinned by tests/ts/package-lock.json)
as the client. The Python SDK's twin is
test_session_continuity.py::test_sdk_client_survives_its_sidecar_being_killed.

What the user must not notice: the call in flight when A dies completes, with every progress
notification exactly once and in order; and the session's standalone GET stream survives too,
so a server notification sent after B took over still reaches the client. Two variants, by what
that GET stream had carried when A died (`GetStreamBeforeKill`): a notification, or only its
priming event (the common case: most sessions' GET stream stays silent for long stretches).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from controlplane.server import RunningControlPlane
from tests.support.control_plane import control_plane_on
from tests.support.procs import ProcessPool
from tests.support.sidecar_swap import GetStreamBeforeKill, SidecarSwap, resumes_get_stream
from tests.support.ts_client import Report, TsClientError, TsSdkClient
from tether.demo_server import NOTIFY_URI_PREFIX

pytestmark = pytest.mark.slow

N = 30
INTERVAL_MS = 100
KILL_AFTER = 8
# The TypeScript transport waits exactly `retry:` between attempts and is told (client.mjs) to
# try 120 times, so a short retry exercises several refused connections while B starts.
CLIENT_RETRY_MS = 250
# Generous: on a loaded machine B may take seconds to start, and the GET stream to come back.
STEP_TIMEOUT_S = 30.0
# B has served the call's result by then: the GET stream, retried every 250 ms, is back soon.
GET_STREAM_BACK_TIMEOUT_S = 15.0
# The notification is sent once the GET stream is back: it arrives at once or never.
NOTIFICATION_TIMEOUT_S = 10.0


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    async with control_plane_on("sqlite", tmp_path) as running:
        yield running


def notification_of(topic: str) -> Callable[[Report], bool]:
    """Matches the `notify` tool's notification about `topic`."""
    uri = f"{NOTIFY_URI_PREFIX}{topic}"
    return lambda r: (
        r["event"] == "notification"
        and r["method"] == "notifications/resources/updated"
        and r["params"].get("uri") == uri
    )


def progress_of(tag: str) -> Callable[[Report], bool]:
    return lambda r: r["event"] == "progress" and r["tag"] == tag


@pytest.mark.parametrize("before_kill", list(GetStreamBeforeKill), ids=lambda v: v.value)
async def test_ts_sdk_client_survives_its_sidecar_being_killed(
    control_plane: RunningControlPlane,
    procs: ProcessPool,
    tmp_path: Path,
    before_kill: GetStreamBeforeKill,
) -> None:
    """The TypeScript SDK client mid-call, its sidecar SIGKILLed and a new one started at the
    same address: the call completes with every progress notification exactly once, in order,
    and a notification sent on the GET stream after the replacement arrives."""
    swap = await SidecarSwap.start(
        procs, control_plane=control_plane.address, client_retry_ms=CLIENT_RETRY_MS
    )
    async with TsSdkClient.running(swap.url, log_dir=tmp_path) as client:
        await client.wait_for(
            lambda r: r["event"] == "get" and r["status"] == 200,
            timeout=STEP_TIMEOUT_S,
            what="the standalone GET stream open",
        )
        if before_kill is GetStreamBeforeKill.CARRIED_EVENTS:
            client.call("before", "notify", topic="before")
            await client.wait_for(
                notification_of("before"), timeout=STEP_TIMEOUT_S, what="the first notification"
            )

        client.call("count", "count", n=N, interval_ms=INTERVAL_MS)
        await client.wait_for(
            lambda r: progress_of("count")(r) and r["progress"] == KILL_AFTER,
            timeout=STEP_TIMEOUT_S,
            what=f"progress {KILL_AFTER}",
        )
        replaced_at = len(client.events)
        await swap.replace()

        result = await client.wait_for_result("count", timeout=STEP_TIMEOUT_S)
        assert result["text"] == f"counted {N}", client.describe()
        assert [r["progress"] for r in client.matching(progress_of("count"))] == list(
            range(1, N + 1)
        ), client.describe()

        # The GET stream comes back through B, resumed from its last id. (A notification sent
        # before that could be lost for good when the GET stream had carried only its priming
        # event: the upstream gave no id on it, so nothing can replay what it sent meanwhile.)
        try:
            await client.wait_for(
                lambda r: (
                    r["event"] == "get"
                    and r["status"] == 200
                    and resumes_get_stream(r["last_event_id"])
                ),
                since=replaced_at,
                timeout=GET_STREAM_BACK_TIMEOUT_S,
                what=f"the GET stream resumed through {swap.name}",
            )
        except TsClientError as e:
            raise AssertionError(f"{e}\n{swap.refused_resumes_summary()}") from None

        # Sent now that B serves the session: it can only arrive on the GET stream through B.
        client.call("after", "notify", topic="after")
        await client.wait_for_result("after", timeout=STEP_TIMEOUT_S)
        await client.wait_for(
            notification_of("after"),
            timeout=NOTIFICATION_TIMEOUT_S,
            what="the notification sent on the GET stream after the replacement",
        )

    notifications = client.matching(lambda r: r["event"] == "notification")
    expected = ["after"] if before_kill is GetStreamBeforeKill.ONLY_PRIMING else ["before", "after"]
    assert [n["params"]["uri"] for n in notifications] == [
        f"{NOTIFY_URI_PREFIX}{t}" for t in expected
    ], client.describe()
