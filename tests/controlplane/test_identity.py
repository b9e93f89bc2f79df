"""`controlplane.identity` without a server: certificates, ServiceAccount tokens and the JWKS
file made in the test with `cryptography` and PyJWT."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path

import jwt
import pytest

from controlplane import identity
from controlplane.identity import (
    ANONYMOUS,
    SHARED_TOKEN,
    AuthenticationError,
    Authenticator,
    PrincipalKind,
    TokenSettings,
    TokenVerifier,
    certificate_principal,
    pod_owner_name,
)
from tests.support.certs import CertificateAuthority
from tests.support.tokens import AUDIENCE, ISSUER, TokenIssuer, write_jwks
from tether.grpc_security import SecurityConfigError
from tether.model import OwnerName


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer()


@pytest.fixture
def verifier(issuer: TokenIssuer, tmp_path: Path) -> TokenVerifier:
    jwks = write_jwks(tmp_path / "jwks.json", issuer)
    return TokenVerifier(TokenSettings(jwks, AUDIENCE, ISSUER))


def test_certificate_principal_is_the_first_uri_san_else_the_cn(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    spiffe = "spiffe://cluster.local/ns/tether/pod/sidecar-a"
    with_uri = ca.issue("a", server=False, uris=(spiffe, "spiffe://other/ns/x/pod/b"))
    p = certificate_principal(with_uri.cert.read_bytes())
    assert (p.kind, p.subjects, p.name) == (PrincipalKind.CERTIFICATE, (spiffe,), "sidecar-a")
    cn_only = ca.issue("b", server=False, common_name="oncall-alice")
    p = certificate_principal(cn_only.cert.read_bytes())
    assert (p.id, p.name) == ("cn:oncall-alice", "oncall-alice")
    # A CN that is no valid owner name: a principal all the same, but no sidecar name.
    odd = ca.issue("c", server=False, common_name="Alice Example/Ops")
    assert certificate_principal(odd.cert.read_bytes()).name is None
    with pytest.raises(AuthenticationError, match="unreadable"):
        certificate_principal(b"not a certificate")


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def test_a_token_names_its_pod(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    p = verifier.verify(issuer.token("sidecar-a", namespace="prod", service_account="mcp"))
    assert p.kind is PrincipalKind.SERVICE_ACCOUNT
    assert p.subjects == ("pod:prod/sidecar-a", "system:serviceaccount:prod:mcp")
    assert p.name == "sidecar-a@prod"  # rule 6: outside the home namespace, qualified
    assert not p.trusted
    home = verifier.verify(issuer.token("sidecar-a", namespace="tether"))
    assert home.name == "sidecar-a"


def test_owner_names_are_unique_across_namespaces(tmp_path: Path) -> None:
    """Rule 6: the same pod name in two namespaces gives two names; a URI SAN names a pod
    only in the SPIFFE `ns/<namespace>/pod/<pod>` (or `sa/<account>`) form."""
    assert pod_owner_name("mcp-0", "tether", "tether") == "mcp-0"
    assert pod_owner_name("mcp-0", "dev", "tether") == "mcp-0@dev"
    assert pod_owner_name("mcp-0.dev", "tether", "tether") != pod_owner_name(
        "mcp-0", "dev", "tether"
    )
    ca = CertificateAuthority(tmp_path)
    names: dict[str, OwnerName | None] = {}
    for uri in (
        "spiffe://td/ns/tether/pod/mcp-0",
        "spiffe://td/ns/dev/pod/mcp-0",
        "spiffe://td/ns/dev/sa/tether-mcp",
        "spiffe://td/workload/mcp-0",
        "https://example.org/mcp-0",
    ):
        pair = ca.issue(f"c{len(names)}", server=False, uris=(uri,))
        names[uri] = certificate_principal(pair.cert.read_bytes()).name
    assert list(names.values()) == ["mcp-0", "mcp-0@dev", "tether-mcp@dev", None, None]
    other_home = ca.issue("h", server=False, uris=("spiffe://td/ns/tether/pod/mcp-0",))
    p = certificate_principal(other_home.cert.read_bytes(), home_namespace="mcp")
    assert p.name == "mcp-0@tether"


@pytest.mark.parametrize(
    ("what", "kwargs", "reason"),
    [
        ("expired", {"lifetime": -120}, "expired"),
        ("not yet valid", {"not_before": time.time() + 600}, "not yet valid"),
        ("wrong audience", {"audience": "kubernetes"}, "Audience doesn't match"),
        ("wrong issuer", {"issuer": "https://evil.example"}, "issuer"),
        ("no account", {"kubernetes": {"namespace": "tether"}}, "names no ServiceAccount"),
    ],
)
def test_bad_tokens_are_refused(
    issuer: TokenIssuer, verifier: TokenVerifier, what: str, kwargs: dict[str, object], reason: str
) -> None:
    with pytest.raises(AuthenticationError, match=reason):
        verifier.verify(issuer.token("sidecar-a", **kwargs))  # type: ignore[arg-type]


def test_a_token_bound_to_no_pod_is_its_account_and_no_sidecar(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """What `kubectl create token tether-admin --audience ...` gives an operator."""
    k8s = {"namespace": "ops", "serviceaccount": {"name": "tether-admin", "uid": "u"}}
    p = verifier.verify(issuer.token("ignored", kubernetes=k8s))
    assert (p.subjects, p.name) == (("system:serviceaccount:ops:tether-admin",), None)


def test_tokens_of_other_keys_and_weak_algorithms_are_refused(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    stranger = TokenIssuer(kid=issuer.kid)  # same key id, another key
    with pytest.raises(AuthenticationError, match="Signature verification failed"):
        verifier.verify(stranger.token("sidecar-a"))
    with pytest.raises(AuthenticationError, match="unknown key"):
        verifier.verify(TokenIssuer().token("sidecar-a"))
    claims = jwt.decode(issuer.token("sidecar-a"), options={"verify_signature": False})
    # HMAC with the public key as the secret, and `none`: the classic confusions. PyJWT will
    # not sign the first, so it is put together by hand.
    public = json.dumps(issuer.jwk()).encode()
    for alg in ("HS256", "none"):
        header = _b64(json.dumps({"alg": alg, "kid": issuer.kid, "typ": "JWT"}).encode())
        signed = header + b"." + _b64(json.dumps(claims).encode())
        mac = hmac.new(public, signed, hashlib.sha256).digest() if alg == "HS256" else b""
        forged = (signed + b"." + _b64(mac)).decode()
        with pytest.raises(AuthenticationError, match="alg"):
            verifier.verify(forged)
    with pytest.raises(AuthenticationError, match="not a JWT"):
        verifier.verify("Bearer-ish garbage")


def test_the_jwks_file_is_read_again_when_keys_rotate(
    issuer: TokenIssuer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    jwks = write_jwks(tmp_path / "jwks.json", issuer)
    verifier = TokenVerifier(TokenSettings(jwks, AUDIENCE, ISSUER))
    successor = TokenIssuer()
    with pytest.raises(AuthenticationError, match="unknown key"):
        verifier.verify(successor.token("sidecar-a"))
    write_jwks(jwks, issuer, successor)  # rotation: both keys for a while
    assert verifier.verify(successor.token("sidecar-a")).name == "sidecar-a"
    old = issuer.token("sidecar-a")
    assert verifier.verify(old).name == "sidecar-a"
    assert verifier.verify(old).name == "sidecar-a"  # remembered (rule 8)
    write_jwks(jwks, successor)  # the old key retired: its tokens, even remembered ones, fail
    with pytest.raises(AuthenticationError, match="unknown key"):
        verifier.verify(old)
    # A broken file keeps the last good keys, and says so.
    jwks.with_suffix(".tmp").write_text("{not json")
    jwks.with_suffix(".tmp").replace(jwks)
    with caplog.at_level(logging.ERROR, logger="controlplane.identity"):
        assert verifier.verify(successor.token("sidecar-a")).name == "sidecar-a"
    assert "keeping the last good keys" in caplog.text
    assert verifier.keys.reloads == 3


def test_verified_tokens_are_remembered_within_a_bound(
    issuer: TokenIssuer, verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(identity, "VERIFIED_TOKENS", 2)
    tokens = [issuer.token(f"sidecar-{i}") for i in range(5)]
    for t in tokens:
        verifier.verify(t)
    assert len(verifier) == 2
    # A forgotten token is verified again, not refused.
    assert verifier.verify(tokens[0]).name == "sidecar-0"


def test_an_unusable_jwks_file_fails_start_up(tmp_path: Path) -> None:
    bad = tmp_path / "jwks.json"
    bad.write_text('{"keys": []}')
    with pytest.raises(SecurityConfigError, match="no usable key"):
        TokenVerifier(TokenSettings(bad, AUDIENCE, ISSUER))
    with pytest.raises(SecurityConfigError, match="no usable key"):
        TokenVerifier(TokenSettings(tmp_path / "missing.json", AUDIENCE, ISSUER))


def test_authenticator_rules(issuer: TokenIssuer, verifier: TokenVerifier, tmp_path: Path) -> None:
    cert = CertificateAuthority(tmp_path).issue("sidecar-b", server=False).cert.read_bytes()
    token = issuer.token("sidecar-a")
    # Rule 5: nothing configured, everyone is the anonymous development caller.
    open_door = Authenticator()
    assert open_door.open
    assert open_door.authenticate(authorization=None, peer_certificate=None) is ANONYMOUS
    # Rules 2 and 4: the shared token, required when configured.
    shared = Authenticator(shared_token="s3cret", tokens=verifier)
    assert shared.authenticate(authorization="Bearer s3cret", peer_certificate=None) is SHARED_TOKEN
    with pytest.raises(AuthenticationError, match="missing"):
        shared.authenticate(authorization=None, peer_certificate=cert)
    # Rule 3: any other bearer token must verify; no fallback to the certificate.
    assert shared.authenticate(authorization=f"Bearer {token}", peer_certificate=None).name == (
        "sidecar-a"
    )
    mtls = Authenticator(tokens=verifier, client_certificates=True)
    with pytest.raises(AuthenticationError):
        mtls.authenticate(authorization="Bearer guess", peer_certificate=cert)
    # Rule 4: no bearer, the certificate decides; no certificate either, refused.
    assert mtls.authenticate(authorization=None, peer_certificate=cert).name == "sidecar-b"
    with pytest.raises(AuthenticationError, match="no credentials"):
        mtls.authenticate(authorization=None, peer_certificate=None)
