"""Identities and authorization on a real control plane (issue 11): client certificates with
URI SANs and CNs, Kubernetes-like ServiceAccount tokens verified against a JWKS file, and a
policy file, all made in the test; real gRPC over TLS; real sidecars for the end-to-end
cases. For each rule, the call that must pass and the call that must fail."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.identity import TokenSettings
from controlplane.server import RunningControlPlane, start_control_plane
from tests.integration.conftest import SidecarFactory
from tests.integration.test_proxy import HEADERS, MCP
from tests.support.certs import CertificateAuthority, Pair
from tests.support.tokens import AUDIENCE, ISSUER, TokenIssuer, write_jwks, write_token
from tether.api.client import SessionClient
from tether.grpc_security import ClientSecurity, ServerSecurity, open_channel
from tether.model import (
    BatchAck,
    OwnerName,
    RejectionReason,
    ReportBatch,
    SessionEventType,
    SessionId,
    SessionRecord,
    SessionUpsert,
    StreamId,
    StreamPosition,
    StreamUpdate,
)

DEADLINE = 20.0
TRUST_DOMAIN = "spiffe://tether.test/ns/tether/pod"
POLICY = f"""
bindings:
  - role: sidecar
    principals: ["system:serviceaccount:tether:tether-mcp", "{TRUST_DOMAIN}/*"]
  - role: viewer
    principals: ["cn:oncall-*", "system:serviceaccount:ops:tether-viewer"]
  - role: admin
    principals: ["cn:root", "system:serviceaccount:ops:tether-admin"]
