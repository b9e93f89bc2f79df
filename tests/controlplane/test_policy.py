"""`controlplane.policy` without a server: the policy file and the rule of each call."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from controlplane.identity import ANONYMOUS, SHARED_TOKEN, Principal, PrincipalKind
from controlplane.policy import Access, Authorizer, Denied, Policy, PolicyError, Read, Role, redact
from tether.model import (
    OwnerName,
    RejectionReason,
    ReportBatch,
    SessionId,
    SessionRecord,
    SessionUpsert,
    StreamId,
    StreamPosition,
    StreamUpdate,
)

POLICY = """
bindings:
  - role: sidecar
    principals: ["system:serviceaccount:tether:tether-mcp", "spiffe://td/ns/tether/pod/*"]
  - role: viewer
    principals: ["cn:oncall-*"]
  - role: admin
    principals: ["cn:root"]
"""

SIDECAR = Principal(
    PrincipalKind.SERVICE_ACCOUNT,
    ("pod:tether/sidecar-a", "system:serviceaccount:tether:tether-mcp"),
    OwnerName("sidecar-a"),
)
OTHER_SA = Principal(
    PrincipalKind.SERVICE_ACCOUNT,
    ("pod:tether/sneaky", "system:serviceaccount:tether:default"),
    OwnerName("sneaky"),
)
VIEWER = Principal(PrincipalKind.CERTIFICATE, ("cn:oncall-bob",), OwnerName("oncall-bob"))
ADMIN = Principal(PrincipalKind.CERTIFICATE, ("cn:root",), OwnerName("root"))
A, B = OwnerName("sidecar-a"), OwnerName("sidecar-b")


def record(owner: str = "sidecar-a") -> SessionRecord:
    return SessionRecord(
        SessionId("s1"),
        "s1",
        "up:1",
        OwnerName(owner),
        1,
        initialize_request=b'{"method":"initialize"}',
        credential_fingerprint="fp",
    )


@pytest.fixture
def authz() -> Authorizer:
    return Authorizer(Policy.parse(POLICY))


def test_roles_come_from_matching_bindings(authz: Authorizer) -> None:
    assert authz.access(SIDECAR).roles == {Role.SIDECAR}
    assert authz.access(OTHER_SA).roles == frozenset()
    assert authz.access(VIEWER).roles == {Role.VIEWER}
    spiffe = Principal(
        PrincipalKind.CERTIFICATE, ("spiffe://td/ns/tether/pod/p-1",), OwnerName("p-1")
    )
    assert authz.access(spiffe).roles == {Role.SIDECAR}


def test_without_a_policy_authenticated_callers_are_sidecars_only() -> None:
    access = Authorizer(None).access(VIEWER)
    assert access.roles == {Role.SIDECAR}
    assert isinstance(access.read("ListSessions"), Denied)
    assert access.deletes_any is False


@pytest.mark.parametrize("dev", [ANONYMOUS, SHARED_TOKEN])
def test_development_callers_may_do_everything(authz: Authorizer, dev: Principal) -> None:
    access = authz.access(dev)
    assert access.read("ListSessions") == Read(redacted=False)
    assert access.watch(None) == Read(redacted=False)
    assert access.claim(B) is None
    assert access.deletes_any
    assert access.report() is None
    batch = ReportBatch(1, upserts=(SessionUpsert(record("anyone")),))
    assert access.writes(batch) == (batch, ())


def test_sidecar_rules(authz: Authorizer) -> None:
    access = authz.access(SIDECAR)
    assert access.report() is None
    assert access.read("GetSession") == Read(redacted=False)  # adoption needs the record
    denied = access.read("ListSessions")
    assert isinstance(denied, Denied)
    assert denied.message == (
        "pod:tether/sidecar-a (roles: sidecar) may not ListSessions: needs the viewer or admin role"
    )
    assert access.watch(A) == Read(redacted=False)
    assert isinstance(access.watch(None), Denied)
    assert isinstance(access.watch(B), Denied)
    assert access.claim(A) is None
    claim_for_b = access.claim(B)
    assert isinstance(claim_for_b, Denied)
    assert "only for itself" in claim_for_b.message
    assert not access.deletes_any
    assert access.delete(record("sidecar-a")) is None
    assert isinstance(access.delete(record("sidecar-b")), Denied)


def test_a_sidecars_writes_carry_it_and_name_it_as_owner(authz: Authorizer) -> None:
    access = authz.access(SIDECAR)
    position = StreamPosition(StreamId("x"), "x.1.1", "", 1, 1)
    batch = ReportBatch(
        3,
        upserts=(SessionUpsert(record("sidecar-a")), SessionUpsert(record("sidecar-b"))),
        updates=(StreamUpdate(SessionId("s1"), position),),
    )
    stamped, rejected = access.writes(batch)
    assert [u.writer for u in stamped.upserts] == [A]
    assert [u.writer for u in stamped.updates] == [A]
    assert [(r.session_id, r.reason) for r in rejected] == [("s1", RejectionReason.INVALID)]
    assert "not as 'sidecar-b'" in rejected[0].detail


def test_viewer_and_admin_rules(authz: Authorizer) -> None:
    viewer = authz.access(VIEWER)
    assert viewer.read("ListSessions") == Read(redacted=True)
    assert viewer.read("GetSession") == Read(redacted=True)
    assert viewer.watch(None) == Read(redacted=True)
    assert isinstance(viewer.delete(record()), Denied)
    assert isinstance(viewer.claim(OwnerName("oncall-bob")), Denied)
    assert isinstance(viewer.report(), Denied)
    admin = authz.access(ADMIN)
    assert admin.read("ListSessions") == Read(redacted=False)
    assert admin.deletes_any
    assert isinstance(admin.report(), Denied)


def test_nameless_principal_cannot_act_as_a_sidecar() -> None:
    nameless = Principal(PrincipalKind.CERTIFICATE, ("cn:Alice Example",), None)
    access = Access(nameless, frozenset({Role.SIDECAR}))
    assert isinstance(access.report(), Denied)
    assert isinstance(access.read("GetSession"), Denied)


def test_redaction_empties_the_secrets_only() -> None:
    position = StreamPosition(StreamId("a"), "a.1.3", "up-7", 3, 1)
    r = redact(dataclasses.replace(record(), streams={StreamId("a"): position}))
    assert (r.credential_fingerprint, r.initialize_request) == ("", b"")
    # What reaches the upstream session: its id, and the upstream's event ids.
    assert (r.upstream_session_id, r.streams[StreamId("a")].upstream_event_id) == ("", "")
    assert r.streams[StreamId("a")] == dataclasses.replace(position, upstream_event_id="")
    assert (r.session_id, r.owner, r.upstream_address) == ("s1", "sidecar-a", "up:1")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[]", "one key, 'bindings'"),
        ("bindings: {}", "must be a list"),
        ("bindings: [{role: root, principals: ['*']}]", "not one of sidecar, viewer, admin"),
        ("bindings: [{role: admin}]", "'role' and 'principals'"),
        ("bindings: [{role: admin, principals: ''}]", "list of non-empty patterns"),
        ("bindings: [: bad", "not YAML"),
    ],
)
def test_bad_policy_files_are_clear_errors(text: str, error: str) -> None:
    with pytest.raises(PolicyError, match=error):
        Policy.parse(text)


def test_policy_load_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.load(tmp_path / "missing.yaml")
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    assert len(Policy.load(path).bindings) == 3
