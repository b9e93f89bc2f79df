"""Prometheus metrics of one control plane, on its own registry (tests run several per process).

What is measured where:
  * every gRPC call, by service, method, type and final status code, with its duration:
    `MetricsInterceptor`, the outermost interceptor, so calls refused by authentication count;
  * store writes (one per batcher flush): duration and size, in `controlplane.batcher`;
  * refusals and rejected reported items, by reason: where `controlplane.service` refuses
    them, and calls that `controlplane.identity` ended UNAUTHENTICATED (seen by the
    interceptor, so authentication knows nothing of metrics);
  * open watches and report streams: gauges kept by the servicer;
  * sessions in the store: counted by the store itself (`SessionStore.count`, no records
    read) when `/metrics` is scraped, at most once per `SESSION_COUNT_INTERVAL`.

Rules:
  1. Every label has a bounded set of values: gRPC methods are the registered ones (an
     unknown method never reaches a handler), codes are `grpc.StatusCode` names, reasons
     are `Reason` values.
  2. Nothing here blocks a call: recording is a few arithmetic operations; the session
     count runs on scrape, and concurrent scrapes share one count.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from controlplane.handlers import OnError, wrapped
from tether.buildinfo import register_process_metrics
from tether.model import RejectionReason

if TYPE_CHECKING:  # generic in the type stubs only; not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

log = logging.getLogger(__name__)

PREFIX: Final = "tether_control_plane_"
SESSION_COUNT_INTERVAL: Final = 1.0
"""Seconds a session count is reused: however often `/metrics` is fetched, the store counts
at most this often (rule 2)."""

RPC_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600,
)  # fmt: skip
"""Unary calls take milliseconds; streaming calls (ReportEvents, WatchSessions) live for
minutes or hours, so the buckets reach that far."""
WRITE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS: Final = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000)
"""Writes per flush; `controlplane.batcher.DEFAULT_MAX_PENDING` (20,000) bounds it."""


class Reason(enum.Enum):
    """Why a call was refused or a reported item rejected (the `reason` label)."""

    UNAUTHENTICATED = "unauthenticated"
    """No or bad credentials (`controlplane.identity`)."""
    PERMISSION_DENIED = "permission_denied"
    """The caller's roles do not allow the call or the write (`controlplane.policy`)."""
    TOO_MANY_CALLS = "too_many_calls"
    """A streaming call over the per-peer limit (`controlplane.limits`)."""
    REQUEST_TOO_LARGE = "request_too_large"
    """A report request over the item limit (`controlplane.limits`)."""
    OWNER_LIMIT = "owner_limit"
    """A claim or a reported session over the per-owner session limit."""
    FENCED = "fenced"
    """A reported item from an owner epoch that is not the session's current one."""
    UNKNOWN_SESSION = "unknown_session"
    """A reported position for a session the store does not have."""
    INVALID = "invalid"
    """A reported item that will never be accepted (bad id, changed credential binding)."""

    @classmethod
    def of(cls, rejection: RejectionReason) -> Reason:
        return cls(rejection.value)


