"""Log lines that used to mislead (issue 14), each reproduced against real parts: a refused
upstream connection, an upstream that closes mid-body, a sidecar taking up its own session
again, and a client that ends its session while reports and requests are still on the way."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import pytest

import controlplane.identity
import controlplane.server
from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.server import RunningControlPlane, start_control_plane
from tests.integration.conftest import SidecarFactory
from tests.integration.test_ownership import running_control_plane
from tests.integration.test_proxy import HEADERS, MCP, count_call, initialize
from tests.support.procs import free_port
from tests.support.relay import Relay
from tests.support.sse_client import events
from tests.support.waiting import eventually
from tether.api.client import SessionClient
from tether.model import SessionId

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


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
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()  # the truncated answer is not passed on as a whole one
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


class HeldDeletes(_ServerInterceptor):
    """Holds the control plane's DeleteSession calls until `release` is set: the moment
    between a client's DELETE answered by its sidecar and the delete stored."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = 0

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        if details.method.endswith("/DeleteSession"):
            self.held += 1
            await self.release.wait()
        return await continuation(details)


@pytest.fixture
async def held_deletes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[RunningControlPlane, HeldDeletes]]:
    """A real control plane whose deletes wait for the test (an interceptor added where the
    server takes its interceptors from)."""
    held = HeldDeletes()
    production = controlplane.identity.server_interceptors
    monkeypatch.setattr(
        controlplane.server, "server_interceptors", lambda security: [*production(security), held]
    )
    plane = await start_control_plane(
        ControlPlaneConfig(listen="127.0.0.1:0", store=SqliteUrl(tmp_path / "s.db"))
    )
    try:
        yield plane, held
    finally:
        held.release.set()
        await plane.stop()


async def test_a_client_ending_its_session_leaves_no_warning(
    held_deletes: tuple[RunningControlPlane, HeldDeletes],
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ordinary exit: a call streams, the client deletes its session, and a late request
    of the same client comes while the delete is still on its way to the control plane.
    Nothing here is wrong, so nothing is logged at WARNING by the sidecar or the control
    plane; the late request is refused (404) as for any unknown session, not served by a
    session restored from the stored record (which the delete would then end again, with a
    "deleted in the control plane" warning)."""
    control_plane, deletes = held_deletes
    caplog.set_level(logging.DEBUG)
    async with numbered_upstream() as upstream:
        sidecar = await sidecar_factory(
            upstream,
            owner="sidecar-a",
            control_plane=control_plane.address,
            report_interval=0.01,
            fingerprint_key=b"k" * 32,  # else a warning about development settings
        )
        await eventually(
            sidecar.proxy.continuity.watch_synced.is_set, timeout=10, what="the ownership watch"
        )
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        async with http.post(base + MCP, json=count_call(20, interval_ms=1), headers=headers) as r:
            assert len([e async for e in events(r)]) == 21
        reporter = sidecar.proxy.continuity.reporter
        assert reporter is not None
        await eventually(lambda: reporter.pending == 0, timeout=10, what="reports settled")
        async with http.delete(base + MCP, headers=headers) as resp:
            assert resp.status in (200, 204)
        await eventually(lambda: deletes.held == 1, timeout=10, what="the delete on its way")
        async with http.post(
            base + MCP, json={"jsonrpc": "2.0", "id": 3, "method": "ping"}, headers=headers
        ) as resp:
            assert resp.status == 404
        deletes.release.set()
        async with grpc.aio.insecure_channel(control_plane.address) as channel:
            client = SessionClient(channel)
            await eventually(lambda: _gone(client, sid), timeout=10, what="the delete stored")
        await sidecar_factory.stop_all()
    assert lines(caplog, logging.WARNING) == []
    late = [line for line in lines(caplog) if line.startswith(f"session {sid}: unknown here")]
    assert late  # the late request's line, at DEBUG


async def _gone(client: SessionClient, sid: str) -> bool:
    return await client.get_session(SessionId(sid), timeout=5) is None