"""
FINGERPRINT_KEY = b"a key every sidecar of the test deployment shares"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}


@dataclass
class Setup:
    tmp: Path
    ca: CertificateAuthority
    server: Pair
    issuer: TokenIssuer
    jwks: Path
    policy: Path

    def token_file(self, pod: str, **claims: Any) -> Path:
        return write_token(
            self.tmp / f"token-{pod}-{len(claims)}", self.issuer.token(pod, **claims)
        )

    def cert(self, stem: str, **kw: Any) -> Pair:
        return self.ca.issue(stem, server=False, **kw)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    ca = CertificateAuthority(tmp_path)
    issuer = TokenIssuer()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    return Setup(
        tmp=tmp_path,
        ca=ca,
        server=ca.issue("control-plane", server=True),
        issuer=issuer,
        jwks=write_jwks(tmp_path / "jwks.json", issuer),
        policy=policy,
    )


Planes = Callable[..., Awaitable[RunningControlPlane]]


@pytest.fixture
async def planes(setup: Setup) -> AsyncIterator[Planes]:
    """Start control planes over TLS: `await planes(mtls=..., policy=...)`."""
    started: list[RunningControlPlane] = []

    async def start(
        *, mtls: bool = False, policy: bool = True, home_namespace: str = "tether"
    ) -> RunningControlPlane:
        security = ServerSecurity(
            cert=setup.server.cert,
            key=setup.server.key,
            client_ca=setup.ca.pair.cert if mtls else None,
        )
        cp = await start_control_plane(
            ControlPlaneConfig(
                listen="127.0.0.1:0",
                store=SqliteUrl(setup.tmp / f"s{len(started)}.db"),
                security=security,
                tokens=TokenSettings(setup.jwks, AUDIENCE, ISSUER),
                policy_file=setup.policy if policy else None,
                home_namespace=home_namespace,
            )
        )
        started.append(cp)
        return cp

    yield start
    for cp in started:
        await cp.stop()


@contextlib.asynccontextmanager
async def client(
    setup: Setup, cp: RunningControlPlane, *, token: Path | None = None, pair: Pair | None = None
) -> AsyncIterator[SessionClient]:
    security = ClientSecurity(
        ca=setup.ca.pair.cert,
        cert=pair.cert if pair else None,
        key=pair.key if pair else None,
        token_file=token,
    )
    async with open_channel(cp.address, security) as channel:
        yield SessionClient(channel)


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def report(c: SessionClient, batch: ReportBatch) -> BatchAck:
    stream = c.report_events()
    await stream.send(batch)
    await stream.done_writing()
    async with asyncio.timeout(DEADLINE):
        acks = [a async for a in stream.acks()]
    assert [a.batch_id for a in acks] == [batch.batch_id]
    return acks[0]


def record(sid: str, owner: str, *, epoch: int = 1, fp: str = "fp-alice") -> SessionRecord:
    return SessionRecord(
        SessionId(sid),
        sid,
        "http://mcp:8080/mcp",
        OwnerName(owner),
        epoch,
        initialize_request=b'{"method":"initialize"}',
        credential_fingerprint=fp,
    )


def update(sid: str, seq: int, epoch: int = 1) -> StreamUpdate:
    return StreamUpdate(
        SessionId(sid), StreamPosition(StreamId("st"), f"st.{epoch}.{seq}", "", seq, epoch)
    )


def reasons(ack: BatchAck) -> list[tuple[str, RejectionReason]]:
    return [(r.session_id, r.reason) for r in ack.rejections]


async def test_sidecar_writes_and_claims_only_as_itself(setup: Setup, planes: Planes) -> None:
    cp = await planes()
    a_token, b_token = setup.token_file("sidecar-a"), setup.token_file("sidecar-b")
    async with client(setup, cp, token=a_token) as a, client(setup, cp, token=b_token) as b:
        # Writing its own session passes; the same batch naming another owner is rejected.
        ack = await report(
            a,
            ReportBatch(
                1,
                upserts=(
                    SessionUpsert(record("s-a", "sidecar-a")),
                    SessionUpsert(record("s-x", "sidecar-b")),
                ),
            ),
        )
        assert reasons(ack) == [("s-x", RejectionReason.INVALID)]
        assert "may write sessions only as their owner 'sidecar-a'" in ack.rejections[0].detail
        assert (
            await report(b, ReportBatch(1, upserts=(SessionUpsert(record("s-b", "sidecar-b")),)))
        ).rejections == ()
        # A writes B's session (right epoch, greater seq): FENCED, the record untouched.
        ack = await report(a, ReportBatch(2, updates=(update("s-b", 7), update("s-a", 3))))
        assert reasons(ack) == [("s-b", RejectionReason.FENCED)]
        assert ack.rejections[0].current_owner == "sidecar-b"
        s_b = await b.get_session(SessionId("s-b"), timeout=5)
        assert s_b is not None
        assert s_b.streams == {}
        s_a = await a.get_session(SessionId("s-a"), timeout=5)
        assert s_a is not None
        assert s_a.streams[StreamId("st")].seq == 3
        # Claims: for itself, yes (adoption); for another, no.
        assert await code_of(a.claim_session(SessionId("s-b"), owner=OwnerName("sidecar-c"))) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        claimed = await a.claim_session(SessionId("s-b"), owner=OwnerName("sidecar-a"), timeout=5)
        assert (claimed.owner, claimed.owner_epoch) == ("sidecar-a", 2)
        # Watch only its own sessions; never list; delete only its own.
        assert await code_of(a.list_sessions(timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        everything = a.watch_sessions()
        assert await code_of(anext(everything)) == grpc.StatusCode.PERMISSION_DENIED
        await everything.aclose()
        mine = a.watch_sessions(owner=OwnerName("sidecar-a"))
        async with asyncio.timeout(DEADLINE):
            seen = [await anext(mine) for _ in range(3)]
        await mine.aclose()
        assert {e.session_id for e in seen if e.type is SessionEventType.PUT} == {"s-a", "s-b"}
        assert seen[-1].type is SessionEventType.SYNCED
        assert await code_of(b.delete_session(SessionId("s-a"), timeout=5)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        await a.delete_session(SessionId("s-a"), timeout=5)
        assert await a.get_session(SessionId("s-a"), timeout=5) is None


async def test_viewer_sees_redacted_records_and_admin_deletes(setup: Setup, planes: Planes) -> None:
    cp = await planes(mtls=True)
    sidecar = setup.cert("sidecar-m", uris=(f"{TRUST_DOMAIN}/sidecar-m",))
    viewer, admin = setup.cert("oncall-bob"), setup.cert("root")
    async with (
        client(setup, cp, pair=sidecar) as s,
        client(setup, cp, pair=viewer) as v,
        client(setup, cp, pair=admin) as adm,
    ):
        # The sidecar authenticated by its URI SAN writes as the name at its end.
        assert (
            await report(s, ReportBatch(1, upserts=(SessionUpsert(record("s1", "sidecar-m")),)))
        ).rejections == ()
        page = await v.list_sessions(timeout=5)
        assert [
            (r.session_id, r.credential_fingerprint, r.initialize_request) for r in page.sessions
        ] == [("s1", "", b"")]
        got = await v.get_session(SessionId("s1"), timeout=5)
        assert got is not None
        assert (got.owner, got.credential_fingerprint, got.initialize_request) == (
            "sidecar-m",
            "",
            b"",
        )
        watch = v.watch_sessions()
        async with asyncio.timeout(DEADLINE):
            first = await anext(watch)
        await watch.aclose()
        assert first.session is not None
        assert first.session.credential_fingerprint == ""
        assert await code_of(v.delete_session(SessionId("s1"), timeout=5)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert await code_of(v.claim_session(SessionId("s1"), owner=OwnerName("oncall-bob"))) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        full = await adm.get_session(SessionId("s1"), timeout=5)
        assert full is not None
        assert (full.credential_fingerprint, full.initialize_request) == (
            "fp-alice",
            b'{"method":"initialize"}',
        )
        deleted = await adm.delete_session(SessionId("s1"), timeout=5)
        assert deleted.session_id == "s1"
        # A certificate the policy does not mention has no role at all.
        stranger = setup.cert("stranger")
        async with client(setup, cp, pair=stranger) as x:
            assert await code_of(x.get_session(SessionId("s1"), timeout=5)) == (
                grpc.StatusCode.PERMISSION_DENIED
            )


async def test_without_a_policy_a_token_caller_is_a_sidecar_only(
    setup: Setup, planes: Planes, caplog: pytest.LogCaptureFixture
) -> None:
    cp = await planes(policy=False)
    admin_pod = setup.token_file("tether-admin-0", namespace="ops", service_account="tether-admin")
    async with client(setup, cp, token=admin_pod) as c:
        for _ in range(5):
            assert await code_of(c.list_sessions(timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        everything = c.watch_sessions()
        assert await code_of(anext(everything)) == grpc.StatusCode.PERMISSION_DENIED
        await everything.aclose()
        # Outside the home namespace the pod's name carries its namespace (identity rule 6).
        ack = await report(
            c, ReportBatch(1, upserts=(SessionUpsert(record("s1", "tether-admin-0@ops")),))
        )
        assert ack.rejections == ()
    # One log line for the five refused lists (the rest held back for the next line).
    denials = [r for r in caplog.records if "may not ListSessions" in r.getMessage()]
    assert len(denials) == 1
    assert "pod:ops/tether-admin-0 (roles: sidecar) may not ListSessions" in denials[0].getMessage()


async def test_pods_outside_the_home_namespace_act_under_a_qualified_name(
    setup: Setup, planes: Planes
) -> None:
    """identity rule 6 through a real control plane: with home namespace `mcp`, pod mcp-0 of
    namespace tether is `mcp-0@tether`, and a certificate of .../ns/mcp/pod/mcp-0 is `mcp-0`."""
    cp = await planes(policy=False, home_namespace="mcp")
    async with client(setup, cp, token=setup.token_file("mcp-0")) as c:
        bare = await report(c, ReportBatch(1, upserts=(SessionUpsert(record("s1", "mcp-0")),)))
        assert [r.reason for r in bare.rejections] == [RejectionReason.INVALID]
        assert "'mcp-0@tether'" in bare.rejections[0].detail
        qualified = record("s2", "mcp-0@tether")
        ack = await report(c, ReportBatch(2, upserts=(SessionUpsert(qualified),)))
        assert ack.rejections == ()

    cp = await planes(mtls=True, policy=False, home_namespace="mcp")
    home = setup.cert("home", uris=("spiffe://tether.test/ns/mcp/pod/mcp-0",))
    away = setup.cert("away", uris=("spiffe://tether.test/ns/tether/pod/mcp-0",))
    async with client(setup, cp, pair=home) as c:
        ack = await report(c, ReportBatch(1, upserts=(SessionUpsert(record("s3", "mcp-0")),)))
        assert ack.rejections == ()
    async with client(setup, cp, pair=away) as c:
        ack = await report(
            c, ReportBatch(1, upserts=(SessionUpsert(record("s4", "mcp-0@tether")),))
        )
        assert ack.rejections == ()
        # Not the owner of the home namespace's pod's session of the same pod name.
        assert await code_of(c.delete_session(SessionId("s3"), timeout=5)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )


async def test_bad_tokens_are_unauthenticated(setup: Setup, planes: Planes) -> None:
    cp = await planes()
    stranger = TokenIssuer(kid=setup.issuer.kid)
    wrong_key = write_token(setup.tmp / "wrong-key", stranger.token("sidecar-a"))
    cases = {
        "expired": setup.token_file("sidecar-a", lifetime=-600),
        "wrong audience": setup.token_file("sidecar-a", audience="kubernetes.default.svc"),
        "wrong issuer": setup.token_file("sidecar-a", issuer="https://evil.example"),
        "wrong key": wrong_key,
        "not a JWT": write_token(setup.tmp / "guess", "guess"),
        "none": None,
    }
    for what, token in cases.items():
        async with client(setup, cp, token=token) as c:
            assert await code_of(c.get_session(SessionId("s1"), timeout=5)) == (
                grpc.StatusCode.UNAUTHENTICATED
            ), what


ALICE = {**HEADERS, "Authorization": "Bearer alice-secret"}
"""The headers of Alice's requests."""


