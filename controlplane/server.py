"""The control-plane process: a grpc.aio server with the session service, gRPC health
checking and server reflection (so `grpcurl` can list and call everything).

`start_control_plane` returns a running instance (tests bind port 0 and read `.port`);
`serve` runs one until SIGTERM or SIGINT. Shutdown order, so that nothing acknowledged is lost
and nothing hangs:
  1. health reports NOT_SERVING (load balancers stop sending new streams);
  2. report streams stop reading, acknowledge what they read, end with UNAVAILABLE (the
     sidecars reconnect to another replica and resend what is unacknowledged); watches end;
  3. `server.stop(grace)`: in-flight unary calls finish within the grace period;
  4. the write batcher flushes what is pending; the store closes;
  5. the admin port (`--admin-listen`: `/metrics`, `/healthz`) closes last, so a scrape
     during the shutdown still answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from controlplane.admin import AdminServer, start_admin
from controlplane.batcher import WriteBatcher
from controlplane.config import ControlPlaneConfig, open_store
from controlplane.identity import authenticator_for, server_interceptors
from controlplane.limits import GRPC_SERVER_OPTIONS
from controlplane.metrics import ControlPlaneMetrics, MetricsInterceptor
from controlplane.policy import Authorizer, Policy
from controlplane.service import SessionService
from controlplane.store.protocol import SessionStore
from tether.api.v1 import sessions_pb2, sessions_pb2_grpc
from tether.grpc_security import add_port

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger(__name__)

SERVICE_NAME = sessions_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name


@dataclass
class RunningControlPlane:
    config: ControlPlaneConfig
    server: grpc.aio.Server
    port: int
    store: SessionStore
    batcher: WriteBatcher
    service: SessionService
    health: AsyncHealthServicer
    metrics: ControlPlaneMetrics
    admin: AdminServer | None = None
    _stopped: bool = False
    flush_traces: Callable[[], object] | None = None
    """Exports the spans still buffered (`--tracing`); blocks, so it runs in a thread."""

    @property
    def admin_port(self) -> int | None:
        return None if self.admin is None else self.admin.port

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0] or "127.0.0.1"
        host = "127.0.0.1" if host in ("0.0.0.0", "[::]", "") else host
        return f"{host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully (see the module docstring); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown_grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.service.begin_shutdown()
        await self.server.stop(grace)
        await self.batcher.aclose()
        await self.store.aclose()
        if self.flush_traces is not None:
            await asyncio.to_thread(self.flush_traces)
        if self.admin is not None:
            await self.admin.stop()
        log.info("control plane stopped")


async def start_control_plane(
    config: ControlPlaneConfig,
    *,
    store: SessionStore | None = None,
    tracer_provider: TracerProvider | None = None,
) -> RunningControlPlane:
    """Open the store (unless given one), start serving on `config.listen`. Bad security
    settings (`SecurityConfigError`, `PolicyError`) raise before anything is opened.
    `tracer_provider`: trace the unary calls there (tests), whatever `config.tracing` says."""
    authenticator = authenticator_for(
        config.security, config.tokens, home_namespace=config.home_namespace
    )
    authorizer = Authorizer(Policy.load(config.policy_file) if config.policy_file else None)
    if store is None:
        store = await open_store(
            config.store,
            session_ttl=config.session_ttl,
            etcd_username=config.etcd_username,
            etcd_password=config.etcd_password,
            etcd_tls=config.etcd_tls,
            max_sessions_per_owner=config.max_sessions_per_owner,
        )
    metrics = ControlPlaneMetrics()
    batcher = WriteBatcher(store, flush_interval=config.flush_interval, metrics=metrics)
    server: grpc.aio.Server | None = None
    admin: AdminServer | None = None
    try:
        # Metrics outermost: calls refused by authentication are counted too.
        interceptors: Sequence[Any] = [
            MetricsInterceptor(metrics),
            *server_interceptors(authenticator),
        ]
        flush_traces: Callable[[], object] | None = None
        if config.tracing or tracer_provider is not None:
            interceptors, flush_traces = _traced(interceptors, tracer_provider)
        server = grpc.aio.server(
            interceptors=interceptors,
            # Documented in controlplane.limits: a longer message is refused by gRPC
            # (RESOURCE_EXHAUSTED) before it is decoded, and gRPC reads no stream far ahead.
            options=GRPC_SERVER_OPTIONS,
        )
        service = SessionService(
            store,
            batcher,
            session_ttl=config.session_ttl,
            authorizer=authorizer,
            max_calls_per_peer=config.max_calls_per_peer,
            metrics=metrics,
        )
        # The generated module is untyped (protoc writes no annotations for it).
        sessions_pb2_grpc.add_SessionServiceServicer_to_server(service, server)
        health_servicer = AsyncHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        try:
            port = add_port(server, config.listen, config.security)
        except RuntimeError as e:  # grpc reports a failed bind this way
            raise OSError(f"cannot listen on {config.listen}: address in use or invalid") from e
        if port == 0:
            raise OSError(f"cannot listen on {config.listen}")
        batcher.start()
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if config.admin_listen is not None:  # last: answering means the gRPC port serves
            admin = await start_admin(config.admin_listen, metrics, count_sessions=store.count)
    except BaseException:  # nothing opened here outlives a failed start
        if server is not None:
            await server.stop(None)
        await batcher.aclose()
        await store.aclose()
        if admin is not None:
            await admin.stop()
        raise
    running = RunningControlPlane(
        config,
        server,
        port,
        store,
        batcher,
        service,
        health_servicer,
        metrics,
        admin,
        flush_traces=flush_traces,
    )
    # `address` is where a local client connects; the bind address may be wider (0.0.0.0).
    log.info(
        "control plane serving on %s (bound to %s:%d, store %s)",
        running.address,
        config.listen.rpartition(":")[0],
        port,
        config.store,
    )
    authenticator.warn_if_development()
    return running


def _traced(
    interceptors: Sequence[Any], provider: TracerProvider | None
) -> tuple[list[Any], Callable[[], object] | None]:
    """Tracing on (`controlplane.tracing`, imported only now): its interceptor goes first, so
    a call the authenticator refuses is a span too. Without a provider, the SDK as the
    `OTEL_*` variables configure it, flushed at the stop."""
    from controlplane.tracing import DEFAULT_SERVICE_NAME, UnaryServerSpans

    flush: Callable[[], object] | None = None
    if provider is None:
        from tether.otel import sdk_provider

        sdk = sdk_provider(DEFAULT_SERVICE_NAME)
        provider, flush = sdk, sdk.shutdown
    return [UnaryServerSpans(provider), *interceptors], flush


async def serve(config: ControlPlaneConfig) -> None:
    """Run a control plane until SIGTERM or SIGINT, then stop it gracefully."""
    running = await start_control_plane(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("signal received: shutting down (grace %.1f s)", config.shutdown_grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        await running.stop()
