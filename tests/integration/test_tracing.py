"""OpenTelemetry tracing (`sidecar.tracing`, `controlplane.tracing`): traces continue through
the sidecar, across an upstream break, a client's resume, an adoption (into the control
plane), a re-initialization and re-issues; off, it costs nothing.

A real sidecar in process, real aiohttp upstreams on loopback (behind a cuttable TCP relay), a
real control plane over SQLite; spans go to the SDK's in-memory exporter. The process tests run
`tether sidecar` itself: with `--tracing` it exports over OTLP/gRPC (to a real OTLP receiver,
the collector's own generated service), without it neither it nor `tether control-plane`
imports anything of OpenTelemetry.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.server import RunningControlPlane, start_control_plane
from sidecar.app import RunningSidecar, start_sidecar
from sidecar.config import SidecarConfig
from sidecar.tracing_otel import OtelTracing
from tests.integration.conftest import serve_app
from tests.integration.test_proxy import HEADERS, MCP, count_call, initialize, progress_numbers
from tests.integration.test_reissue import FAST, Script, post, request, scripted
from tests.support.numbered_upstream import make_app
from tests.support.procs import ProcessPool, free_port, python_module
from tests.support.relay import Relay
from tests.support.sse_client import Received, collect, events
from tests.support.waiting import eventually

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

DEADLINE = 20.0


def traceparent(trace_id: str, parent_id: str) -> str:
    return f"00-{trace_id}-{parent_id}-01"


def new_ids() -> tuple[str, str]:
    """A (trace id, span id) pair as a caller would make them."""
    return secrets.token_hex(16), secrets.token_hex(8)


@dataclass
class Seen:
    """What an upstream was sent: (method, traceparent) per request, in order."""

    requests: list[tuple[str, str | None]] = field(default_factory=list)


def watched(app: web.Application, seen: Seen) -> web.Application:
    """The app, noting each request's `traceparent` as its response starts."""

    async def note(request: web.Request, _: web.StreamResponse) -> None:
        seen.requests.append((request.method, request.headers.get("traceparent")))

    app.on_response_prepare.append(note)
    return app


@asynccontextmanager
async def traced_sidecar(
    upstream: str, provider: TracerProvider, **config: Any
) -> AsyncIterator[RunningSidecar]:
    sidecar = await start_sidecar(
        SidecarConfig(listen_host="127.0.0.1", listen_port=0, upstream=upstream, **config),
        tracing=OtelTracing(provider),
    )
    try:
        yield sidecar
    finally:
        await sidecar.stop()


@asynccontextmanager
async def traced_control_plane(
    tmp_path: Path, provider: TracerProvider
) -> AsyncIterator[RunningControlPlane]:
    plane = await start_control_plane(
        ControlPlaneConfig(listen="127.0.0.1:0", store=SqliteUrl(tmp_path / "sessions.db")),
        tracer_provider=provider,
    )
    try:
        yield plane
    finally:
        await plane.stop()


@pytest.fixture
def exported() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


def parent_of(span: ReadableSpan) -> str | None:
    return f"{span.parent.span_id:016x}" if span.parent is not None else None


def server_span(spans: Sequence[ReadableSpan], trace_id: str, method: str) -> ReadableSpan:
    found = [
        s
        for s in spans
        if s.kind is SpanKind.SERVER and hex_trace(s) == trace_id and s.name == method
    ]
    assert len(found) == 1, [(s.name, dict(s.attributes or {})) for s in found]
    return found[0]


