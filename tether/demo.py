"""`tether demo`: the example MCP server, a sidecar and a control plane on one machine.

The MCP server runs as a child process and is restarted whenever it dies, so a user can
`kill -9` it mid-stream and watch the client carry on. Everything stops on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.server import RunningControlPlane, start_control_plane
from sidecar.app import start_sidecar
from sidecar.config import SidecarConfig
from tether.ports import check_free
from tether.tasks import cancel_and_wait, spawn

log = logging.getLogger("tether.demo")


class Supervised:
    """A child process restarted (with a short pause) whenever it exits on its own."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.argv = argv
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None
        self.started = asyncio.Event()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            self.proc = await asyncio.create_subprocess_exec(*self.argv)
            await _wait_port(self.port, self.proc)
            self.started.set()
            code = await self.proc.wait()
            if self._stopping.is_set():
                return
            log.warning("MCP server (pid %d) exited with %d; restarting it", self.proc.pid, code)
            self.started.clear()
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _wait_port(port: int, proc: asyncio.subprocess.Process, patience: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while loop.time() < deadline and proc.returncode is None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise RuntimeError(f"MCP server did not start listening on port {port}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_demo(args: argparse.Namespace) -> int:
    host = args.host
    # Every port before anything starts: a busy one is one line (`tether.ports`), and the MCP
    # server's readiness check would otherwise take whoever holds its port for it.
    check_free(host, args.port, what="--port")
    check_free(host, args.admin_port, what="--admin-port")
    check_free("127.0.0.1", args.mcp_port, what="--mcp-port")
    check_free("127.0.0.1", args.control_plane_port, what="--control-plane-port")
    mcp_port = args.mcp_port or _free_port()
    server = Supervised(
        [
            sys.executable,
            "-m",
            "tether.demo_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(mcp_port),
            "--log-level",
            "WARNING",
        ],
        mcp_port,
    )
    supervisor = spawn(server.run(), name="demo-mcp-server")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sidecar = None
    control_plane: RunningControlPlane | None = None
    try:
        db: Path = args.db
        control_plane = await start_control_plane(
            ControlPlaneConfig(listen=f"127.0.0.1:{args.control_plane_port}", store=SqliteUrl(db))
        )
        started = spawn(server.started.wait(), name="demo-wait-server")
        await asyncio.wait([started, supervisor], return_when=asyncio.FIRST_COMPLETED)
        if supervisor.done():
            await supervisor  # re-raises why the server could not start
        sidecar = await start_sidecar(
            SidecarConfig(
                listen_host=host,
                listen_port=args.port,
                upstream=f"http://127.0.0.1:{mcp_port}",
                admin_host=host,
                admin_port=args.admin_port,
                control_plane=control_plane.address,
                owner="demo-sidecar",
            )
        )
        url = f"http://{host}:{sidecar.port}/mcp"
        pid = server.proc.pid if server.proc else "?"
        print(
            f"""
Tether demo is running.

  MCP endpoint, through the sidecar:  {url}
  Sidecar health and metrics:         http://{host}:{sidecar.admin_port}/metrics
  Example MCP server, direct:         http://127.0.0.1:{mcp_port}/mcp   (pid {pid})
  Control plane (gRPC, SQLite {db.name}): {control_plane.address}

Try it:
  python -m tether.demo_client {url} --n 50 --calls 3
      calls the `count` tool 3 times in one session; each call streams a progress
      notification every 200 ms.
  Point any MCP client at {url}
      (Streamable HTTP; tools count, echo, add, notify, touch, remember, server_info).
  kill -9 {pid}
      kills the MCP server mid-call. The demo restarts it, without its memory; the sidecar
      re-initializes the session, so the client keeps its session: the call that was in
      flight ends with a clear error, the next call works.
  tether sessions list --control-plane {control_plane.address}
      shows the sessions the control plane keeps (also: get ID, watch, delete ID).

Ctrl-C stops everything.
""",
            flush=True,
        )
        await stop.wait()
        print("stopping...", flush=True)
    finally:
        if sidecar is not None:
            await sidecar.stop()
        if control_plane is not None:
            await control_plane.stop()
        await server.stop()
        await cancel_and_wait(supervisor)
    return 0


DEMO_MODULES = ("mcp", "uvicorn")
"""What the example server and client need: the `demo` extra (the sidecar needs neither)."""


def missing_demo_modules() -> list[str]:
    return [name for name in DEMO_MODULES if importlib.util.find_spec(name) is None]


def _run(args: argparse.Namespace) -> int:
    missing = missing_demo_modules()
    if missing:
        print(
            f"tether demo: the example MCP server needs {', '.join(missing)}: "
            "install the demo extra (pip install 'tether[demo]', or from a checkout "
            "pip install '.[demo]')",
            file=sys.stderr,
        )
        return 1
    args.db = Path(args.db).resolve()
    try:
        return asyncio.run(run_demo(args))
    except OSError as exc:
        print(f"tether demo: {exc}", file=sys.stderr)
        return 1


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run everything on this machine with the bundled MCP server")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8930, help="sidecar port (default 8930; 0 = any)")
    p.add_argument("--admin-port", type=int, default=8932, help="sidecar admin port (default 8932)")
    p.add_argument("--mcp-port", type=int, default=8931, help="example MCP server port (0 = any)")
    p.add_argument(
        "--control-plane-port", type=int, default=8933, help="control plane port (0 = any)"
    )
    p.add_argument(
        "--db",
        default="tether-demo.db",
        help="SQLite file of the control plane (default %(default)s)",
    )
    p.set_defaults(run=_run)
