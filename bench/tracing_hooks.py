"""What a tracing hook costs a request: `python -m bench.tracing_hooks`.

With tracing off (`sidecar.tracing.NO_TRACING`) a proxied request runs two hooks (its server
span and its upstream client span) and sets a few attributes; SSE events run none. This
times those hooks off, with nothing of OpenTelemetry imported (checked), and, for scale, one
upstream span with the SDK on (no exporter: the SDK's own cost of a recorded span).
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable

from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from sidecar.tracing import NO_TRACING

OFF_CALLS = 1_000_000
ON_CALLS = 20_000


def best_ns(fn: Callable[[], None], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9


def main() -> int:
    request = make_mocked_request("POST", "/mcp")
    headers: CIMultiDict[str] = CIMultiDict()

    def empty() -> None:
        pass

    def request_hook() -> None:
        with NO_TRACING.request(request) as span:
            span.set("mcp.method.name", "tools/call")
            span.http_status(200)

    def upstream_hook() -> None:
        with NO_TRACING.upstream("POST", "http://127.0.0.1:8080/mcp", headers) as span:
            span.http_status(200)

    print(f"empty function call     {best_ns(empty, OFF_CALLS):8.0f} ns")
    print(f"request hook, off       {best_ns(request_hook, OFF_CALLS):8.0f} ns")
    print(f"upstream hook, off      {best_ns(upstream_hook, OFF_CALLS):8.0f} ns")
    loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
    print(f"opentelemetry modules loaded while off: {len(loaded)}")

    from opentelemetry.sdk.trace import TracerProvider

    from sidecar.tracing_otel import OtelTracing

    tracing = OtelTracing(TracerProvider())

    def upstream_on() -> None:
        with tracing.upstream("POST", "http://127.0.0.1:8080/mcp", CIMultiDict()) as span:
            span.http_status(200)

    print(f"upstream hook, SDK on   {best_ns(upstream_on, ON_CALLS):8.0f} ns (no exporter)")
    return 1 if loaded else 0


if __name__ == "__main__":
    sys.exit(main())
