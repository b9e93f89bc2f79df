"""Prometheus metrics of one sidecar, on its own registry so several can share a process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from sidecar.reporter import Reporter
    from sidecar.streams import Registry


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
        self.buffered_bytes = Gauge(
            "tether_sidecar_replay_buffer_bytes", "Bytes held in replay buffers", registry=r
        )

    def watch_reporter(self, reporter: Reporter) -> None:
        self.registry.register(ReporterCollector(reporter))

    def refresh(self, registry: Registry) -> None:
        """Update the gauges (called by the janitor, off the event path)."""
        self.live_streams.set(len(registry.streams))
        self.sessions.set(len(registry.sessions))
        self.buffered_bytes.set(sum(s.tracker.buffered_bytes for s in registry.streams.values()))