async def alice_session_through_a_sidecar(
    setup: Setup,
    cp: RunningControlPlane,
    sidecar_factory: SidecarFactory,
    upstream: str,
    http: aiohttp.ClientSession,
) -> tuple[str, SessionId]:
    """A sidecar proving its name with a ServiceAccount token, and a session Alice's bearer
    token made through it, stored: the sidecar's base URL and the session id."""
    sidecar = await sidecar_factory(
        upstream,
        control_plane=cp.address,
        control_plane_security=ClientSecurity(
            ca=setup.ca.pair.cert, token_file=setup.token_file("sidecar-a")
        ),
        owner="sidecar-a",
        fingerprint_key=FINGERPRINT_KEY,
    )
    base = f"http://127.0.0.1:{sidecar.port}"
    async with http.post(base + MCP, json=INITIALIZE, headers=ALICE) as resp:
        assert resp.status == 200
        sid = SessionId(resp.headers["Mcp-Session-Id"])
        await resp.read()
    reporter = sidecar.proxy.continuity.reporter
    assert reporter is not None
    await asyncio.wait_for(reporter.flushed(), DEADLINE)
    return base, sid


async def test_the_attack_is_refused_at_the_first_step(
    setup: Setup,
    planes: Planes,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """The issue's attack: list every session, upsert one at its current epoch with one's own
    owner and fingerprint, then stream it through a sidecar with one's own credential. Each
    step is refused on its own, whether the attacker has no credential or a sidecar's."""
    cp = await planes()
    async with numbered_upstream() as up:
        base, sid = await alice_session_through_a_sidecar(setup, cp, sidecar_factory, up, http)
        admin = setup.token_file("admin-0", namespace="ops", service_account="tether-admin")
        async with client(setup, cp, token=admin) as adm:
            victim = await adm.get_session(sid, timeout=5)
        assert victim is not None

        # Step 1, listing: no credential is UNAUTHENTICATED, a sidecar's PERMISSION_DENIED.
        evil_token = setup.token_file("evil")
        async with client(setup, cp) as anonymous:
            assert (
                await code_of(anonymous.list_sessions(timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
            )
        async with client(setup, cp, token=evil_token) as evil:
            assert await code_of(evil.list_sessions(timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
            # Step 2, given the id and epoch anyway: an upsert with its own owner at the current
            # epoch, and one posing as the owner, change nothing.
            mallory_fp = hmac.new(FINGERPRINT_KEY, b"Bearer mallory", hashlib.sha256).hexdigest()
            ack = await report(
                evil,
                ReportBatch(
                    1,
                    upserts=(
                        SessionUpsert(record(sid, "evil", epoch=victim.owner_epoch, fp=mallory_fp)),
                        SessionUpsert(
                            record(sid, "sidecar-a", epoch=victim.owner_epoch, fp=mallory_fp)
                        ),
                    ),
                ),
            )
            assert set(reasons(ack)) == {
                (sid, RejectionReason.FENCED),
                (sid, RejectionReason.INVALID),
            }
            # Even a claim (a sidecar may claim for itself) does not move the binding.
            claimed = await evil.claim_session(sid, owner=OwnerName("evil"), timeout=5)
            ack = await report(
                evil,
                ReportBatch(
                    2,
                    upserts=(
                        SessionUpsert(
                            record(sid, "evil", epoch=claimed.owner_epoch, fp=mallory_fp)
                        ),
                    ),
                ),
            )
            assert reasons(ack) == [(sid, RejectionReason.INVALID)]
            assert "cannot change" in ack.rejections[0].detail
        async with client(setup, cp, token=admin) as adm:
            after = await adm.get_session(sid, timeout=5)
        assert after is not None
        assert after.credential_fingerprint == victim.credential_fingerprint
        # Step 3: Mallory's credential gets nothing from a sidecar; Alice's still works.
        mallory = {**HEADERS, "Authorization": "Bearer mallory", "Mcp-Session-Id": sid}
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        async with http.post(base + MCP, json=ping, headers=mallory) as resp:
            assert resp.status == 404
        async with http.post(
            base + MCP, json=ping, headers={**ALICE, "Mcp-Session-Id": sid}
        ) as resp:
            assert resp.status == 200
            await resp.read()


async def test_sidecar_end_to_end_with_a_rotated_token_and_a_keyed_fingerprint(
    setup: Setup,
    planes: Planes,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """A real sidecar starts with an expired projected token (the control plane refuses it),
    the kubelet rotates the file, and the sidecar's sessions flow: the token file is read
    again. The stored fingerprint is the HMAC of the header with the shared key."""
    cp = await planes()
    token = write_token(
        setup.tmp / "projected-token", setup.issuer.token("sidecar-a", lifetime=-600)
    )
    async with numbered_upstream() as up:
        sidecar = await sidecar_factory(
            up,
            control_plane=cp.address,
            control_plane_security=ClientSecurity(ca=setup.ca.pair.cert, token_file=token),
            owner="sidecar-a",
            fingerprint_key=FINGERPRINT_KEY,
        )
        headers = {**HEADERS, "Authorization": "Bearer alice-secret"}
        async with http.post(
            f"http://127.0.0.1:{sidecar.port}{MCP}", json=INITIALIZE, headers=headers
        ) as resp:
            assert resp.status == 200
            sid = SessionId(resp.headers["Mcp-Session-Id"])
            await resp.read()
        write_token(token, setup.issuer.token("sidecar-a"))
        reporter = sidecar.proxy.continuity.reporter
        assert reporter is not None
        await asyncio.wait_for(reporter.flushed(), DEADLINE)
    admin = setup.token_file("admin-0", namespace="ops", service_account="tether-admin")
    async with client(setup, cp, token=admin) as adm:
        stored = await adm.get_session(sid, timeout=5)
    assert stored is not None
    assert stored.owner == "sidecar-a"
    header = b"Bearer alice-secret"
    assert (
        stored.credential_fingerprint
        == hmac.new(FINGERPRINT_KEY, header, hashlib.sha256).hexdigest()
    )
    assert stored.credential_fingerprint != hashlib.sha256(header).hexdigest()


async def run_control_plane(*flags: str) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.cli",
        "control-plane",
        "--listen",
        "127.0.0.1:0",
        *flags,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err


async def test_bad_identity_settings_are_clear_errors(setup: Setup) -> None:
    store = f"sqlite:///{setup.tmp}/x.db"
    bad_policy = setup.tmp / "bad.yaml"
    bad_policy.write_text("bindings: [{role: root, principals: ['*']}]")
    code, err = await run_control_plane("--store", store, "--policy-file", str(bad_policy))
    assert code == 1
    assert b"role 'root' is not one of sidecar, viewer, admin" in err
    code, err = await run_control_plane("--store", store, "--jwt-jwks-file", str(setup.jwks))
    assert code == 2
    assert b"--jwt-jwks-file, --jwt-audience and --jwt-issuer go together" in err
    empty = setup.tmp / "empty.json"
    empty.write_text('{"keys": []}')
    code, err = await run_control_plane(
        "--store", store, "--jwt-jwks-file", str(empty), "--jwt-audience", "a", "--jwt-issuer", "i"
    )
    assert code == 1
    assert b"holds no usable key" in err
    assert b"Traceback" not in err


async def test_a_short_fingerprint_key_is_a_clear_error(setup: Setup) -> None:
    key = setup.tmp / "fingerprint-key"
    key.write_text("short\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.cli",
        "sidecar",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://127.0.0.1:9/",
        "--fingerprint-key-file",
        str(key),
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"the key must have at least 16 bytes" in err


async def test_an_operator_token_bound_to_no_pod_reads_but_never_writes(
    setup: Setup, planes: Planes
) -> None:
    """`kubectl create token tether-viewer --audience tether-control-plane`: the account's
    roles apply; with no pod it has no name, so it cannot act as a sidecar even if a policy
    said so."""
    cp = await planes()
    k8s = {"namespace": "ops", "serviceaccount": {"name": "tether-viewer", "uid": "u"}}
    path = write_token(setup.tmp / "viewer", setup.issuer.token("-", kubernetes=k8s))
    async with client(setup, cp, token=path) as v:
        assert (await v.list_sessions(timeout=5)).sessions == ()
        stream = v.report_events()
        await stream.send(ReportBatch(1, upserts=(SessionUpsert(record("s1", "x")),)))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async with asyncio.timeout(DEADLINE):
                _ = [a async for a in stream.acks()]
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_sidecar_end_to_end_over_mutual_tls(
    setup: Setup,
    planes: Planes,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """A real sidecar whose certificate's URI SAN ends with its owner name: its sessions flow;
    the same certificate with another owner name is refused item by item."""
    cp = await planes(mtls=True)
    pair = setup.cert("sidecar-m", uris=(f"{TRUST_DOMAIN}/sidecar-m",))
    security = ClientSecurity(ca=setup.ca.pair.cert, cert=pair.cert, key=pair.key)
    sids = []
    async with numbered_upstream() as up:
        for owner in ("sidecar-m", "impostor"):
            sidecar = await sidecar_factory(
                up, control_plane=cp.address, control_plane_security=security, owner=owner
            )
            async with http.post(
                f"http://127.0.0.1:{sidecar.port}{MCP}", json=INITIALIZE, headers=HEADERS
            ) as resp:
                assert resp.status == 200
                sids.append(SessionId(resp.headers["Mcp-Session-Id"]))
                await resp.read()
            reporter = sidecar.proxy.continuity.reporter
            assert reporter is not None
            await asyncio.wait_for(reporter.flushed(), DEADLINE)
        await sidecar_factory.stop_all()
    async with client(setup, cp, pair=setup.cert("root")) as adm:
        stored = await adm.get_session(sids[0], timeout=5)
        assert stored is not None
        assert stored.owner == "sidecar-m"
        assert await adm.get_session(sids[1], timeout=5) is None


async def test_varied_bad_tokens_do_not_multiply_the_log(
    setup: Setup, planes: Planes, caplog: pytest.LogCaptureFixture
) -> None:
    """identity rule 10: forty tokens signed with forty different unknown key ids, and forty
    different garbage tokens, each refused; the log gets one line per kind of refusal, not
    one per key id or per token."""
    cp = await planes()
    for i in range(40):
        forged = TokenIssuer(kid=f"kid-{i}")
        garbage = f"garbage.{i}.token"
        for token in (forged.token("sidecar-a"), garbage):
            path = write_token(setup.tmp / f"bad-{i}", token)
            async with client(setup, cp, token=path) as c:
                assert await code_of(c.get_session(SessionId("s1"), timeout=5)) == (
                    grpc.StatusCode.UNAUTHENTICATED
                )
    lines = [r for r in caplog.records if "unauthenticated call" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]
