"""The MCP group (issue 16): what a proxy costs real MCP traffic, next to nginx in the same run.

Upstream is the official SDK server (`bench/mcp_server.py`), the load is the official SDK
client (`mcp.Client`), and each path (direct, nginx with `proxy_buffering off`, the sidecar)
gets one client per protocol revision: 2025-11-25 (`mode="legacy"`: initialize handshake,
a session, SSE responses; the protocol the sidecar tracks) and 2026-07-28 (no session). Three
phases, each interleaved across revisions and paths in segments (as the stateless group
does), so that load from outside falls on every path alike:

1. no-op: `tools/call noop` one after the other; latency per call (client-side wall time)
   and the proxy's CPU per call.
2. burst: `tools/call burst(n)`, n progress notifications written one per write by the
   server; every one must reach the client's progress callback. The proxy's CPU per
   notification includes the call's own cost, spread over its n notifications.
3. open calls (2025-11-25 only, see `HELD`): `McpSizes.open_calls` concurrent
   `tools/call hold` on one client, held by the server until the harness calls `release`
   directly; once the server counts them all, the proxy's RSS (`VmRSS`, and `VmHWM`, its peak
   so far) is read. Added KiB per open call is the "idle stream" cost: an open call is an SSE
   response with nothing flowing.

"x nginx" is a ratio to nginx's figure in the same revision of the same run; for added
latency it is left out when nginx adds nothing measurable (its p50 at or below direct's).

CPU is the proxy process's alone, summed over its threads from `/proc/<pid>/task/*/schedstat`
(nanoseconds; `/proc/<pid>/stat` counts 10 ms ticks, which nginx's few milliseconds per
thousand notifications would fall between), over the phase; the server's and the harness's
(the SDK client: `getrusage`) are shown for scale. Only the proxy's is compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import httpx2
import mcp_types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.procs import Child, cpu_seconds_fine, rss_hwm_mib, self_cpu_seconds
from bench.stats import percentile

REVISIONS = ("2025-11-25", "2026-07-28")
"""`mcp.Client` modes: "legacy" negotiates 2025-11-25; a modern version string pins it."""
FLOOR = "aiohttp relay (floor)"
"""`bench.floor_relay`: aiohttp's server and client relaying with no MCP logic, the cost no
Python sidecar on aiohttp can go under."""
HELD = REVISIONS[0]
"""The revision whose calls are held open: only one, since the second would be measured in a
heap the first has already grown (freed memory is reused, not returned)."""
NOOP_SEGMENTS = 20
"""No-op calls alternate between revisions and paths in this many segments: a call takes a few
ms and nginx adds well under one, so a load burst from outside must not land on one path."""
BURST_SEGMENTS = 4
CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class McpSizes:
    calls: int
    """No-op calls per revision and path."""
    notifications: int
    """Progress notifications per revision and path, in `BURST_SEGMENTS` bursts."""
    open_calls: int


@dataclass(frozen=True)
class McpPath:
    name: str
    port: int
    proxy: Child | None


@dataclass(frozen=True)
class McpFigures:
    revision: str
    path: str
    p50_ms: float
    p99_ms: float
    calls: int
    proxy_cpu_per_call_us: float | None
    proxy_cpu_per_call_first_last_us: tuple[float, float] | None
    """Over the first and the last quarter of the no-op phase: the sidecar's cost grows with
    the calls its session has made, so the two differ where nginx's do not."""
    notifications: int
    proxy_cpu_per_notification_us: float | None
    server_cpu_per_notification_us: float
    client_cpu_per_notification_us: float
    open_calls: int
    rss_before_mib: float | None
    rss_open_mib: float | None
    hwm_mib: float | None

    @property
    def kib_per_open_call(self) -> float | None:
        if self.rss_open_mib is None or self.rss_before_mib is None:
            return None
        return (self.rss_open_mib - self.rss_before_mib) * 1024 / self.open_calls


@contextlib.asynccontextmanager
async def sdk_client(port: int, revision: str, connections: int) -> AsyncIterator[Client]:
    """`mcp.Client` on `revision`, its HTTP pool wide enough for `connections` open calls
    (httpx's default stops at 100)."""
    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx2.Timeout(CALL_TIMEOUT_S, read=300.0)
    async with httpx2.AsyncClient(limits=limits, timeout=timeout) as http:
        transport = streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)
        mode = "legacy" if revision == "2025-11-25" else revision
        async with Client(transport, mode=mode) as client:
            if client.protocol_version != revision:
                raise RuntimeError(f"asked for {revision}, negotiated {client.protocol_version}")
            yield client


