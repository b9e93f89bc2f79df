"""Network cuts, and heals, between the sidecar and the upstream and between the sidecar and
the control plane.

Where the machine allows it (root, `ip netns`), the sidecar, the upstream and the control plane
run as "pods" in network namespaces of their own, linked by veth pairs (tests/support/netns.py);
a cut takes the direct link down at both ends, which TCP does not notice: no reset, no FIN.
Where it does not, those tests skip saying why, and the loopback variants (always run) cut
through a relay instead: connections are reset and new ones refused until the heal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.server import RunningControlPlane
from sidecar.tracker import EventId
from tests.integration.conftest import SidecarFactory
from tests.integration.test_proxy import HEADERS, MCP, count_call, initialize
from tests.support.chaos import (
    DEADLINE_S,
    ChaosRow,
    ChaosTable,
    LoopbackPartition,
    PositionWatcher,
    StreamConsumer,
    assert_delivered_and_persisted,
    poll_persisted,
    start_count_stream,
)
from tests.support.metrics import counter_value
from tests.support.netns import PodNetwork, netns_unavailable_reason
from tests.support.procs import python_module
from tests.support.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(30)]

CUT_S = 1.0
"""How long a sidecar <-> upstream cut lasts: the fault's length, not a wait for anything."""
SILENT_DEATH_BUDGET_S = 5.0
"""How soon after the upstream pod is replaced the sidecar must be streaming again."""
UPSTREAM_PORT, SIDECAR_PORT, CP_PORT = 3000, 8080, 50051


@pytest.fixture
async def pods(tmp_path: Path) -> AsyncIterator[PodNetwork]:
    """Pods `sidecar`, `upstream` and `cp`, linked sidecar <-> upstream and sidecar <-> cp;
    deleted after the test however it ends."""
    reason = await asyncio.to_thread(netns_unavailable_reason)
    if reason is not None:
        pytest.skip(f"{reason}; the loopback variant of this scenario runs instead")
    net = PodNetwork(
        pods=("sidecar", "upstream", "cp"),
        pairs=(("sidecar", "upstream"), ("sidecar", "cp")),
        log_dir=tmp_path,
    )
    async with net:
        yield net


async def start_pods(net: PodNetwork) -> tuple[str, str]:
    """The upstream, the control plane (SQLite) and the sidecar, each in its pod; returns the
    sidecar's base URL and the control plane's address as the test (outside) sees them."""
    upstream_argv = python_module(
        "tests.support.numbered_upstream", "--host", "0.0.0.0", "--port", UPSTREAM_PORT
    )
    cp_argv = [
        *python_module("tether.cli", "control-plane"),
        "--listen",
        f"0.0.0.0:{CP_PORT}",
        "--store",
        f"sqlite:///{net.log_dir / 'cp.db'}",
    ]
    await asyncio.gather(
        net.start("upstream", upstream_argv, name="upstream", ready_port=UPSTREAM_PORT),
        net.start("cp", cp_argv, name="control-plane", ready_port=CP_PORT),
    )
    sidecar_argv = [
        *python_module("tether.cli", "sidecar"),
        "--listen",
        f"0.0.0.0:{SIDECAR_PORT}",
        "--upstream",
        f"http://{net.ip_toward('upstream', 'sidecar')}:{UPSTREAM_PORT}",
        "--control-plane",
        f"{net.ip_toward('cp', 'sidecar')}:{CP_PORT}",
        "--owner",
        "pod-sidecar",
        # Clients reach the pod by its address, as through a headless Service.
        "--allowed-host",
        net.node_ip("sidecar"),
        # A silently dead upstream must be noticed within the scenario's budget.
        "--upstream-dead-after",
        "4",
    ]
    await net.start("sidecar", sidecar_argv, name="sidecar", ready_port=SIDECAR_PORT)
    return f"http://{net.node_ip('sidecar')}:{SIDECAR_PORT}", f"{net.node_ip('cp')}:{CP_PORT}"


async def test_netns_cut_sidecar_upstream_and_heal(
    pods: PodNetwork, http: aiohttp.ClientSession, chaos_table: ChaosTable
) -> None:
    """Both pods live through the cut; TCP retransmits once the link is back and the stream
    goes on, exactly once. recover_s: from the link up to the client's next event."""
    base, cp_address = await start_pods(pods)
    n = 300
    async with PositionWatcher(cp_address) as watcher:
        sid, _headers, client = await start_count_stream(http, base, n=n, interval_ms=5)
        try:
            await client.wait_count(40)
            await pods.cut("sidecar", "upstream")
            await asyncio.sleep(CUT_S)  # the outage itself
            await pods.heal("sidecar", "upstream")
            healed = time.monotonic()
            await client.finished()
        finally:
            await client.aclose()
        got, _, _ = await assert_delivered_and_persisted(
            client, n=n, address=cp_address, session_id=sid, watcher=watcher
        )
        assert client.longest_gap() >= CUT_S / 2, "the cut did not stop the stream"
        watcher.assert_never_backwards()
    chaos_table.add(
        ChaosRow.of(
            f"netns cut sidecar<->upstream {CUT_S:.0f}s, heal",
            got,
            client.first_arrival_after(healed),
        )
    )