async def test_a_stream_cut_upstream_and_resumed_by_its_client_stays_in_the_callers_trace(
    exported: tuple[TracerProvider, InMemorySpanExporter], http: aiohttp.ClientSession
) -> None:
    """The POST continues the caller's trace; the upstream gets a `traceparent` of that trace;
    the upstream connection is cut mid-stream and the sidecar's reconnect (with the upstream's
    Last-Event-ID) is a span of the stream, in the same trace; the client drops, resumes with
    Last-Event-ID and that request is a server span of its trace too."""
    provider, exporter = exported
    seen = Seen()
    async with (
        serve_app(watched(make_app(interval_ms=5), seen)) as up,
        Relay("127.0.0.1", int(up.rpartition(":")[2])) as relay,
        traced_sidecar(f"http://127.0.0.1:{relay.port}", provider) as sidecar,
    ):
        base = f"http://127.0.0.1:{sidecar.port}"
        sid = await initialize(http, base)
        trace_id, caller_span = new_ids()
        headers = {**HEADERS, "Mcp-Session-Id": sid}
        post = {**headers, "traceparent": traceparent(trace_id, caller_span)}
        async with http.post(base + MCP, json=count_call(80, interval_ms=5), headers=post) as r:
            assert r.status == 200
            got: list[Received] = []
            async for ev in events(r):
                got.append(ev)
                if len(got) == 10:
                    relay.cut()  # the upstream connection breaks mid-stream
                if len(got) == 30:
                    break  # the client drops too
        last = got[-1].id
        assert last is not None
        _, resume_span = new_ids()
        resume = {
            **headers,
            "Accept": "text/event-stream",
            "Last-Event-ID": last,
            "traceparent": traceparent(trace_id, resume_span),
        }
        async with http.get(base + MCP, headers=resume) as r:
            assert r.status == 200
            got += await collect(r)
        assert progress_numbers(got) == list(range(1, 81))
        spans = await eventually(
            lambda: (s := exporter.get_finished_spans()) and named(s, "tether.stream") and s,
            timeout=DEADLINE,
            what="the stream's span to end",
        )

    request = server_span(spans, trace_id, "POST")
    assert parent_of(request) == caller_span
    attributes = dict(request.attributes or {})
    assert attributes["mcp.method.name"] == "tools/call"
    assert attributes["mcp.session.id"] == sid
    # The client stopped reading mid-stream: its request ended so, not with a status.
    assert [e.name for e in request.events] == ["tether.client.disconnected"]

    # The upstream POST: a client span under the request, whose id the upstream was sent.
    (upstream_post,) = [
        s for s in spans if s.kind is SpanKind.CLIENT and parent_of(s) == hex_span(request)
    ]
    posts = [tp for method, tp in seen.requests if method == "POST" and tp and trace_id in tp]
    assert posts == [traceparent(trace_id, hex_span(upstream_post))]

    (stream,) = named(spans, "tether.stream")
    assert hex_trace(stream) == trace_id
    assert parent_of(stream) == hex_span(request)
    assert dict(stream.attributes or {})["tether.stream.state"] == "complete"
    assert any(e.name == "tether.upstream.ended" for e in stream.events)

    reconnects = named(spans, "tether.reconnect")
    assert reconnects, "the cut was not followed by a reconnect span"
    assert all(parent_of(s) == hex_span(stream) for s in reconnects)
    assert any(dict(s.attributes or {})["tether.reconnect.resumed"] for s in reconnects)
    # Each reconnect's GET carried a traceparent of the caller's trace, naming its own span.
    reconnect_gets = {
        hex_span(s) for s in spans if s.kind is SpanKind.CLIENT and s.name == "GET"
    } & {tp.split("-")[2] for method, tp in seen.requests if method == "GET" and tp}
    assert reconnect_gets
    assert all(trace_id in tp for method, tp in seen.requests if method == "GET" and tp is not None)

    resumed = server_span(spans, trace_id, "GET")
    assert parent_of(resumed) == resume_span
    assert dict(resumed.attributes or {})["tether.resume.last_event_id"] == last
    assert dict(resumed.attributes or {})["http.response.status_code"] == 200


