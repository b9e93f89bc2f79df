"""TLS, mutual TLS and bearer tokens between sidecars, the CLI and the control plane; etcd
with authentication on. Certificates are made in the test; nothing is mocked."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.config import (
    ControlPlaneConfig,
    EtcdTls,
    EtcdUrl,
    SqliteUrl,
    parse_store_url,
)
from controlplane.server import RunningControlPlane, start_control_plane
from controlplane.store.protocol import StoreError
from tests.integration.conftest import SidecarFactory
from tests.integration.test_proxy import initialize
from tests.support.certs import CertificateAuthority, Pair
from tests.support.etcd import etcd_available, start_etcd
from tests.support.procs import free_port
from tests.support.waiting import eventually
from tether.api.client import SessionClient
from tether.grpc_security import ClientSecurity, ServerSecurity, TokenFile, open_channel
from tether.model import OwnerName, SessionEventType, SessionId, SessionRecord, SessionUpsert


@dataclass
class Pki:
    ca: CertificateAuthority
    server: Pair
    client: Pair
    rogue_client: Pair
    token: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority(tmp_path)
    rogue = CertificateAuthority(tmp_path, name="rogue-ca")
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    return Pki(
        ca=ca,
        server=ca.issue("control-plane", server=True),
        client=ca.issue("sidecar", server=False),
        rogue_client=rogue.issue("intruder", server=False),
        token=token,
    )


@pytest.fixture
async def secure_cp(pki: Pki, tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    security = ServerSecurity(
        cert=pki.server.cert,
        key=pki.server.key,
        client_ca=pki.ca.pair.cert,
        token_file=pki.token,
    )
    cp = await start_control_plane(
        ControlPlaneConfig(
            listen="127.0.0.1:0", store=SqliteUrl(tmp_path / "s.db"), security=security
        )
    )
    try:
        yield cp
    finally:
        await cp.stop()


async def list_with(address: str, security: ClientSecurity) -> grpc.StatusCode:
    async with open_channel(address, security) as channel:
        try:
            await SessionClient(channel).list_sessions(timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_mutual_tls_and_token_are_required(pki: Pki, secure_cp: RunningControlPlane) -> None:
    good = ClientSecurity(
        ca=pki.ca.pair.cert, cert=pki.client.cert, key=pki.client.key, token_file=pki.token
    )
    assert await list_with(secure_cp.address, good) == grpc.StatusCode.OK
    # Every call shape carries the token: unary-stream (watch) too.
    async with open_channel(secure_cp.address, good) as channel:
        watch = SessionClient(channel).watch_sessions()
        first = await asyncio.wait_for(anext(watch), 5)
        await watch.aclose()
    assert first.type is SessionEventType.SYNCED
    wrong_token = pki.token.with_name("wrong")
    wrong_token.write_text("guess")
    cases = {
        "plaintext": ClientSecurity(token_file=pki.token),
        "no client certificate": ClientSecurity(ca=pki.ca.pair.cert, token_file=pki.token),
        "client certificate from another CA": ClientSecurity(
            ca=pki.ca.pair.cert,
            cert=pki.rogue_client.cert,
            key=pki.rogue_client.key,
            token_file=pki.token,
        ),
        "no token": ClientSecurity(ca=pki.ca.pair.cert, cert=pki.client.cert, key=pki.client.key),
        "wrong token": ClientSecurity(
            ca=pki.ca.pair.cert, cert=pki.client.cert, key=pki.client.key, token_file=wrong_token
        ),
    }
    for what, security in cases.items():
        code = await list_with(secure_cp.address, security)
        expected = (
            grpc.StatusCode.UNAUTHENTICATED if "token" in what else grpc.StatusCode.UNAVAILABLE
        )
        assert code == expected, what


async def test_health_checks_need_no_token(pki: Pki, secure_cp: RunningControlPlane) -> None:
    """Kubernetes gRPC probes carry no token; they still need the TLS handshake."""
    security = ClientSecurity(ca=pki.ca.pair.cert, cert=pki.client.cert, key=pki.client.key)
    async with open_channel(secure_cp.address, security) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_sidecar_reports_over_mutual_tls_with_a_token(
    pki: Pki,
    secure_cp: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    security = ClientSecurity(
        ca=pki.ca.pair.cert, cert=pki.client.cert, key=pki.client.key, token_file=pki.token
    )
    async with numbered_upstream() as up:
        sidecar = await sidecar_factory(
            up, control_plane=secure_cp.address, control_plane_security=security, owner="tls"
        )
        sid = await initialize(http, f"http://127.0.0.1:{sidecar.port}")
        reporter = sidecar.proxy.continuity.reporter
        assert reporter is not None
        await asyncio.wait_for(reporter.flushed(), 10)
    async with open_channel(secure_cp.address, security) as channel:
        record = await SessionClient(channel).get_session(SessionId(sid), timeout=5)
    assert record is not None
    assert record.owner == "tls"


async def test_sessions_cli_over_mutual_tls(pki: Pki, secure_cp: RunningControlPlane) -> None:
    base = [sys.executable, "-m", "tether.cli", "sessions", "list"]
    flags = [
        "--control-plane",
        secure_cp.address,
        "--control-plane-ca",
        str(pki.ca.pair.cert),
        "--control-plane-cert",
        str(pki.client.cert),
        "--control-plane-key",
        str(pki.client.key),
        "--control-plane-token-file",
        str(pki.token),
    ]
    ok = await asyncio.create_subprocess_exec(*base, *flags, stdout=asyncio.subprocess.PIPE)
    out, _ = await ok.communicate()
    assert ok.returncode == 0
    assert b"no sessions" in out
    bad = await asyncio.create_subprocess_exec(*base, *flags[:-2], stderr=asyncio.subprocess.PIPE)
    _, err = await bad.communicate()
    assert bad.returncode == 1
    assert b"UNAUTHENTICATED" in err


async def test_bad_tls_settings_are_clear_errors(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.cli",
        "control-plane",
        "--listen",
        "127.0.0.1:0",
        "--store",
        f"sqlite:///{tmp_path}/x.db",
        "--tls-client-ca",
        str(tmp_path / "ca.pem"),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"mutual TLS" in err
    assert b"Traceback" not in err


@pytest.mark.etcd
async def test_control_plane_on_etcd_with_authentication(tmp_path: Path) -> None:
    if not etcd_available():
        pytest.skip("etcd binary not installed (Debian etcd-server)")
    cluster = await asyncio.to_thread(start_etcd, tmp_path / "etcd")
    try:
        gateway = f"http://{cluster.endpoints[0]}"
        async with aiohttp.ClientSession() as http:
            for path, body in (
                ("/v3/auth/user/add", {"name": "root", "password": "rootpw"}),
                ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
                ("/v3/auth/enable", {}),
            ):
                async with http.post(gateway + path, json=body) as resp:
                    assert resp.status == 200, (path, await resp.text())
        url = parse_store_url(cluster.url)
        assert isinstance(url, EtcdUrl)
        # Without credentials the cluster refuses the control plane: at start or on first use.
        refused = ""
        try:
            denied = await start_control_plane(ControlPlaneConfig(listen="127.0.0.1:0", store=url))
        except Exception as exc:  # any refusal will do; what it says is checked below
            refused = str(exc)
        else:
            try:
                async with grpc.aio.insecure_channel(denied.address) as ch:
                    await SessionClient(ch).list_sessions(timeout=5)
            except grpc.aio.AioRpcError as exc:
                refused = exc.details() or ""
            finally:
                await denied.stop()
        assert any(w in refused.lower() for w in ("user", "auth", "permission", "token")), refused
        cp = await start_control_plane(
            ControlPlaneConfig(
                listen="127.0.0.1:0", store=url, etcd_username="root", etcd_password="rootpw"
            )
        )
        try:
            async with grpc.aio.insecure_channel(cp.address) as ch:
                page = await SessionClient(ch).list_sessions(timeout=5)
            assert page.sessions == ()
        finally:
            await cp.stop()
    finally:
        await asyncio.to_thread(cluster.stop)


@pytest.mark.etcd
async def test_control_plane_on_etcd_over_mutual_tls(pki: Pki, tmp_path: Path) -> None:
    """etcd serving clients over TLS with client-certificate auth: the store connects with
    the right certificate and is refused without one."""
    if not etcd_available():
        pytest.skip("etcd binary not installed (Debian etcd-server)")
    etcd_server = pki.ca.issue("etcd", server=True)
    client_port, peer_port = free_port(), free_port()
    url = f"https://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    log = (tmp_path / "etcd.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        "etcd",
        f"--data-dir={tmp_path / 'etcd-data'}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        f"--cert-file={etcd_server.cert}",
        f"--key-file={etcd_server.key}",
        f"--trusted-ca-file={pki.ca.pair.cert}",
        "--client-cert-auth",
        "--log-level=warn",
        "--logger=zap",
        stdout=log,
        stderr=log,
    )
    try:
        store = parse_store_url(f"etcd://127.0.0.1:{client_port}/tls-test")
        assert isinstance(store, EtcdUrl)
        tls = EtcdTls(
            ca=pki.ca.pair.cert.read_bytes(),
            cert=pki.client.cert.read_bytes(),
            key=pki.client.key.read_bytes(),
        )
        cp = await start_control_plane(
            ControlPlaneConfig(listen="127.0.0.1:0", store=store, etcd_tls=tls)
        )
        try:

            async def stored() -> bool:
                await cp.store.apply(writes=[SessionUpsert(sample_record("over-tls"))])
                return True

            # A fresh etcd takes a moment to elect itself and serve (StoreError until then).
            await eventually(
                stored, timeout=20, interval=0.2, ignoring=(StoreError,), what="a write over TLS"
            )
            assert await cp.store.get(session_id=SessionId("over-tls")) is not None
            async with grpc.aio.insecure_channel(cp.address) as ch:
                page = await SessionClient(ch).list_sessions(timeout=5)
            assert [r.session_id for r in page.sessions] == ["over-tls"]
        finally:
            await cp.stop()
        # Without a client certificate the same etcd refuses the connection.
        no_cert = EtcdTls(ca=pki.ca.pair.cert.read_bytes())
        refused = ""
        try:
            bad = await start_control_plane(
                ControlPlaneConfig(listen="127.0.0.1:0", store=store, etcd_tls=no_cert)
            )
        except (OSError, StoreError) as exc:
            refused = str(exc) or type(exc).__name__
        else:
            try:
                await bad.store.get(session_id=SessionId("over-tls"))
            except StoreError as exc:
                refused = str(exc) or type(exc).__name__
            finally:
                await bad.stop()
        assert refused
    finally:
        proc.kill()
        await proc.wait()
        log.close()


def sample_record(sid: str) -> SessionRecord:
    return SessionRecord(
        session_id=SessionId(sid),
        upstream_session_id=sid,
        upstream_address="http://127.0.0.1:1",
        owner=OwnerName("a"),
        owner_epoch=1,
    )


def test_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    """Kubelet rotates a projected token by swapping the file: the next call sends the new
    one; a file that turns unreadable keeps the last token (and says so)."""
    path = tmp_path / "token"
    path.write_text("first\n")
    token = TokenFile(path, "--control-plane-token-file")
    assert token.token() == "first"
    tmp = tmp_path / "token.new"
    tmp.write_text("second\n")
    tmp.replace(path)
    assert token.token() == "second"
    assert token.token() == "second"
    assert token.reads == 2
    tmp.write_text("\n")
    tmp.replace(path)
    assert token.token() == "second"