async def test_netns_upstream_pod_replaced_during_cut(
    pods: PodNetwork, http: aiohttp.ClientSession, chaos_table: ChaosTable
) -> None:
    """The upstream pod dies while cut off and a new one comes up with the same address: the
    sidecar's connection to the old one is dead, and nothing will ever tell it (the sidecar
    only reads, so it sends nothing that could draw a reset). The sidecar must notice on its
    own, reconnect with Last-Event-ID, and the client get the rest exactly once."""
    base, cp_address = await start_pods(pods)
    n = 300
    async with PositionWatcher(cp_address) as watcher:
        sid, _headers, client = await start_count_stream(http, base, n=n, interval_ms=5)
        try:
            await client.wait_count(40)
            await pods.cut("sidecar", "upstream")
            (upstream,) = (p for p in pods.processes if p.name == "upstream")
            upstream.kill()
            await upstream.wait_exit()
            await pods.replace_pod("upstream")  # its new links come up at once: healed
            await upstream.start(ready_port=UPSTREAM_PORT)
            healed = time.monotonic()
            stalled_at = len(client.received)
            resumed = await client.wait_new_event(timeout=SILENT_DEATH_BUDGET_S)
            if not resumed:
                chaos_table.add(
                    ChaosRow(
                        "netns upstream pod replaced during cut",
                        n + 1,
                        stalled_at,
                        n + 1 - stalled_at,
                        0,
                        None,
                        note=f"xfail: no event for {SILENT_DEATH_BUDGET_S:.0f}s, stream hangs",
                    )
                )
            assert resumed, (
                f"no event within {SILENT_DEATH_BUDGET_S}s of the new upstream pod listening: "
                f"the sidecar still waits on the dead connection ({stalled_at} of {n + 1} "
                "events delivered)"
            )
            await client.finished()
        finally:
            await client.aclose()
        got, _, _ = await assert_delivered_and_persisted(
            client, n=n, address=cp_address, session_id=sid, watcher=watcher
        )
        watcher.assert_never_backwards()
    chaos_table.add(
        ChaosRow.of(
            "netns upstream pod replaced during cut", got, client.first_arrival_after(healed)
        )
    )


async def test_netns_cut_sidecar_control_plane_and_heal(
    pods: PodNetwork, http: aiohttp.ClientSession, chaos_table: ChaosTable
) -> None:
    """The client keeps streaming while the sidecar cannot reach its control plane; after the
    heal the held-back position is flushed and the store ends at the client's last event.
    recover_s: from the link up to the store holding the client's position at that moment."""
    base, cp_address = await start_pods(pods)
    n = 200
    async with PositionWatcher(cp_address) as watcher:
        sid, _headers, client = await start_count_stream(http, base, n=n, interval_ms=10)
        try:
            recovered = await _partition_control_plane(
                client,
                watcher,
                sid,
                cp_address,
                cut=lambda: pods.cut("sidecar", "cp"),
                heal=lambda: pods.heal("sidecar", "cp"),
            )
            await client.finished()
        finally:
            await client.aclose()
        got, _, _ = await assert_delivered_and_persisted(
            client, n=n, address=cp_address, session_id=sid, watcher=watcher
        )
        watcher.assert_never_backwards()
    chaos_table.add(ChaosRow.of("netns cut sidecar<->control plane, heal", got, recovered))


async def test_netns_control_plane_pod_replaced_during_cut(
    pods: PodNetwork, http: aiohttp.ClientSession, chaos_table: ChaosTable
) -> None:
    """The control plane's pod dies while cut off from the sidecar; a new one comes up with the
    same address and the same SQLite volume. The sidecar's report stream to the old pod is
    dead without a word, but the sidecar keeps sending positions on it, so the new pod's
    kernel answers with a reset and the reporter reconnects. recover_s: from the new control
    plane listening to the store holding the client's position at that moment."""
    base, cp_address = await start_pods(pods)
    n = 200
    async with PositionWatcher(cp_address) as watcher:
        sid, _headers, client = await start_count_stream(http, base, n=n, interval_ms=10)
        (cp,) = (p for p in pods.processes if p.name == "control-plane")

        async def cut() -> None:
            await pods.cut("sidecar", "cp")
            cp.kill()
            await cp.wait_exit()

        async def replace() -> None:
            await pods.replace_pod("cp")
            await cp.start(ready_port=CP_PORT)
            await watcher.reopen()

        try:
            recovered = await _partition_control_plane(
                client, watcher, sid, cp_address, cut=cut, heal=replace
            )
            await client.finished()
        finally:
            await client.aclose()
        got, _, _ = await assert_delivered_and_persisted(
            client, n=n, address=cp_address, session_id=sid, watcher=watcher
        )
        watcher.assert_never_backwards()
    chaos_table.add(ChaosRow.of("netns control plane pod replaced during cut", got, recovered))