async def test_adoption_and_reinitialization_are_spans_of_the_request_that_caused_them(
    exported: tuple[TracerProvider, InMemorySpanExporter],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A session made through sidecar A is used through sidecar B, whose MCP server never saw
    it: B's request span holds `tether.adopt` (with the control-plane calls, their
    `traceparent` in the gRPC metadata) and `tether.reinitialize` (with its two upstream
    POSTs), all in the caller's trace."""
    provider, exporter = exported
    seen_b = Seen()
    async with (
        traced_control_plane(tmp_path, provider) as plane,
        serve_app(make_app(strict_sessions=True)) as up_a,
        serve_app(watched(make_app(strict_sessions=True), seen_b)) as up_b,
        # Stopped before the control plane (they flush to it): entered after it.
        traced_sidecar(up_a, provider, control_plane=plane.address, owner="a") as a,
        traced_sidecar(up_b, provider, control_plane=plane.address, owner="b") as b,
    ):
        sid = await initialize(http, f"http://127.0.0.1:{a.port}")
        assert a.proxy.continuity.reporter is not None
        await asyncio.wait_for(a.proxy.continuity.reporter.flushed(), DEADLINE)
        trace_id, caller_span = new_ids()
        ping = {"jsonrpc": "2.0", "id": 5, "method": "ping"}
        call = {**HEADERS, "Mcp-Session-Id": sid}
        call["traceparent"] = traceparent(trace_id, caller_span)
        async with http.post(f"http://127.0.0.1:{b.port}{MCP}", json=ping, headers=call) as r:
            assert r.status == 200, await r.text()
            await r.read()
    spans = exporter.get_finished_spans()
    request = server_span(spans, trace_id, "POST")
    assert parent_of(request) == caller_span
    assert dict(request.attributes or {})["mcp.method.name"] == "ping"

    (adopt,) = [s for s in named(spans, "tether.adopt") if hex_trace(s) == trace_id]
    assert parent_of(adopt) == hex_span(request)
    assert dict(adopt.attributes or {})["tether.adopt.outcome"] == "adopted"
    rpcs = {s.name: s for s in spans if parent_of(s) == hex_span(adopt)}
    assert "tether.v1.SessionService/GetSession" in rpcs
    claim = rpcs["tether.v1.SessionService/ClaimSession"]
    assert claim.kind is SpanKind.CLIENT
    # The control plane continued the trace from the call's metadata.
    (served,) = [s for s in spans if s.kind is SpanKind.SERVER and parent_of(s) == hex_span(claim)]
    assert served.name == "tether.v1.SessionService/ClaimSession"
    assert hex_trace(served) == trace_id
    assert dict(served.attributes or {})["rpc.grpc.status_code"] == 0

    (reinit,) = [s for s in named(spans, "tether.reinitialize") if hex_trace(s) == trace_id]
    assert parent_of(reinit) == hex_span(request)
    replayed = [s for s in spans if parent_of(s) == hex_span(reinit)]
    assert [s.name for s in replayed] == ["POST", "POST"]  # initialize, then initialized
    sent = {tp for _, tp in seen_b.requests if tp}
    assert {traceparent(trace_id, hex_span(s)) for s in replayed} <= sent


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver (the collector's generated service): what it was sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[str, str, dict[str, str]]]:
        """(service.name, span name, its string attributes, with `trace_id`) of each span."""
        out = []
        for export in self.requests:
            for resource_spans in export.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        attributes = {a.key: a.value.string_value for a in span.attributes}
                        attributes["trace_id"] = span.trace_id.hex()
                        out.append((service, span.name, attributes))
        return out


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[OtlpReceiver, int]]:
    receiver = OtlpReceiver()
    server = grpc.aio.server()
    # The generated gRPC module is untyped.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver, port
    finally:
        await server.stop(None)


def sidecar_process_argv(port: int, upstream: str, *extra: str) -> list[str]:
    return python_module(
        "tether.cli", "sidecar", "--listen", f"127.0.0.1:{port}", "--upstream", upstream, *extra
    )


async def test_tether_sidecar_with_tracing_exports_over_otlp_as_the_otel_variables_say(
    procs: ProcessPool, http: aiohttp.ClientSession
) -> None:
    """`tether sidecar --tracing` with only the standard variables set: its spans reach an
    OTLP/gRPC receiver, in the caller's trace, under the default service name."""
    async with serve_app(make_app()) as up, otlp_receiver() as (receiver, otlp_port):
        port = free_port()
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        env_off = {k: "" for k in os.environ if k.startswith("OTEL_")}
        sidecar = await procs.start(
            sidecar_process_argv(port, up, "--tracing"),
            name="traced-sidecar",
            ready_port=port,
            env={**env_off, **env},
        )
        trace_id, caller_span = new_ids()
        headers = {**HEADERS, "traceparent": traceparent(trace_id, caller_span)}
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        async with http.post(f"http://127.0.0.1:{port}{MCP}", json=ping, headers=headers) as r:
            assert r.status == 200
        ours = await eventually(
            lambda: [s for s in receiver.spans() if s[2]["trace_id"] == trace_id],
            timeout=DEADLINE,
            what="the request's spans at the OTLP receiver",
        )
        assert await sidecar.stop() == 0
    assert {(service, name) for service, name, _ in ours} >= {
        ("tether-sidecar", "POST"),  # the proxied request, then the upstream request
    }
    assert any(a.get("mcp.method.name") == "ping" for _, _, a in ours)


