"""Prometheus metrics of one sidecar, on its own registry so several can share a process.

Labels are bounded sets, whatever clients send (an operator's Prometheus must not grow with
traffic): `method` is one of `MCP_METHODS`, `GET`, `DELETE` or `other`; `status` an HTTP status
class or one of `timeout`, `unreachable`; `source` and `outcome` are enums of this module.
The README lists every name, its labels and what it means; the Grafana dashboard under
`deploy/grafana/` uses only these names (tests/deploy checks it against a real scrape).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidecar.reconnect import Outcome
from tether.buildinfo import register_process_metrics

if TYPE_CHECKING:
    from sidecar.reporter import Reporter
    from sidecar.streams import Registry


MCP_METHODS: Final = frozenset(
    {
        "initialize",
        "ping",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
        "tools/list",
        "tools/call",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "completion/complete",
        "logging/setLevel",
        "tasks/get",
        "tasks/result",
        "tasks/list",
        "tasks/cancel",
        "server/discover",
        "subscriptions/listen",
    }
)
"""The `method` label's JSON-RPC values; any other method name is `other`."""

OTHER: Final = "other"

REQUEST_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
"""Upstream answers: milliseconds for a ping, up to the response timeout for a slow tool."""
RECOVERY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
"""Resumes and upstream outages: a buffer replay is milliseconds, an upstream restart seconds."""


def method_label(http_method: str, rpc_method: str | None) -> str:
    """The `method` label of one request: its JSON-RPC method when it is a known MCP one,
    `GET`/`DELETE` for bodiless requests, else `other`."""
    if rpc_method is not None:
        return rpc_method if rpc_method in MCP_METHODS else OTHER
    if http_method in ("GET", "DELETE"):
        return http_method
    return OTHER


def status_label(status: int) -> str:
    """`2xx`, `4xx`, ...: the class, so the label set stays small."""
    return f"{status // 100}xx" if 100 <= status < 600 else OTHER


class Failure(enum.Enum):
    """The `status` of an upstream request that got no answer."""

    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"


class ResumeSource(enum.Enum):
    """Where a resumed stream's missed events came from (the `source` label)."""

    BUFFER = "buffer"
    """This sidecar's replay buffer."""
    UPSTREAM = "upstream"
    """Older than the buffer: fetched again from the upstream first."""
    ADOPTED = "adopted"
    """A stream another sidecar served, taken over: its upstream resumed from the client's id."""


class ReconnectOutcome(enum.Enum):
    """How an upstream outage of one stream ended (the `outcome` label)."""

    RESUMED = "resumed"
    """A reconnect got the stream back."""
    FAILED = "failed"
    """The reconnect policy gave up (or the upstream cannot resume): the stream failed."""
    STOPPED = "stopped"
    """The stream ended for another reason while reconnecting (its session went, a drain)."""


class ResumeClock:
    """Times one client resume, from its request to the moment the client has the first event
    it missed (or, resuming from the buffer with nothing missed, is live again)."""

    def __init__(self, metrics: Metrics, source: ResumeSource, started: float) -> None:
        self._metrics = metrics
        self._source = source
        self._started = started
        self._done = False

    @property
    def waits_for_event(self) -> bool:
        """An adopted stream has nothing buffered: its first event comes from the upstream."""
        return self._source is ResumeSource.ADOPTED

    def caught_up(self) -> None:
        """The first missed event is written (or there was none); observed once."""
        if not self._done:
            self._done = True
            self._metrics.resume_seconds.labels(self._source.value).observe(
                time.monotonic() - self._started
            )


