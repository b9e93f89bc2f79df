"""`tether demo` as a user runs it: start, follow the banner, use it, Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import mcp_types
import pytest
from mcp import Client

from tests.support.waiting import eventually

pytestmark = pytest.mark.slow


async def read_banner(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(30):
        while True:
            raw = await proc.stdout.readline()
            assert raw, "tether demo exited before printing its banner:\n" + "".join(lines)
            lines.append(raw.decode())
            if "Ctrl-C stops everything." in lines[-1]:
                return "".join(lines)


async def test_demo_runs_serves_survives_a_server_kill_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.cli",
        "demo",
        "--port",
        "0",
        "--admin-port",
        "0",
        "--mcp-port",
        "0",
        "--control-plane-port",
        "0",
        "--db",
        str(tmp_path / "demo.db"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        banner = await read_banner(proc)
        url_match = re.search(r"through the sidecar:\s+(\S+)", banner)
        pid_match = re.search(r"kill -9 (\d+)", banner)
        assert url_match is not None
        assert pid_match is not None
        url, server_pid = url_match.group(1), int(pid_match.group(1))
        port_match = re.search(r"MCP server, direct:\s+http://127.0.0.1:(\d+)/mcp", banner)
        assert port_match is not None
        server_port = int(port_match.group(1))
        assert f"python -m tether.demo_client {url}" in banner

        got: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            got.append(progress)

        async with Client(url, mode="legacy") as client:
            result = await client.call_tool(
                "count", {"n": 5, "interval_ms": 10}, progress_callback=on_progress
            )
        assert not result.is_error
        assert got == [1.0, 2.0, 3.0, 4.0, 5.0]

        # Killing the example server: the demo restarts it and keeps serving.
        os.kill(server_pid, signal.SIGKILL)

        async def list_tools() -> mcp_types.ListToolsResult:
            async with Client(url, mode="legacy") as client:
                return await client.list_tools()

        tools = await eventually(  # an exception: not up again yet
            list_tools, timeout=30, interval=0.2, ignoring=(Exception,), what="the server back"
        )
        assert "count" in {t.name for t in tools.tools}

        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            code = await proc.wait()
        assert code == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # The restarted server went down with the demo: nothing listens on its port any more.
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", server_port)