def text(result: mcp_types.CallToolResult) -> str:
    """The text a tool answered; raises for an error or any other answer."""
    match result.content:
        case [mcp_types.TextContent(text=answer)] if not result.is_error:
            return answer
    raise RuntimeError(f"tool call failed: {result.content}")


async def noop_calls(client: Client, n: int) -> list[float]:
    """Seconds per `tools/call noop`, one call after the other."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        async with asyncio.timeout(CALL_TIMEOUT_S):
            result = await client.call_tool("noop", {})
        out.append(time.perf_counter() - start)
        if text(result) != "ok":
            raise RuntimeError(f"noop answered {result.content}")
    return out


async def burst(client: Client, n: int) -> int:
    """One `tools/call burst(n)`; raises unless all n notifications arrived, in order."""
    seen: list[float] = []

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with asyncio.timeout(CALL_TIMEOUT_S + n / 100):
        result = await client.call_tool("burst", {"n": n}, progress_callback=progress)
    if text(result) != f"sent {n}" or seen != [float(i) for i in range(1, n + 1)]:
        raise RuntimeError(f"burst of {n}: {len(seen)} notifications arrived, {result.content}")
    return n


@dataclass
class _Acc:
    latencies: list[float] = field(default_factory=list)
    call_cpu: list[float] = field(default_factory=list)
    """Proxy CPU seconds per no-op call, one value per segment."""
    notifications: int = 0
    cpu: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("proxy", "server", "client"), 0.0)
    )
    memory: tuple[float, float, float] | None = None


def _snapshot(proxy: Child | None, server: Child) -> dict[str, float]:
    return {
        "proxy": cpu_seconds_fine(proxy.pid) if proxy is not None else 0.0,
        "server": cpu_seconds_fine(server.pid),
        "client": self_cpu_seconds(),
    }


async def hold_open(
    client: Client, control: Client, proxy: Child | None, count: int
) -> tuple[float, float, float] | None:
    """`count` calls held open through `client`; the proxy's (RSS before, RSS open, HWM)."""
    before = rss_hwm_mib(proxy.pid)[0] if proxy is not None else None
    async with asyncio.TaskGroup() as group:
        calls = [
            group.create_task(client.call_tool("hold", {}), name=f"mcp-hold-{i}")
            for i in range(count)
        ]
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await control.call_tool("holding", {"at_least": count})
        await asyncio.sleep(0.5)  # let the proxy settle (reports sent, buffers allocated)
        memory = rss_hwm_mib(proxy.pid) if proxy is not None else None
        released = int(text(await control.call_tool("release", {})))
        if released != count:
            raise RuntimeError(f"{released} held calls released, {count} were opened")
    if any(text(c.result()) != "released" for c in calls):
        raise RuntimeError("a held call did not end released")
    if before is None or memory is None:
        return None
    return before, memory[0], memory[1]


