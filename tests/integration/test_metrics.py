"""Metrics as Prometheus reads them (issue 14): real sidecars and a real `tether control-plane`
process, real traffic, `/metrics` scraped over HTTP and parsed by `prometheus_client.parser`.
Each test reads the metric before and after, so it fails if the code stops recording it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import SidecarFactory
from tests.integration.test_proxy import (
    HEADERS,
    MCP,
    _stream_of_60_with_client_gone_after_3,
    count_call,
    initialize,
    read_killing_upstream,
    through_numbered_upstream,
)
from tests.support.metrics import counter_value
from tests.support.procs import ProcessPool, free_port, python_module
from tests.support.scrape import Scrape, scrape
from tests.support.sse_client import collect
from tests.support.tokens import AUDIENCE, ISSUER, TokenIssuer, write_jwks, write_token
from tests.support.waiting import eventually
from tether.buildinfo import tether_version
from tether.grpc_security import ClientSecurity

DEADLINE = 20.0
UPSTREAM = "tether_sidecar_upstream_request_duration_seconds"
RESUME = "tether_sidecar_resume_duration_seconds"
OUTAGE = "tether_sidecar_upstream_outage_duration_seconds"
SSE = "text/event-stream"


def metrics_url(admin_port: int | None) -> str:
    assert admin_port is not None
    return f"http://127.0.0.1:{admin_port}/metrics"


# --- the sidecar ------------------------------------------------------------------------------


async def test_upstream_requests_are_timed_by_mcp_method_and_status(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream(interval_ms=1) as up:
        sidecar = await sidecar_factory(up)
        base = f"http://127.0.0.1:{sidecar.port}"
        url = metrics_url(sidecar.admin_port)
        before = await scrape(http, url)
        assert not before.matching(UPSTREAM + "_count")
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        async with http.post(base + MCP, json=count_call(3), headers=headers) as resp:
            await collect(resp)
        # A method no MCP revision has: counted as `other`, its name never becomes a label.
        unknown = {"jsonrpc": "2.0", "id": 9, "method": "x/made-up-4711"}
        async with http.post(base + MCP, json=unknown, headers=headers) as resp:
            await resp.read()
        after = await scrape(http, url)
    assert after.value(UPSTREAM + "_count", method="initialize", status="2xx") == 1
    assert after.value(UPSTREAM + "_count", method="tools/call", status="2xx") == 1
    assert after.value(UPSTREAM + "_count", method="other") == 1
    assert after.label_values(UPSTREAM + "_count", "method") == {
        "initialize",
        "tools/call",
        "other",
    }
    assert after.value(UPSTREAM + "_bucket", method="tools/call", le="+Inf") == 1
    assert after.value(UPSTREAM + "_sum", method="initialize") > 0
    # The process and Python collectors, and the build, on the sidecar's own registry.
    assert after.value("process_resident_memory_bytes") > 0
    assert after.value("process_cpu_seconds_total") > 0
    assert after.matching("python_gc_collections_total", generation="0")
    assert after.value("python_info") == 1
    assert after.value("tether_build_info", component="sidecar", version=tether_version()) == 1


async def test_an_unreachable_upstream_is_timed_as_unreachable(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await sidecar_factory(f"http://127.0.0.1:{free_port()}")
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    async with http.post(f"http://127.0.0.1:{sidecar.port}{MCP}", json=body, headers=HEADERS) as r:
        assert r.status == 502
    after = await scrape(http, metrics_url(sidecar.admin_port))
    assert after.value(UPSTREAM + "_count", method="initialize", status="unreachable") == 1
    assert after.label_values(UPSTREAM + "_count", "status") == {"unreachable"}


async def test_a_resume_from_the_buffer_is_timed(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream(interval_ms=5, no_ids=True) as up:
        sidecar = await sidecar_factory(up)
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        async with http.post(base + MCP, json=count_call(40), headers=headers) as resp:
            first = await collect(resp, limit=10)
        await eventually(
            lambda: counter_value(sidecar.proxy.metrics, "events_received") >= 20,
            timeout=10,
            what="events read while the client is away",
        )
        before = await scrape(http, metrics_url(sidecar.admin_port))
        assert not before.matching(RESUME + "_count")
        last = first[-1].id
        assert last is not None
        resume = {**headers, "Last-Event-ID": last, "Accept": SSE}
        async with http.get(base + MCP, headers=resume) as resp:
            assert resp.status == 200
            await collect(resp)
        after = await scrape(http, metrics_url(sidecar.admin_port))
    assert after.value(RESUME + "_count", source="buffer") == 1
    assert after.value(RESUME + "_sum", source="buffer") > 0
    assert after.label_values(RESUME + "_count", "source") == {"buffer"}


async def test_a_resume_older_than_the_buffer_is_timed_as_from_the_upstream(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream(interval_ms=1, overlap=2) as up:
        base, headers, first, sidecar = await _stream_of_60_with_client_gone_after_3(
            sidecar_factory, up, http
        )
        last = first[-1].id
        assert last is not None
        resume = {**headers, "Last-Event-ID": last, "Accept": SSE}
        async with http.get(base + MCP, headers=resume) as resp:
            assert resp.status == 200
            await collect(resp)
        after = await scrape(http, metrics_url(sidecar.admin_port))
    assert after.value(RESUME + "_count", source="upstream") == 1
    assert after.label_values(RESUME + "_count", "source") == {"upstream"}


async def test_an_upstream_outage_is_timed_until_the_stream_is_back(
    sidecar_factory: SidecarFactory, procs: ProcessPool, http: aiohttp.ClientSession
) -> None:
    upstream, port, sidecar, base, sid = await through_numbered_upstream(
        procs, sidecar_factory, http
    )
    before = await scrape(http, metrics_url(sidecar.admin_port))
    assert not before.matching(OUTAGE + "_count")
    async with http.post(
        base + MCP, json=count_call(60, interval_ms=5), headers={**HEADERS, "Mcp-Session-Id": sid}
    ) as resp:
        await read_killing_upstream(resp, upstream, kill_at=20, restart_port=port)
    after = await scrape(http, metrics_url(sidecar.admin_port))
    assert after.value(OUTAGE + "_count", outcome="resumed") >= 1
    assert after.value(OUTAGE + "_sum", outcome="resumed") > 0
    assert after.label_values(OUTAGE + "_count", "outcome") == {"resumed"}


async def test_an_outage_the_stream_does_not_survive_is_timed_as_failed(
    sidecar_factory: SidecarFactory, procs: ProcessPool, http: aiohttp.ClientSession
) -> None:
    """Without event ids the stream cannot be resumed: the outage ends with the stream."""
    upstream, _, sidecar, base, sid = await through_numbered_upstream(
        procs, sidecar_factory, http, "--no-ids"
    )
    async with http.post(
        base + MCP, json=count_call(60, interval_ms=5), headers={**HEADERS, "Mcp-Session-Id": sid}
    ) as resp:
        await read_killing_upstream(resp, upstream, kill_at=10)
    after = await scrape(http, metrics_url(sidecar.admin_port))
    assert after.value(OUTAGE + "_count", outcome="failed") == 1
    assert after.label_values(OUTAGE + "_count", "outcome") == {"failed"}


# --- the control plane, a real process --------------------------------------------------------

POLICY = """
bindings:
  - role: sidecar
    principals: ["system:serviceaccount:tether:tether-mcp"]
  - role: viewer
    principals: ["system:serviceaccount:ops:tether-viewer"]
