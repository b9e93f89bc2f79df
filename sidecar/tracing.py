"""Tracing: the one seam between the sidecar and OpenTelemetry, free when it is off.

The sidecar's stages call a `Tracing` at the points worth a span (the proxied request, each
upstream request, a tracked stream's upstream life, each reconnect, adoption,
re-initialization, re-issues, control-plane calls). `NO_TRACING` is what they get by default;
`sidecar.tracing_otel.OtelTracing` is the OpenTelemetry implementation, loaded by
`tracing_from_env` only when tracing is turned on (`--tracing`, `TETHER_TRACING=true`).

Rules:
1. Nothing in this module imports OpenTelemetry, and only `sidecar.tracing_otel` does: with
   tracing off, no `opentelemetry` module is loaded by the sidecar, whatever is installed, and
   each hook costs one call returning a shared no-op object (no allocation).
2. A proxied request continues the trace of its incoming `traceparent`/`tracestate` (the
   propagators of `OTEL_PROPAGATORS`, W3C Trace Context and Baggage by default), and every
   request the sidecar sends upstream carries the `traceparent` of its own client span. With
   tracing off, the client's headers pass through untouched (`sidecar.headers`).
3. Nothing is recorded per SSE event: a stream's span gets an event per upstream break; the
   report stream to the control plane gets an event per batch and per acknowledgement,
   bounded by the SDK's span limits (`OTEL_SPAN_EVENT_COUNT_LIMIT`, 128 by default).
4. The exporter, sampler and resource come from the standard `OTEL_*` variables (the SDK's
   own reading of them); the service name defaults to `tether-sidecar`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from aiohttp import web

Attribute = str | int | float | bool
Attributes = Mapping[str, Attribute]


class TracingUnavailableError(RuntimeError):
    """Tracing was asked for, but the `tracing` extra is not installed."""


class Span(Protocol):
    """What a hook may do to the span it opened. Never raises; cheap when tracing is off."""

    def set(self, key: str, value: Attribute) -> None:
        """Set one attribute (`mcp.method.name`, `http.response.status_code`, ...)."""

    def event(self, name: str, attributes: Attributes | None = None) -> None:
        """Record a point in time on the span (a break, a batch sent)."""

    def http_status(self, status: int) -> None:
        """The HTTP status of the exchange; marks the span failed as the HTTP semantic
        conventions say (5xx for a server span, 4xx and 5xx for a client span)."""

    def fail(self, reason: str) -> None:
        """Mark the span failed, saying why."""


class Tracing(Protocol):
    """The tracing of one sidecar. Every method returns a context manager that opens a span
    on enter (current for the code inside) and ends it on exit, recording an exception that
    escapes it. None of them awaits or raises."""

    @property
    def enabled(self) -> bool:
        """False for `NO_TRACING`: a caller may skip work that only feeds attributes."""

    def request(self, request: web.Request) -> AbstractContextManager[Span]:
        """The server span of a proxied request, continuing its incoming trace (rule 2)."""

    def upstream(
        self, method: str, url: str, headers: MutableMapping[str, str]
    ) -> AbstractContextManager[Span]:
        """The client span of one request to the MCP server; writes its `traceparent` (and
        `tracestate`) into `headers` (rule 2)."""

    def span(self, name: str, attributes: Attributes | None = None) -> AbstractContextManager[Span]:
        """An internal span: `tether.stream`, `tether.reconnect`, `tether.adopt`, ..."""

    def grpc_interceptors(self) -> Sequence[object]:
        """grpc.aio client interceptors for the control-plane channel: a client span per
        unary call, its `traceparent` in the call's metadata."""

    def shutdown(self) -> None:
        """Export what is buffered and stop; blocks (up to the exporters' timeouts), so an
        event loop runs it in a thread."""


class _NoSpan:
    """The no-op span, its own context manager, shared by every hook (rule 1)."""

    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def set(self, key: str, value: Attribute) -> None:
        pass

    def event(self, name: str, attributes: Attributes | None = None) -> None:
        pass

    def http_status(self, status: int) -> None:
        pass

    def fail(self, reason: str) -> None:
        pass


NO_SPAN: Span = _NoSpan()
"""The span hooks get with tracing off; also for a caller that skips a hook when off."""
_NO_SPAN = _NoSpan()


class NoTracing:
    """Tracing off: every hook returns the same no-op span (rule 1)."""

    __slots__ = ()

    @property
    def enabled(self) -> bool:
        return False

    def request(self, request: web.Request) -> _NoSpan:
        return _NO_SPAN

    def upstream(self, method: str, url: str, headers: MutableMapping[str, str]) -> _NoSpan:
        return _NO_SPAN

    def span(self, name: str, attributes: Attributes | None = None) -> _NoSpan:
        return _NO_SPAN

    def grpc_interceptors(self) -> Sequence[object]:
        return ()

    def shutdown(self) -> None:
        pass


NO_TRACING: Tracing = NoTracing()


def tracing_from_env(enabled: bool) -> Tracing:
    """`NO_TRACING` unless `enabled` (and not `OTEL_SDK_DISABLED=true`); else OpenTelemetry's
    SDK configured from the `OTEL_*` variables (rule 4). Raises `TracingUnavailableError`
    when the `tracing` extra is not installed, `ValueError` for an `OTEL_*` value it cannot
    use."""
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    if not enabled or disabled:
        return NO_TRACING
    require_sdk()
    from sidecar.tracing_otel import sdk_tracing

    return sdk_tracing()


def require_sdk() -> None:
    """Raise `TracingUnavailableError` unless the `tracing` extra is installed and the
    `OTEL_*` variables name exporters it has (the CLI asks before it starts anything)."""
    try:
        import sidecar.tracing_otel  # noqa: F401 - the check is the import
        from tether.otel import check_env
    except ImportError as exc:
        raise TracingUnavailableError(
            f"--tracing needs OpenTelemetry's SDK: pip install 'tether[tracing]' ({exc})"
        ) from exc
    try:
        check_env()
    except ValueError as exc:
        raise TracingUnavailableError(str(exc)) from exc