async def measure(
    *,
    sizes: McpSizes,
    paths: Sequence[McpPath],
    server: Child,
    server_port: int,
    log: Callable[[str], None],
) -> list[McpFigures]:
    """Every phase for every revision and path; see the module docstring."""
    pool = sizes.open_calls + 16
    acc = {(r, p.name): _Acc() for r in REVISIONS for p in paths}
    noop_segments = min(NOOP_SEGMENTS, sizes.calls)
    per_noop = sizes.calls // noop_segments
    per_burst = max(1, sizes.notifications // BURST_SEGMENTS)
    async with contextlib.AsyncExitStack() as stack:
        control = await stack.enter_async_context(sdk_client(server_port, REVISIONS[0], 4))
        clients = {
            (r, p.name): await stack.enter_async_context(sdk_client(p.port, r, pool))
            for r in REVISIONS
            for p in paths
        }
        for c in clients.values():  # warm-up: connections made, code paths taken
            await noop_calls(c, 5)
            await burst(c, 20)
        for _ in range(noop_segments):
            for r in REVISIONS:
                for p in paths:
                    a = acc[(r, p.name)]
                    before = _snapshot(p.proxy, server)
                    a.latencies += await noop_calls(clients[(r, p.name)], per_noop)
                    spent = _snapshot(p.proxy, server)["proxy"] - before["proxy"]
                    a.call_cpu.append(spent / per_noop)
        log("mcp: no-op calls done")
        for _ in range(BURST_SEGMENTS):
            for r in REVISIONS:
                for p in paths:
                    a = acc[(r, p.name)]
                    before = _snapshot(p.proxy, server)
                    a.notifications += await burst(clients[(r, p.name)], per_burst)
                    after = _snapshot(p.proxy, server)
                    for k in after:
                        a.cpu[k] += after[k] - before[k]
        log("mcp: bursts done")
        for p in paths:
            acc[(HELD, p.name)].memory = await hold_open(
                clients[(HELD, p.name)], control, p.proxy, sizes.open_calls
            )
        log(f"mcp: {sizes.open_calls} open calls done")
    return [_figures(r, p, acc[(r, p.name)], sizes, log) for r in REVISIONS for p in paths]


def _first_last_quarter(per_segment: list[float]) -> tuple[float, float]:
    """Mean CPU µs per call over the first and the last quarter of the segments."""
    k = max(1, len(per_segment) // 4)
    return statistics.fmean(per_segment[:k]) * 1e6, statistics.fmean(per_segment[-k:]) * 1e6


def _figures(
    revision: str, p: McpPath, a: _Acc, sizes: McpSizes, log: Callable[[str], None]
) -> McpFigures:
    proxied = p.proxy is not None
    fig = McpFigures(
        revision=revision,
        path=p.name,
        p50_ms=percentile(a.latencies, 50) * 1000,
        p99_ms=percentile(a.latencies, 99) * 1000,
        calls=len(a.latencies),
        proxy_cpu_per_call_us=statistics.fmean(a.call_cpu) * 1e6 if proxied else None,
        proxy_cpu_per_call_first_last_us=_first_last_quarter(a.call_cpu) if proxied else None,
        notifications=a.notifications,
        proxy_cpu_per_notification_us=a.cpu["proxy"] / a.notifications * 1e6 if proxied else None,
        server_cpu_per_notification_us=a.cpu["server"] / a.notifications * 1e6,
        client_cpu_per_notification_us=a.cpu["client"] / a.notifications * 1e6,
        open_calls=sizes.open_calls,
        rss_before_mib=a.memory[0] if a.memory else None,
        rss_open_mib=a.memory[1] if a.memory else None,
        hwm_mib=a.memory[2] if a.memory else None,
    )
    log(f"mcp {revision} {p.name}: no-op p50 {fig.p50_ms:.2f} ms")
    return fig


# --- report -----------------------------------------------------------------------------------


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _x(value: float | None, ref: float | None) -> str:
    return f"{value / ref:.2f}x" if value is not None and ref is not None and ref > 0 else "-"


def table(figures: Sequence[McpFigures]) -> Iterator[str]:
    if not figures:
        return
    f0 = figures[0]
    yield (
        "### MCP traffic: official SDK server and client (issue 16; "
        f"{f0.calls:,} no-op calls, {f0.notifications:,} notifications, "
        f"{f0.open_calls} open calls per revision and path)"
    )
    yield ""
    yield (
        "| revision | path | no-op `tools/call` p50 ms | p99 ms | added p50 ms | added p50 x nginx "
        "| proxy CPU µs/call (first → last quarter) | proxy CPU µs/notification | x nginx "
        "| CPU µs/notification: server / client "
        f"| RSS MiB, {f0.open_calls} calls open (before) | x nginx | added KiB/open call "
        "| x nginx | VmHWM MiB |"
    )
    yield "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    for revision in REVISIONS:
        rows = {f.path: f for f in figures if f.revision == revision}
        for f in rows.values():
            yield _row(f, rows.get("direct"), rows.get("nginx"))
    yield ""
    yield from _targets(figures)


def _call_cpu(f: McpFigures) -> str:
    if f.proxy_cpu_per_call_us is None or f.proxy_cpu_per_call_first_last_us is None:
        return "-"
    first, last = f.proxy_cpu_per_call_first_last_us
    return f"{f.proxy_cpu_per_call_us:,.0f} ({first:,.0f} → {last:,.0f})"


def _row(f: McpFigures, direct: McpFigures | None, nginx: McpFigures | None) -> str:
    added = f.p50_ms - direct.p50_ms if direct else None
    ngx_added = nginx.p50_ms - direct.p50_ms if nginx and direct else None
    ngx_cpu = nginx.proxy_cpu_per_notification_us if nginx else None
    ngx_rss = nginx.rss_open_mib if nginx else None
    ngx_kib = nginx.kib_per_open_call if nginx else None
    rss = "-"
    if f.rss_open_mib is not None and f.rss_before_mib is not None:
        rss = f"{f.rss_open_mib:.1f} ({f.rss_before_mib:.1f})"
    cells = [
        f.revision,
        f.path,
        f"{f.p50_ms:.2f}",
        f"{f.p99_ms:.2f}",
        _num(added, "+.2f"),
        _x(added, ngx_added) if f.proxy_cpu_per_call_us is not None and ngx_added else "-",
        _call_cpu(f),
        _num(f.proxy_cpu_per_notification_us, ",.1f"),
        _x(f.proxy_cpu_per_notification_us, ngx_cpu),
        f"{f.server_cpu_per_notification_us:,.0f} / {f.client_cpu_per_notification_us:,.0f}",
        rss,
        _x(f.rss_open_mib, ngx_rss),
        _num(f.kib_per_open_call, ",.1f"),
        _x(f.kib_per_open_call, ngx_kib),
        _num(f.hwm_mib, ".1f"),
    ]
    return "| " + " | ".join(cells) + " |"


@dataclass(frozen=True)
class TargetRow:
    target: str
    sidecar: str
    floor: str
    """The same figure for the aiohttp relay with no MCP logic (`FLOOR`), "-" when not run."""
    nginx: str
    met: bool


def target_rows(figures: Sequence[McpFigures]) -> list[TargetRow]:
    """The issue's targets on the 2025-11-25 rows, each with the floor relay's figure."""
    rows = {f.path: f for f in figures if f.revision == REVISIONS[0]}
    side, ngx, direct = rows.get("sidecar"), rows.get("nginx"), rows.get("direct")
    floor = rows.get(FLOOR)
    if side is None or ngx is None or direct is None:
        return []
    out: list[TargetRow] = []
    n_add = ngx.p50_ms - direct.p50_ms

    def added(f: McpFigures) -> str:
        add = f.p50_ms - direct.p50_ms
        return f"{add:+.2f} ms ({_x(add, n_add) if n_add > 0 else 'nginx adds none'})"

    def cpu(f: McpFigures) -> str:
        us = f.proxy_cpu_per_notification_us
        return f"{_num(us, '.1f')} µs ({_x(us, n_cpu)})"

    def rss(f: McpFigures) -> str:
        return f"{_num(f.rss_open_mib, '.1f')} MiB"

    def kib(f: McpFigures) -> str:
        return f"{_num(f.kib_per_open_call, '.1f')} KiB ({_x(f.kib_per_open_call, n_kib)})"

    def on_floor(show: Callable[[McpFigures], str]) -> str:
        return show(floor) if floor is not None else "-"

    s_add = side.p50_ms - direct.p50_ms
    out.append(
        TargetRow(
            "added p50 of a no-op `tools/call` ≤ 2x nginx's",
            added(side),
            on_floor(added),
            f"{n_add:+.2f} ms",
            s_add <= 2 * max(n_add, 0.0),
        )
    )
    s_cpu, n_cpu = side.proxy_cpu_per_notification_us, ngx.proxy_cpu_per_notification_us
    if s_cpu is not None and n_cpu is not None:
        out.append(
            TargetRow(
                "CPU per notification, one per write, ≤ 3x nginx's",
                cpu(side),
                on_floor(cpu),
                f"{n_cpu:.1f} µs",
                s_cpu <= 3 * n_cpu,
            )
        )
    if side.rss_open_mib is not None and ngx.rss_open_mib is not None:
        limit = 2 * ngx.rss_open_mib + 20
        out.append(
            TargetRow(
                f"RSS with {side.open_calls} calls open ≤ 2x nginx's + 20 MiB",
                f"{rss(side)} (limit {limit:.1f})",
                on_floor(rss),
                f"{ngx.rss_open_mib:.1f} MiB",
                side.rss_open_mib <= limit,
            )
        )
    s_kib, n_kib = side.kib_per_open_call, ngx.kib_per_open_call
    if s_kib is not None and n_kib is not None:
        out.append(
            TargetRow(
                "idle streams (open calls) ≤ 2x nginx's KiB per stream",
                kib(side),
                on_floor(kib),
                f"{n_kib:.1f} KiB",
                s_kib <= 2 * n_kib,
            )
        )
    return out


def _targets(figures: Sequence[McpFigures]) -> Iterator[str]:
    rows = target_rows(figures)
    if not rows:
        return
    yield "### MCP targets (issue 16; 2025-11-25 rows, ratios to nginx in this run)"
    yield ""
    yield (
        f"The {FLOOR} column is aiohttp's server and client relaying with no MCP logic "
        "(`bench/floor_relay.py`): what the HTTP layer the sidecar is built on costs by itself."
    )
    yield ""
    yield f"| target | sidecar | {FLOOR} | nginx | met |"
    yield "|---|---:|---:|---:|:---:|"
    for r in rows:
        yield (
            f"| {r.target} | {r.sidecar} | {r.floor} | {r.nginx} | {'yes' if r.met else '**no**'} |"
        )
    yield ""