"""


async def tether_cli(*args: str) -> tuple[int, str]:
    """Run `tether ARGS...` to the end; (exit status, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *python_module("tether.cli", *args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(DEADLINE):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@contextlib.asynccontextmanager
async def watching(address: str, token: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`tether sessions watch` as a process, once it has printed the snapshot's end."""
    proc = await asyncio.create_subprocess_exec(
        *python_module(
            "tether.cli",
            "sessions",
            "watch",
            "--control-plane",
            address,
            "--control-plane-token-file",
            str(token),
        ),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(DEADLINE):
            while b"synced" not in await proc.stdout.readline():
                pass
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_control_plane_process_exports_calls_store_writes_sessions_watchers_rejections(
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    procs: ProcessPool,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    issuer = TokenIssuer()
    jwks = write_jwks(tmp_path / "jwks.json", issuer)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    sidecar_token = write_token(tmp_path / "sidecar-token", issuer.token("sidecar-a"))
    viewer_token = write_token(
        tmp_path / "viewer-token",
        issuer.token("oncall", namespace="ops", service_account="tether-viewer"),
    )
    grpc_port, admin_port = free_port(), free_port()
    address = f"127.0.0.1:{grpc_port}"
    await procs.start(
        python_module(
            "tether.cli",
            "control-plane",
            "--listen",
            address,
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
            "--store",
            f"sqlite:///{tmp_path / 'sessions.db'}",
            "--jwt-jwks-file",
            str(jwks),
            "--jwt-audience",
            AUDIENCE,
            "--jwt-issuer",
            ISSUER,
            "--policy-file",
            str(policy),
        ),
        name="control-plane",
        ready_port=admin_port,
    )
    url = metrics_url(admin_port)
    async with http.get(f"http://127.0.0.1:{admin_port}/healthz") as resp:
        assert resp.status == 200
    before = await scrape(http, url)
    assert before.value("tether_control_plane_sessions") == 0
    assert before.value("tether_control_plane_watchers") == 0
    assert before.value("tether_control_plane_store_write_duration_seconds_count") == 0
    assert before.value("tether_control_plane_rejections_total") == 0  # every reason, at 0
    assert (
        before.value("tether_build_info", component="control-plane", version=tether_version()) == 1
    )
    assert before.value("process_resident_memory_bytes") > 0

    # A sidecar reports a session; a viewer watches; the viewer's delete is refused by the
    # policy; a caller without a token is refused by authentication.
    async with numbered_upstream(interval_ms=1) as up, watching(address, viewer_token):
        assert (await scrape(http, url)).value("tether_control_plane_watchers") == 1
        sidecar = await sidecar_factory(
            up,
            control_plane=address,
            control_plane_security=ClientSecurity(token_file=sidecar_token),
            owner="sidecar-a",
        )
        sid = await initialize(http, f"http://127.0.0.1:{sidecar.port}")

        async def sessions_counted() -> Scrape | None:
            now = await scrape(http, url)
            return now if now.value("tether_control_plane_sessions") == 1 else None

        during = await eventually(sessions_counted, timeout=DEADLINE, what="one session")
        assert during is not None
        # The viewer's, and the sidecar's own ownership watch.
        assert during.value("tether_control_plane_watchers") == 2
        assert during.value("tether_control_plane_report_streams") >= 1
        code, err = await tether_cli(
            "sessions", "delete", sid, "--control-plane", address,
            "--control-plane-token-file", str(viewer_token),
        )  # fmt: skip
        assert (code, "PERMISSION_DENIED" in err) == (1, True), err
        code, err = await tether_cli("sessions", "list", "--control-plane", address)
        assert (code, "UNAUTHENTICATED" in err) == (1, True), err
        await sidecar_factory.stop_all()

    async def watch_ended() -> Scrape | None:
        now = await scrape(http, url)
        return now if now.value("tether_control_plane_watchers") == 0 else None

    after = await eventually(watch_ended, timeout=DEADLINE, what="the watch counted as ended")
    assert after is not None
    handled = "tether_control_plane_grpc_handled_total"
    service = "tether.v1.SessionService"
    assert after.value(handled, grpc_method="DeleteSession", grpc_code="PERMISSION_DENIED") == 1
    assert after.value(handled, grpc_method="ListSessions", grpc_code="UNAUTHENTICATED") == 1
    assert after.value(handled, grpc_service=service, grpc_method="WatchSessions") == 2
    assert after.value(handled, grpc_method="WatchSessions", grpc_type="server_stream") == 2
    assert after.value_or_zero(handled, grpc_code="OK") >= 1
    seconds = "tether_control_plane_grpc_handling_seconds"
    assert after.value(seconds + "_count", grpc_method="DeleteSession") == 1
    assert after.value(seconds + "_bucket", grpc_method="DeleteSession", le="+Inf") == 1
    assert after.value("tether_control_plane_rejections_total", reason="permission_denied") == 1
    assert after.value("tether_control_plane_rejections_total", reason="unauthenticated") == 1
    writes = "tether_control_plane_store_write_duration_seconds"
    assert after.value(writes + "_count", outcome="ok") >= 1
    assert after.value(writes + "_sum", outcome="ok") > 0
    assert after.value("tether_control_plane_store_write_batch_size_count") >= 1
    assert after.value("tether_control_plane_store_write_batch_size_sum") >= 1
    assert after.value("tether_control_plane_reported_writes_total") >= 1
    # The sidecar stopped: its report stream ended and was counted.
    assert after.value(handled, grpc_method="ReportEvents", grpc_type="bidi_stream") >= 1
    assert after.value("tether_control_plane_report_streams") == 0


@pytest.mark.parametrize("value", ["nowhere", "host:99999", ":80"])
async def test_a_bad_admin_listen_is_refused_at_start(value: str) -> None:
    code, err = await tether_cli(
        "control-plane", "--listen", "127.0.0.1:0", "--admin-listen", value
    )
    assert code == 2
    assert "--admin-listen" in err, err


async def test_admin_listen_comes_from_the_environment_too(
    procs: ProcessPool, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    admin_port = free_port()
    await procs.start(
        python_module(
            "tether.cli", "control-plane", "--listen", "127.0.0.1:0",
            "--store", f"sqlite:///{tmp_path / 's.db'}",
        ),
        name="control-plane",
        ready_port=admin_port,
        env={"TETHER_ADMIN_LISTEN": f"127.0.0.1:{admin_port}"},
    )  # fmt: skip
    now = await scrape(http, metrics_url(admin_port))
    assert now.value("tether_build_info", component="control-plane") == 1
