"""What real `tether` processes write to stderr: one JSON object per line with
`--log-format json` (or `TETHER_LOG_FORMAT=json`), and the sidecar's access line per request on
the proxied port, for a POST, a streamed POST, a GET stream ended by the server and one the
client closed; none with `--no-access-log` (`TETHER_ACCESS_LOG=0`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from tests.integration.test_authz import record, report
from tests.integration.test_env_config import clean_env
from tests.support.procs import ManagedProcess, ProcessPool, free_port
from tests.support.waiting import eventually
from tether.api.client import SessionClient
from tether.model import OwnerName, ReportBatch, SessionId, SessionUpsert

TETHER = [sys.executable, "-m", "tether.cli"]
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ACCESS = "tether.sidecar.access"


def json_lines(proc: ManagedProcess) -> list[dict[str, Any]]:
    """Every line the process wrote, each parsed as JSON (the run markers of `procs` aside);
    a line that is not a JSON object fails the test."""
    out = []
    for line in proc.log_path.read_text().splitlines():
        if line.startswith("--- start #"):
            continue
        parsed = json.loads(line)
        assert isinstance(parsed, dict), line
        for key in ("time", "level", "logger", "message"):
            assert key in parsed, line
        assert RFC3339_UTC.match(parsed["time"]), parsed["time"]
        out.append(parsed)
    return out


def access_lines(proc: ManagedProcess) -> list[dict[str, Any]]:
    return [line for line in json_lines(proc) if line["logger"] == ACCESS]


async def start_sidecar(
    procs: ProcessPool, upstream: str, *flags: str, env: dict[str, str] | None = None
) -> tuple[ManagedProcess, str]:
    port = free_port()
    proc = await procs.start(
        [*TETHER, *flags, "sidecar", "--listen", f"127.0.0.1:{port}", "--upstream", upstream],
        name="sidecar",
        ready_port=port,
        env=clean_env(**(env or {})),
    )
    return proc, f"http://127.0.0.1:{port}/mcp"


async def initialize(http: aiohttp.ClientSession, url: str) -> str:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    async with http.post(url, json=body) as resp:
        assert resp.status == 200
        return resp.headers["Mcp-Session-Id"]


async def test_sidecar_json_lines_and_access_log(
    procs: ProcessPool, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream() as upstream:
        sidecar, url = await start_sidecar(procs, upstream, "--log-format", "json")
        session = await initialize(http, url)
        headers = {"Mcp-Session-Id": session, "Accept": "application/json, text/event-stream"}
        count = {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "count", "arguments": {"n": 3, "interval_ms": 1}},
        }
        async with http.post(url, json=count, headers=headers) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            streamed = await resp.read()
        assert b"counted 3" in streamed
        # A POST whose client leaves before any of its response went out: on 2025-11-25 a
        # response starts with a priming event, which waits for the upstream's answer (3 s
        # here) up to a grace, and the headers wait for it (`sidecar.writer` rule 5).
        arguments = {"n": 0, "interval_ms": 3000}
        slow = {**count, "id": 8, "params": {"name": "count", "arguments": arguments}}
        primed = {**headers, "MCP-Protocol-Version": "2025-11-25"}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.1), http.post(url, json=slow, headers=primed) as resp:
                await resp.read()

        # A GET stream the client closes after its first event.
        sse = {"Mcp-Session-Id": session, "Accept": "text/event-stream"}
        async with http.get(url, headers=sse) as resp:
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
        # A GET stream the server ends: the session's DELETE ends its streams.
        async with http.get(url, headers=sse) as resp:
            await resp.content.readuntil(b"\n\n")
            async with http.delete(url, headers={"Mcp-Session-Id": session}) as deleted:
                assert deleted.status in (200, 204)
            ended = await resp.read()  # returns once the sidecar ends the stream

        def six() -> list[dict[str, Any]] | None:
            found = access_lines(sidecar)
            return found if len(found) >= 6 else None

        lines = await eventually(six, timeout=10, what="six access lines")
        assert lines is not None
    by_method: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_method.setdefault(line["http_method"], []).append(line)
    init, call, left = by_method["POST"]
    assert init["level"] == "INFO"
    assert init["mcp_method"] == "initialize"
    assert init["request_id"] == 1
    assert init["status"] == 200
    assert init["path"] == "/mcp"
    assert init["bytes_sent"] > 0
    assert init["session"] == session  # from the response: the request had none yet
    assert call["mcp_method"] == "tools/call"
    assert call["request_id"] == 7
    assert call["session"] == session
    assert call["bytes_sent"] >= len(streamed)
    assert isinstance(call["duration_ms"], float)
    assert call["message"].startswith("POST /mcp 200 ")
    assert f"session={session} mcp=tools/call id=7" in call["message"]

    assert left["request_id"] == 8
    assert left["client_closed"] is True
    assert left["status"] == 499, left  # its headers never went out
    assert left["bytes_sent"] == 0

    closed, ended_get = by_method["GET"]
    assert closed["client_closed"] is True
    assert closed["status"] == 200
    assert closed["bytes_sent"] > 0
    assert closed["session"] == session
    assert "client_closed" not in ended_get  # the server ended it: aiohttp's own line
    assert ended_get["status"] == 200
    assert ended_get["bytes_sent"] >= len(ended)
    (delete,) = by_method["DELETE"]
    assert delete["session"] == session
    assert "mcp_method" not in delete
    # The sidecar's other lines are JSON too (json_lines parsed every line): its start line.
    assert any(line["message"].startswith("sidecar listening") for line in json_lines(sidecar))


async def test_no_access_log_and_the_variables(
    procs: ProcessPool, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream() as upstream:
        sidecar, url = await start_sidecar(
            procs, upstream, env={"TETHER_LOG_FORMAT": "json", "TETHER_ACCESS_LOG": "0"}
        )
        session = await initialize(http, url)
        async with http.get(
            url, headers={"Mcp-Session-Id": session, "Accept": "text/event-stream"}
        ) as resp:
            await resp.content.readuntil(b"\n\n")
        await sidecar.stop()
    lines = json_lines(sidecar)  # JSON from the variable alone
    assert any(line["message"] == "sidecar stopping" for line in lines)
    assert [line for line in lines if line["logger"] == ACCESS] == []


async def test_text_access_line(
    procs: ProcessPool, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async with numbered_upstream() as upstream:
        sidecar, url = await start_sidecar(procs, upstream)
        session = await initialize(http, url)

        def line() -> str | None:
            for text in sidecar.log_path.read_text().splitlines():
                if f" INFO {ACCESS}: POST /mcp 200 " in text:
                    return text
            return None

        found = await eventually(line, timeout=10, what="the access line")
    assert found is not None
    assert found.endswith(f" session={session} mcp=initialize id=1")


async def test_control_plane_json_lines(procs: ProcessPool, tmp_path: Path) -> None:
    port = free_port()
    cp = await procs.start(
        [*TETHER, "--log-format=json", "control-plane", "--listen", f"127.0.0.1:{port}"],
        name="control-plane",
        ready_port=port,
        env=clean_env(TETHER_STORE=f"sqlite:///{tmp_path / 'sessions.db'}"),
    )
    sid = SessionId("4f1c2d")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = SessionClient(channel)
        ack = await report(client, ReportBatch(1, upserts=(SessionUpsert(record(sid, "pod-a")),)))
        assert ack.rejections == ()
        await client.claim_session(sid, owner=OwnerName("pod-b"), timeout=5)
        await client.delete_session(sid, timeout=5)
    assert await cp.stop() == 0
    lines = json_lines(cp)
    assert lines[0]["logger"] == "controlplane.server"
    assert lines[0]["message"].startswith("control plane serving on ")
    deleted = [line for line in lines if line["message"].startswith(f"session {sid} deleted")]
    assert [(line["session"], line["owner"]) for line in deleted] == [(sid, "pod-b")]
    claimed = [line for line in lines if line["message"].startswith(f"session {sid} claimed")]
    assert [(line["session"], line["owner"]) for line in claimed] == [(sid, "pod-b")]