class OutageClock:
    """Times the upstream outages of one tracked stream: from a connection that failed (a
    polling close is no outage, `sidecar.reconnect` rule 2) until a reconnect got the stream
    back, or the stream ended without it."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._since: float | None = None

    def connection_ended(self, outcome: Outcome, now: float) -> None:
        if outcome is Outcome.FAILED and self._since is None:
            self._since = now

    def reconnected(self, back: bool, now: float) -> None:
        """`back`: the reconnect got a stream to relay (else the outage goes on)."""
        if back and self._since is not None:
            self._metrics.outage(ReconnectOutcome.RESUMED, now - self._since)
            self._since = None

    def stream_ended(self, failed: bool, now: float) -> None:
        if self._since is not None:
            outcome = ReconnectOutcome.FAILED if failed else ReconnectOutcome.STOPPED
            self._metrics.outage(outcome, now - self._since)
            self._since = None


class ReporterCollector:
    """The reporter's own counters, read at scrape time (it keeps plain ints so that the
    event path never touches a metrics library)."""

    def __init__(self, reporter: Reporter) -> None:
        self._reporter = reporter

    def collect(self) -> Iterator[Metric]:
        stats = self._reporter.stats
        for name, value, doc in (
            ("reports_sent", stats.items_sent, "Updates and upserts sent to the control plane"),
            ("reports_acked", stats.acked, "Reported items the control plane made durable"),
            ("reports_rejected", stats.rejected, "Reported items the control plane rejected"),
            ("reports_dropped", stats.dropped, "Reported items given up unsent"),
            ("sessions_fenced", stats.fenced, "Sessions another sidecar took over"),
            ("report_reconnects", stats.reconnects, "Report streams reopened"),
        ):
            yield CounterMetricFamily(f"tether_sidecar_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "tether_sidecar_reports_pending",
            "Reported items not yet acknowledged",
            value=self._reporter.pending,
        )
        yield GaugeMetricFamily(
            "tether_sidecar_control_plane_connected",
            "1 when a report stream to the control plane is open",
            value=1 if self._reporter.connected else 0,
        )

    def describe(self) -> list[Metric]:
        return []  # collected only at scrape time


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        register_process_metrics(r, component="sidecar")

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"tether_sidecar_{name}", doc, registry=r)

        self.events_in = counter("events_received", "SSE events delivered by the upstream")
        self.events_out = counter("events_sent", "SSE events written to clients")
        self.duplicates = counter("duplicates_dropped", "Events dropped as already delivered")
        self.reconnects = counter("upstream_reconnects", "Upstream stream reconnect attempts")
        self.upstream_errors = counter("upstream_errors", "Requests the upstream did not answer")
        self.streams_opened = counter("streams_opened", "Session SSE streams opened")
        self.streams_failed = counter("streams_failed", "Streams ended before completion")
        self.resumes = counter("client_resumes", "Client resumes served with Last-Event-ID")
        self.resume_failures = counter("client_resume_failures", "Client resumes refused")
        self.slow_clients = counter("slow_clients_dropped", "Clients dropped behind the buffer")
        self.reinitializations = counter(
            "upstream_reinitializations", "Sessions re-initialized after the upstream lost them"
        )
        self.reissues = counter(
            "requests_reissued", "Safe requests sent to the upstream again after it failed"
        )
        self.relistens = counter(
            "listens_reissued", "2026-07-28 listen requests sent again after the upstream's ended"
        )
        self.upstream_paused = counter(
            "upstream_paused", "Times an upstream read paused until clients caught up"
        )
        self.refused = Counter(
            "tether_sidecar_refused",
            "Requests refused, by reason",
            ["reason"],
            registry=r,
        )
        self.live_streams = Gauge("tether_sidecar_streams", "Streams in memory", registry=r)
        self.sessions = Gauge("tether_sidecar_sessions", "Sessions in memory", registry=r)
        self.upstream_reachable = Gauge(
            "tether_sidecar_upstream_reachable",
            "1 while the upstream accepts TCP connections (the probe /readyz follows)",
            registry=r,
        )
        self.buffered_bytes = Gauge(
            "tether_sidecar_replay_buffer_bytes", "Bytes held in replay buffers", registry=r
        )
        self.upstream_seconds = Histogram(
            "tether_sidecar_upstream_request_duration_seconds",
            "Seconds from forwarding a request until the upstream's response status arrived "
            "(re-issues included), by MCP method and status class",
            ["method", "status"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self._upstream_children: dict[tuple[str, str], Histogram] = {}
        self.resume_seconds = Histogram(
            "tether_sidecar_resume_duration_seconds",
            "Seconds from a client's resume (Last-Event-ID) until its first missed event was "
            "written, by where the events came from",
            ["source"],
            buckets=RECOVERY_BUCKETS,
            registry=r,
        )
        self.outage_seconds = Histogram(
            "tether_sidecar_upstream_outage_duration_seconds",
            "Seconds a tracked stream's upstream connection was down, from the break until a "
            "reconnect got it back or the stream gave up, by outcome",
            ["outcome"],
            buckets=RECOVERY_BUCKETS,
            registry=r,
        )

    def upstream_request(self, method: str, status: int | Failure, started: float) -> None:
        """One upstream request answered (or not) `started` (monotonic) seconds ago."""
        label = status.value if isinstance(status, Failure) else status_label(status)
        # `labels()` takes a lock and builds a key each time (~4 us); the children are kept
        # here instead (~1 us), a bounded set like the labels.
        child = self._upstream_children.get((method, label))
        if child is None:
            child = self._upstream_children[method, label] = self.upstream_seconds.labels(
                method, label
            )
        child.observe(time.monotonic() - started)

    def outage(self, outcome: ReconnectOutcome, seconds: float) -> None:
        self.outage_seconds.labels(outcome.value).observe(seconds)

    def watch_reporter(self, reporter: Reporter) -> None:
        self.registry.register(ReporterCollector(reporter))

    def refresh(self, registry: Registry) -> None:
        """Update the gauges (called by the janitor, off the event path)."""
        self.live_streams.set(len(registry.streams))
        self.sessions.set(len(registry.sessions))
        self.buffered_bytes.set(sum(s.tracker.buffered_bytes for s in registry.streams.values()))
