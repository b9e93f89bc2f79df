"""Hostile callers of the control plane (issue 11), found by an outside tester: each test was a
defect when written, fixed since; its failing assertion is marked "Fixed"."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
from typing import Any

import aiohttp
import grpc

from tests.integration import test_authz
from tests.integration.conftest import SidecarFactory
from tests.integration.test_authz import (
    DEADLINE,
    FINGERPRINT_KEY,
    Planes,
    Setup,
    alice_session_through_a_sidecar,
    client,
    code_of,
    record,
    report,
)
from tests.integration.test_proxy import HEADERS, MCP
from tether.model import OwnerName, ReportBatch, SessionId, SessionUpsert

setup = test_authz.setup  # fixtures shared with the authorization tests
planes = test_authz.planes


async def test_a_sidecar_cannot_rebind_a_session_by_claim_delete_and_recreate(
    setup: Setup,
    planes: Planes,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """docs/security.md: "What stops a sidecar from handing a session to another credential
    is the binding rule": the fingerprint is set once, at creation. But a sidecar principal
    may claim any session (then owns it), may delete a session it owns, and may create any
    absent session: claim, delete, upsert with its own fingerprint (and the victim's upstream
    session id, read unredacted with GetSession) rebinds the victim's session to Mallory's
    credential; a sidecar then serves Mallory the victim's session and upstream session."""
    cp = await planes()
    async with numbered_upstream() as up:
        base, sid = await alice_session_through_a_sidecar(setup, cp, sidecar_factory, up, http)

        mallory_fp = hmac.new(FINGERPRINT_KEY, b"Bearer mallory", hashlib.sha256).hexdigest()
        async with client(setup, cp, token=setup.token_file("evil")) as evil:
            victim = await evil.get_session(sid, timeout=5)  # a sidecar reads any, whole
            assert victim is not None
            claimed = await evil.claim_session(sid, owner=OwnerName("evil"), timeout=5)
            deleted = await code_of(evil.delete_session(sid, timeout=5))
            ack = await report(
                evil,
                ReportBatch(
                    1,
                    upserts=(
                        SessionUpsert(
                            record(sid, "evil", epoch=claimed.owner_epoch + 1, fp=mallory_fp)
                        ),
                    ),
                ),
            )
            after = await evil.get_session(sid, timeout=5)
        mallory = {**HEADERS, "Authorization": "Bearer mallory", "Mcp-Session-Id": sid}
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        async with http.post(base + MCP, json=ping, headers=mallory) as resp:
            mallory_status = resp.status
            await resp.read()
    # Fixed: the delete passes, the re-creation rebinds the session to Mallory's credential
    # (upstream session id included), and a sidecar then serves Mallory the session.
    rebound = after is not None and after.credential_fingerprint == mallory_fp
    kept = after is not None and after.upstream_session_id == victim.upstream_session_id
    assert (rebound, mallory_status) == (False, 404), (
        f"victim session rebound: delete {deleted}, re-creation rejections {ack.rejections}, "
        f"fingerprint now Mallory's: {rebound}, "
        f"upstream session kept: {kept}, "
        f"Mallory's ping through the sidecar: {mallory_status}"
    )


async def test_a_pod_of_another_namespace_cannot_act_as_a_sidecar_of_the_same_name(
    setup: Setup, planes: Planes
) -> None:
    """Without a policy every token caller is a sidecar acting as its pod's name, and the
    name drops the namespace: any pod of the cluster named like a sidecar (any namespace, any
    ServiceAccount; any pod may ask the kubelet for a token with the control plane's
    audience) reads, watches, writes and deletes that sidecar's sessions, unredacted."""
    cp = await planes(policy=False)
    victim_token = setup.token_file("mcp-0")  # namespace tether, account tether-mcp
    intruder_token = setup.token_file("mcp-0", namespace="dev", service_account="default")
    async with client(setup, cp, token=victim_token) as victim:
        ack = await report(victim, ReportBatch(1, upserts=(SessionUpsert(record("s1", "mcp-0")),)))
        assert ack.rejections == ()
    async with client(setup, cp, token=intruder_token) as intruder:
        watch = intruder.watch_sessions(owner=OwnerName("mcp-0"))
        try:
            async with asyncio.timeout(DEADLINE):
                first = await anext(watch)
            seen: object = (
                first.type,
                first.session.credential_fingerprint if first.session else "",
            )
        except grpc.aio.AioRpcError as e:
            seen = e.code()
        finally:
            await watch.aclose()
        deleted = await code_of(intruder.delete_session(SessionId("s1"), timeout=5))
    # Fixed: pod dev/mcp-0 watches (with fingerprints) and deletes tether/mcp-0's session.
    assert (seen, deleted) == (
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.PERMISSION_DENIED,
    ), f"pod dev/mcp-0 acted as sidecar mcp-0 of namespace tether: watch {seen}, delete {deleted}"


