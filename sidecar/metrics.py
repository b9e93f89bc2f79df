"""Prometheus metrics of one sidecar, on its own registry so several can share a process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from sidecar.streams import Registry


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

    def refresh(self, registry: Registry) -> None:
        """Update the gauges (called by the janitor, off the event path)."""
        self.live_streams.set(len(registry.streams))
        self.sessions.set(len(registry.sessions))
        self.buffered_bytes.set(sum(s.tracker.buffered_bytes for s in registry.streams.values()))
