"""A rollout fails no tool call through Tether (issue #12): the headline test of draining.

"Pods" are process pairs: the demo MCP server (official Python SDK) with NO event store, and a
`tether sidecar` process in front of it; one control plane (in-process, SQLite). A
connection-level balancer (tests/support/balancer.py, round robin per new connection, like
kube-proxy) stands in for the Service. Official SDK clients, Python (`mode="legacy"` and the
default `"auto"`) and TypeScript, call `count` back to back: a tool that streams progress for
a few seconds.

The pods are rolled one by one as a Deployment's rolling update does it, each terminated as
the kubelet terminates a pod: a new pod (started ahead, while the clients begin, so that no step
waits for processes to boot) is put into rotation; the old one is
taken out of rotation (its endpoint removed), its preStop hook runs (`GET /drain` on the
sidecar's admin port, which blocks until nothing is in flight), SIGTERM goes to the MCP
server, and once it has exited, to the sidecar (a native sidecar stops after the main
container).

The same rollout runs with the clients talking to the servers through the balancer without
Tether (there the pod is the server alone and has no hook). A call fails when it raises, times
out, answers wrongly, or when its progress notifications are not exactly 1..n in order. A
client whose call failed starts a new client (what an application does), and goes on. Through
Tether no call may fail; without it, the failures are measured and reported, not asserted.
The table (`-s` shows it) is the one in the README, "Proven under failure".
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx2
import mcp_types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.support.balancer import Balancer
from tests.support.control_plane import control_plane_on
from tests.support.procs import ManagedProcess, ProcessPool, free_port, python_module
from tests.support.ts_client import TsClientError, TsSdkClient
from tests.support.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PODS = 3
PY_CLIENTS = 20  # half legacy, half default ("auto")
TS_CLIENTS = 5
TICKS = 10
TICK_MS = 250  # a call streams progress for 2.5 s
CALL_TIMEOUT_S = 25.0
DRAIN_TIMEOUT_S = 20  # the sidecars' --drain-timeout: longer than any call
CLIENT_RETRY_MS = 100


@dataclass
class Pod:
    """A pod: the MCP server, and with Tether the sidecar the Service sends clients to."""

    name: str
    server: ManagedProcess
    port: int
    """What the balancer sends connections to: the sidecar's port, else the server's."""
    sidecar: ManagedProcess | None = None
    admin_port: int | None = None


@dataclass
class Tally:
    """What the clients of one rollout saw."""

    calls: int = 0
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    log: list[str] = field(default_factory=list)
    """What happened when (seconds since the start): the rollout's steps and the failures."""
    longest_stall: float = 0.0
    """Longest wait for the next message of a call (its first progress, the next, or its
    result), over every call that succeeded."""

    def note(self, what: str) -> None:
        self.log.append(f"{time.monotonic() - self.started:6.2f} {what}")

    def fail(self, what: str) -> None:
        self.failures.append(what)
        self.note(f"FAILED {what}")

    def stall(self, gap: float) -> None:
        self.longest_stall = max(self.longest_stall, gap)


async def start_pod(procs: ProcessPool, name: str, control_plane: str | None) -> Pod:
    """Start the pod's processes (server and sidecar at once: the sidecar reaches its
    upstream only when a request comes); return once both listen."""
    up = free_port()
    server_argv = python_module(
        "tether.demo_server", "--port", up, "--no-event-store", "--log-level", "WARNING"
    )
    if control_plane is None:
        return Pod(name, await procs.start(server_argv, name=f"{name}-server", ready_port=up), up)
    port, admin = free_port(), free_port()
    sidecar_argv = python_module(
        "tether.cli",
        "sidecar",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"http://127.0.0.1:{up}",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        "--control-plane",
        control_plane,
        "--owner",
        name,
        "--drain-timeout",
        DRAIN_TIMEOUT_S,
        "--client-retry-ms",
        CLIENT_RETRY_MS,
    )
    server, sidecar = await asyncio.gather(
        procs.start(server_argv, name=f"{name}-server", ready_port=up),
        procs.start(sidecar_argv, name=f"{name}-sidecar", ready_port=port),
    )
    return Pod(name, server, port, sidecar, admin)


