"""The benchmark harness: every path and figure of the performance issue, in one run.

Processes (each its own event loop, so none shares a core with the load it measures):
  harness    this process: the load client (`bench.client`) and the orchestration
  generator  `python -m bench.sse_generator` (the upstream)
  mcp server `python -m bench.mcp_server` (the `mcp` group's upstream: the official SDK)
  nginx      Debian's nginx, one process, `proxy_buffering off` (config in a temp dir)
  floor      `python -m bench.floor_relay` (the `mcp` group: aiohttp relaying, no MCP logic)
  control    `python -m tether.cli control-plane --store sqlite:///...`
  sidecar    `python -m tether.cli sidecar --control-plane ...` (reporting on)
  cp_server  `python -m bench.cp_server` for the control-plane figures (it prints counters)
  etcd       a real 1-member etcd via `tests.support.etcd.start_etcd`

Figure groups: `mcp` (the official SDK server and client: no-op calls, progress bursts, open
calls; bench/mcp_group.py), `paths` (throughput, latency), `idle`, `control-plane`, `resume`,
`stateless` (MCP 2026-07-28 requests without a session), `cp-flood`. What each measures exactly is
written next to its table (`NOTES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from mcp import Client

from bench import client, cp_flood, mcp_group
from bench.procs import (
    NGINX_MISSING,
    Child,
    cpu_seconds,
    find_nginx,
    free_port,
    nginx_config,
    python_module,
    raise_fd_limit,
    rss_mib,
    self_cpu_seconds,
)
from bench.stats import percentile
from sidecar.tracker import EventId
from tether.api.client import SessionClient
from tether.api.v1 import sessions_pb2 as pb
from tether.model import (
    OwnerName,
    ReportBatch,
    SessionId,
    SessionRecord,
    SessionUpsert,
    StreamId,
)

T = TypeVar("T")
DEFAULT_GROUPS = ("mcp", "paths", "idle", "control-plane", "resume", "stateless")
GROUPS = (*DEFAULT_GROUPS, "cp-flood")
"""`cp-flood` (bench/cp_flood.py) runs only when asked for: a million items per flood takes
minutes."""
RATE = 1000.0
LATENCY_SEGMENTS = 5
CP_STREAMS = 100
FLUSH_INTERVAL = 0.05
REPORT_METHOD = "/tether.v1.SessionService/ReportEvents"


@dataclass(frozen=True)
class Sizes:
    throughput_events: dict[int, int]
    rounds: int
    latency_events: int
    idle_streams: tuple[int, ...]
    cp_batches: int
    cp_updates_per_stream: int
    resumes: int
    flood_items: int
    stateless: tuple[int, int]
    """Stateless requests per kind and path: sequential (one client), then concurrent (all
    `STATELESS_CLIENTS` together)."""
    mcp: mcp_group.McpSizes


PRESETS = {
    "full": Sizes(
        {256: 500_000, 4096: 50_000},
        3,
        5_000,
        (1_000, 10_000),
        1_500,
        10,
        200,
        1_000_000,
        stateless=(800, 3_200),
        mcp=mcp_group.McpSizes(calls=400, notifications=4_000, open_calls=200),
    ),
    "quick": Sizes(
        {256: 50_000, 4096: 10_000},
        2,
        1_000,
        (200, 1_000),
        150,
        10,
        20,
        100_000,
        stateless=(300, 1_200),
        mcp=mcp_group.McpSizes(calls=200, notifications=2_000, open_calls=200),
    ),
    "smoke": Sizes(
        {256: 200, 4096: 200},
        1,
        100,
        (20,),
        1,
        1,
        3,
        2_000,
        stateless=(10, 16),
        mcp=mcp_group.McpSizes(calls=8, notifications=40, open_calls=10),
    ),
}


@dataclass
class Env:
    """The processes of one run; everything is stopped by `close`."""

    tmp: Path
    nginx_binary: str | None
    children: list[Child] = field(default_factory=list)
    gen_port: int = 0
    cp_port: int = 0

    def start(self, name: str, argv: list[str], port: int | None, **kw: Any) -> Child:
        child = Child(name, argv, self.tmp / f"{name}.log")
        child.start(**kw)
        self.children.append(child)
        if port is not None:
            child.wait_port(port)
        return child

    def start_generator(self) -> Child:
        self.gen_port = free_port()
        return self.start(
            "generator",
            python_module("bench.sse_generator", "--port", self.gen_port),
            self.gen_port,
        )

    def start_control_plane(self) -> Child:
        self.cp_port = free_port()
        argv = python_module(
            "tether.cli",
            "--log-level",
            "WARNING",
            "control-plane",
            "--listen",
            f"127.0.0.1:{self.cp_port}",
            "--store",
            f"sqlite:///{self.tmp}/sessions.db",
        )
        return self.start("control-plane", argv, self.cp_port)

    def start_sidecar(
        self, name: str, port: int, event_loop: str = "asyncio", upstream: int | None = None
    ) -> Child:
        argv = python_module(
            "tether.cli",
            "--log-level",
            "WARNING",
            "sidecar",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"http://127.0.0.1:{upstream or self.gen_port}",
            "--control-plane",
            f"127.0.0.1:{self.cp_port}",
            "--owner",
            name,
            "--event-loop",
            event_loop,
        )
        return self.start(name, argv, port)

    def start_nginx(
        self,
        port: int,
        connections: int,
        buffer_size: str | None = None,
        upstream_keepalive: int = 0,
        upstream: int | None = None,
    ) -> Child:
        assert self.nginx_binary is not None
        conf_dir = self.tmp / f"nginx-{port}"
        conf = nginx_config(
            conf_dir,
            listen=port,
            upstream=upstream or self.gen_port,
            connections=connections,
            buffer_size=buffer_size,
            upstream_keepalive=upstream_keepalive,
        )
        return self.start(
            f"nginx-{port}", [self.nginx_binary, "-p", str(conf_dir), "-c", str(conf)], port
        )

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()


# --- figure group: paths (throughput, latency) ----------------------------------------------


SIDECAR_UVLOOP = "sidecar (uvloop)"
NGINX_TUNED = "nginx (proxy_buffer_size 64k)"


@dataclass
class Path_:
    name: str
    port: int
    proxy: Child | None


@dataclass(frozen=True)
class Throughput:
    path: str
    size: int
    events_per_s: float
    mb_per_s: float
    seconds: float
    cpu: dict[str, float]
    """CPU seconds of each process during the best round."""


@dataclass(frozen=True)
class Latency:
    path: str
    p50_us: float
    p99_us: float
    max_us: float
    samples: int


def cpu_snapshot(env: Env, procs: dict[str, Child]) -> dict[str, float]:
    snap = {name: cpu_seconds(c.pid) for name, c in procs.items()}
    snap["client"] = self_cpu_seconds()
    return snap


async def measure_paths(
    env: Env, sizes: Sizes, paths: list[Path_], log: Callable[[str], None]
) -> tuple[list[Throughput], list[Latency]]:
    gen = next(c for c in env.children if c.name == "generator")
    cp = next(c for c in env.children if c.name == "control-plane")
    results: list[Throughput] = []
    # One MCP session per path, made through it before anything is measured.
    session = {p.name: await client.initialize(p.port) for p in paths}
    gen_session = await client.initialize(env.gen_port)
    for size, n in sizes.throughput_events.items():
        # Warm-up: the generator encodes and caches this body; each proxy serves one stream.
        await client.read_post_stream(env.gen_port, n=n, size=size, session_id=gen_session)
        for p in paths:
            await client.read_post_stream(p.port, n=200, size=size, session_id=session[p.name])
        best: dict[str, Throughput] = {}
        for _ in range(sizes.rounds):
            for p in paths:
                procs = {"generator": gen}
                if p.proxy is not None:
                    procs[p.name] = p.proxy
                if p.name.startswith("sidecar"):
                    procs["control plane"] = cp
                before = cpu_snapshot(env, procs)
                got = await client.read_post_stream(
                    p.port, n=n, size=size, session_id=session[p.name]
                )
                after = cpu_snapshot(env, procs)
                cpu = {k: after[k] - before[k] for k in after}
                rate = got.events / got.seconds
                if p.name not in best or rate > best[p.name].events_per_s:
                    mbs = got.body_bytes / got.seconds / 1e6
                    best[p.name] = Throughput(p.name, size, rate, mbs, got.seconds, cpu)
        for p in paths:
            t = best[p.name]
            log(f"throughput {size} B {p.name}: {t.events_per_s:,.0f} events/s")
            results.append(t)
    # Segments interleaved across the paths, so that a disturbance from outside (another
    # process on this small machine) lands on every path alike rather than on one.
    segments = LATENCY_SEGMENTS if sizes.latency_events >= 1000 else 1
    samples: dict[str, list[float]] = {p.name: [] for p in paths}
    for _ in range(segments):
        for p in paths:
            n = sizes.latency_events // segments
            got = await client.read_post_stream(
                p.port,
                n=n,
                size=256,
                rate=RATE,
                session_id=session[p.name],
                timeout=n / RATE * 3 + 30,
            )
            samples[p.name] += [v / 1000 for v in got.latencies_ns]
    latencies: list[Latency] = []
    for p in paths:
        us = samples[p.name]
        lat = Latency(p.name, percentile(us, 50), percentile(us, 99), max(us), len(us))
        log(f"latency {p.name}: p50 {lat.p50_us:.0f} us, p99 {lat.p99_us:.0f} us")
        latencies.append(lat)
    return results, latencies


async def profile_sidecar(
    *,
    sidecar: Child,
    load: Callable[[], Awaitable[object]],
    out: Path,
    log: Callable[[str], None],
) -> list[tuple[str, float]]:
    """py-spy the sidecar while `load` runs again and again for 8 s; top functions by own
    time."""
    spy = shutil.which("py-spy")
    if spy is None:
        log("profile skipped: py-spy not installed (pip install py-spy)")
        return []
    raw = out.with_suffix(".txt")
    # --gil: only the thread holding the GIL, i.e. where the sidecar's Python time goes.
    proc = await asyncio.create_subprocess_exec(
        *(spy, "record", "--pid", str(sidecar.pid), "--gil", "--format", "raw", "-o", str(raw)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await asyncio.sleep(1.0)
    start = time.monotonic()
    while time.monotonic() - start < 8.0:
        await load()
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        await proc.wait()
    own: dict[str, float] = {}
    total = 0.0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        # "function (file:line)" -> "function (file)": own time per function, not per line.
        leaf = stack.rsplit(";", 1)[-1]
        func, _, where = leaf.partition(" (")
        leaf = f"{func} ({where.rsplit(':', 1)[0]})" if where else func
        own[leaf] = own.get(leaf, 0.0) + int(count)
        total += int(count)
    return sorted(((k, v / total * 100) for k, v in own.items()), key=lambda kv: -kv[1])[:10]


# --- figure group: idle streams -------------------------------------------------------------


@dataclass(frozen=True)
class Idle:
    path: str
    streams: int
    requested: int
    rss_before_mib: float
    rss_open_mib: float
    rss_after_mib: float
    open_seconds: float
    delivered: int


async def idle_streams(
    env: Env, proxy: Child, *, port: int, path: str, count: int, requested: int
) -> Idle:
    before = rss_mib(proxy.pid)
    start = time.perf_counter()
    readers = await client.open_idle_streams(port, count)
    try:
        opened = time.perf_counter() - start
        await asyncio.sleep(0.5)  # let the proxy settle (reports sent, buffers allocated)
        rss_open = rss_mib(proxy.pid)
        released = await client.release_idle(env.gen_port)
        delivered = await client.wait_each_delivers(readers, 1, timeout=30 + count / 500)
        rss_after = rss_mib(proxy.pid)
    finally:
        for r in readers:
            r.close()
    if released < count or delivered != count:
        raise client.IncompleteStreamError(
            f"{path}: {count} idle streams, generator released {released}, "
            f"{delivered} delivered their event"
        )
    return Idle(path, count, requested, before, rss_open, rss_after, opened, delivered)


async def measure_idle(
    env: Env, sizes: Sizes, fd_limit: int, with_nginx: bool, log: Callable[[str], None]
) -> list[Idle]:
    results: list[Idle] = []
    # The sidecar holds two sockets per stream (client and upstream), within one process.
    cap = (fd_limit - 256) // 2
    for requested in sizes.idle_streams:
        count = min(requested, cap)
        if count < requested:
            log(f"idle: {requested} streams need {2 * requested}+ fds; limit {fd_limit}: {count}")
        port = free_port()
        side = env.start_sidecar(f"sidecar-idle-{requested}", port)
        try:
            res = await idle_streams(
                env, side, port=port, path="sidecar", count=count, requested=requested
            )
        finally:
            side.stop()
        log(f"idle {count} via sidecar: {res.rss_open_mib - res.rss_before_mib:.0f} MiB added")
        results.append(res)
        if with_nginx:
            port = free_port()
            # Headroom: nginx starts closing "reusable" connections when under 1/16 are free.
            ngx = env.start_nginx(port, connections=requested * 4 + 128)
            try:
                res = await idle_streams(
                    env, ngx, port=port, path="nginx", count=count, requested=requested
                )
            finally:
                ngx.stop()
            results.append(res)
    return results


# --- figure group: control plane -------------------------------------------------------------


@dataclass(frozen=True)
class ControlPlaneFigures:
    store: str
    updates: int
    seconds: float
    writes_received: int
    writes_flushed: int
    flushes: int
    cp_cpu: float
    client_cpu: float

    @property
    def updates_per_s(self) -> float:
        return self.updates / self.seconds

    @property
    def writes_per_s(self) -> float:
        return self.writes_flushed / self.seconds

    @property
    def writes_per_stream_per_flush(self) -> float:
        return self.writes_flushed / max(1, self.flushes) / CP_STREAMS


def report_batches(sizes: Sizes) -> list[bytes]:
    """Pre-serialized ReportEvents requests: each carries `per_stream` increasing positions
    of each of the 100 streams (built before the clock starts, so the client stays cheap)."""
    out = []
    k = sizes.cp_updates_per_stream
    for b in range(1, sizes.cp_batches + 1):
        updates = [
            pb.StreamUpdate(
                session_id=f"bench-cp-{i}",
                position=pb.StreamPosition(
                    stream_id="a",
                    last_event_id=f"a.1.{seq}",
                    upstream_event_id=str(seq),
                    seq=seq,
                    owner_epoch=1,
                ),
            )
            for seq in range((b - 1) * k + 1, b * k + 1)
            for i in range(CP_STREAMS)
        ]
        out.append(pb.ReportEventsRequest(batch_id=b, updates=updates).SerializeToString())
    return out


async def read_json_line(child: Child) -> dict[str, Any]:
    assert child.process.stdout is not None
    line = await asyncio.to_thread(child.process.stdout.readline)
    if not line:
        raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
    value: dict[str, Any] = json.loads(line)
    return value


async def measure_control_plane(
    env: Env, store: str, label: str, batches: list[bytes], sizes: Sizes
) -> ControlPlaneFigures:
    cp = env.start(
        f"cp-{label}",
        python_module("bench.cp_server", "--store", store, "--flush-interval", FLUSH_INTERVAL),
        None,
        stdout_pipe=True,
    )
    try:
        assert cp.process.stdout is not None
        ready = (await asyncio.to_thread(cp.process.stdout.readline)).decode().split()
        if not ready or ready[0] != "ready":
            raise RuntimeError(f"{cp.name} did not start:\n{cp.log_tail()}")
        address = f"127.0.0.1:{ready[1]}"
        async with grpc.aio.insecure_channel(address) as channel:
            typed = SessionClient(channel)
            setup = typed.report_events()
            upserts = tuple(
                SessionUpsert(
                    SessionRecord(
                        session_id=SessionId(f"bench-cp-{i}"),
                        upstream_session_id=f"bench-cp-{i}",
                        upstream_address="http://bench",
                        owner=OwnerName("bench"),
                        owner_epoch=1,
                    )
                )
                for i in range(CP_STREAMS)
            )
            await setup.send(ReportBatch(batch_id=0, upserts=upserts))
            ack = await anext(aiter(setup.acks()))
            if ack.rejections:
                raise RuntimeError(f"control plane refused the sessions: {ack.rejections[:3]}")
            await setup.done_writing()
            # The load: pre-serialized requests on a raw stream (identity serializer).
            report: Any = channel.stream_stream(
                REPORT_METHOD,
                request_serializer=lambda b: b,
                response_deserializer=pb.ReportEventsResponse.FromString,
            )
            call = report()
            cp.process.send_signal(signal.SIGUSR1)
            before = await read_json_line(cp)
            client_before = self_cpu_seconds()
            acked = 0
            window = asyncio.Semaphore(64)

            async def read_acks() -> None:
                nonlocal acked
                while acked < len(batches):
                    msg = await call.read()
                    if msg is grpc.aio.EOF:  # type: ignore[attr-defined]
                        raise RuntimeError("ReportEvents ended early")
                    if msg.rejections:
                        raise RuntimeError(f"updates rejected: {list(msg.rejections)[:3]}")
                    acked += 1
                    window.release()

            start = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                group.create_task(read_acks(), name="cp-acks")
                for raw in batches:
                    await window.acquire()
                    await call.write(raw)
            seconds = time.perf_counter() - start
            client_cpu = self_cpu_seconds() - client_before
            await call.done_writing()
            await asyncio.sleep(FLUSH_INTERVAL * 2)  # acked means flushed; this is margin
            cp.process.send_signal(signal.SIGUSR1)
            after = await read_json_line(cp)
            last = len(batches) * sizes.cp_updates_per_stream
            record = await typed.get_session(SessionId("bench-cp-7"), timeout=10)
            got = record.streams.get(StreamId("a")) if record is not None else None
            if got is None or got.seq != last:
                raise RuntimeError(f"stored position {got} is not the last one sent ({last})")
    finally:
        cp.stop()
    return ControlPlaneFigures(
        store=label,
        updates=len(batches) * sizes.cp_updates_per_stream * CP_STREAMS,
        seconds=seconds,
        writes_received=after["writes_received"] - before["writes_received"],
        writes_flushed=after["writes_flushed"] - before["writes_flushed"],
        flushes=after["flushes"] - before["flushes"],
        cp_cpu=after["cpu_seconds"] - before["cpu_seconds"],
        client_cpu=client_cpu,
    )


# --- figure group: resume ---------------------------------------------------------------------


async def measure_resume(env: Env, sizes: Sizes, log: Callable[[str], None]) -> list[float]:
    """Streams opened via sidecar A, A SIGKILLed, each resumed via a fresh sidecar B."""
    port_a, port_b = free_port(), free_port()
    a = env.start_sidecar("sidecar-a", port_a)
    last_seen: list[str] = []
    sessions = [await client.initialize(port_a) for _ in range(sizes.resumes)]
    for i in range(sizes.resumes):
        req = client.Request(
            port_a, "GET", "/mcp?burst=5", client.mcp_headers(sessions[i], sse_get=True)
        )
        reader = await client.open_reader(req, keep_ids=True)
        async with asyncio.timeout(10):
            while len(reader.ids) < 5:
                reader.event_seen.clear()
                await reader.event_seen.wait()
        reader.close()
        last_seen.append(reader.ids[2])  # the client saw 1..3; 4 and 5 are its to replay
    # Wait until the control plane holds every stream's position (A reports every 50 ms).
    async with grpc.aio.insecure_channel(f"127.0.0.1:{env.cp_port}") as channel:
        typed = SessionClient(channel)
        deadline = time.monotonic() + 20
        for i in range(sizes.resumes):
            while True:
                rec = await typed.get_session(SessionId(sessions[i]), timeout=5)
                if rec is not None and any(p.seq >= 5 for p in rec.streams.values()):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"resume {i}: position never reached the control plane")
                await asyncio.sleep(0.05)
    a.stop(signal.SIGKILL)
    b = env.start_sidecar("sidecar-b", port_b)
    samples: list[float] = []
    for i, last in enumerate(last_seen):
        headers = client.mcp_headers(sessions[i], sse_get=True)
        headers["Last-Event-ID"] = last
        start = time.perf_counter()
        reader = await client.open_reader(
            client.Request(port_b, "GET", "/mcp", headers), keep_ids=True
        )
        try:
            async with asyncio.timeout(10):
                while not reader.events and not reader.done.done():
                    reader.event_seen.clear()
                    await reader.event_seen.wait()
                # Then check what came: the first replayed event is upstream event 4.
                while not reader.ids and not reader.done.done():
                    reader.event_seen.clear()
                    await reader.event_seen.wait()
        finally:
            reader.close()
        first = EventId.parse(reader.ids[0]) if reader.ids else None
        if reader.status != 200 or first is None or first.upstream != "4":
            raise client.IncompleteStreamError(
                f"resume-{i}: status {reader.status}, first id {reader.ids[:1]}"
            )
        samples.append((reader.first_event_at - start) * 1000)
    b.stop()
    log(f"resume: p50 {percentile(samples, 50):.1f} ms, p99 {percentile(samples, 99):.1f} ms")
    return samples


# --- figure group: stateless (MCP 2026-07-28) ------------------------------------------------


STATELESS_CLIENTS = 8
STATELESS_PROGRESS = 10
STATELESS_KINDS = (
    # tools/list may be sent again if the upstream fails before answering; a call of a tool
    # the sidecar knows nothing about may not. Both, so the table shows what that costs.
    client.StatelessKind("tools/list"),
    client.StatelessKind("tools/call"),
    client.StatelessKind("tools/list", STATELESS_PROGRESS),
    client.StatelessKind("tools/call", STATELESS_PROGRESS),
)
NGINX_KEEPALIVE = 32
"""Idle upstream connections the stateless group's nginx keeps, as the sidecar's pool does."""


@dataclass(frozen=True)
class StatelessFigures:
    request: str
    answer: str
    path: str
    seq_p50_us: float
    seq_p99_us: float
    conc_p50_us: float
    conc_p99_us: float
    requests_per_s: float
    """Concurrent phase: requests answered / its wall time."""
    proxy_cpu_us: float | None
    """Proxy CPU (utime + stime from /proc) over both phases / requests; None for direct."""
    generator_cpu_us: float
    client_cpu_us: float
    """The harness's own CPU (the load client) per request: with the generator, what the two
    CPUs of a small machine spend besides the proxy, which caps every path's requests/s."""
    requests: int


