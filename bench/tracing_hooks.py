"""What tracing costs a request when it is off: `python -m bench.tracing_hooks`.

With tracing off (`sidecar.tracing.NO_TRACING`) a proxied request checks `tracing.enabled`
once (the request span is skipped), hands the no-op span its JSON-RPC method, and opens the
no-op upstream span around its upstream request; SSE events run no hook at all. This times
that path with nothing of OpenTelemetry imported (checked: exit 1 if anything was), and, for
scale, one upstream span with the SDK on (no exporter: the SDK's own cost of a span).
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable

from multidict import CIMultiDict

from sidecar.proxy import trace_call
from sidecar.reissue import Call
from sidecar.tracing import NO_SPAN, NO_TRACING

OFF_CALLS = 1_000_000
ON_CALLS = 20_000


def best_ns(fn: Callable[[], None], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9


def main() -> int:
    headers: CIMultiDict[str] = CIMultiDict()
    call = Call(method="tools/call", request_id=7)
    url = "http://127.0.0.1:8080/mcp"

    def empty() -> None:
        pass

    def request_off() -> None:
        if NO_TRACING.enabled:
            raise AssertionError("tracing is off")
        trace_call(NO_SPAN, call)
        with NO_TRACING.upstream("POST", url, headers) as span:
            span.http_status(200)

    print(f"empty function call        {best_ns(empty, OFF_CALLS):8.0f} ns")
    print(f"a request's hooks, off     {best_ns(request_off, OFF_CALLS):8.0f} ns")
    loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
    print(f"opentelemetry modules loaded while off: {len(loaded)}")

    from opentelemetry.sdk.trace import TracerProvider

    from sidecar.tracing_otel import OtelTracing

    tracing = OtelTracing(TracerProvider())

    def upstream_on() -> None:
        with tracing.upstream("POST", url, CIMultiDict()) as span:
            span.http_status(200)

    print(f"one upstream span, SDK on  {best_ns(upstream_on, ON_CALLS):8.0f} ns (no exporter)")
    return 1 if loaded else 0


if __name__ == "__main__":
    sys.exit(main())
