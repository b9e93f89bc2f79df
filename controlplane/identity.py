"""Who is calling the control plane: every gRPC call is given an authenticated principal.

`Authenticator` decides from what a call presents (its bearer token, the client certificate
the TLS handshake verified) and raises `AuthenticationError` with the reason; no gRPC in it.
`AuthenticationInterceptor` is the thin layer that feeds it each call and files the principal
where the servicer reads it (`current_principal`).

Rules:
  1. Health checks need no credential (Kubernetes probes carry none).
  2. A bearer token equal to the shared token (`--auth-token-file`) is the development caller:
     trusted with everything, as with no authentication at all. A warning says so once, at
     start-up.
  3. Any other bearer token must be a Kubernetes projected ServiceAccount token (a JWT) that
     verifies against the JWKS file (`--jwt-jwks-file`): signed by a key of the set with an
     asymmetric algorithm, within `exp` and `nbf` (`LEEWAY` seconds of clock skew), `aud`
     containing `--jwt-audience`, `iss` equal to `--jwt-issuer`, and naming a ServiceAccount
     (claim `kubernetes.io`). The principal is the pod the token names
     (`kubernetes.io.pod.name`): a projected token proves which pod holds it. A token bound
     to no pod (`kubectl create token`, for an operator's tool) is its ServiceAccount, with
     no name to act as a sidecar under. Anything else is UNAUTHENTICATED.
  4. Without a bearer token: when the shared token is configured, UNAUTHENTICATED (it is
     required on every call, as before); else the client certificate (mutual TLS, verified
     against `--tls-client-ca` by the handshake) names the principal: its first URI SAN (a
     SPIFFE id, say), else its subject CN; else, when callers must authenticate (a JWKS is
     configured), UNAUTHENTICATED.
  5. With no caller authentication configured at all, every caller is the anonymous
     development caller (trusted); a warning says so once, at start-up.
  6. A principal's `name` is the owner name it acts as (the policy's rules compare it with a
     session's owner), unique in the cluster: a pod's name is unique only in its namespace,
     so the namespace is part of it. A pod of the home namespace (`--home-namespace`, where
     the control plane and its sidecars run; `tether` by default) is `<pod>`, a pod of any
     other namespace `<pod>@<namespace>` (`@` is in no pod name nor namespace, so no two
     pods share a name). The pod is that of a token (rule 3), or of a URI SAN of the SPIFFE
     form `.../ns/<namespace>/pod/<pod>` (`.../ns/<namespace>/sa/<account>` names its
     account the same way: pods sharing that certificate share the name); any other URI SAN
     names no one; a CN is its own name (the operator's CA chose it). None when that is not
     a valid owner name: such a principal cannot act as a sidecar.
  7. The JWKS file is read again when it changes (keys rotate; a mounted ConfigMap is
     replaced), looked at on every verification by its size, mtime and inode. A new file that
     cannot be read or holds no usable key keeps the last good set and logs why.
  8. A verified token is remembered until it expires (at most `VERIFIED_TOKENS`, the least
     recently used forgotten first; all forgotten when the JWKS file changes), so a sidecar's
     calls do not pay for a signature check each: PyJWT's parsing costs about 0.5 ms a token.
  9. Authentication happens when a call starts: a report stream opened with a token stays open
     after the token expires (as Kubernetes watches do); the next stream needs a fresh one.
  10. Refusals are logged at most once per `REFUSAL_LOG_INTERVAL` per kind of reason
     (`tether.logthrottle`, bounded; the kind leaves out what the caller chose, such as a key
     id), then one summary line with the count held back, so a flood of bad calls writes few
     lines, however varied.
"""

from __future__ import annotations

import contextvars
import enum
import hmac
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import jwt
from cryptography import x509
from cryptography.x509.oid import NameOID

from controlplane.handlers import wrapped
from tether.grpc_security import HEALTH_PREFIX, SecurityConfigError, ServerSecurity, read_token
from tether.logthrottle import ThrottledLog
from tether.model import InvalidIdError, OwnerName, parse_owner

if TYPE_CHECKING:  # generic in the type stubs only; not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

