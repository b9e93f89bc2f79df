"""Outside probe of the rendered manifests (issues 11 and 12): who can reach `/drain`. The
assertion that failed, since fixed, is marked "Fixed"."""

from __future__ import annotations

import os

import pytest

from sidecar.cli import config_from_args
from tests.deploy.render import (
    DEPLOY,
    OVERLAYS,
    container_env,
    find,
    kubectl,
    pod_spec,
    render,
)
from tether.cli import build_parser

pytestmark = pytest.mark.skipif(
    kubectl() is None, reason="kubectl is not installed (it renders the kustomize overlays)"
)


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_drain_endpoint_is_not_open_to_every_pod(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`/drain` is unauthenticated and one-way (drain rule 1: the sidecar never reports ready
    again), served on the sidecar's admin port. The kubelet's preStop hook is the only caller
    it needs, and kubelet traffic is always admitted. Yet the rendered objects open that port
    to every pod of the cluster (a NetworkPolicy rule with no `from`) and put it behind the
    MCP Service (port 9090, "metrics"): one `curl http://mcp-example:9090/drain` per pod, from
    any pod, takes every MCP pod out of its Service until they are restarted."""
    objects = render(DEPLOY / "overlays" / name)
    deployment = find(objects, "Deployment", "mcp-example")
    (sidecar,) = pod_spec(deployment)["initContainers"]
    for key in list(os.environ):
        if key.startswith("TETHER_"):
            monkeypatch.delenv(key)
    for key, value in container_env(objects, sidecar).items():
        monkeypatch.setenv(key, value)
    admin_port = config_from_args(build_parser().parse_args(sidecar["args"])).admin_port
    admin_names = {
        p.get("name") for p in sidecar.get("ports", []) if p["containerPort"] == admin_port
    }
    drain_ports = {admin_port, *admin_names}

    exposed = [
        (svc["metadata"]["name"], p["port"])
        for svc in objects
        if svc["kind"] == "Service"
        and svc["spec"].get("selector", {}).items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
        for p in svc["spec"]["ports"]
        if p.get("targetPort") in drain_ports
    ]
    open_to_all = [
        pol["metadata"]["name"]
        for pol in objects
        if pol["kind"] == "NetworkPolicy"
        and pol["spec"]["podSelector"].get("matchLabels", {}).items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
        for rule in pol["spec"].get("ingress", [])
        if "from" not in rule and any(p.get("port") in drain_ports for p in rule.get("ports", []))
    ]
    assert (exposed, open_to_all) == ([], []), (  # Fixed
        f"/drain reachable through Services {exposed} and from every pod via {open_to_all}"
    )
