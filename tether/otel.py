"""OpenTelemetry's SDK as the standard `OTEL_*` variables configure it, for the sidecar's and
the control plane's tracing (`sidecar.tracing`, `controlplane.tracing`).

Imported only once tracing is turned on: a process with tracing off loads nothing of
OpenTelemetry. Tether sets no `OTEL_*` variable and reads them as the SDK's own
auto-configuration does; the only default of its own is the service name.
"""

from __future__ import annotations

import os
from importlib.metadata import EntryPoint, entry_points

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


def exporter_names() -> list[str]:
    """The exporters `OTEL_TRACES_EXPORTER` names (default `otlp`; `none`: no exporter)."""
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    return [n for n in names if n and n != "none"]


def check_env() -> None:
    """Raise ValueError, saying which variable is wrong, for an exporter or OTLP protocol the
    SDK would not find; nothing is created (the commands call it before they start)."""
    for name in exporter_names():
        _entry_point(name)


def span_exporter(name: str) -> SpanExporter:
    """The exporter `OTEL_TRACES_EXPORTER` names: `otlp` is OTLP over gRPC, or over HTTP when
    `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` is `http/protobuf`; any other name is an installed
    exporter's entry point (`console`, `otlp_proto_http`, ...). Raises ValueError otherwise."""
    exporter = _entry_point(name).load()()
    if not isinstance(exporter, SpanExporter):
        raise ValueError(f"OTEL_TRACES_EXPORTER: {name!r} is not a span exporter")
    return exporter


def _entry_point(name: str) -> EntryPoint:
    if name == "otlp":
        protocol = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        ).strip()
        if protocol not in _BY_PROTOCOL:
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r}")
        name = _BY_PROTOCOL[protocol]
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        raise ValueError(f"OTEL_TRACES_EXPORTER: no exporter named {name!r} is installed")
    return next(iter(found))


def sdk_provider(default_service_name: str) -> TracerProvider:
    """A provider configured by the `OTEL_*` variables: resource (`OTEL_SERVICE_NAME`, else
    `default_service_name`; `OTEL_RESOURCE_ATTRIBUTES`), sampler (`OTEL_TRACES_SAMPLER`),
    exporters (`OTEL_TRACES_EXPORTER`, default `otlp`; `none` for none), batching
    (`OTEL_BSP_*`) and each exporter's own `OTEL_EXPORTER_OTLP_*`. Its `shutdown()` exports
    what is buffered. Raises ValueError for a value it cannot use."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
    exporters = [span_exporter(n) for n in exporter_names()]
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