async def test_without_tracing_no_opentelemetry_module_is_imported(
    procs: ProcessPool, http: aiohttp.ClientSession
) -> None:
    """Off (the default), tracing costs nothing: neither `tether sidecar` nor `tether
    control-plane` ever imports OpenTelemetry (`-X importtime` lists every module a process
    imports, at start-up or later) while a session is created, reported and used, and a
    caller's `traceparent` passes through to the upstream untouched."""
    seen = Seen()
    otel_unset = {k: "" for k in os.environ if k.startswith("OTEL_")}
    cp_port, port = free_port(), free_port()
    plane = await procs.start(
        [
            sys.executable,
            "-Ximporttime",
            *python_module("tether.cli", "control-plane")[1:],
            "--listen",
            f"127.0.0.1:{cp_port}",
            "--store",
            f"sqlite:///{procs.log_dir / 'sessions.db'}",
        ],
        name="plain-control-plane",
        ready_port=cp_port,
        env=otel_unset,
    )
    async with serve_app(watched(make_app(), seen)) as up:
        argv = sidecar_process_argv(port, up, "--control-plane", f"127.0.0.1:{cp_port}")
        argv.insert(1, "-Ximporttime")
        sidecar = await procs.start(argv, name="plain-sidecar", ready_port=port, env=otel_unset)
        base = f"http://127.0.0.1:{port}"
        sid = await initialize(http, base)
        trace_id, caller_span = new_ids()
        sent = traceparent(trace_id, caller_span)
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        headers = {**HEADERS, "Mcp-Session-Id": sid, "traceparent": sent}
        async with http.post(base + MCP, json=ping, headers=headers) as r:
            assert r.status == 200
        assert await sidecar.stop() == 0  # after flushing its reports to the control plane
    assert await plane.stop() == 0
    for process, module in ((sidecar, "sidecar.proxy"), (plane, "controlplane.service")):
        imported = process.log_path.read_text()
        assert "import time:" in imported  # -X importtime did list the imports
        assert module in imported
        assert "opentelemetry" not in imported, process.name
    assert seen.requests[-1] == ("POST", sent)


async def test_each_reissue_is_a_span_between_the_attempts_it_separates(
    exported: tuple[TracerProvider, InMemorySpanExporter], http: aiohttp.ClientSession
) -> None:
    """A safe 2026-07-28 request whose upstream resets, then answers 503, then answers: three
    upstream client spans under the request, with a `tether.reissue` span (the wait, and why)
    before each attempt after the first."""
    provider, exporter = exported
    script = Script(plans={"tools/list": ["reset", "503", "sse"]})
    async with scripted(script) as up, traced_sidecar(up, provider, reconnect=FAST) as sidecar:
        trace_id, caller_span = new_ids()
        status, _ = await post(
            http,
            f"http://127.0.0.1:{sidecar.port}",
            request("tools/list"),
            traceparent=traceparent(trace_id, caller_span),
        )
        assert status == 200
    spans = exporter.get_finished_spans()
    request_span = server_span(spans, trace_id, "POST")
    children = sorted(
        (s for s in spans if parent_of(s) == hex_span(request_span)),
        key=lambda s: s.start_time or 0,
    )
    assert [s.name for s in children] == [
        "POST",
        "tether.reissue",
        "POST",
        "tether.reissue",
        "POST",
    ]
    waits = [dict(s.attributes or {}) for s in children if s.name == "tether.reissue"]
    assert [w["tether.reissue.attempt"] for w in waits] == [1, 2]
    assert "answered 503" in str(waits[1]["tether.reissue.reason"])
    statuses = [dict(s.attributes or {}).get("http.response.status_code") for s in children]
    assert statuses[2::2] == [503, 200]
    assert script.hits["tools/list"] == 3


@pytest.mark.parametrize(
    "command",
    [
        ["sidecar", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9"],
        ["control-plane", "--listen", "127.0.0.1:0"],
    ],
    ids=["sidecar", "control-plane"],
)
async def test_an_otel_variable_tracing_cannot_use_stops_the_command_saying_which(
    command: list[str],
) -> None:
    """A typo in `OTEL_TRACES_EXPORTER` or the OTLP protocol stops `--tracing` at once (exit 2,
    the variable named), instead of a traceback once it has started."""
    for variable, value, said in (
        ("OTEL_TRACES_EXPORTER", "zipkinn", "no exporter named 'zipkinn'"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "unsupported protocol 'http/json'"),
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        proc = await asyncio.create_subprocess_exec(
            *python_module("tether.cli", *command, "--tracing"),
            env={**env, variable: value},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
        finally:
            if proc.returncode is None:  # it started instead: stop it
                proc.kill()
                await proc.wait()
        assert proc.returncode == 2, err
        assert f"{variable}: {said}" in err.decode()