log = logging.getLogger(__name__)

LEEWAY = 30.0
"""Seconds of clock skew allowed on a token's `exp` and `nbf`."""

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
"""Signature algorithms a token may use: asymmetric only (never `none`, never HMAC, whose key
would be the public JWKS)."""

REFUSAL_LOG_INTERVAL = 60.0
VERIFIED_TOKENS = 1024
"""Verified tokens remembered (rule 8): one per sidecar pod is what a deployment needs."""


class AuthenticationError(Exception):
    """The call's credentials do not authenticate it; the message says why (sent to it).
    `kind` is the message without what the caller chose (a key id, a parser's complaint):
    refusals are logged per kind (rule 10), so a caller cannot multiply the lines."""

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind or message


class PrincipalKind(enum.Enum):
    ANONYMOUS = "anonymous"
    """No caller authentication is configured (development)."""
    SHARED_TOKEN = "shared-token"
    """The shared bearer token (development)."""
    CERTIFICATE = "certificate"
    """A client certificate (mutual TLS)."""
    SERVICE_ACCOUNT = "service-account"
    """A Kubernetes projected ServiceAccount token."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    kind: PrincipalKind
    subjects: tuple[str, ...]
    """What policy patterns are matched against, the principal's id first:
    `spiffe://...` (a URI SAN) or `cn:<CN>` for a certificate; `pod:<namespace>/<pod>` and
    `system:serviceaccount:<namespace>:<name>` for a ServiceAccount token."""
    name: OwnerName | None = None
    """The owner name it acts as (rule 6)."""

    @property
    def id(self) -> str:
        return self.subjects[0]

    @property
    def trusted(self) -> bool:
        """A development caller (rules 2 and 5): may do everything."""
        return self.kind in (PrincipalKind.ANONYMOUS, PrincipalKind.SHARED_TOKEN)


HOME_NAMESPACE = "tether"
"""The namespace whose pods act under their bare pod name (rule 6): that of the manifests."""

ANONYMOUS = Principal(PrincipalKind.ANONYMOUS, ("anonymous",))
SHARED_TOKEN = Principal(PrincipalKind.SHARED_TOKEN, ("shared-token",))


def _owner_name(value: str) -> OwnerName | None:
    try:
        return parse_owner(value)
    except InvalidIdError:
        return None


def pod_owner_name(pod: str, namespace: str, home: str) -> OwnerName | None:
    """The owner name of pod `namespace/pod` (rule 6); None if it is not a valid one."""
    if not pod or not namespace or "@" in pod or "@" in namespace:
        return None
    return _owner_name(pod if namespace == home else f"{pod}@{namespace}")


def _uri_owner_name(uri: str, home: str) -> OwnerName | None:
    """Rule 6 for a URI SAN: only `.../ns/<namespace>/pod/<pod>` (or `/sa/<account>`)."""
    parts = uri.rstrip("/").split("/")
    if len(parts) < 4 or parts[-4] != "ns" or parts[-2] not in ("pod", "sa"):
        return None
    return pod_owner_name(parts[-1], parts[-3], home)


def certificate_principal(pem: bytes, *, home_namespace: str = HOME_NAMESPACE) -> Principal:
    """The principal a client certificate names (rules 4 and 6)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise AuthenticationError(
            f"unreadable client certificate: {e}", kind="unreadable client certificate"
        ) from e
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris:
        uri = uris[0]
        return Principal(PrincipalKind.CERTIFICATE, (uri,), _uri_owner_name(uri, home_namespace))
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise AuthenticationError("the client certificate has neither a URI SAN nor a CN")
    cn = names[0].value
    cn = cn.decode(errors="replace") if isinstance(cn, bytes) else cn
    return Principal(PrincipalKind.CERTIFICATE, (f"cn:{cn}",), _owner_name(cn))


