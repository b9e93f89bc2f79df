"""A busy port is one line and exit 1 for every command that binds (`tether.ports`), never a
shared port: real processes against a port bound first."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.limits import GRPC_SERVER_OPTIONS
from controlplane.server import start_control_plane
from tests.support.procs import free_port

DEADLINE = 30.0


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something listens on (as a server would: SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def tether(*argv: str | int, cwd: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.cli",
        *(str(a) for a in argv),
        cwd=cwd,
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


INJECTOR = ["injector", "--tls-cert", "tls.crt", "--tls-key", "tls.key", "--sidecar-image", "t:1"]

INFO_LOG = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO ")


def one_line(err: str) -> str:
    """The error line: besides it only INFO log lines, and gRPC's C core's own line about
    the bind."""
    lines = [
        line for line in err.splitlines() if "add_port.cc" not in line and not INFO_LOG.match(line)
    ]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (
            ["sidecar", "--listen", "127.0.0.1:{busy}", "--upstream", "http://127.0.0.1:9"],
            "--listen",
        ),
        (
            [
                "sidecar",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:{busy}",
                "--upstream",
                "http://127.0.0.1:9",
            ],
            "--admin-listen",
        ),
        (["control-plane", "--listen", "127.0.0.1:{busy}"], "cannot listen on"),
        (
            ["control-plane", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:{busy}"],
            "--admin-listen",
        ),
        (
            # The port is checked before the certificate is read: these files need not exist.
            [*INJECTOR, "--listen", "127.0.0.1:{busy}"],
            "--listen",
        ),
        (
            [*INJECTOR, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:{busy}"],
            "--admin-listen",
        ),
        (["demo", "--port", "{busy}", "--admin-port", "0"], "--port"),
        (["demo", "--port", "0", "--admin-port", "{busy}"], "--admin-port"),
        (["demo", "--port", "0", "--admin-port", "0", "--mcp-port", "{busy}"], "--mcp-port"),
        (
            ["demo", "--port", "0", "--admin-port", "0", "--control-plane-port", "{busy}"],
            "--control-plane-port",
        ),
    ],
)
async def test_a_busy_port_is_one_line_and_exit_1(
    command: list[str], flag: str, busy_port: int, tmp_path: Path
) -> None:
    argv = [a.format(busy=busy_port) for a in command]
    code, err = await tether(*argv, cwd=tmp_path)
    line = one_line(err)
    assert code == 1, err
    assert f"{flag} 127.0.0.1:{busy_port}: address already in use" in line


async def test_a_second_control_plane_on_the_same_port_is_refused(tmp_path: Path) -> None:
    """The issue's split: gRPC's SO_REUSEPORT let a second control plane share the port, and
    clients alternated between two stores."""
    first = await start_control_plane(
        ControlPlaneConfig(listen="127.0.0.1:0", store=SqliteUrl(tmp_path / "a.db"))
    )
    try:
        code, err = await tether(
            "control-plane",
            "--listen",
            first.address,
            "--store",
            f"sqlite:///{tmp_path / 'b.db'}",
            cwd=tmp_path,
        )
        assert code == 1, err
        assert f"cannot listen on {first.address}: address already in use" in one_line(err)
        assert not (tmp_path / "b.db").exists()
    finally:
        await first.stop(grace=0.5)


async def test_grpc_itself_does_not_share_the_port() -> None:
    """`controlplane.limits`: with `grpc.so_reuseport` 0 the second bind fails in gRPC too
    (the case where another process takes the port between `check_free` and the bind)."""
    port = free_port()
    first = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
    second = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
    try:
        assert first.add_insecure_port(f"127.0.0.1:{port}") == port
        await first.start()
        with pytest.raises(RuntimeError):
            second.add_insecure_port(f"127.0.0.1:{port}")
    finally:
        await first.stop(None)
        await second.stop(None)