async def terminate(pod: Pod, lb: Balancer, http: aiohttp.ClientSession, tally: Tally) -> None:
    """As the kubelet does: out of the Service, preStop, SIGTERM server, then sidecar."""
    lb.remove(pod.port)
    tally.note(f"{pod.name} out of the balancer")
    if pod.admin_port is not None:
        async with http.get(f"http://127.0.0.1:{pod.admin_port}/drain") as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
            assert answer["status"] == "drained", answer
        tally.note(f"{pod.name} drained")
    pod.server.kill(signal.SIGTERM)
    await pod.server.wait_exit(timeout=30)
    tally.note(f"{pod.name} server exited")
    if pod.sidecar is not None:
        pod.sidecar.kill(signal.SIGTERM)
        await pod.sidecar.wait_exit(timeout=30)
        tally.note(f"{pod.name} sidecar exited")


def _text(result: mcp_types.CallToolResult) -> str:
    if result.is_error or len(result.content) != 1:
        return f"error result {result}"
    [content] = result.content
    return content.text if isinstance(content, mcp_types.TextContent) else repr(content)


async def python_client(
    name: str, mode: str, url: str, tally: Tally, rolling: asyncio.Event
) -> None:
    """Calls `count` back to back while the rollout runs; a new client after a failure."""
    while rolling.is_set():
        try:
            async with (
                httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=60.0)) as http,
                Client(streamable_http_client(url, http_client=http), mode=mode) as client,
            ):
                while rolling.is_set():
                    if not await _python_call(name, client, tally):
                        break
        except Exception as exc:  # the client broke on the way out: counted with its call
            if not rolling.is_set():
                break
            tally.fail(f"{name}: client: {exc!r}"[:300])


async def _python_call(name: str, client: Client, tally: Tally) -> bool:
    got: list[float] = []
    last = time.monotonic()
    stalls: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        nonlocal last
        now = time.monotonic()
        stalls.append(now - last)
        last = now
        got.append(progress)

    tally.calls += 1
    try:
        result = await asyncio.wait_for(
            client.call_tool(
                "count", {"n": TICKS, "interval_ms": TICK_MS}, progress_callback=on_progress
            ),
            CALL_TIMEOUT_S,
        )
    except Exception as exc:
        tally.fail(f"{name}: {exc!r}"[:300])
        return False
    text = _text(result)
    if text != f"counted {TICKS}" or got != [float(i) for i in range(1, TICKS + 1)]:
        tally.fail(f"{name}: answer {text!r}, progress {got}")
        return False
    for gap in [*stalls, time.monotonic() - last]:
        tally.stall(gap)
    return True


async def ts_client(name: str, url: str, tally: Tally, rolling: asyncio.Event, logs: Path) -> None:
    """The TypeScript SDK client (a node process), calling back to back likewise."""
    serial = 0
    while rolling.is_set():
        try:
            async with TsSdkClient.running(url, log_dir=logs) as ts:
                while rolling.is_set():
                    serial += 1
                    if not await _ts_call(f"{name}-{serial}", ts, tally):
                        break
        except TsClientError as exc:
            if not rolling.is_set():
                break
            tally.fail(f"{name}: client: {str(exc)[:200]}")


async def _ts_call(tag: str, ts: TsSdkClient, tally: Tally) -> bool:
    tally.calls += 1
    since = len(ts.events)
    ts.call(tag, "count", n=TICKS, interval_ms=TICK_MS)
    got: list[float] = []
    stalls: list[float] = []
    last = time.monotonic()
    while True:
        try:
            report = await ts.wait_for(
                lambda r: r.get("tag") == tag, timeout=CALL_TIMEOUT_S, what=tag, since=since
            )
        except TsClientError as exc:
            tally.fail(f"{tag}: {str(exc)[:200]}")
            return False
        since = next(i for i in range(since, len(ts.events)) if ts.events[i] is report) + 1
        now = time.monotonic()
        stalls.append(now - last)
        last = now
        if report["event"] == "progress":
            got.append(report["progress"])
        elif report["event"] == "result":
            if report["text"] != f"counted {TICKS}" or got != list(range(1, TICKS + 1)):
                tally.fail(f"{tag}: answer {report}, progress {got}")
                return False
            for gap in stalls:
                tally.stall(gap)
            return True
        else:
            recent = [r for r in ts.events[-12:] if r.get("tag") in (None, tag)]
            tally.fail(f"{tag}: {report} after {recent}")
            return False


