"""Admission: whether the proxied port serves a request at all, before anything is forwarded.

Checks, in order, each refusal logged, counted (`refused{reason}`) and answered in JSON-RPC
shape:
1. `Host` not allowed -> 421 (the sidecar rewrites `Host`, so it must check it: DNS rebinding).
2. A browser `Origin` not allowed -> 403 (each `Origin` header is checked, if there are
   several).
3. Over `max_streams` open SSE responses, or over `max_upstream_requests` requests waiting for
   the upstream -> 503 with `Retry-After`.
4. A session (or legacy session) presented with another credential than the one that created
   it -> 404, as if it did not exist.
"""

from __future__ import annotations

import logging

from aiohttp import web

from sidecar.config import SidecarConfig
from sidecar.guard import HostPolicy, OriginPolicy, TrustedProxies, fingerprint
from sidecar.headers import error_response
from sidecar.metrics import Metrics
from sidecar.streams import LiveStream, Registry, Session
from sidecar.upstream import Upstream
from sidecar.writer import Writer
from tether.logthrottle import ThrottledLog

log = logging.getLogger("tether.sidecar.admission")


class Admission:
    def __init__(
        self,
        *,
        config: SidecarConfig,
        metrics: Metrics,
        registry: Registry,
        upstream: Upstream,
        writer: Writer,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.registry = registry
        self.upstream = upstream
        self.writer = writer
        self.hosts = HostPolicy(config.allowed_hosts, listen_host=config.listen_host)
        self.origins = OriginPolicy(config.allowed_origins)
        self.trusted = TrustedProxies(config.trusted_proxies)
        self.warnings = ThrottledLog(log)
        """Refusals are per request: a flood of them is summarised (`tether.logthrottle`)."""

    def refusal(self, request: web.Request) -> web.Response | None:
        """Rules 1-3, and rule 4 for legacy POSTs; None to go on."""
        host = request.headers.get("Host")
        if not self.hosts.allows(host):
            return self._refuse(
                request, "host", 421, f"host {(host or '')[:200]!r} is not served here"
            )
        for origin in request.headers.getall("Origin", ()):  # every one, however many
            if not self.origins.allows(origin):
                message = f"origin {origin[:200]!r} is not allowed"
                return self._refuse(request, "origin", 403, message)
        if request.method in ("GET", "POST") and self.writer.active >= self.config.max_streams:
            return self._busy(request, "too_many_streams", f"{self.writer.active} streams open")
        if self.upstream.full:
            return self._busy(
                request, "too_many_requests", f"{self.upstream.waiting} requests wait upstream"
            )
        if request.method == "POST" and not self._legacy_post_allowed(request):
            return error_response(404, "session not found")
        return None

    def trusts_forwarding(self, request: web.Request) -> bool:
        return self.trusted.trusts(request.remote)

    def presented(self, request: web.Request) -> str | None:
        """The fingerprint of the request's credential; None when sessions are not bound."""
        if not self.config.session_binding:
            return None
        return fingerprint(request.headers.get("Authorization"), key=self.config.fingerprint_key)

    def credential_matches(self, request: web.Request, sess: Session) -> bool:
        """A session belongs to the credential that created it; first sight records it."""
        if not self.config.session_binding:
            return True
        presented = fingerprint(
            request.headers.get("Authorization"), key=self.config.fingerprint_key
        )
        if sess.credential_fingerprint is None:
            sess.credential_fingerprint = presented
            return True
        if sess.credential_fingerprint == presented:
            return True
        return self._refuse_credential(request, f"session {sess.session_id}")

    def legacy_credential_matches(self, request: web.Request, stream: LiveStream) -> bool:
        """A legacy stream belongs to the credential of the GET /sse that opened it."""
        if not self.config.session_binding or stream.credential_fingerprint is None:
            return True
        if stream.credential_fingerprint == fingerprint(
            request.headers.get("Authorization"), key=self.config.fingerprint_key
        ):
            return True
        return self._refuse_credential(request, f"legacy session {stream.legacy_session}")

    def _legacy_post_allowed(self, request: web.Request) -> bool:
        """A POST to a legacy session's endpoint (`...?session_id=X`) needs its credential."""
        name = request.query.get("session_id") or request.query.get("sessionId")
        stream = self.registry.legacy_sessions.get(name) if name else None
        return stream is None or self.legacy_credential_matches(request, stream)

    def _refuse_credential(self, request: web.Request, what: str) -> bool:
        self.warnings.log(
            ("credential",),
            "requests refused to another credential",
            logging.WARNING,
            "%s %s: %s refused to another credential",
            request.method,
            request.path,
            what,
        )
        self.metrics.refused.labels("credential").inc()
        return False

    def _refuse(self, request: web.Request, reason: str, status: int, message: str) -> web.Response:
        self.warnings.log(
            ("refused", reason),
            f"requests refused ({reason})",
            logging.WARNING,
            "%s %s: refused (%d): %s",
            request.method,
            request.path,
            status,
            message,
        )
        self.metrics.refused.labels(reason).inc()
        return error_response(status, message)

    def _busy(self, request: web.Request, reason: str, what: str) -> web.Response:
        busy = self._refuse(request, reason, 503, f"too busy ({what}); retry shortly")
        busy.headers["Retry-After"] = "1"
        return busy
