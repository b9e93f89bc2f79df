"""OpenTelemetry behind `sidecar.tracing.Tracing`; the only sidecar module that imports it,
and only once tracing is turned on (`sidecar.tracing` rule 1).

Names and attributes follow OpenTelemetry's semantic conventions: HTTP server and client
spans are named by their method, gRPC client spans `package.Service/Method`; MCP's
`mcp.method.name` and `mcp.session.id`. Tether's own spans are named `tether.*`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from sidecar.tracing import Attribute, Attributes
from tether.otel import sdk_provider

if TYPE_CHECKING:
    _UnaryUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
else:
    _UnaryUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor

INSTRUMENTATION = "tether.sidecar"
DEFAULT_SERVICE_NAME = "tether-sidecar"


class _OtelSpan:
    """`sidecar.tracing.Span` over an OpenTelemetry span."""

    __slots__ = ("_server", "_span")

    def __init__(self, span: trace.Span, *, server: bool = False) -> None:
        self._span = span
        self._server = server

    def set(self, key: str, value: Attribute) -> None:
        self._span.set_attribute(key, value)

    def event(self, name: str, attributes: Attributes | None = None) -> None:
        self._span.add_event(name, attributes)

    def http_status(self, status: int) -> None:
        self._span.set_attribute("http.response.status_code", status)
        if status >= 500 or (status >= 400 and not self._server):
            self._span.set_status(Status(StatusCode.ERROR))

    def fail(self, reason: str) -> None:
        self._span.set_status(Status(StatusCode.ERROR, reason))


class OtelTracing:
    """`sidecar.tracing.Tracing` on a `TracerProvider` (the global one when None: tests pass
    their own, with an in-memory exporter). `shutdown` flushes and stops the exporters of a
    provider this object was made for (`sdk_tracing`), and does nothing for one passed in."""

    def __init__(
        self,
        provider: trace.TracerProvider | None = None,
        *,
        on_shutdown: Callable[[], object] | None = None,
    ) -> None:
        provider = provider if provider is not None else trace.get_tracer_provider()
        self._tracer = provider.get_tracer(INSTRUMENTATION)
        self._on_shutdown = on_shutdown

    @property
    def enabled(self) -> bool:
        return True

    def shutdown(self) -> None:
        if self._on_shutdown is not None:
            self._on_shutdown()

    @contextmanager
    def request(self, request: web.Request) -> Iterator[_OtelSpan]:
        attributes: dict[str, Attribute] = {
            "http.request.method": request.method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "server.address": request.host,
        }
        if request.remote:
            attributes["client.address"] = request.remote
        with self._tracer.start_as_current_span(
            request.method,
            context=propagate.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:
            yield _OtelSpan(span, server=True)

    @contextmanager
    def upstream(
        self, method: str, url: str, headers: MutableMapping[str, str]
    ) -> Iterator[_OtelSpan]:
        parts = urlsplit(url)
        attributes: dict[str, Attribute] = {
            "http.request.method": method,
            # Without the query: a legacy session id travels in it.
            "url.full": f"{parts.scheme}://{parts.netloc}{parts.path}",
            "server.address": parts.hostname or "",
        }
        if parts.port is not None:
            attributes["server.port"] = parts.port
        with self._tracer.start_as_current_span(
            method, kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            propagate.inject(headers)
            yield _OtelSpan(span)

    @contextmanager
    def span(self, name: str, attributes: Attributes | None = None) -> Iterator[_OtelSpan]:
        with self._tracer.start_as_current_span(name, attributes=attributes) as span:
            yield _OtelSpan(span)

    def grpc_interceptors(self) -> Sequence[object]:
        return (UnaryCallSpans(self._tracer),)


class UnaryCallSpans(_UnaryUnaryInterceptor):
    """A client span per unary control-plane call (`GetSession`, `ClaimSession`, ...), its
    `traceparent` in the call's metadata. Streams are traced by their users, not here."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        method: Any = client_call_details.method  # bytes at run time, str in the stubs
        name = (method.decode() if isinstance(method, bytes) else str(method)).lstrip("/")
        service, _, rpc = name.partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
        with self._tracer.start_as_current_span(
            name, kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()))
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            for key, value in carrier.items():
                metadata[key] = value
            details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                metadata,
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
            call = await continuation(details, request)
            code = await call.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {await call.details()}"))
            return call


def sdk_tracing() -> OtelTracing:
    """OpenTelemetry's SDK as the `OTEL_*` variables say (`tether.otel`, `sidecar.tracing`
    rule 4), under the service name `tether-sidecar` unless they name one."""
    provider = sdk_provider(DEFAULT_SERVICE_NAME)
    return OtelTracing(provider, on_shutdown=provider.shutdown)
