"""Bad input from every side: a control plane that answers garbage, oversized and invalid
gRPC messages, slowloris clients. Each gets a clear error; the process keeps serving and no
stored session is harmed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web

from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.server import RunningControlPlane, start_control_plane
from tests.integration.conftest import SidecarFactory, serve_app
from tests.integration.test_proxy import HEADERS, MCP, count_call, initialize, progress_numbers
from tests.support.sse_client import collect
from tether.api.client import SessionClient
from tether.api.v1 import sessions_pb2 as pb
from tether.api.v1 import sessions_pb2_grpc as pb_grpc
from tether.model import SessionId


@pytest.fixture
async def control_plane(tmp_path: Path) -> Any:
    cp = await start_control_plane(
        ControlPlaneConfig(listen="127.0.0.1:0", store=SqliteUrl(tmp_path / "s.db"))
    )
    try:
        yield cp
    finally:
        await cp.stop()


async def test_a_control_plane_that_answers_garbage_does_not_stop_the_sidecar(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    """The sidecar's control-plane address answers HTTP/1 junk instead of gRPC: a session the
    sidecar does not hold cannot be adopted (503, retry; never forwarded unchecked: continuity
    invariant 12), reporting keeps retrying, the streams of its own sessions flow."""

    async def junk(_: web.Request) -> web.Response:
        return web.Response(body=b"\x00\xffnot grpc at all", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", junk)
    async with serve_app(app) as garbage, numbered_upstream(interval_ms=1) as up:
        sidecar = await sidecar_factory(
            up, control_plane=garbage.removeprefix("http://"), owner="s"
        )
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        async with http.post(base + MCP, json=count_call(5), headers=headers) as resp:
            assert progress_numbers(await collect(resp)) == [1, 2, 3, 4, 5]
        # A session the sidecar never saw: it asks the "control plane", survives the answer.
        other = {**HEADERS, "Mcp-Session-Id": "never-seen-here"}
        async with http.post(base + MCP, json=count_call(2), headers=other) as resp:
            assert resp.status == 503, await resp.text()
            assert resp.headers["Retry-After"] == "1"
        async with http.post(base + MCP, json=count_call(3), headers=headers) as resp:
            assert progress_numbers(await collect(resp)) == [1, 2, 3]
        reporter = sidecar.proxy.continuity.reporter
        assert reporter is not None
        assert not reporter.connected
        assert reporter.pending >= 1  # kept for when a real control plane answers
        # Nothing here can ever acknowledge them: stop without waiting out the 5 s flush.
        await reporter.stop(flush_timeout=0)


async def test_oversized_and_invalid_grpc_messages_get_clear_statuses(
    control_plane: RunningControlPlane,
) -> None:
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        stub: Any = pb_grpc.SessionServiceStub(channel)
        client = SessionClient(channel)
        # A real session that must come out unharmed.
        ok = pb.ReportEventsRequest(
            batch_id=1,
            upserts=[pb.SessionUpsert(session=pb.Session(session_id="keep", owner="a"))],
        )
        call = stub.ReportEvents()
        await call.write(ok)
        assert not (await call.read()).rejections
        await call.done_writing()
        # Over gRPC's 4 MiB message limit.
        huge = pb.Session(session_id="big", owner="a", initialize_request=b"x" * (5 << 20))
        call = stub.ReportEvents()
        await call.write(
            pb.ReportEventsRequest(batch_id=1, upserts=[pb.SessionUpsert(session=huge)])
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Ids that must never become keys.
        for bad in ("", "../etc/passwd", "a/b", "x" * 300, ".hidden", "spa ce"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetSession(pb.GetSessionRequest(session_id=bad), timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        # Bytes that are not a protobuf message at all.
        raw = channel.unary_unary(
            "/tether.v1.SessionService/GetSession",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\xff\xff\xff\xff garbage", timeout=5)
        # grpc.aio reports an undecodable request as UNKNOWN, naming the parse failure.
        assert "Error parsing message" in (info.value.details() or "")
        # Still serving, and the stored session is intact.
        record = await client.get_session(SessionId("keep"), timeout=5)
        assert record is not None
        assert record.owner == "a"
        assert await client.get_session(SessionId("big"), timeout=5) is None


async def test_slowloris_clients_do_not_stop_the_sidecar(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    """Connections that dribble half a request line hold only a socket each; everyone else
    is served meanwhile."""
    async with numbered_upstream(interval_ms=1) as up:
        sidecar = await sidecar_factory(up)
        writers = []
        for _ in range(200):
            _, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
            writer.write(b"POST /mcp HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            writers.append(writer)
        await asyncio.gather(*(w.drain() for w in writers))
        try:
            base = f"http://127.0.0.1:{sidecar.port}"
            sid = await initialize(http, base)
            headers = {**HEADERS, "Mcp-Session-Id": sid}
            async with http.post(base + MCP, json=count_call(3), headers=headers) as resp:
                assert progress_numbers(await collect(resp)) == [1, 2, 3]
        finally:
            for w in writers:
                w.transport.abort()


async def test_malformed_http_gets_400_and_the_sidecar_keeps_serving(
    sidecar_factory: SidecarFactory, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream() as up:
        sidecar = await sidecar_factory(up)
        for junk in (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n",  # TLS to plaintext
            b"GET /mcp HTTP/9.9\r\n\r\n",
            b"POST /mcp HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
            b"GET /mcp HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
            writer.write(junk)
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            assert status[:7] == b"HTTP/1.", (junk, status)
            assert status.split(b" ")[1] == b"400", (junk, status)
        base = f"http://127.0.0.1:{sidecar.port}"
        await initialize(http, base)


@pytest.mark.parametrize(
    "session_id", ["../../etc/passwd", "a" * 5000, "spaces in id", "ünï", ".dot"]
)
async def test_invalid_session_ids_are_survived_and_never_stored(
    control_plane: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
    session_id: str,
) -> None:
    """A session id the control plane would refuse as a key: the sidecar forwards the
    request (the upstream decides), reports nothing for it, and keeps serving."""
    async with numbered_upstream(strict_sessions=True) as up:
        sidecar = await sidecar_factory(up, control_plane=control_plane.address, owner="s")
        base = f"http://127.0.0.1:{sidecar.port}"
        headers = {**HEADERS, "Mcp-Session-Id": session_id}
        try:
            async with http.post(base + MCP, json=count_call(2), headers=headers) as resp:
                assert resp.status == 404  # the (strict) upstream does not know it
        except ValueError:
            pytest.skip("the HTTP client refuses to send this header value")
        sid = await initialize(http, base)
        reporter = sidecar.proxy.continuity.reporter
        assert reporter is not None
        await asyncio.wait_for(reporter.flushed(), 10)
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        page = await SessionClient(channel).list_sessions(timeout=5)
    assert [s.session_id for s in page.sessions] == [sid]
