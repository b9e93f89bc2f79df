"""Sidecar settings: one frozen dataclass, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sidecar.guard import HostPolicy, OriginPolicy, TrustedProxies
from sidecar.reconnect import ReconnectConfig
from sidecar.stream_core import check_buffer_fits_events
from sidecar.tracker import TrackerLimits
from tether.grpc_security import ClientSecurity


class ConfigError(ValueError):
    """A setting is invalid; the message says which and why."""


def parse_hostport(value: str, *, what: str) -> tuple[str, int]:
    """Split `HOST:PORT` (IPv6 as `[::1]:PORT`); raise ConfigError with `what` in the message."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    listen_host: str
    listen_port: int
    upstream: str
    """Base URL of the MCP server; request paths are appended unchanged."""
    admin_host: str | None = None
    admin_port: int | None = None
    control_plane: str | None = None
    owner: str | None = None
    """This sidecar's name in the control plane (default: $POD_NAME, else host-pid)."""
    control_plane_security: ClientSecurity | None = None
    """TLS, mutual TLS and bearer token towards the control plane (plaintext when None)."""
    report_interval: float = 0.05
    """How often stream positions are flushed to the control plane (coalesced per stream)."""
    renew_interval: float = 30.0
    """At most this many seconds between renewals of the sessions this sidecar serves; a third
    of the control plane's session TTL (stated in its acknowledgements) when that is less."""
    max_event_bytes: int = 1 << 20
    max_request_body_bytes: int = 4 << 20
    tracker: TrackerLimits = field(default_factory=TrackerLimits)
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)
    connect_timeout: float = 10.0
    upstream_dead_after: float = 10.0
    """An upstream connection that stays silent this long, and whose peer does not answer TCP
    keepalive probes, is declared dead (then the stream is resumed). Idle but live streams
    are unaffected: the peer's kernel answers the probes."""
    client_retry_ms: int | None = None
    """`retry:` sent to clients on priming events: how long they wait before reconnecting
    (None: the client's default, 1 s for the official SDK, which tries twice)."""
    heartbeat_interval: float = 15.0
    """Idle client streams get an SSE comment this often, so dead clients are noticed."""
    client_write_timeout: float = 60.0
    """A client that takes longer than this to accept a write is dropped (it can resume)."""
    orphan_timeout: float = 300.0
    """How long a stream keeps reading its upstream while no client is attached."""
    stream_linger: float = 300.0
    """How long a finished stream stays replayable for a client that comes back."""
    linger_max_bytes: int = 64 << 20
    """Replay buffers of finished streams kept at most, in all; the longest-finished are
    forgotten first (each stream's own buffer is bounded by `tracker.replay_max_bytes`)."""
    session_idle_timeout: float = 3600.0
    max_streams: int = 10_000
    """Concurrent SSE responses; more are answered 503 with Retry-After."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed to call (`https://app.example`, `http://localhost:*`, `*`).
    Empty: loopback origins only. Requests without an Origin header are not browsers."""
    session_binding: bool = True
    """Refuse a session to any credential but the one that created it."""
    access_log: bool = True
    """One INFO line per request on the proxied port (`sidecar.accesslog`)."""
    fingerprint_key: bytes | None = field(default=None, repr=False)
    """Key of the credential fingerprints (`sidecar.guard.fingerprint`), shared by every
    sidecar of a deployment; None: unkeyed SHA-256 (development only)."""
    allowed_hosts: tuple[str, ...] = ()
    """`Host` values the proxied port answers (besides loopback names and the listen address):
    `name`, `name:port`, `*.domain`, `*`. Others get 421 (DNS rebinding defence)."""
    trusted_proxies: tuple[str, ...] = ()
    """Peers (CIDRs) whose `X-Forwarded-*` headers are passed on; anyone else's are replaced."""
    upstream_response_timeout: float = 300.0
    """Longest wait for the upstream's response headers (a JSON answer to a slow tool call
    arrives whole, so this bounds a tool call's run time in JSON mode); then 504."""
    max_upstream_requests: int = 1000
    """Requests waiting for the upstream's response headers at once; more are answered 503."""
    tracing: bool = False
    """Export OpenTelemetry traces (`sidecar.tracing`; the `tracing` extra), as the standard
    `OTEL_*` variables say."""
    drain_timeout: float = 30.0
    """Longest drain (`/drain`, the preStop hook): how long requests in flight may take to
    finish before the pod goes on stopping. Size `terminationGracePeriodSeconds` from it."""

    upstream_probe_interval: float = 2.0
    """Seconds between TCP connects to the upstream that readiness follows (`sidecar.health`);
    0: no probe, the upstream counts as reachable."""
    upstream_probe_timeout: float = 1.0
    """A probe connect not accepted within this many seconds failed."""
    ready_requires_control_plane: bool = False
    """Not ready while no report stream to the control plane is open (`sidecar.readiness`
    rule 2 says why this is off by default)."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--upstream: expected an http(s) URL, got {self.upstream!r}")
        if parts.query or parts.fragment:
            raise ConfigError("--upstream: the base URL must not have a query or fragment")
        try:
            OriginPolicy(self.allowed_origins)
            HostPolicy(self.allowed_hosts, listen_host=self.listen_host)
            TrustedProxies(self.trusted_proxies)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self._check_bounds()

    def _check_bounds(self) -> None:
        if self.client_retry_ms is not None and not 0 <= self.client_retry_ms <= 3_600_000:
            raise ConfigError("client_retry_ms must be between 0 and 3600000")
        try:
            check_buffer_fits_events(self.tracker, self.max_event_bytes)
        except ValueError as exc:
            raise ConfigError(f"--replay-bytes / --max-event-bytes: {exc}") from exc
        if self.max_streams < 1:
            raise ConfigError("max_streams must be at least 1")
        if self.linger_max_bytes < 0:
            raise ConfigError("linger_max_bytes must be >= 0")
        if self.max_upstream_requests < 1:
            raise ConfigError("max_upstream_requests must be at least 1")
        for name in ("max_event_bytes", "max_request_body_bytes"):
            if getattr(self, name) < 1024:
                raise ConfigError(f"{name} must be at least 1024 bytes")
        if self.upstream_probe_interval < 0:
            raise ConfigError("upstream_probe_interval must be >= 0")
        if self.upstream_dead_after < 2:
            raise ConfigError("upstream_dead_after must be at least 2 seconds")
        for name in (
            "connect_timeout",
            "heartbeat_interval",
            "client_write_timeout",
            "report_interval",
            "renew_interval",
            "orphan_timeout",
            "stream_linger",
            "upstream_response_timeout",
            "drain_timeout",
            "upstream_probe_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")

    @property
    def upstream_base(self) -> str:
        return self.upstream.rstrip("/")
