"""Kubernetes-like projected ServiceAccount tokens made on the spot: an issuer with its own
RSA key, its JWKS written to a file (as an operator would from the API server's
`/openid/v1/jwks`), and tokens with the claims the kubelet's carry."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "tether-control-plane"


class TokenIssuer:
    """Signs tokens with one RSA key (`kid`); `jwks()` is its public key set."""

    def __init__(self, kid: str | None = None) -> None:
        self.kid = kid or uuid.uuid4().hex[:12]
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return jwk

    def token(
        self,
        pod: str,
        *,
        namespace: str = "tether",
        service_account: str = "tether-mcp",
        audience: str | list[str] = AUDIENCE,
        issuer: str = ISSUER,
        lifetime: float = 3600.0,
        not_before: float | None = None,
        kubernetes: dict[str, Any] | None = None,
        **extra: Any,
    ) -> str:
        """A token for `pod`; `kubernetes` replaces the `kubernetes.io` claim, `extra` adds
        or replaces others."""
        now = time.time()
        claims: dict[str, Any] = {
            "aud": audience if isinstance(audience, list) else [audience],
            "iss": issuer,
            "iat": int(now),
            "nbf": int(not_before if not_before is not None else now),
            "exp": int(now + lifetime),
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": pod, "uid": str(uuid.uuid4())},
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
            },
        }
        if kubernetes is not None:
            claims["kubernetes.io"] = kubernetes
        claims.update(extra)
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})


def write_jwks(path: Path, *issuers: TokenIssuer) -> Path:
    """Write the issuers' public keys as a JWKS file, replacing it at once (as kubelet does)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": [i.jwk() for i in issuers]}))
    tmp.replace(path)
    return path


def write_token(path: Path, token: str) -> Path:
    """Write a token file, replacing it at once (as kubelet rotates a projected token)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(token)
    tmp.replace(path)
    return path