async def rollout(procs: ProcessPool, logs: Path, control_plane: str | None) -> Tally:
    """Start the pods and the clients, roll every pod once, stop the clients; what they saw."""
    tally = Tally()
    pods = list(
        await asyncio.gather(
            *(start_pod(procs, f"{logs.name}-old{i}", control_plane) for i in range(PODS))
        )
    )
    rolling = asyncio.Event()
    rolling.set()
    async with (
        Balancer([p.port for p in pods]) as lb,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DRAIN_TIMEOUT_S + 30)) as http,
    ):
        url = f"{lb.url}/mcp"
        clients: list[Awaitable[None]] = [
            python_client(f"py{i}", "legacy" if i % 2 else "auto", url, tally, rolling)
            for i in range(PY_CLIENTS)
        ]
        for i in range(TS_CLIENTS):
            (logs / f"ts{i}").mkdir(parents=True, exist_ok=True)
        clients += [
            ts_client(f"ts{i}", url, tally, rolling, logs / f"ts{i}") for i in range(TS_CLIENTS)
        ]
        running = asyncio.gather(*clients)
        try:
            # Every client mid-call before the first pod goes (calls counted start at once).
            # Meanwhile the new pods start: each stays out of the balancer until its step, as
            # a ready pod the Service does not list yet, so the clients see the same rollout
            # without waiting for a pod's processes to boot at every step.
            _, new_pods = await asyncio.gather(
                eventually(
                    lambda: tally.calls >= PY_CLIENTS + TS_CLIENTS,
                    timeout=60,
                    what="every client calling",
                ),
                asyncio.gather(
                    *(start_pod(procs, f"{logs.name}-new{i}", control_plane) for i in range(PODS))
                ),
            )
            await asyncio.sleep(TICK_MS / 1000 * TICKS / 2)  # mid-call, not at a call's start
            for old, new in zip(list(pods), new_pods, strict=True):
                lb.add(new.port)
                tally.note(f"{new.name} in the balancer")
                pods.append(new)
                await terminate(old, lb, http, tally)
                pods.remove(old)
        finally:
            rolling.clear()
            await running
            tally.log += [
                f"{when - tally.started:6.2f} balancer: :{backend} closed a connection with "
                "a request unanswered"
                for backend, when in lb.unanswered
            ]
            tally.log.sort()
    return tally


async def test_rollout_fails_no_call_through_tether(tmp_path: Path) -> None:
    async with ProcessPool(tmp_path / "without") as procs:
        without = await rollout(procs, tmp_path / "without", None)
    async with (
        control_plane_on("sqlite", tmp_path) as cp,
        ProcessPool(tmp_path / "with") as procs,
    ):
        with_tether = await rollout(procs, tmp_path / "with", cp.address)
    clients = PY_CLIENTS + TS_CLIENTS
    print(
        "\n| rollout of "
        f"{PODS} pods, {clients} clients | calls | failed | longest stall |\n"
        "|---|---|---|---|\n"
        f"| without Tether | {without.calls} | {len(without.failures)} | "
        f"{without.longest_stall:.1f} s |\n"
        f"| with Tether | {with_tether.calls} | {len(with_tether.failures)} | "
        f"{with_tether.longest_stall:.1f} s |"
    )
    with contextlib.suppress(Exception):
        print("failures without Tether (first 5):", *without.failures[:5], sep="\n  ")
    assert with_tether.failures == [], "\n".join(with_tether.log)
    assert with_tether.calls >= clients * 2
