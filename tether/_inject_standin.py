"""Stand-in for `tether.inject` (built on another branch) until it lands: same names, a tiny
injection. Deleted on merge."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INJECT_ANNOTATION = "tether.dev/inject"
NAMESPACE_INJECT_LABEL = "tether.dev/inject"
UPSTREAM_PORT_ANNOTATION = "tether.dev/upstream-port"


class InjectError(ValueError):
    pass


@dataclass(frozen=True)
class InjectConfig:
    image: str = "tether:0.1.0"
    control_plane: str = "tether-control-plane.tether.svc:50051"
    home_namespace: str = "tether"
    drain_timeout_s: int = 30
    allowed_hosts: tuple[str, ...] = ("*.svc", "*.svc.cluster.local")
    token_audience: str | None = None
    fingerprint_key_secret: str | None = None


def is_opted_in(obj: Mapping[str, Any]) -> bool:
    annotations = obj.get("metadata", {}).get("annotations") or {}
    return annotations.get(INJECT_ANNOTATION) == "true"


def is_opted_out(obj: Mapping[str, Any]) -> bool:
    annotations = obj.get("metadata", {}).get("annotations") or {}
    return annotations.get(INJECT_ANNOTATION) in ("false", "disabled")


def inject(
    obj: Mapping[str, Any],
    config: InjectConfig,
    *,
    force: bool = False,
    namespace: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = copy.deepcopy(dict(obj))
    if is_opted_out(obj) or not (force or is_opted_in(obj)):
        return out
    spec = out.get("spec") or {}
    containers = spec.get("containers") or []
    if len(containers) != 1:
        raise InjectError(f"expected one container, found {len(containers)}")
    ports = containers[0].get("ports") or []
    annotations = out.get("metadata", {}).get("annotations") or {}
    upstream = annotations.get(UPSTREAM_PORT_ANNOTATION) or (
        ports[0]["containerPort"] if ports else None
    )
    if upstream is None:
        raise InjectError("no upstream port")
    inits = spec.setdefault("initContainers", [])
    if not any(c.get("name") == "tether-sidecar" for c in inits):
        inits.append(
            {
                "name": "tether-sidecar",
                "image": config.image,
                "restartPolicy": "Always",
                "args": ["sidecar"],
                "env": [
                    {"name": "TETHER_UPSTREAM", "value": f"http://127.0.0.1:{upstream}"},
                    {"name": "TETHER_CONTROL_PLANE", "value": config.control_plane},
                ],
                "ports": [{"name": "tether-http", "containerPort": 8080}],
            }
        )
    out.setdefault("metadata", {}).setdefault("labels", {})["tether.dev/control-plane-client"] = (
        "true"
    )
    return out