async def measure_stateless(
    env: Env, sizes: Sizes, paths: list[Path_], log: Callable[[str], None]
) -> list[StatelessFigures]:
    """Every kind through every path: one client sending requests one after the other, then
    `STATELESS_CLIENTS` at once, each on its own kept-alive connection. Segments alternate
    across the paths (as the latency figure does), so a disturbance lands on all alike."""
    gen = next(c for c in env.children if c.name == "generator")
    seq_n, conc_n = sizes.stateless
    segments = min(4, max(1, seq_n // 150))
    seq_per = seq_n // segments
    conc_per = max(1, conc_n // segments // STATELESS_CLIENTS)
    results: list[StatelessFigures] = []
    for kind in STATELESS_KINDS:
        for p in paths:  # warm-up: connections pooled, code paths taken
            await client.stateless_load(
                p.port, kind, clients=STATELESS_CLIENTS, per_client=min(20, seq_per)
            )
        seq: dict[str, list[float]] = {p.name: [] for p in paths}
        conc: dict[str, list[float]] = {p.name: [] for p in paths}
        wall = dict.fromkeys(seq, 0.0)
        cpu = {p.name: dict.fromkeys(("proxy", "generator", "client"), 0.0) for p in paths}
        for _ in range(segments):
            for p in paths:
                procs = {"generator": gen} | ({"proxy": p.proxy} if p.proxy else {})
                before = cpu_snapshot(env, procs)
                one = await client.stateless_load(p.port, kind, clients=1, per_client=seq_per)
                many = await client.stateless_load(
                    p.port, kind, clients=STATELESS_CLIENTS, per_client=conc_per
                )
                after = cpu_snapshot(env, procs)
                for k in after:
                    cpu[p.name][k] += after[k] - before[k]
                seq[p.name] += [v * 1e6 for v in one.latencies_s]
                conc[p.name] += [v * 1e6 for v in many.latencies_s]
                wall[p.name] += many.seconds
        for p in paths:
            count = len(seq[p.name]) + len(conc[p.name])
            fig = StatelessFigures(
                request=kind.request,
                answer=kind.answer,
                path=p.name,
                seq_p50_us=percentile(seq[p.name], 50),
                seq_p99_us=percentile(seq[p.name], 99),
                conc_p50_us=percentile(conc[p.name], 50),
                conc_p99_us=percentile(conc[p.name], 99),
                requests_per_s=len(conc[p.name]) / wall[p.name],
                proxy_cpu_us=cpu[p.name]["proxy"] / count * 1e6 if p.proxy is not None else None,
                generator_cpu_us=cpu[p.name]["generator"] / count * 1e6,
                client_cpu_us=cpu[p.name]["client"] / count * 1e6,
                requests=count,
            )
            log(
                f"stateless {kind.request} {kind.answer} {p.name}: p50 {fig.seq_p50_us:.0f} us, "
                f"{fig.requests_per_s:,.0f} req/s"
            )
            results.append(fig)
    return results


# --- report -----------------------------------------------------------------------------------


def ratio(value: float, ref: float | None) -> str:
    return f"{value / ref:.2f}x" if ref else "-"


@dataclass
class Results:
    throughput: list[Throughput] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    idle: list[Idle] = field(default_factory=list)
    control_plane: list[ControlPlaneFigures] = field(default_factory=list)
    resume_ms: list[float] = field(default_factory=list)
    floods: list[cp_flood.FloodFigures] = field(default_factory=list)
    stateless: list[StatelessFigures] = field(default_factory=list)
    profile: list[tuple[str, float]] = field(default_factory=list)
    stateless_profile: list[tuple[str, float]] = field(default_factory=list)
    mcp: list[mcp_group.McpFigures] = field(default_factory=list)
    mcp_profiles: list[tuple[str, list[tuple[str, float]]]] = field(default_factory=list)
    """(the load, its top functions) per sidecar profile of the `mcp` group."""
    notes: list[str] = field(default_factory=list)


def tables(res: Results) -> Iterator[str]:
    for section in (
        _mcp_table,
        _throughput_table,
        _latency_table,
        _idle_table,
        _control_plane_table,
        _resume_table,
        _stateless_table,
        _flood_table,
        targets,
        _profile_table,
    ):
        yield from section(res)


def _mcp_table(res: Results) -> Iterator[str]:
    yield from mcp_group.table(res.mcp)


def _throughput_table(res: Results) -> Iterator[str]:
    if not res.throughput:
        return
    yield "### Throughput, one stream (best of the rounds)"
    yield ""
    yield (
        "| event | path | events/s | MB/s | x direct | x nginx "
        "| CPU s: generator / proxy / control plane / client (wall s) |"
    )
    yield "|---:|---|---:|---:|---:|---:|---|"
    for size in sorted({t.size for t in res.throughput}):
        row = {t.path: t for t in res.throughput if t.size == size}
        d = row["direct"].events_per_s
        n = row["nginx"].events_per_s if "nginx" in row else None
        for t in row.values():
            cpu = " / ".join(
                f"{t.cpu[k]:.2f}" if k in t.cpu else "-"
                for k in ("generator", t.path, "control plane", "client")
            )
            yield (
                f"| {size} B | {t.path} | {t.events_per_s:,.0f} | {t.mb_per_s:,.0f} "
                f"| {ratio(t.events_per_s, d)} | {ratio(t.events_per_s, n)} "
                f"| {cpu} ({t.seconds:.2f}) |"
            )
    yield ""


def _latency_table(res: Results) -> Iterator[str]:
    if not res.latency:
        return
    yield f"### Latency at {RATE:,.0f} events/s (256 B events, receive - stamp)"
    yield ""
    yield (
        "| path | p50 µs | p99 µs | max µs | added p50 µs | added p99 µs "
        "| p99 x direct | p99 x nginx |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|---:|"
    by = {lat.path: lat for lat in res.latency}
    base = by["direct"]
    ng = by.get("nginx")
    for lat in res.latency:
        yield (
            f"| {lat.path} | {lat.p50_us:,.0f} | {lat.p99_us:,.0f} | {lat.max_us:,.0f} "
            f"| {lat.p50_us - base.p50_us:,.0f} | {lat.p99_us - base.p99_us:,.0f} "
            f"| {ratio(lat.p99_us, base.p99_us)} "
            f"| {ratio(lat.p99_us, ng.p99_us if ng else None)} |"
        )
    yield ""


def _idle_table(res: Results) -> Iterator[str]:
    if not res.idle:
        return
    yield "### Concurrent idle SSE streams through one proxy"
    yield ""
    yield (
        "| streams (asked) | path | RSS before MiB | RSS open MiB | added KiB/stream "
        "| RSS after delivery MiB | RSS x nginx | open s | delivered |"
    )
    yield "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    for idle in res.idle:
        peer = next(
            (y for y in res.idle if y.path == "nginx" and y.requested == idle.requested),
            None,
        )
        per = (idle.rss_open_mib - idle.rss_before_mib) * 1024 / idle.streams
        yield (
            f"| {idle.streams:,} ({idle.requested:,}) | {idle.path} "
            f"| {idle.rss_before_mib:.1f} | {idle.rss_open_mib:.1f} | {per:.1f} "
            f"| {idle.rss_after_mib:.1f} "
            f"| {ratio(idle.rss_open_mib, peer.rss_open_mib if peer else None)} "
            f"| {idle.open_seconds:.2f} | {idle.delivered:,}/{idle.streams:,} |"
        )
    yield ""


def _control_plane_table(res: Results) -> Iterator[str]:
    if not res.control_plane:
        return
    yield f"### Control plane: {CP_STREAMS} streams on one ReportEvents call"
    yield ""
    yield (
        "| store | updates | updates/s absorbed | store writes/s | flushes/s "
        "| coalescing (updates per write) | writes per stream per flush "
        "| CPU s control plane / client (wall s) |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|---|"
    for c in res.control_plane:
        yield (
            f"| {c.store} | {c.updates:,} | {c.updates_per_s:,.0f} | {c.writes_per_s:,.0f} "
            f"| {c.flushes / c.seconds:,.1f} "
            f"| {c.writes_received / max(1, c.writes_flushed):,.1f} "
            f"| {c.writes_per_stream_per_flush:.2f} "
            f"| {c.cp_cpu:.2f} / {c.client_cpu:.2f} ({c.seconds:.2f}) |"
        )
    yield ""


def _resume_table(res: Results) -> Iterator[str]:
    if not res.resume_ms:
        return
    s = res.resume_ms
    yield "### Resume through a new sidecar (reconnect with Last-Event-ID → first event)"
    yield ""
    yield "| resumes | p50 ms | p99 ms | max ms | mean ms | first (cold) ms |"
    yield "|---:|---:|---:|---:|---:|---:|"
    yield (
        f"| {len(s)} | {percentile(s, 50):.1f} | {percentile(s, 99):.1f} | {max(s):.1f} "
        f"| {statistics.fmean(s):.1f} | {s[0]:.1f} |"
    )
    yield ""


def _stateless_table(res: Results) -> Iterator[str]:
    if not res.stateless:
        return
    yield (
        "### Stateless requests (MCP 2026-07-28, no session; "
        f"1 client, then {STATELESS_CLIENTS} clients, kept-alive connections)"
    )
    yield ""
    yield (
        "| request | answer | path | p50 µs | p99 µs | added p50 µs "
        f"| p50 µs ({STATELESS_CLIENTS} clients) | p99 µs ({STATELESS_CLIENTS} clients) "
        f"| added p50 µs ({STATELESS_CLIENTS} clients) | requests/s ({STATELESS_CLIENTS} clients) "
        "| CPU µs/request: proxy / generator / client | requests |"
    )
    yield "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"
    direct = {(f.request, f.answer): f for f in res.stateless if f.path == "direct"}
    for f in res.stateless:
        base = direct.get((f.request, f.answer))
        added_seq = f"{f.seq_p50_us - base.seq_p50_us:,.0f}" if base else "-"
        added_conc = f"{f.conc_p50_us - base.conc_p50_us:,.0f}" if base else "-"
        proxy = f"{f.proxy_cpu_us:,.0f}" if f.proxy_cpu_us is not None else "-"
        cpu = f"{proxy} / {f.generator_cpu_us:,.0f} / {f.client_cpu_us:,.0f}"
        yield (
            f"| {f.request} | {f.answer} | {f.path} | {f.seq_p50_us:,.0f} | {f.seq_p99_us:,.0f} "
            f"| {added_seq} | {f.conc_p50_us:,.0f} | {f.conc_p99_us:,.0f} | {added_conc} "
            f"| {f.requests_per_s:,.0f} | {cpu} | {f.requests:,} |"
        )
    yield ""


def _flood_table(res: Results) -> Iterator[str]:
    yield from cp_flood.table(res.floods)


def _profile_table(res: Results) -> Iterator[str]:
    for title, profile in (
        *res.mcp_profiles,
        ("the 256 B load", res.profile),
        (f"stateless tools/call noop (JSON), {STATELESS_CLIENTS} clients", res.stateless_profile),
    ):
        if not profile:
            continue
        yield f"### Sidecar profile under {title} (py-spy, top 10 by own time)"
        yield ""
        yield "| own % of GIL-held samples | function (file) |"
        yield "|---:|---|"
        for name, share in profile:
            yield f"| {share:.1f} | `{name}` |"
        yield ""


def targets(res: Results) -> Iterator[str]:
    rows: list[tuple[str, str, bool | None]] = []
    tp = {(t.path, t.size): t.events_per_s for t in res.throughput}
    for size in sorted({t.size for t in res.throughput}):
        if ("nginx", size) in tp:
            r = tp[("sidecar", size)] / tp[("nginx", size)]
            rows.append((f"throughput {size} B ≥ 0.5x nginx", f"{r:.2f}x", r >= 0.5))
    lat = {x.path: x for x in res.latency}
    if "sidecar" in lat:
        added = lat["sidecar"].p99_us - lat["direct"].p99_us
        rows.append(("added p99 latency ≤ 1 ms", f"{added / 1000:.2f} ms", added <= 1000))
    for x in res.idle:
        if x.path == "sidecar" and x.requested >= 10_000:
            # Fewer streams than asked only when the fd hard limit forbids more: extrapolate
            # linearly from the measured per-stream cost, and say so.
            full = x.rss_before_mib + (x.rss_open_mib - x.rss_before_mib) * x.requested / x.streams
            value = f"{x.rss_open_mib:.0f} MiB"
            if x.streams < x.requested:
                value += f" at {x.streams:,} (fd limit); ≈{full:.0f} MiB at {x.requested:,}"
            rows.append((f"{x.requested:,} idle streams < 500 MiB", value, full < 500))
    rows += _idle_ratio_rows(res.idle)
    for c in res.control_plane:
        rows.append(
            (
                f"control plane ({c.store}) ≥ 100,000 updates/s",
                f"{c.updates_per_s:,.0f}/s",
                c.updates_per_s >= 100_000,
            )
        )
        rows.append(
            (
                f"≤ 1 store write per stream per flush ({c.store})",
                f"{c.writes_per_stream_per_flush:.2f}",
                c.writes_per_stream_per_flush <= 1.0,
            )
        )
    for f in res.floods:
        rows.append(
            (
                f"control plane peak RSS ≤ {cp_flood.MANIFEST_LIMIT_MIB} MiB "
                f"({f.store}, {f.flood} flood)",
                f"{f.peak_rss_mib:.0f} MiB",
                f.peak_rss_mib <= cp_flood.MANIFEST_LIMIT_MIB,
            )
        )
    if res.resume_ms:
        p99 = percentile(res.resume_ms, 99)
        rows.append(("resume p99 ≤ 50 ms", f"{p99:.1f} ms", p99 <= 50))
    if not rows:
        return
    yield "### Targets"
    yield ""
    yield "| target | measured | met |"
    yield "|---|---:|:---:|"
    for name, value, ok in rows:
        yield f"| {name} | {value} | {'yes' if ok else '**no**'} |"
    yield ""


def _idle_ratio_rows(idle: Sequence[Idle]) -> list[tuple[str, str, bool | None]]:
    """Issue 16: idle streams ≤ 2x nginx's KiB per stream, at each count both measured."""

    def kib(x: Idle) -> float:
        return (x.rss_open_mib - x.rss_before_mib) * 1024 / x.streams

    ngx = {x.requested: x for x in idle if x.path == "nginx"}
    rows: list[tuple[str, str, bool | None]] = []
    for x in idle:
        ref = ngx.get(x.requested)
        if x.path == "sidecar" and ref is not None and kib(ref) > 0:
            r = kib(x) / kib(ref)
            rows.append(
                (
                    f"{x.streams:,} idle streams ≤ 2x nginx's KiB per stream",
                    f"{kib(x):.1f} KiB ({r:.2f}x)",
                    r <= 2,
                )
            )
    return rows


def plot(res: Results, path: Path) -> str:
    """Throughput and latency per path as a PNG; returns a note if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = sorted({t.size for t in res.throughput})
    paths = [t.path for t in res.throughput if t.size == sizes[0]] if sizes else []
    width = 0.8 / max(1, len(paths))
    ax = axes[0]
    for j, name in enumerate(paths):
        values = [
            next(t.events_per_s for t in res.throughput if t.path == name and t.size == s)
            for s in sizes
        ]
        bars = ax.bar([i + j * width for i in range(len(sizes))], values, width, label=name)
        ax.bar_label(bars, labels=[f"{v / 1000:,.0f}k" for v in values], fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks([i + width * (len(paths) - 1) / 2 for i in range(len(sizes))])
    ax.set_xticklabels([f"{s} B events" for s in sizes])
    ax.set_ylabel("events/s, one stream (log)")
    ax.set_title("Throughput")
    ax.legend()
    ax = axes[1]
    names = [x.path for x in res.latency]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [x.p50_us for x in res.latency], 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [x.p99_us for x in res.latency], 0.4, label="p99")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylabel("µs, receive - stamp")
    ax.set_title(f"Latency at {RATE:,.0f} events/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"


# --- main ---------------------------------------------------------------------------------


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    import os

    ngx = find_nginx()
    ngx_version = "absent"
    if ngx:
        out = subprocess.run([ngx, "-v"], capture_output=True, text=True, check=False)
        ngx_version = out.stderr.strip().removeprefix("nginx version: ")
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {mem} RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, nginx {ngx_version}"
    )


@dataclass(frozen=True)
class Options:
    preset: str
    groups: tuple[str, ...]
    nginx: bool
    etcd: bool
    plot_path: Path | None
    json_path: Path | None
    profile: bool
    compare_loops: bool = False
    tuned_nginx: bool = False


async def run(opts: Options, log: Callable[[str], None]) -> Results:
    sizes = PRESETS[opts.preset]
    fd_limit = raise_fd_limit()
    nginx_binary = find_nginx() if opts.nginx else None
    if opts.nginx and nginx_binary is None:
        raise SystemExit(NGINX_MISSING)
    res = Results()
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        env = Env(Path(tmp), nginx_binary)
        try:
            await step(env, log, "start", _start_common(env))
            log("generator and control plane started")
            if "mcp" in opts.groups:
                res.mcp = await step(env, log, "mcp", _mcp(env, sizes, opts, res, log))
            if "paths" in opts.groups:
                await step(env, log, "paths", _paths(env, sizes, opts, res, log))
            if "idle" in opts.groups:
                res.idle = await step(
                    env, log, "idle", measure_idle(env, sizes, fd_limit, opts.nginx, log)
                )
            if "control-plane" in opts.groups:
                await step(env, log, "control-plane", _control_plane(env, sizes, opts, res, log))
            if "resume" in opts.groups:
                res.resume_ms = await step(env, log, "resume", measure_resume(env, sizes, log))
            if "stateless" in opts.groups:
                res.stateless = await step(
                    env, log, "stateless", _stateless(env, sizes, opts, res, log)
                )
            if "cp-flood" in opts.groups:
                res.floods = await step(env, log, "cp-flood", _floods(env, sizes, opts, res, log))
        finally:
            env.close()
    return res


async def step(env: Env, log: Callable[[str], None], name: str, work: Awaitable[T]) -> T:
    """Run one group; on failure, show the tail of every child's log."""
    try:
        return await work
    except BaseException:
        for c in env.children:
            tail = c.log_tail(1500).strip()
            if tail:
                log(f"--- {c.name} log ({c.log_path}) ---\n{tail}")
        raise


async def _start_common(env: Env) -> None:
    env.start_generator()
    env.start_control_plane()


async def _paths(
    env: Env, sizes: Sizes, opts: Options, res: Results, log: Callable[[str], None]
) -> None:
    paths = [Path_("direct", env.gen_port, None)]
    if env.nginx_binary is not None:
        port = free_port()
        paths.append(Path_("nginx", port, env.start_nginx(port, connections=1024)))
        if opts.tuned_nginx:
            port = free_port()
            tuned = env.start_nginx(port, connections=1024, buffer_size="64k")
            paths.append(Path_(NGINX_TUNED, port, tuned))
    port = free_port()
    side = env.start_sidecar("sidecar", port)
    paths.append(Path_("sidecar", port, side))
    if opts.compare_loops:
        # The same sidecar on uvloop: what the event loop is worth on this path.
        other = free_port()
        paths.append(
            Path_(SIDECAR_UVLOOP, other, env.start_sidecar("sidecar-uvloop", other, "uvloop"))
        )
    res.throughput, res.latency = await measure_paths(env, sizes, paths, log)
    if opts.profile:
        events = sizes.throughput_events[256]
        session = await client.initialize(port)
        res.profile = await profile_sidecar(
            sidecar=side,
            load=lambda: client.read_post_stream(port, n=events, size=256, session_id=session),
            out=env.tmp / "profile.txt",
            log=log,
        )


MCP_PROFILE_BURST = 1_000


async def _mcp(
    env: Env, sizes: Sizes, opts: Options, res: Results, log: Callable[[str], None]
) -> list[mcp_group.McpFigures]:
    """The official SDK server, nginx (upstream keepalive, as in the stateless group), the
    floor relay (`bench.floor_relay`) and a sidecar in front of it (and the sidecar on uvloop
    with `--compare-loops`), all stopped afterwards. `--profile` py-spies the sidecar under
    no-op calls, then under progress bursts (2025-11-25, one client)."""
    server_port = free_port()
    server = env.start(
        "mcp-server", python_module("bench.mcp_server", "--port", server_port), server_port
    )
    paths = [mcp_group.McpPath("direct", server_port, None)]
    try:
        if env.nginx_binary is not None:
            port = free_port()
            ngx = env.start_nginx(
                port, connections=4096, upstream_keepalive=NGINX_KEEPALIVE, upstream=server_port
            )
            paths.append(mcp_group.McpPath("nginx", port, ngx))
        port = free_port()
        floor = env.start(
            "floor-relay",
            python_module(
                "bench.floor_relay", "--port", port, "--upstream", f"http://127.0.0.1:{server_port}"
            ),
            port,
        )
        paths.append(mcp_group.McpPath(mcp_group.FLOOR, port, floor))
        port = free_port()
        side = env.start_sidecar("sidecar-mcp", port, upstream=server_port)
        paths.append(mcp_group.McpPath("sidecar", port, side))
        if opts.compare_loops:  # what the event loop is worth on MCP traffic
            other = free_port()
            uv = env.start_sidecar("sidecar-mcp-uvloop", other, "uvloop", upstream=server_port)
            paths.append(mcp_group.McpPath(SIDECAR_UVLOOP, other, uv))
        figures = await mcp_group.measure(
            sizes=sizes.mcp, paths=paths, server=server, server_port=server_port, log=log
        )
        if opts.profile:
            res.mcp_profiles = await _profile_mcp(env, side, port, log)
        return figures
    finally:
        for p in paths:
            if p.proxy is not None:
                p.proxy.stop()
        server.stop()


async def _profile_mcp(
    env: Env, side: Child, port: int, log: Callable[[str], None]
) -> list[tuple[str, list[tuple[str, float]]]]:
    """py-spy the sidecar under each MCP workload, each on a new session (2025-11-25): the
    sidecar's cost per call grows with the calls its session has made, so a fresh session shows
    the cost of the path itself (which the session's growth then adds to)."""
    workloads: list[tuple[str, Callable[[Client], Awaitable[object]]]] = [
        ("no-op `tools/call` (SDK client, 2025-11-25, new session)", _noop_load),
        (f"progress bursts of {MCP_PROFILE_BURST:,} (SDK, 2025-11-25, new session)", _burst_load),
    ]
    out = []
    for i, (title, load) in enumerate(workloads):
        async with mcp_group.sdk_client(port, mcp_group.REVISIONS[0], 4) as sdk:
            top = await profile_sidecar(
                sidecar=side,
                load=functools.partial(load, sdk),
                out=env.tmp / f"mcp-profile-{i}",
                log=log,
            )
        out.append((title, top))
    return out


async def _noop_load(sdk: Client) -> object:
    return await mcp_group.noop_calls(sdk, 50)


async def _burst_load(sdk: Client) -> object:
    return await mcp_group.burst(sdk, MCP_PROFILE_BURST)


async def _stateless(
    env: Env, sizes: Sizes, opts: Options, res: Results, log: Callable[[str], None]
) -> list[StatelessFigures]:
    """Its own nginx (upstream keepalive, so that neither proxy opens an upstream connection
    per request) and its own sidecar, stopped afterwards; `--profile` py-spies that sidecar
    under `tools/call` answered with JSON."""
    paths = [Path_("direct", env.gen_port, None)]
    if env.nginx_binary is not None:
        port = free_port()
        ngx = env.start_nginx(port, connections=1024, upstream_keepalive=NGINX_KEEPALIVE)
        paths.append(Path_("nginx", port, ngx))
    port = free_port()
    side = env.start_sidecar("sidecar-stateless", port)
    paths.append(Path_("sidecar", port, side))
    try:
        figures = await measure_stateless(env, sizes, paths, log)
        if opts.profile:
            call = client.StatelessKind("tools/call")
            res.stateless_profile = await profile_sidecar(
                sidecar=side,
                load=lambda: client.stateless_load(
                    port, call, clients=STATELESS_CLIENTS, per_client=100
                ),
                out=env.tmp / "stateless-profile.txt",
                log=log,
            )
        return figures
    finally:
        for p in paths:
            if p.proxy is not None:
                p.proxy.stop()


async def _control_plane(
    env: Env, sizes: Sizes, opts: Options, res: Results, log: Callable[[str], None]
) -> None:
    batches = await asyncio.to_thread(report_batches, sizes)
    fig = await measure_control_plane(env, f"sqlite:///{env.tmp}/cp.db", "sqlite", batches, sizes)
    res.control_plane.append(fig)
    log(f"control plane sqlite: {fig.updates_per_s:,.0f} updates/s")
    if not opts.etcd:
        return
    from tests.support.etcd import etcd_available, start_etcd

    if not etcd_available():
        res.notes.append("etcd skipped: no etcd binary (Debian etcd-server)")
        return
    cluster = await asyncio.to_thread(start_etcd, env.tmp / "etcd")
    try:
        fig = await measure_control_plane(env, cluster.url, "etcd", batches, sizes)
    finally:
        await asyncio.to_thread(cluster.stop)
    res.control_plane.append(fig)
    log(f"control plane etcd: {fig.updates_per_s:,.0f} updates/s")


async def _floods(
    env: Env, sizes: Sizes, opts: Options, res: Results, log: Callable[[str], None]
) -> list[cp_flood.FloodFigures]:
    stores = ["sqlite"]
    if opts.etcd:
        from tests.support.etcd import etcd_available

        if etcd_available():
            stores.append("etcd")
        else:
            res.notes.append("cp-flood on etcd skipped: no etcd binary (Debian etcd-server)")
    return await cp_flood.run_floods(tmp=env.tmp, count=sizes.flood_items, stores=stores, log=log)


def command_line(argv: Sequence[str]) -> str:
    return " ".join(["python -m bench", *argv])


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Tether's benchmark harness: direct vs nginx vs sidecar, idle streams, "
        "control plane, resume, stateless (2026-07-28) requests. Prints one markdown table per "
        "figure group.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes (about 30 s)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    p.add_argument(
        "--only",
        nargs="+",
        choices=GROUPS,
        help="run only these figure groups (default: all but cp-flood)",
    )
    p.add_argument("--no-nginx", action="store_true", help="leave the nginx path out")
    p.add_argument("--no-etcd", action="store_true", help="control plane on SQLite only")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the sidecar (mcp: no-op calls, progress bursts; paths: 256 B load; "
        "stateless: tools/call)",
    )
    p.add_argument(
        "--tuned-nginx",
        action="store_true",
        help="also measure nginx with proxy_buffer_size 64k (paths group)",
    )
    p.add_argument(
        "--compare-loops",
        action="store_true",
        help="also measure the sidecar on uvloop (mcp and paths groups; needs uvloop installed)",
    )
    p.add_argument("--plot", type=Path, default=None, help="write the PNG here")
    p.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    args = p.parse_args(argv)
    opts = Options(
        preset="smoke" if args.smoke else "quick" if args.quick else "full",
        groups=tuple(args.only or DEFAULT_GROUPS),
        nginx=not args.no_nginx,
        etcd=not args.no_etcd,
        plot_path=args.plot,
        json_path=args.json,
        profile=args.profile,
        compare_loops=args.compare_loops,
        tuned_nginx=args.tuned_nginx,
    )

    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[bench {time.monotonic() - started:5.1f}s] {msg}", file=sys.stderr, flush=True)

    res = asyncio.run(run(opts, log))
    print(f"## Tether benchmarks ({opts.preset})\n")
    print(f"Machine: {machine()}\n")
    for line in tables(res):
        print(line)
    for note in res.notes:
        print(f"Note: {note}\n")
    if opts.plot_path is not None and res.throughput and res.latency:
        print(plot(res, opts.plot_path) + "\n")
    if opts.json_path is not None:
        from dataclasses import asdict

        raw = {k: v for k, v in asdict(res).items()}
        opts.json_path.write_text(json.dumps(raw, indent=1))
    print(f"Command: `{command_line(argv)}` ({time.monotonic() - started:.0f} s)")
    return 0