# --- ServiceAccount tokens -----------------------------------------------------------------


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class JwksFile:
    """The keys of a JWKS file, read again when the file changes (rule 7)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._state: tuple[int, int, int] | None = None
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self.reloads = 0
        """Times a changed file was read successfully (the first read included)."""
        if not self._reload():
            raise SecurityConfigError(f"--jwt-jwks-file: {path} holds no usable key")

    def refresh(self) -> None:
        """Read the file again if it changed (rule 7); `reloads` counts the reads."""
        self._reload()

    def _reload(self) -> bool:
        state = _file_state(self.path)
        if state is None or state == self._state:
            return state is not None
        self._state = state
        try:
            data = json.loads(self.path.read_bytes())
            keyset = jwt.PyJWKSet.from_dict(data)
        except (OSError, ValueError, jwt.PyJWTError) as e:
            log.error("JWKS file %s unusable (%s); keeping the last good keys", self.path, e)
            return False
        self._keys = {k.key_id: k for k in keyset.keys}
        self.reloads += 1
        log.info("JWKS file %s: %d keys", self.path, len(self._keys))
        return True

    def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key with id `kid`; without a `kid`, the only key there is."""
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """How ServiceAccount tokens are verified (`tether control-plane --jwt-*`)."""

    jwks_file: Path
    audience: str
    issuer: str


class TokenVerifier:
    """Verifies projected ServiceAccount tokens offline (rule 3)."""

    def __init__(self, settings: TokenSettings, *, home_namespace: str = HOME_NAMESPACE) -> None:
        if not settings.audience or not settings.issuer:
            raise SecurityConfigError("--jwt-jwks-file needs --jwt-audience and --jwt-issuer")
        self.settings = settings
        self.home_namespace = home_namespace
        self.keys = JwksFile(settings.jwks_file)
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._keys_read = self.keys.reloads

    def __len__(self) -> int:
        """Verified tokens remembered."""
        return len(self._verified)

    def verify(self, token: str) -> Principal:
        self.keys.refresh()
        if self.keys.reloads != self._keys_read:
            self._keys_read = self.keys.reloads
            self._verified.clear()
        hit = self._verified.get(token)
        if hit is not None and time.time() < hit[1] + LEEWAY:
            self._verified.move_to_end(token)
            return hit[0]
        self._verified.pop(token, None)
        principal, expires = self._verify(token)
        self._verified[token] = (principal, expires)
        while len(self._verified) > VERIFIED_TOKENS:
            self._verified.popitem(last=False)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise AuthenticationError(
                f"bearer token is not a JWT: {e}", kind="bearer token is not a JWT"
            ) from e
        kid = header.get("kid")
        key = self.keys.key(kid if isinstance(kid, str) else None)
        if key is None:
            raise AuthenticationError(
                f"token signed with unknown key {kid!r}", kind="token signed with an unknown key"
            )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(ALGORITHMS),
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "aud", "iss"]},
            )
        except jwt.PyJWTError as e:
            raise AuthenticationError(
                f"token refused: {e}", kind=f"token refused: {type(e).__name__}"
            ) from e
        return _pod_principal(claims, self.home_namespace), float(claims["exp"])


def _pod_principal(claims: Mapping[str, Any], home: str) -> Principal:
    k8s = claims.get("kubernetes.io")
    k8s = k8s if isinstance(k8s, dict) else {}
    namespace = k8s.get("namespace")
    pod = k8s.get("pod")
    pod_name = pod.get("name") if isinstance(pod, dict) else None
    account = k8s.get("serviceaccount")
    account_name = account.get("name") if isinstance(account, dict) else None
    if not isinstance(namespace, str) or not isinstance(account_name, str):
        raise AuthenticationError("token names no ServiceAccount (not a Kubernetes token)")
    account_id = f"system:serviceaccount:{namespace}:{account_name}"
    if not isinstance(pod_name, str):
        # `kubectl create token`: an operator's tool, never a sidecar (no name to act as).
        return Principal(PrincipalKind.SERVICE_ACCOUNT, (account_id,), None)
    subjects = (f"pod:{namespace}/{pod_name}", account_id)
    return Principal(
        PrincipalKind.SERVICE_ACCOUNT, subjects, pod_owner_name(pod_name, namespace, home)
    )


# --- the decision ----------------------------------------------------------------------------


