"""The conventions the README promises of every Tether pod, as checks on one workload: used on
the hand-written manifests of deploy/ (test_manifests.py) and on every workload `tether inject`
produces (test_inject_manifests.py), so both are held to the same rules by the same code.

Each check raises AssertionError naming the workload and container.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import pytest

from sidecar.cli import config_from_args
from sidecar.config import SidecarConfig
from sidecar.guard import HostPolicy
from sidecar.reconnect import Outcome, ReconnectPolicy, Retry
from tests.deploy.render import Obj
from tether.cli import build_parser

Env = Mapping[str, str]
EnvOf = Callable[[Obj], dict[str, str]]

SIDECAR_STOP_S = 5
"""What the README's grace formula allows the sidecar to stop once the server has: end its
streams, close its listeners, flush the last positions (it is drained by then)."""
MARGIN_S = 5


def where(workload: Obj) -> str:
    return f"{workload['kind']}/{workload['metadata'].get('name')}"


def pod_template(workload: Obj) -> Obj:
    """The pod (template) of any workload kind, or the Pod itself."""
    kind = workload["kind"]
    if kind == "Pod":
        return workload
    if kind == "CronJob":
        template: Obj = workload["spec"]["jobTemplate"]["spec"]["template"]
        return template
    pod: Obj = workload["spec"]["template"]
    return pod


def native_sidecars(spec: Obj) -> list[Obj]:
    return [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]


def check_pod_locked_down(workload: Obj) -> None:
    spec = pod_template(workload)["spec"]
    name = where(workload)
    pod_security = spec.get("securityContext", {})
    assert pod_security.get("runAsNonRoot") is True, name
    assert pod_security.get("runAsUser", 0) != 0, name
    assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
    assert spec.get("automountServiceAccountToken") is False, name


def check_container_locked_down(workload: Obj, container: Obj) -> None:
    """The container's own settings, with what the pod's securityContext gives it."""
    pod_security = pod_template(workload)["spec"].get("securityContext", {})
    name = f"{where(workload)} container {container['name']}"
    security = container.get("securityContext", {})
    assert security.get("allowPrivilegeEscalation") is False, name
    assert security.get("readOnlyRootFilesystem") is True, name
    assert security.get("capabilities", {}).get("drop") == ["ALL"], name
    assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, name
    assert security.get("runAsUser", pod_security.get("runAsUser", 0)) != 0, name
    seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {}))
    assert seccomp.get("type") == "RuntimeDefault", name
    assert not security.get("privileged", False), name
    for bound in ("requests", "limits"):
        assert set(container.get("resources", {}).get(bound, {})) >= {"cpu", "memory"}, name
    image = container["image"]
    assert ":" in image.rsplit("/", 1)[-1], f"{name}: image {image} has no tag"
    assert not image.endswith(":latest"), name


def check_long_running_containers_have_probes(workload: Obj) -> None:
    spec = pod_template(workload)["spec"]
    for c in [*native_sidecars(spec), *spec["containers"]]:
        name = f"{where(workload)}/{c['name']}"
        assert "readinessProbe" in c, name
        assert "livenessProbe" in c, name


def check_sidecar_probes(sidecar: Obj) -> None:
    """Health on the admin port, never on the proxied one; startup gates the MCP server."""
    admin = {p["name"] for p in sidecar["ports"] if p["containerPort"] != _listen_port(sidecar)}
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        hook = sidecar[probe]["httpGet"]
        assert hook["path"] == path, probe
        assert hook["port"] in admin, (probe, hook)


def _listen_port(sidecar: Obj) -> int:
    for item in sidecar.get("env", []):
        if item["name"] == "TETHER_LISTEN":
            return int(item["value"].rsplit(":", 1)[1])
    return 8080  # the manifests' (from their ConfigMap)


_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def resolve_env(env: Env, pod: Mapping[str, str]) -> dict[str, str]:
    """The values a container sees, as the kubelet makes them: `<fieldPath>` placeholders
    (render.container_env) from `pod`, `$(VAR)` references to variables defined before."""
    out: dict[str, str] = {}
    for key, raw in env.items():
        value = pod[raw[1:-1]] if raw.startswith("<") and raw.endswith(">") else raw
        out[key] = _REFERENCE.sub(lambda m: out.get(m.group(1), m.group(0)), value)
    return out


@contextmanager
def environment(monkeypatch: pytest.MonkeyPatch, env: Env) -> Iterator[None]:
    """Exactly `env` as TETHER_* and POD_* variables, for the real parsers to read."""
    with monkeypatch.context() as patch:
        import os

        for key in list(os.environ):
            if key.startswith(("TETHER_", "POD_")):
                patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        yield


def sidecar_config(monkeypatch: pytest.MonkeyPatch, sidecar: Obj, env: Env) -> SidecarConfig:
    """The real `tether sidecar` configuration the container starts with."""
    with environment(monkeypatch, env):
        config: SidecarConfig = config_from_args(build_parser().parse_args(sidecar["args"]))
    return config


def check_sidecar_outlasts_termination(workload: Obj, config: SidecarConfig) -> None:
    """When the pod is deleted, Kubernetes stops the MCP server first and the native sidecar
    only after it: the sidecar must not give up on the vanished upstream (which ends the
    client's requests with an error) before the grace period ends and it is stopped (which
    drops the connection, so the client resumes on another pod). Drive the real reconnect
    policy with the configured budget over many seeds of its jitter."""
    grace = pod_template(workload)["spec"]["terminationGracePeriodSeconds"]
    for seed in range(200):
        policy = ReconnectPolicy(config.reconnect, rng=random.Random(seed))
        now = 0.0
        while isinstance(decision := policy.next(Outcome.FAILED, now=now, retry_ms=None), Retry):
            now += decision.delay
        assert now > 2 * grace, f"seed {seed}: gave up after {now:.1f}s (grace {grace}s)"


def check_server_drains_its_sidecar(
    workload: Obj, sidecar: Obj, server: Obj, config: SidecarConfig, *, server_stop_s: float
) -> None:
    """Issue #12, the order the kubelet follows on pod deletion: the server's preStop hook
    (HTTP, on the sidecar's admin port: the server cannot run `tether`) blocks until the
    sidecar has drained; then SIGTERM to the server; the native sidecar stops after it. The
    grace period holds all three (README, "Rolling an MCP server")."""
    spec = pod_template(workload)["spec"]
    assert sidecar["restartPolicy"] == "Always"  # stopped after the server
    hook = server["lifecycle"]["preStop"]["httpGet"]
    assert hook["path"] == "/drain"
    assert hook["port"] == config.admin_port
    assert "host" not in hook  # the pod's IP: the admin port must listen on it
    assert config.admin_host == "0.0.0.0"
    assert "preStop" not in sidecar.get("lifecycle", {})  # drained by the server's hook
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= config.drain_timeout + server_stop_s + SIDECAR_STOP_S + MARGIN_S, (
        f"terminationGracePeriodSeconds {grace} < drain timeout {config.drain_timeout} + "
        f"server stop {server_stop_s} + sidecar stop {SIDECAR_STOP_S} + margin {MARGIN_S}"
    )


def check_sidecar_answers_service(config: SidecarConfig, service: Obj, namespace: str) -> None:
    """The sidecar refuses Host names it was not told (DNS rebinding): the Service's names,
    in `namespace`, must be allowed by the real policy built from the sidecar's settings."""
    policy = HostPolicy(config.allowed_hosts, listen_host=config.listen_host)
    name = service["metadata"]["name"]
    port = service["spec"]["ports"][0]["port"]
    svc = f"{name}.{namespace}.svc"
    for host in (name, f"{name}.{namespace}", svc, f"{svc}.cluster.local"):
        for value in (host, f"{host}:{port}"):
            assert policy.allows(value), value
    assert not policy.allows(f"{name}.elsewhere.example")


def sidecar_variables() -> set[str]:
    """Every TETHER_ variable `tether sidecar` reads."""
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices["sidecar"]
    return {
        "TETHER_" + a.dest.upper() for a in parser._actions if a.option_strings and a.dest != "help"
    }


def check_sidecar_variables_are_real(sidecar: Obj, env: Env) -> None:
    unknown = {k for k in env if k.startswith("TETHER_")} - sidecar_variables()
    assert not unknown, f"{sidecar['name']}: no such option of `tether sidecar`: {unknown}"


def check_control_plane_client_label(workload: Obj, env_of: EnvOf) -> None:
    """Every pod configured to reach the control plane carries the label its NetworkPolicy
    admits."""
    template = pod_template(workload)
    spec = template["spec"]
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        if "TETHER_CONTROL_PLANE" in env_of(c):
            labels = template["metadata"]["labels"]
            assert labels.get("tether.dev/control-plane-client") == "true", where(workload)
