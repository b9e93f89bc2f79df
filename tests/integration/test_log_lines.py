"""Log lines that used to mislead (issue 14), each reproduced against real parts: a refused
upstream connection, an upstream that closes mid-body, a sidecar taking up its own session
again, and a client that ends its session while reports and requests are still on the way."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.server import RunningControlPlane
from tests.integration.conftest import SidecarFactory
from tests.integration.test_ownership import running_control_plane
from tests.integration.test_proxy import HEADERS, MCP, count_call, initialize
from tests.support.procs import free_port
from tests.support.relay import Relay
from tests.support.sse_client import events


def lines(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


async def test_a_refused_connection_says_so(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}")
    with caplog.at_level(logging.WARNING, logger="tether.sidecar"):
        async with http.post(
            f"http://127.0.0.1:{sidecar.port}{MCP}", json={"jsonrpc": "2.0"}, headers=HEADERS
        ) as resp:
            assert resp.status == 502
            body = await resp.json()
    said = f"upstream unreachable: cannot connect to 127.0.0.1:{port}: connection refused"
    assert body["error"]["message"] == f"tether: {said}"
    assert [line for line in lines(caplog, logging.WARNING) if said in line]
    assert not [line for line in lines(caplog) if "ssl:default" in line]


async def test_a_flood_of_refusals_is_summarised(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Per-request warnings go through `tether.logthrottle`: the first few in full, then one
    summary with the count (written by the sidecar's stop at the latest)."""
    port = free_port()
    sidecar = await sidecar_factory(f"http://127.0.0.1:{port}")
    with caplog.at_level(logging.WARNING, logger="tether.sidecar"):
        for _ in range(20):
            async with http.post(
                f"http://127.0.0.1:{sidecar.port}{MCP}", json={"jsonrpc": "2.0"}, headers=HEADERS
            ) as resp:
                assert resp.status == 502
        await sidecar_factory.stop_all()
    said = lines(caplog, logging.WARNING)
    assert len([line for line in said if line.startswith("POST /mcp: upstream unreachable")]) == 5
    [summary] = [line for line in said if " more " in line]
    assert summary.startswith("15 more requests refused with the upstream unreachable in the last")
    refused = f"cannot connect to 127.0.0.1:{port}: connection refused"
    assert summary.endswith(f"e.g. POST /mcp: upstream unreachable: {refused}")


@asynccontextmanager
async def closes_mid_body() -> AsyncIterator[str]:
    """An upstream that answers JSON, chunked, and closes the connection inside the body."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n'
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def test_an_upstream_closing_mid_body_is_named(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async with closes_mid_body() as upstream:
        sidecar = await sidecar_factory(upstream)
        with caplog.at_level(logging.WARNING, logger="tether.sidecar"):
            async with http.post(
                f"http://127.0.0.1:{sidecar.port}{MCP}", json={"jsonrpc": "2.0"}, headers=HEADERS
            ) as resp:
                assert resp.status == 200
                await resp.read()
            await sidecar_factory.stop_all()
    broke = [line for line in lines(caplog, logging.WARNING) if "upstream body broke" in line]
    assert broke == ["POST /mcp: upstream body broke: the upstream closed the response mid-body"]
    assert not [line for line in lines(caplog) if "TransferEncodingError" in line]


@pytest.mark.parametrize("no_ids", [False, True], ids=["ids", "no-ids"])
async def test_a_reconnect_says_where_it_resumed(
    no_ids: bool,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A GET stream whose upstream connection is cut: resumed after the upstream's last event
    id, or (an upstream without ids) reopened; never "resumed after ''"."""
    async with numbered_upstream(no_ids=no_ids) as upstream:
        host, _, port = upstream.removeprefix("http://").partition(":")
        async with Relay(host, int(port)) as relay:
            sidecar = await sidecar_factory(f"http://127.0.0.1:{relay.port}")
            base = f"http://127.0.0.1:{sidecar.port}"
            sid = await initialize(http, base)
            sse = {**HEADERS, "Mcp-Session-Id": sid, "Accept": "text/event-stream"}
            with caplog.at_level(logging.INFO, logger="tether.sidecar"):
                async with http.get(base + MCP, headers=sse) as resp:
                    got = 0
                    async for _ in events(resp):
                        got += 1
                        if got == 3:
                            relay.cut()
                        if got == 6:
                            break
            await sidecar_factory.stop_all()
    said = [line for line in lines(caplog, logging.INFO) if "upstream" in line]
    assert not [line for line in said if "after ''" in line]
    upstream_lines = [line.split(": ", 1)[1] for line in said if line.startswith("stream ")]
    if no_ids:
        assert "reopened upstream stream" in upstream_lines
    else:
        assert [
            line for line in upstream_lines if line.startswith("resumed upstream after event 'get/")
        ]


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    async with running_control_plane(tmp_path) as running:
        yield running


async def test_a_sidecar_taking_up_its_own_session_does_not_adopt_it_from_itself(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = {"control_plane": control_plane.address, "report_interval": 0.01}
    async with numbered_upstream() as upstream:
        first = await sidecar_factory(upstream, owner="sidecar-a", **cfg)
        sid = await initialize(http, f"http://127.0.0.1:{first.port}")
        await sidecar_factory.stop_all()  # flushes the session to the control plane

        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tether.sidecar"):
            # The same name again (a StatefulSet pod restarted), then another sidecar.
            for owner in ("sidecar-a", "sidecar-b"):
                sidecar = await sidecar_factory(upstream, owner=owner, **cfg)
                async with http.post(
                    f"http://127.0.0.1:{sidecar.port}{MCP}",
                    json={"jsonrpc": "2.0", "id": 2, "method": "ping"},
                    headers={**HEADERS, "Mcp-Session-Id": sid},
                ) as resp:
                    assert resp.status == 200, await resp.text()
                await sidecar_factory.stop_all()
    taken = [line for line in lines(caplog, logging.INFO) if line.startswith(f"session {sid} ")]
    assert [line.split(" at epoch")[0] for line in taken] == [
        f"session {sid} restored from the control plane",
        f"session {sid} adopted from sidecar-a",
    ]
    assert "this sidecar already owned it" in taken[0]


async def test_a_client_ending_its_session_leaves_no_warning(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ordinary exit: a call streams, the client deletes its session at once (positions
    still on their way to the control plane), then a late request of the same client comes.
    Nothing here is wrong, so nothing is logged at WARNING by the sidecar or the control
    plane; the late request is still refused (404) as for any unknown session."""
    caplog.set_level(logging.DEBUG)
    async with numbered_upstream() as upstream:
        sidecar = await sidecar_factory(
            upstream,
            owner="sidecar-a",
            control_plane=control_plane.address,
            report_interval=0.01,
            fingerprint_key=b"k" * 32,  # else a warning about development settings
        )
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        async with http.post(base + MCP, json=count_call(20, interval_ms=1), headers=headers) as r:
            assert len([e async for e in events(r)]) == 21
        async with http.delete(base + MCP, headers=headers) as resp:
            assert resp.status in (200, 204)
        async with http.post(
            base + MCP, json={"jsonrpc": "2.0", "id": 3, "method": "ping"}, headers=headers
        ) as resp:
            assert resp.status == 404
        await sidecar_factory.stop_all()
    warnings = lines(caplog, logging.WARNING)
    assert warnings == []
