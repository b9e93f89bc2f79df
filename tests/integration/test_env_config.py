"""The real `tether` command configured only through `TETHER_*` variables, as a Kubernetes
ConfigMap does it: a control plane and a sidecar that report to each other, the downward-API
`POD_NAME` as the owner, a flag winning over its variable, and a bad value refused."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.procs import ProcessPool, free_port
from tests.support.waiting import eventually
from tether.api.client import SessionClient
from tether.model import SessionId

TETHER = [sys.executable, "-m", "tether.cli"]


def clean_env(**variables: str) -> dict[str, str]:
    """Exactly these TETHER_* variables: any inherited from the test runner are blanked
    (an empty variable counts as unset)."""
    inherited = {k: "" for k in os.environ if k.startswith("TETHER_") or k == "POD_NAME"}
    return {**inherited, **variables}


async def test_control_plane_and_sidecar_from_variables_only(
    procs: ProcessPool, numbered_upstream: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cp_port, port, admin = free_port(), free_port(), free_port()
    await procs.start(
        [*TETHER, "control-plane"],
        name="control-plane",
        ready_port=cp_port,
        env=clean_env(
            TETHER_LISTEN=f"127.0.0.1:{cp_port}",
            TETHER_STORE=f"sqlite:///{tmp_path / 'sessions.db'}",
            TETHER_SESSION_TTL="120",
            TETHER_FLUSH_INTERVAL="0",
        ),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cp_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        async with numbered_upstream() as upstream:
            await procs.start(
                [*TETHER, "sidecar"],
                name="sidecar",
                ready_port=port,
                env=clean_env(
                    TETHER_LISTEN=f"127.0.0.1:{port}",
                    TETHER_UPSTREAM=upstream,
                    TETHER_ADMIN_LISTEN=f"127.0.0.1:{admin}",
                    TETHER_CONTROL_PLANE=f"127.0.0.1:{cp_port}",
                    TETHER_REPORT_INTERVAL="0.01",
                    POD_NAME="mcp-example-7d9f-abcde",
                ),
            )
            async with http.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                assert resp.status == 200
            body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
            async with http.post(f"http://127.0.0.1:{port}/mcp", json=body) as resp:
                assert resp.status == 200
                session_id = SessionId(resp.headers["Mcp-Session-Id"])

            client = SessionClient(channel)
            record = await eventually(  # reports are asynchronous
                lambda: client.get_session(session_id, timeout=5),
                timeout=10,
                interval=0.02,
                what="the session reported",
            )
            assert record is not None
            assert record.owner == "mcp-example-7d9f-abcde"


async def test_flag_wins_over_its_variable(
    procs: ProcessPool, numbered_upstream: Any, http: aiohttp.ClientSession
) -> None:
    port, admin = free_port(), free_port()
    async with numbered_upstream() as upstream:
        await procs.start(
            [*TETHER, "sidecar", "--listen", f"127.0.0.1:{port}"],
            name="sidecar",
            ready_port=port,
            env=clean_env(
                TETHER_LISTEN="not-an-address",  # overridden by --listen
                TETHER_UPSTREAM=upstream,
                TETHER_ADMIN_LISTEN=f"127.0.0.1:{admin}",
            ),
        )
        async with http.get(f"http://127.0.0.1:{admin}/healthz") as resp:
            assert resp.status == 200


@pytest.mark.parametrize(
    ("command", "env", "message"),
    [
        (
            "sidecar",
            {"TETHER_REPLAY_EVENTS": "many"},
            "environment variable TETHER_REPLAY_EVENTS='many' is not a valid int",
        ),
        (
            "control-plane",
            {"TETHER_SESSION_TTL": "1h"},
            "environment variable TETHER_SESSION_TTL='1h' is not a valid float",
        ),
        ("sidecar", {"TETHER_LISTEN": "", "TETHER_UPSTREAM": "http://x"}, "--listen"),
    ],
)
async def test_bad_variable_is_a_usage_error_naming_it(
    command: str, env: dict[str, str], message: str
) -> None:
    base = {"TETHER_LISTEN": "127.0.0.1:0", "TETHER_UPSTREAM": "http://127.0.0.1:1"}
    proc = await asyncio.create_subprocess_exec(
        *TETHER,
        command,
        env={**os.environ, **clean_env(**{**base, **env})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2, err.decode()
    assert message in err.decode()
    assert "Traceback" not in err.decode()