class ControlPlaneMetrics:
    """The registry `/metrics` serves, and the instruments the control plane records into."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        register_process_metrics(r, component="control-plane")
        rpc_labels = ["grpc_service", "grpc_method", "grpc_type"]
        self.rpcs = Counter(
            PREFIX + "grpc_handled",
            "gRPC calls finished, by method and status code",
            [*rpc_labels, "grpc_code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            PREFIX + "grpc_handling_seconds",
            "Seconds from a gRPC call's start to its end (streaming calls: their whole life)",
            rpc_labels,
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.store_write_seconds = Histogram(
            PREFIX + "store_write_duration_seconds",
            "Seconds one store write (a batcher flush) took, by outcome",
            ["outcome"],
            buckets=WRITE_BUCKETS,
            registry=r,
        )
        for outcome in ("ok", "error"):  # both show from the start, at 0
            self.store_write_seconds.labels(outcome)
        self.store_batch_size = Histogram(
            PREFIX + "store_write_batch_size",
            "Writes per store write (after coalescing reports of the same stream)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.reported_writes = Counter(
            PREFIX + "reported_writes",
            "Session and stream writes reported by sidecars, before coalescing",
            registry=r,
        )
        self.rejections = Counter(
            PREFIX + "rejections",
            "Calls refused and reported items rejected, by reason",
            ["reason"],
            registry=r,
        )
        for reason in Reason:  # every reason shows from the start, at 0
            self.rejections.labels(reason.value)
        self.watchers = Gauge(PREFIX + "watchers", "WatchSessions calls open now", registry=r)
        self.report_streams = Gauge(
            PREFIX + "report_streams", "ReportEvents calls open now", registry=r
        )
        self.sessions = Gauge(
            PREFIX + "sessions",
            "Live sessions in the store (shared by every replica), counted at scrape time",
            registry=r,
        )
        self.store_reachable = Gauge(
            PREFIX + "store_reachable",
            "1 while the store answers the health probe (gRPC health is SERVING)",
            registry=r,
        )
        self.pending_writes = Gauge(
            PREFIX + "pending_writes",
            "Writes waiting for the next store write, after coalescing",
            registry=r,
        )
        self._counted_at = -SESSION_COUNT_INTERVAL
        self._count_lock = asyncio.Lock()

    def reject(self, reason: Reason, n: int = 1) -> None:
        self.rejections.labels(reason.value).inc(n)

    async def refresh_sessions(self, count: Callable[[], Awaitable[int]]) -> None:
        """Set the sessions gauge from `count()` (the store's), unless a count younger than
        `SESSION_COUNT_INTERVAL` stands; a failed count leaves the last value (rule 2).
        Concurrent scrapes wait for one count instead of starting their own."""
        async with self._count_lock:
            if time.monotonic() - self._counted_at < SESSION_COUNT_INTERVAL:
                return
            try:
                self.sessions.set(await count())
            except Exception as e:  # the store's error: the scrape still answers
                log.warning("counting sessions for /metrics failed: %s", e)
            finally:
                self._counted_at = time.monotonic()


def _split(full_method: str) -> tuple[str, str]:
    """`/tether.v1.SessionService/ReportEvents` -> (`tether.v1.SessionService`, `ReportEvents`)."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


def _rpc_type(handler: Any) -> str:
    if handler.unary_unary:
        return "unary"
    if handler.unary_stream:
        return "server_stream"
    if handler.stream_unary:
        return "client_stream"
    return "bidi_stream"


class MetricsInterceptor(_ServerInterceptor):
    """Counts every call by its final status and times it (rule 1: registered methods only).

    The final status is read when the call is done (`add_done_callback`): the code a handler
    aborted or set, CANCELLED if the client went away, UNKNOWN if the handler raised, else OK.
    """

    def __init__(self, metrics: ControlPlaneMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        service, method = _split(details.method)
        kind = _rpc_type(handler)
        counted = self.metrics.rpcs
        seconds = self.metrics.rpc_seconds.labels(service, method, kind)

        async def start(context: Any) -> OnError:
            """Arrange for the call to be recorded when done; returns what notes a handler's
            unexpected exception."""
            started = time.monotonic()
            raised: list[grpc.StatusCode] = []

            def done(ctx: Any) -> None:
                code = ctx.code() or (raised[0] if raised else None)
                if code is None:
                    code = grpc.StatusCode.CANCELLED if ctx.cancelled() else grpc.StatusCode.OK
                counted.labels(service, method, kind, code.name).inc()
                seconds.observe(time.monotonic() - started)
                if code is grpc.StatusCode.UNAUTHENTICATED:
                    self.metrics.reject(Reason.UNAUTHENTICATED)

            context.add_done_callback(done)

            def failed(e: BaseException) -> None:
                if _unexpected(e):
                    raised.append(grpc.StatusCode.UNKNOWN)

            return failed

        return wrapped(handler, start)


def _unexpected(e: BaseException) -> bool:
    """An exception gRPC turns into UNKNOWN (an abort carries its own code)."""
    return isinstance(e, Exception) and not isinstance(e, grpc.aio.AbortError)
