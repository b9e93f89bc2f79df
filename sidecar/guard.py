"""Who may use the proxied port: host names, browser origins, forwarding peers, and which
credential owns a session.

Pure functions and small policy classes, no I/O: the admission stage applies them.
- Host (DNS rebinding): the sidecar sets `Host` anew for the upstream, which defeats the
  upstream's own Host check (the MCP SDKs' rebinding defence), so the sidecar checks the
  client's `Host` against an allow-list itself.
- Origin (MCP specification, Streamable HTTP security): a browser request whose `Origin` is not
  allowed is refused, which defeats DNS rebinding against a server on a private address.
- Trusted proxies: only peers in these networks may set `X-Forwarded-*` for the upstream.
- Session binding: a session remembers a fingerprint of the `Authorization` header that
  created it (never the header); any other credential is told the session does not exist.
  The fingerprint is HMAC-SHA256 keyed with a secret every sidecar of a deployment shares
  (`--fingerprint-key-file`): it travels to the control plane and any sidecar adopting the
  session must compute the same one, while a leaked record gives a dictionary attack on the
  header nothing to test guesses against. Without a key it is plain SHA-256 (development
  only; the sidecar warns at start-up).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_UNSPECIFIED = frozenset({"", "0.0.0.0", "::"})

LOOPBACK_ORIGINS = (
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://[::1]:*",
    "https://[::1]:*",
)


MIN_FINGERPRINT_KEY_BYTES = 16


def fingerprint(authorization: str | None, *, key: bytes | None) -> str:
    """HMAC-SHA256 (hex) of an Authorization header with `key` (plain SHA-256 without one:
    development only); "" when there is no header. The one place a fingerprint is made."""
    if not authorization:
        return ""
    if key is None:
        return hashlib.sha256(authorization.encode()).hexdigest()
    return hmac.new(key, authorization.encode(), hashlib.sha256).hexdigest()


def parse_fingerprint_key(raw: bytes) -> bytes:
    """The key in a `--fingerprint-key-file`'s bytes (surrounding whitespace, such as the
    newline of `openssl rand -base64 32 > key`, is not part of it); ValueError if too short."""
    key = raw.strip()
    if len(key) < MIN_FINGERPRINT_KEY_BYTES:
        raise ValueError(
            f"--fingerprint-key-file: the key must have at least {MIN_FINGERPRINT_KEY_BYTES} "
            f"bytes (got {len(key)}); make one with: openssl rand -base64 32"
        )
    return key


def _split(origin: str) -> tuple[str, str, str] | None:
    """(scheme, host, port) of an origin or pattern, lower-cased; None if malformed."""
    try:
        parts = urlsplit(origin.strip())
        host = parts.hostname
        port = parts.port
    except ValueError:
        if origin.endswith(":*"):
            base = _split(origin[:-2])
            return None if base is None else (base[0], base[1], "*")
        return None
    if parts.scheme not in ("http", "https") or not host or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username:
        return None
    default = "443" if parts.scheme == "https" else "80"
    return parts.scheme, host.lower(), str(port) if port is not None else default


class OriginPolicy:
    """Allow-list of origins: exact (`https://app.example.com`), any port (`http://host:*`),
    or everything (`*`). Empty means loopback origins only."""

    def __init__(self, patterns: Sequence[str]) -> None:
        patterns = tuple(patterns) or LOOPBACK_ORIGINS
        self.allow_all = "*" in patterns
        self._allowed: set[tuple[str, str, str]] = set()
        for p in patterns:
            if p == "*":
                continue
            parsed = _split(p)
            if parsed is None:
                raise ValueError(
                    f"--allowed-origin: {p!r} is not an origin like https://host[:port]"
                )
            self._allowed.add(parsed)

    def allows(self, origin: str) -> bool:
        if self.allow_all:
            return True
        parsed = _split(origin)
        if parsed is None:
            return False
        scheme, host, _ = parsed
        return parsed in self._allowed or (scheme, host, "*") in self._allowed


def _split_host(value: str) -> tuple[str, str] | None:
    """(host, port or "") of a Host header or allow-list entry, lower-cased, without a
    trailing dot or IPv6 brackets; None if malformed."""
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    elif value.count(":") > 1:
        host, port = value, ""  # a bare IPv6 address (allow-list entries only)
    else:
        host, _, port = value.partition(":")
    if port and not (port.isdigit() or port == "*"):
        return None
    host = host.rstrip(".")
    return (host, "" if port == "*" else port) if host else None


class HostPolicy:
    """Allow-list of `Host` header values: `name` or `name:*` (any port), `name:port`,
    `*.domain` (any sub-domain), or `*` (everything). The loopback names and the listen
    address (unless it is a wildcard address) are always allowed."""

    def __init__(self, patterns: Sequence[str], *, listen_host: str = "") -> None:
        self.allow_all = "*" in patterns
        self._names: set[str] = set()
        self._exact: set[tuple[str, str]] = set()
        self._suffixes: list[str] = []
        defaults = [*LOOPBACK_HOSTS] + ([] if listen_host in _UNSPECIFIED else [listen_host])
        for p in [*defaults, *patterns]:
            if p == "*":
                continue
            parsed = _split_host(p)
            if parsed is None:
                raise ValueError(f"--allowed-host: {p!r} is not a host name like host[:port]")
            host, port = parsed
            if host.startswith("*."):
                self._suffixes.append(host[1:])
            elif port:
                self._exact.add((host, port))
            else:
                self._names.add(host)

    def allows(self, host_header: str | None) -> bool:
        if self.allow_all:
            return True
        parsed = _split_host(host_header or "")
        if parsed is None:
            return False
        host, port = parsed
        return (
            host in self._names
            or (host, port) in self._exact
            or any(host.endswith(s) for s in self._suffixes)
        )


class TrustedProxies:
    """Networks whose peers may set `X-Forwarded-*` (CIDRs or single addresses)."""

    def __init__(self, networks: Sequence[str]) -> None:
        try:
            self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        except ValueError as exc:
            raise ValueError(f"--trusted-proxy: {exc}") from exc

    def trusts(self, peer: str | None) -> bool:
        if not self._networks or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in n for n in self._networks)
