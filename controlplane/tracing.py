"""Server spans for the control plane's unary calls, continuing the caller's trace.

A sidecar with tracing on sends the `traceparent` of its client span in each call's metadata
(`sidecar.tracing`); this interceptor opens the matching server span, so a sidecar's adoption
and the control plane's `ClaimSession` read as one trace. Imported only when tracing is on
(`--tracing`): with it off the control plane loads nothing of OpenTelemetry.

Streams (`ReportEvents`, `WatchSessions`) get no span: they live as long as their sidecar.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

INSTRUMENTATION = "tether.controlplane"
DEFAULT_SERVICE_NAME = "tether-control-plane"


class UnaryServerSpans(_ServerInterceptor):
    """A server span per unary call (`package.Service/Method`), child of the `traceparent` in
    its metadata; `rpc.grpc.status_code` and an error status from what the call ended with."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self._tracer = provider.get_tracer(INSTRUMENTATION)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner: Any = handler.unary_unary  # a coroutine function in grpc.aio
        name = handler_call_details.method.lstrip("/")
        service, _, method = name.partition("/")
        metadata = dict(handler_call_details.invocation_metadata or ())
        tracer = self._tracer

        async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with tracer.start_as_current_span(
                name,
                context=propagate.extract(metadata),
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
            ) as span:
                failed = grpc.StatusCode.UNKNOWN  # an exception without a status set
                try:
                    response = await inner(request, context)
                    failed = grpc.StatusCode.OK
                    return response
                finally:
                    code = context.code()  # None unless the servicer set or aborted with one
                    code = code if isinstance(code, grpc.StatusCode) else failed
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code is not grpc.StatusCode.OK:
                        span.set_status(Status(StatusCode.ERROR, code.name))

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
