"""The control plane's gRPC health follows its store: NOT_SERVING while the store is unreachable.

A control plane whose store is down cannot persist a report or answer a lookup; saying SERVING
then keeps it in the Service while every call it takes fails. A cheap read (the record of a
session id nobody uses, so one key lookup: a quorum read on etcd, one indexed SELECT on SQLite)
runs every `interval` seconds, bounded by `timeout`; its outcomes go through
`tether.probe.ProbeState`, and each change of verdict sets the served services' status and
logs one line.

Rules:
1. Only the services in `served` follow the store (`""`, the whole server, and the session
   service); `LIVENESS_SERVICE` stays SERVING while the process runs, so a liveness probe does
   not restart a control plane that waits for its store (a restart cannot bring etcd back).
2. Once shutdown begins the loop is stopped first: the health servicer keeps NOT_SERVING from
   `enter_graceful_shutdown` on (it ignores later sets, and nothing sets them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from controlplane.metrics import ControlPlaneMetrics
from controlplane.store.protocol import SessionStore, StoreError
from tether.model import SessionId
from tether.probe import ProbeState
from tether.tasks import cancel_and_wait, spawn

log = logging.getLogger(__name__)

LIVENESS_SERVICE = "liveness"
"""A health service name that is SERVING while the process answers (rule 1): the manifests'
liveness and startup probes ask for it."""
PROBE_SESSION_ID = SessionId("tether-health-probe")
"""The id the probe reads; a record under it would be read and ignored."""
DEFAULT_INTERVAL = 2.0
DEFAULT_TIMEOUT = 3.0

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def probe_store(store: SessionStore, timeout: float) -> str | None:
    """None if the store answered a one-key read within `timeout`, else why not."""
    try:
        async with asyncio.timeout(timeout):
            await store.get(session_id=PROBE_SESSION_ID)
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except StoreError as exc:
        return str(exc) or type(exc).__name__
    except Exception as exc:  # a backend's unexpected error: still a failed probe, not a crash
        return f"{type(exc).__name__}: {exc}"
    return None


class StoreHealth:
    """Runs the store probe and sets the health of `served` from its verdicts."""

    def __init__(
        self,
        store: SessionStore,
        health: HealthServicer,
        served: Sequence[str],
        *,
        interval: float = DEFAULT_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        fall: int = 1,
        rise: int = 1,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self.store = store
        self.health = health
        self.served = tuple(served)
        self.interval = interval
        self.timeout = timeout
        self.state = ProbeState(fall=fall, rise=rise)
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None

    async def check_once(self) -> None:
        """One probe; on a change of verdict, set the status and log it."""
        why = await probe_store(self.store, self.timeout)
        first = self.state.up is None
        change = self.state.observe(why is None, why or "")
        if change is None:
            return
        if change.up:
            # The first verdict, up, is the normal start: nothing to say.
            if not first:
                log.info("store reachable again: health SERVING")
        else:
            log.warning("store unreachable (%s): health NOT_SERVING", change.detail)
        if self.metrics is not None:
            self.metrics.store_reachable.set(1 if change.up else 0)
        for name in self.served:
            await self.health.set(name, SERVING if change.up else NOT_SERVING)

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = spawn(self._run(), name="controlplane-store-health")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