class Authenticator:
    """Rules 2 to 5: the principal of a call from what it presents."""

    def __init__(
        self,
        *,
        shared_token: str | None = None,
        tokens: TokenVerifier | None = None,
        client_certificates: bool = False,
        home_namespace: str = HOME_NAMESPACE,
    ) -> None:
        self._home = home_namespace
        self._shared = f"Bearer {shared_token}".encode() if shared_token else None
        self._tokens = tokens
        self._certificates = client_certificates

    @property
    def open(self) -> bool:
        """No caller authentication configured: everyone is the anonymous caller (rule 5)."""
        return self._shared is None and self._tokens is None and not self._certificates

    def warn_if_development(self) -> None:
        """Rules 2 and 5: say once, at start-up, that callers are trusted blindly."""
        if self.open:
            log.warning(
                "no caller authentication configured: every caller may read, write and "
                "delete every session (development only; see the README's security section)"
            )
        elif self._shared is not None:
            log.warning(
                "the shared token (--auth-token-file) is for development only: its holders "
                "may do everything; use mutual TLS or ServiceAccount tokens with a policy"
            )

    def authenticate(
        self, *, authorization: str | None, peer_certificate: bytes | None
    ) -> Principal:
        if authorization:
            if self._shared is not None and hmac.compare_digest(
                authorization.encode(), self._shared
            ):
                return SHARED_TOKEN
            scheme, _, token = authorization.partition(" ")
            if self._tokens is None or scheme.lower() != "bearer" or not token.strip():
                raise AuthenticationError("missing or wrong bearer token")
            return self._tokens.verify(token.strip())
        if self._shared is not None:
            raise AuthenticationError("missing or wrong bearer token")
        if peer_certificate is not None:
            return certificate_principal(peer_certificate, home_namespace=self._home)
        if self._tokens is not None or self._certificates:
            raise AuthenticationError("no credentials: send a ServiceAccount token")
        return ANONYMOUS


# --- the gRPC glue ---------------------------------------------------------------------------

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "tether_principal", default=ANONYMOUS
)


def current_principal() -> Principal:
    """The principal of the call being handled. ANONYMOUS in a server built without
    `AuthenticationInterceptor` (tests of the servicer alone): the development caller."""
    return _current.get()


Behaviour = Callable[[Any, Any], Any]


class AuthenticationInterceptor(_ServerInterceptor):
    """Authenticates every call but health checks (UNAUTHENTICATED when that fails) and runs
    its handler with the principal set (`current_principal`)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator
        self._refusals = ThrottledLog(log, burst=1, interval=REFUSAL_LOG_INTERVAL)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        if self.authenticator.open:
            return handler  # rule 5: `current_principal` is ANONYMOUS without a wrapper
        return wrapped(handler, self._enter)

    async def _enter(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = (
                    value.decode(errors="replace") if isinstance(value, bytes) else value
                )
        pems = list((context.auth_context() or {}).get("x509_pem_cert") or ())
        try:
            principal = self.authenticator.authenticate(
                authorization=authorization, peer_certificate=pems[0] if pems else None
            )
        except AuthenticationError as e:
            self._refusals.log(
                ("unauthenticated", e.kind),
                f"unauthenticated calls ({e.kind})",
                logging.WARNING,
                "unauthenticated call from %s: %s",
                context.peer(),
                e,
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        _current.set(principal)


def authenticator_for(
    security: ServerSecurity | None,
    tokens: TokenSettings | None,
    *,
    home_namespace: str = HOME_NAMESPACE,
) -> Authenticator:
    """The authenticator of a control plane's settings (`ServerSecurity`, token settings);
    reads the shared token and the JWKS now, so a bad file fails start-up."""
    shared = read_token(security.token_file, "--auth-token-file") if security else None
    return Authenticator(
        shared_token=shared,
        tokens=(
            TokenVerifier(tokens, home_namespace=home_namespace) if tokens is not None else None
        ),
        client_certificates=security is not None and security.client_ca is not None,
        home_namespace=home_namespace,
    )


def server_interceptors(authenticator: Authenticator) -> list[_ServerInterceptor]:
    return [AuthenticationInterceptor(authenticator)]