async def test_a_new_session_cannot_borrow_another_sessions_upstream_session(
    setup: Setup,
    planes: Planes,
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """No claim, no delete: a viewer's redacted listing still shows every session's
    `upstream_session_id` (and its streams' upstream cursors), and any sidecar principal may
    create a session of its own naming any `upstream_session_id`, bound to its own
    credential. A real sidecar then adopts that session and forwards Mallory's requests
    into Alice's upstream session (the upstream knows only that id). The binding protects the
    Tether session id, not the upstream session behind it."""
    cp = await planes()
    async with numbered_upstream(strict_sessions=True) as up:
        base, sid = await alice_session_through_a_sidecar(setup, cp, sidecar_factory, up, http)
        viewer = setup.token_file("viewer-0", namespace="ops", service_account="tether-viewer")
        async with client(setup, cp, token=viewer) as v:
            (listed,) = (await v.list_sessions(timeout=5)).sessions
        assert (listed.session_id, listed.credential_fingerprint) == (sid, "")  # redacted...
        upstream_sid = listed.upstream_session_id  # ...but not the upstream session

        mallory_fp = hmac.new(FINGERPRINT_KEY, b"Bearer mallory", hashlib.sha256).hexdigest()
        borrowed = dataclasses.replace(
            record("mallory-1", "evil", fp=mallory_fp),
            upstream_session_id=upstream_sid,
            upstream_address=listed.upstream_address,
            initialize_request=b"",
        )
        control = dataclasses.replace(borrowed, session_id=SessionId("mallory-2"))
        control = dataclasses.replace(control, upstream_session_id="not-a-live-upstream-session")
        async with client(setup, cp, token=setup.token_file("evil")) as evil:
            ack = await report(
                evil, ReportBatch(1, upserts=(SessionUpsert(borrowed), SessionUpsert(control)))
            )
        statuses = {}
        for mine in ("mallory-1", "mallory-2"):
            mallory = {**HEADERS, "Authorization": "Bearer mallory", "Mcp-Session-Id": mine}
            ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
            async with http.post(base + MCP, json=ping, headers=mallory) as resp:
                statuses[mine] = resp.status
                await resp.read()
    assert statuses["mallory-2"] == 404  # the upstream refuses a session it does not know
    # Fixed: the session Mallory made reaches Alice's upstream session through the sidecar.
    assert (ack.rejections == (), statuses["mallory-1"]) != (True, 200), (
        f"Mallory's own session naming Alice's upstream session {upstream_sid!r} was stored "
        f"and served: ping {statuses['mallory-1']}"
    )


async def test_a_certificate_of_another_namespace_cannot_act_as_a_sidecar_of_the_same_name(
    setup: Setup, planes: Planes
) -> None:
    """The mutual-TLS twin: without a policy a certificate's name is the last path segment of
    its URI SAN, whatever comes before it, so a mesh CA's certificate for any workload whose
    SPIFFE id ends like a sidecar's (another namespace, another trust domain) is that
    sidecar."""
    cp = await planes(mtls=True, policy=False)
    victim = setup.cert("victim", uris=("spiffe://cluster.local/ns/tether/pod/mcp-0",))
    intruder = setup.cert("intruder", uris=("spiffe://cluster.local/ns/dev/pod/mcp-0",))
    async with client(setup, cp, pair=victim) as v:
        ack = await report(v, ReportBatch(1, upserts=(SessionUpsert(record("s1", "mcp-0")),)))
        assert ack.rejections == ()
    async with client(setup, cp, pair=intruder) as x:
        full = await code_of(x.get_session(SessionId("s1"), timeout=5))
        deleted = await code_of(x.delete_session(SessionId("s1"), timeout=5))
    # Fixed: spiffe://.../ns/dev/pod/mcp-0 deletes the session of .../ns/tether/pod/mcp-0.
    assert deleted == grpc.StatusCode.PERMISSION_DENIED, (
        f"another namespace's certificate acted as sidecar mcp-0: get {full}, delete {deleted}"
    )


async def test_a_fenced_sidecar_cannot_recreate_a_session_below_its_last_epoch(
    setup: Setup, planes: Planes
) -> None:
    """docs/ownership.md rule 4, marked [open]: B claims A's session (epoch 2), the client
    deletes it through B; A, fenced but not told yet (its watch down), renews it at epoch 1
    and re-creates it as its own at epoch 1: the owner epoch went backwards (invariant I5),
    and the session a client deleted is alive again."""
    cp = await planes()
    a_token, b_token = setup.token_file("sidecar-a"), setup.token_file("sidecar-b")
    async with client(setup, cp, token=a_token) as a, client(setup, cp, token=b_token) as b:
        ack = await report(a, ReportBatch(1, upserts=(SessionUpsert(record("s1", "sidecar-a")),)))
        assert ack.rejections == ()
        claimed = await b.claim_session(SessionId("s1"), owner=OwnerName("sidecar-b"), timeout=5)
        assert claimed.owner_epoch == 2
        await b.delete_session(SessionId("s1"), timeout=5)
        ack = await report(a, ReportBatch(2, upserts=(SessionUpsert(record("s1", "sidecar-a")),)))
        after = await a.get_session(SessionId("s1"), timeout=5)
    # Fixed: re-created at epoch 1 after the store gave out epoch 2.
    assert after is None or after.owner_epoch > 2, (
        f"re-created by {after.owner} at epoch {after.owner_epoch} (rejections {ack.rejections})"
    )
