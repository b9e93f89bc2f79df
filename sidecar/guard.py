"""Who may use the proxied port: browser origins, and which credential owns a session.

Pure functions and a small policy class, no I/O: the proxy applies them at its edge.
- Origin (MCP specification, Streamable HTTP security): a browser request whose `Origin` is not
  allowed is refused, which defeats DNS rebinding against a server on a private address.
- Session binding: a session remembers the SHA-256 of the `Authorization` header that created
  it (never the header); any other credential is told the session does not exist.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from urllib.parse import urlsplit

LOOPBACK_ORIGINS = (
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://[::1]:*",
    "https://[::1]:*",
)


def fingerprint(authorization: str | None) -> str:
    """SHA-256 (hex) of an Authorization header; "" when there is none."""
    if not authorization:
        return ""
    return hashlib.sha256(authorization.encode()).hexdigest()


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
