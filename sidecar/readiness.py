"""What `/readyz` answers, sans-IO: one function from the sidecar's state to a verdict.

Rules:
1. Not ready while starting (the proxied port not bound yet, or the upstream not probed yet),
   while draining, and while the upstream is unreachable (`sidecar.health`): a pod whose MCP
   server does not accept connections leaves the Service instead of answering 502s.
2. A control plane that cannot be reached does not make the sidecar unready unless
   `ready_requires_control_plane` says so. Sessions this sidecar serves keep working without
   it (reports wait, positions are resent later); only adoption of sessions from other pods
   and new reports stop. An outage of the one control plane would otherwise take every MCP
   pod out of every Service at once, turning a degraded service into none. The body says
   `"control_plane": "unreachable"`, and `tether_sidecar_control_plane_connected` is 0.
3. The body always says why: `status` is `ready` or the first reason in rule 1's order
   (`starting`, `draining`, `upstream unreachable`, `control plane unreachable`), `detail`
   the probe's last error while the upstream is down.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Status(Enum):
    READY = "ready"
    STARTING = "starting"
    DRAINING = "draining"
    UPSTREAM_UNREACHABLE = "upstream unreachable"
    CONTROL_PLANE_UNREACHABLE = "control plane unreachable"


@dataclass(frozen=True, slots=True)
class Inputs:
    """The sidecar's state as readiness sees it."""

    started: bool
    draining: bool
    upstream_up: bool | None
    """The upstream probe's verdict; None before the first probe."""
    upstream_detail: str
    control_plane_connected: bool | None
    """None: no control plane configured."""
    ready_requires_control_plane: bool
    streams: int


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Status
    body: dict[str, object]

    @property
    def http_status(self) -> int:
        return 200 if self.status is Status.READY else 503


def _status(s: Inputs) -> Status:
    if not s.started:
        return Status.STARTING
    if s.draining:
        return Status.DRAINING
    if s.upstream_up is None:
        return Status.STARTING
    if not s.upstream_up:
        return Status.UPSTREAM_UNREACHABLE
    if s.ready_requires_control_plane and s.control_plane_connected is False:
        return Status.CONTROL_PLANE_UNREACHABLE
    return Status.READY


def readiness(s: Inputs) -> Verdict:
    """Rules 1-3."""
    status = _status(s)
    upstream = {None: "unknown", True: "reachable", False: "unreachable"}[s.upstream_up]
    body: dict[str, object] = {"status": status.value, "upstream": upstream}
    if s.upstream_up is False and s.upstream_detail:
        body["detail"] = s.upstream_detail
    if s.control_plane_connected is not None:
        body["control_plane"] = "connected" if s.control_plane_connected else "unreachable"
    body["streams"] = s.streams
    return Verdict(status, body)
