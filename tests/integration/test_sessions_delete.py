"""`tether sessions delete` of a live session ends it where it is served (continuity
invariant 13), end to end with real processes: the control plane, the SDK demo server, a
sidecar, the `tether` command, and clients (raw HTTP and the official SDK client)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from tests.integration.test_proxy import HEADERS, MCP, initialize
from tests.support.procs import ProcessPool, free_port, python_module
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

DEADLINE = 30.0
RENEW = "0.2"
"""The sidecar renews its sessions this often: a session it still held would be back in the
control plane within a few renewals."""


async def tether(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.cli",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(DEADLINE):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def stack(procs: ProcessPool, tmp_path: Path) -> tuple[str, str]:
    """Control plane, MCP server and sidecar; returns (control plane address, sidecar URL)."""
    cp_port, mcp_port, port = free_port(), free_port(), free_port()
    await procs.start(
        python_module(
            "tether.cli",
            "control-plane",
            "--listen",
            f"127.0.0.1:{cp_port}",
            "--store",
            f"sqlite:///{tmp_path / 'sessions.db'}",
        ),
        name="control-plane",
        ready_port=cp_port,
    )
    await procs.start(
        python_module("tether.demo_server", "--port", mcp_port, "--log-level", "WARNING"),
        name="mcp-server",
        ready_port=mcp_port,
    )
    await procs.start(
        python_module(
            "tether.cli",
            "sidecar",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"http://127.0.0.1:{mcp_port}",
            "--control-plane",
            f"127.0.0.1:{cp_port}",
            "--owner",
            "pod-a",
            "--renew-interval",
            RENEW,
        ),
        name="sidecar",
        ready_port=port,
    )
    return f"127.0.0.1:{cp_port}", f"http://127.0.0.1:{port}"


async def listed(cp: str) -> list[str]:
    code, out, err = await tether("sessions", "list", "--control-plane", cp, "-o", "json")
    assert code == 0, err
    return [s["sessionId"] for s in json.loads(out).get("sessions", [])]


async def wait_listed(cp: str, sid: str) -> None:
    async def shown() -> bool:
        return sid in await listed(cp)

    await eventually(shown, timeout=DEADLINE, interval=0.1, what="the session reported")


async def test_a_deleted_session_gets_404_and_does_not_come_back(
    procs: ProcessPool, tmp_path: Path
) -> None:
    cp, base = await stack(procs, tmp_path)
    async with aiohttp.ClientSession() as http:
        sid = await initialize(http, base)
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        async with http.post(base + MCP, json=ping, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        await wait_listed(cp, sid)

        code, out, err = await tether("sessions", "delete", sid[:12], "--control-plane", cp)
        assert code == 1  # delete takes the whole id
        code, out, err = await tether("sessions", "delete", sid, "--control-plane", cp)
        assert (code, out) == (0, f"deleted session {sid}\n"), err

        async def answer_unless(ok: int) -> int | None:
            async with http.post(base + MCP, json=ping, headers=headers) as resp:
                await resp.read()
                return None if resp.status == ok else resp.status

        # The watch brings the delete to the sidecar: until then the session is served.
        status = await eventually(
            lambda: answer_unless(200), timeout=DEADLINE, what="the session ended"
        )
        assert status == 404
        await asyncio.sleep(float(RENEW) * 5)  # five renewals: the scenario, not a wait
        assert sid not in await listed(cp)


async def test_the_sdk_client_learns_its_session_is_gone(
    procs: ProcessPool, tmp_path: Path
) -> None:
    """The official SDK client (mcp 2.3) does not start a new session by itself on 404: its
    next call fails with the sidecar's JSON-RPC error, and a new client gets a new session.
    The deleted one does not come back."""
    cp, base = await stack(procs, tmp_path)
    async with Client(f"{base}/mcp", mode="legacy") as client:
        assert (await client.call_tool("echo", {"text": "a"})).content
        (first,) = await eventually(
            lambda: listed(cp), timeout=DEADLINE, interval=0.1, what="the session reported"
        )
        code, _, err = await tether("sessions", "delete", first, "--control-plane", cp)
        assert code == 0, err

        async def refused() -> str | None:
            try:
                await client.call_tool("echo", {"text": "b"})
            except MCPError as exc:
                return str(exc)
            return None  # the watch has not brought the delete to the sidecar yet

        error = await eventually(refused, timeout=DEADLINE, what="the call refused")
        assert error is not None
        assert "session not found" in error
    async with Client(f"{base}/mcp", mode="legacy") as client:
        result: Any = await client.call_tool("echo", {"text": "c"})
        assert result.content[0].text == "c"
        await asyncio.sleep(float(RENEW) * 5)  # five renewals: the scenario, not a wait
        now = await listed(cp)
    assert first not in now
    assert len(now) == 1  # the new client's session