async def _partition_control_plane(
    client: StreamConsumer,
    watcher: PositionWatcher,
    sid: str,
    cp_address: str,
    *,
    cut: Any,
    heal: Any,
) -> float:
    """Cut the sidecar off its control plane while the client receives 50 more events (it
    must: the sidecar keeps serving), heal, and return the seconds until the position the
    client had reached is persisted."""
    await client.wait_count(30)
    reached = EventId.parse(client.last_id)
    assert reached is not None
    await watcher.wait_position(sid, reached)
    await cut()
    await client.wait_count(len(client.received) + 50)
    held = EventId.parse(client.last_id)
    persisted = watcher.position(sid, reached.stream)
    assert held is not None
    assert persisted is not None
    assert persisted.order < held.order, "positions reached the store through the cut"
    await heal()
    healed = time.monotonic()
    backlog = EventId.parse(client.last_id)
    assert backlog is not None
    await poll_persisted(cp_address, sid, backlog, watcher=watcher, exact=False)
    return time.monotonic() - healed


# --- loopback variants: a relay resets connections and refuses new ones until the heal -------


async def test_loopback_cut_sidecar_upstream_and_heal(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    chaos_table: ChaosTable,
) -> None:
    """recover_s: from the heal to the client's next event."""
    n = 200
    async with numbered_upstream(interval_ms=5) as upstream:
        host, _, port = upstream.removeprefix("http://").rpartition(":")
        async with LoopbackPartition(host, int(port)) as relay:
            sidecar = await sidecar_factory(
                f"http://{relay.address}", control_plane=control_plane.address, owner="chaos"
            )
            base = f"http://127.0.0.1:{sidecar.port}"
            async with PositionWatcher(control_plane.address) as watcher:
                sid = await initialize(http, base)
                headers = {**HEADERS, "Mcp-Session-Id": sid}
                client = StreamConsumer()
                client.start(
                    lambda: http.post(
                        base + MCP, json=count_call(n, interval_ms=5), headers=headers
                    )
                )
                try:
                    await client.wait_count(40)
                    relay.partition()
                    # The outage lasts until the stream's pump has tried (and failed) to
                    # reconnect: it starts a second attempt only after the first failed. A
                    # refused connection alone would not say so: the sidecar's upstream probe
                    # connects every 2 s too (CI met that: the heal came before any attempt).
                    metrics = sidecar.proxy.metrics
                    await eventually(
                        lambda: (
                            relay.refused >= 1
                            and counter_value(metrics, "upstream_reconnects") >= 2
                        ),
                        timeout=DEADLINE_S,
                        what="a failed reconnect of the stream",
                    )
                    relay.heal()
                    healed = time.monotonic()
                    await client.finished()
                finally:
                    await client.aclose()
                got, _, _ = await assert_delivered_and_persisted(
                    client, n=n, address=control_plane.address, session_id=sid, watcher=watcher
                )
                watcher.assert_never_backwards()
    assert counter_value(sidecar.proxy.metrics, "upstream_reconnects") >= 2
    chaos_table.add(
        ChaosRow.of(
            "loopback cut sidecar<->upstream, heal", got, client.first_arrival_after(healed)
        )
    )


async def test_loopback_cut_sidecar_control_plane_and_heal(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    chaos_table: ChaosTable,
) -> None:
    """recover_s: from the heal to the store holding the client's position at that moment."""
    n = 200
    host, _, port = control_plane.address.rpartition(":")
    async with (
        numbered_upstream(interval_ms=10) as upstream,
        LoopbackPartition(host, int(port)) as relay,
    ):
        sidecar = await sidecar_factory(upstream, control_plane=relay.address, owner="chaos")
        base = f"http://127.0.0.1:{sidecar.port}"
        # The watcher talks to the control plane directly, not through the cut.
        async with PositionWatcher(control_plane.address) as watcher:
            sid, _headers, client = await start_count_stream(http, base, n=n, interval_ms=10)

            async def cut() -> None:
                relay.partition()

            async def heal() -> None:
                relay.heal()

            try:
                recovered = await _partition_control_plane(
                    client, watcher, sid, control_plane.address, cut=cut, heal=heal
                )
                await client.finished()
            finally:
                await client.aclose()
            got, _, _ = await assert_delivered_and_persisted(
                client, n=n, address=control_plane.address, session_id=sid, watcher=watcher
            )
            watcher.assert_never_backwards()
    chaos_table.add(ChaosRow.of("loopback cut sidecar<->control plane, heal", got, recovered))
