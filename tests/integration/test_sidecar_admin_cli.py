"""The admin port, the `tether sidecar` command line and its handling of bad config."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.server import start_control_plane
from tests.integration.conftest import SidecarFactory, serve_app
from tests.support.procs import ProcessPool, free_port


async def test_admin_port_serves_health_readiness_and_metrics(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream() as up:
        sidecar = await sidecar_factory(up)
        admin = f"http://127.0.0.1:{sidecar.admin_port}"
        async with http.get(admin + "/healthz") as resp:
            assert resp.status == 200
        async with http.get(admin + "/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ready"
        async with http.get(admin + "/metrics") as resp:
            text = await resp.text()
        assert "tether_sidecar_events_received_total" in text
        assert "tether_sidecar_streams " in text


async def test_health_paths_on_the_proxied_port_belong_to_the_upstream(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    async def upstream_health(request: web.Request) -> web.Response:
        return web.Response(text=f"upstream says {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", upstream_health)
    async with serve_app(app) as up:
        sidecar = await sidecar_factory(up)
        for path in ("/healthz", "/readyz", "/metrics"):
            async with http.get(f"http://127.0.0.1:{sidecar.port}{path}") as resp:
                assert await resp.text() == f"upstream says {path}"


async def test_legacy_endpoint_event_is_rewritten_under_a_base_path(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """The upstream serves under /prefix and announces an absolute endpoint URL; the client
    must be told a path on the sidecar."""
    posted: list[str] = []

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        origin = f"http://{request.host}"
        await resp.write(
            f"event: endpoint\r\ndata: {origin}/prefix/messages/?session_id=abc\r\n\r\n".encode()
        )
        await resp.write(b'event: message\r\ndata: {"jsonrpc":"2.0","method":"x"}\r\n\r\n')
        return resp

    async def message(request: web.Request) -> web.Response:
        posted.append(request.path_qs)
        return web.Response(status=202, text="Accepted")

    app = web.Application()
    app.router.add_get("/prefix/sse", sse)
    app.router.add_post("/prefix/messages/", message)
    async with serve_app(app) as up:
        sidecar = await sidecar_factory(up + "/prefix")
        base = f"http://127.0.0.1:{sidecar.port}"
        async with http.get(base + "/sse", headers={"Accept": "text/event-stream"}) as resp:
            body = await resp.text()
        assert "event: endpoint\ndata: /messages/?session_id=abc\n" in body
        assert '"method":"x"' in body
        async with http.post(base + "/messages/?session_id=abc", json={}) as resp:
            assert resp.status == 202
    assert posted == ["/prefix/messages/?session_id=abc"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "nonsense", "--upstream", "http://x"], "--listen: expected HOST:PORT"),
        (["--listen", "127.0.0.1:0", "--upstream", "ftp://x"], "--upstream: expected an http(s)"),
        (
            ["--listen", "127.0.0.1:0", "--upstream", "http://x", "--replay-events", "0"],
            "must be positive",
        ),
    ],
)
async def test_bad_config_is_a_clear_error(args: list[str], message: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.cli",
        "sidecar",
        *args,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert message in err.decode()
    assert "Traceback" not in err.decode()


async def test_sidecar_command_serves_and_stops_on_sigterm(
    procs: ProcessPool, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream() as up:
        port, admin = free_port(), free_port()
        argv = [
            sys.executable,
            "-m",
            "tether.cli",
            "sidecar",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            up,
            "--admin-listen",
            f"127.0.0.1:{admin}",
        ]
        proc = await procs.start(argv, name="sidecar", ready_port=port)
        async with http.get(f"http://127.0.0.1:{admin}/readyz") as resp:
            assert resp.status == 200
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        async with http.post(f"http://127.0.0.1:{port}/mcp", json=body) as resp:
            assert resp.status == 200
            assert "Mcp-Session-Id" in resp.headers
        proc.kill(signal.SIGTERM)
        assert await proc.wait_exit(10) == 0


async def test_sigterm_with_open_streams_ends_them_cleanly_and_exits(
    procs: ProcessPool, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    """Kubernetes sends SIGTERM: the sidecar ends its client streams at once (no error for
    the open request: the client resumes elsewhere with Last-Event-ID) and exits."""
    async with numbered_upstream(interval_ms=20) as up:
        port = free_port()
        argv = [sys.executable, "-m", "tether.cli", "sidecar"]
        argv += ["--listen", f"127.0.0.1:{port}", "--upstream", up]
        proc = await procs.start(argv, name="sidecar", ready_port=port)
        base = f"http://127.0.0.1:{port}"
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        async with http.post(base + "/mcp", json=init) as resp:
            sid = resp.headers["Mcp-Session-Id"]
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "count", "arguments": {"n": 10_000, "interval_ms": 20}},
        }
        headers = {"Mcp-Session-Id": sid, "Accept": "text/event-stream"}
        async with http.post(base + "/mcp", json=call, headers=headers) as resp:
            await resp.content.readline()  # the stream is open
            proc.kill(signal.SIGTERM)
            async with asyncio.timeout(10):
                body = await resp.content.read()
        assert b"tether: stream ended: sidecar shutting down" in body
        assert b'"error"' not in body
        assert await proc.wait_exit(10) == 0


async def test_metrics_show_how_reporting_to_the_control_plane_goes(
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    cp = await start_control_plane(
        ControlPlaneConfig(listen="127.0.0.1:0", store=SqliteUrl(tmp_path / "s.db"))
    )
    try:
        async with numbered_upstream() as up:
            sidecar = await sidecar_factory(up, control_plane=cp.address, owner="m")
            body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
            async with http.post(f"http://127.0.0.1:{sidecar.port}/mcp", json=body) as resp:
                assert resp.status == 200
            reporter = sidecar.proxy.continuity.reporter
            assert reporter is not None
            await asyncio.wait_for(reporter.flushed(), 10)
            async with http.get(f"http://127.0.0.1:{sidecar.admin_port}/metrics") as resp:
                text = await resp.text()
    finally:
        await sidecar_factory.stop_all()  # before their control plane (see SidecarFactory)
        await cp.stop()
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("tether_sidecar_") and " " in line
    }
    assert values["tether_sidecar_reports_acked_total"] >= 1
    assert values["tether_sidecar_reports_pending"] == 0
    assert values["tether_sidecar_control_plane_connected"] == 1
