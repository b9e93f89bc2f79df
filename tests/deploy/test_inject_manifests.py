"""Injection over real manifests (issue 15): the example MCP server of deploy/ without its
hand-wired sidecar, and shapes of popular MCP server charts (tests/deploy/fixtures/), through
the same stream function `tether inject` runs. Every result must be valid for Kubernetes 1.29
and 1.37 (strict), keep the conventions tests/deploy holds the hand-written manifests to (the
same checks, tests/deploy/conventions.py), configure a sidecar the real `tether sidecar` parser
accepts, and send every Service that selected the MCP server to the sidecar."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from controlplane.identity import pod_owner_name
from tests.deploy.conventions import (
    check_container_locked_down,
    check_control_plane_client_label,
    check_long_running_containers_have_probes,
    check_pod_locked_down,
    check_server_drains_its_sidecar,
    check_sidecar_answers_service,
    check_sidecar_outlasts_termination,
    check_sidecar_probes,
    check_sidecar_variables_are_real,
    pod_template,
    resolve_env,
    sidecar_config,
)
from tests.deploy.render import (
    DEPLOY,
    KUBERNETES_VERSIONS,
    REPO_ROOT,
    Obj,
    container_env,
    find,
    kubectl,
    render,
    validate,
)
from tests.unit.test_inject import workloads as generated_workloads
from tether import demo_server
from tether.cli_inject import inject_stream
from tether.inject import (
    CHANGES_ANNOTATION,
    DEFAULT_GRACE_S,
    PROXY_PORT_NAME,
    SIDECAR_NAME,
    InjectConfig,
    InjectError,
    inject,
    injected_workload,
    is_injected,
    selects,
    uninject,
)

FIXTURES = REPO_ROOT / "tests" / "deploy" / "fixtures"
FIXTURE_FILES = sorted(FIXTURES.glob("*.yaml"))
PLAIN_EXAMPLE = FIXTURES / "mcp-example-plain.yaml"
CONFIG = InjectConfig()

_yaml: Any = __import__("yaml")


def load(text: str) -> list[Obj]:
    return [d for d in _yaml.safe_load_all(text) if d]


def injected(path: Path, config: InjectConfig = CONFIG) -> list[Obj]:
    return load(inject_stream(path.read_text(), config, force=False))


def sidecar_and_server(workload: Obj) -> tuple[Obj, Obj]:
    spec = pod_template(workload)["spec"]
    (sidecar,) = [c for c in spec["initContainers"] if c["name"] == SIDECAR_NAME]
    record = _yaml.safe_load(pod_template(workload)["metadata"]["annotations"][CHANGES_ANNOTATION])
    (server,) = [c for c in spec["containers"] if c["name"] == record["container"]]
    return sidecar, server


def original_grace(path: Path, workload: Obj) -> int:
    """The grace period the workload had before injection: its server's time to stop."""
    (before,) = [
        o
        for o in load(path.read_text())
        if o["kind"] == workload["kind"] and o["metadata"]["name"] == workload["metadata"]["name"]
    ]
    grace: int = pod_template(before)["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
    return grace


@pytest.fixture(params=FIXTURE_FILES, ids=lambda p: p.stem)
def fixture_file(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_fixtures_and_their_injected_forms_are_valid_for_kubernetes(
    fixture_file: Path, version: str
) -> None:
    for obj in load(fixture_file.read_text()):
        validate(obj, version)
    objects = injected(fixture_file)
    assert objects
    for obj in objects:
        validate(obj, version)
    # The prod overlay's identity settings add a projected token and a keyed fingerprint.
    prod = InjectConfig(
        token_audience="tether-control-plane", fingerprint_key_secret="tether-fingerprint-key"
    )
    for obj in injected(fixture_file, prod):
        validate(obj, version)


def test_every_opted_in_workload_is_injected_and_no_other(fixture_file: Path) -> None:
    before = load(fixture_file.read_text())
    after = injected(fixture_file)
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        if is_injected(new):
            assert old != new
        elif old["kind"] != "Service":
            assert old == new, f"{old['kind']}/{old['metadata']['name']} changed"
    count = sum(is_injected(o) for o in after)
    assert count == (
        0
        if fixture_file.stem == "untouched"
        else len(
            [
                o
                for o in before
                if o["kind"]
                in {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
            ]
        )
    )


def test_injected_workloads_keep_the_deploy_conventions(
    fixture_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = injected(fixture_file)
    for workload in filter(is_injected, objects):
        sidecar, server = sidecar_and_server(workload)
        check_container_locked_down(workload, sidecar)
        check_sidecar_probes(sidecar)
        assert {"readinessProbe", "livenessProbe"} <= set(sidecar)
        env = container_env(objects, sidecar)
        check_sidecar_variables_are_real(sidecar, env)
        check_control_plane_client_label(workload, lambda c: container_env(objects, c))
        namespace = workload["metadata"].get("namespace", "default")
        pod = {"metadata.name": "mcp-0", "metadata.namespace": namespace}
        config = sidecar_config(monkeypatch, sidecar, resolve_env(env, pod))
        # The owner name is the one the control plane derives from the pod's token.
        assert config.owner == pod_owner_name("mcp-0", namespace, CONFIG.home_namespace)
        check_sidecar_outlasts_termination(workload, config)
        check_server_drains_its_sidecar(
            workload,
            sidecar,
            server,
            config,
            server_stop_s=original_grace(fixture_file, workload),
        )
        target = injected_workload(workload)
        assert target is not None
        assert config.upstream == f"http://127.0.0.1:{target.upstream_port}"


def _container_port(workload: Obj, target: int | str) -> tuple[str, int]:
    """(container, port number) a Service's targetPort reaches in the workload's pods."""
    spec = pod_template(workload)["spec"]
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        for p in c.get("ports", []):
            if target in (p["containerPort"], p.get("name")):
                return c["name"], p["containerPort"]
    raise AssertionError(f"no container port {target!r}")


def test_services_reach_the_sidecar_which_answers_their_names(
    fixture_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = load(fixture_file.read_text())
    objects = injected(fixture_file)
    for workload in filter(is_injected, objects):
        target = injected_workload(workload)
        assert target is not None
        sidecar, _ = sidecar_and_server(workload)
        namespace = workload["metadata"].get("namespace", "default")
        pod = {"metadata.name": "mcp-0", "metadata.namespace": namespace}
        config = sidecar_config(
            monkeypatch, sidecar, resolve_env(container_env(objects, sidecar), pod)
        )
        for old, service in zip(before, objects, strict=True):
            if service["kind"] != "Service" or not selects(service, target):
                continue
            for was, port in zip(old["spec"]["ports"], service["spec"]["ports"], strict=True):
                aimed = was.get("targetPort", was["port"])
                if aimed in (target.upstream_port, target.upstream_port_name):
                    assert port["targetPort"] == PROXY_PORT_NAME
                    assert _container_port(workload, port["targetPort"]) == (
                        SIDECAR_NAME,
                        config.listen_port,
                    )
                else:
                    assert port == was
            if service["metadata"].get("namespace"):
                check_sidecar_answers_service(config, service, namespace)


def test_the_pod_names_its_ingress_host_too(monkeypatch: pytest.MonkeyPatch) -> None:
    (pod,) = injected(FIXTURES / "pod.yaml")
    sidecar, _ = sidecar_and_server(pod)
    env = resolve_env(
        container_env([], sidecar), {"metadata.name": "p", "metadata.namespace": "default"}
    )
    config = sidecar_config(monkeypatch, sidecar, env)
    assert "mcp.example.com" in config.allowed_hosts


def test_the_prod_identity_settings_mount_what_the_variables_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prod = InjectConfig(
        token_audience="tether-control-plane", fingerprint_key_secret="tether-fingerprint-key"
    )
    objects = injected(PLAIN_EXAMPLE, prod)
    deployment = find(objects, "Deployment", "mcp-example")
    sidecar, _ = sidecar_and_server(deployment)
    env = container_env(objects, sidecar)
    volumes = {v["name"]: v for v in pod_template(deployment)["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    token_file = Path(env["TETHER_CONTROL_PLANE_TOKEN_FILE"])
    token = volumes[mounts[str(token_file.parent)]["name"]]["projected"]["sources"][0]
    assert token["serviceAccountToken"]["audience"] == "tether-control-plane"
    assert token["serviceAccountToken"]["path"] == token_file.name
    key_file = Path(env["TETHER_FINGERPRINT_KEY_FILE"])
    key = volumes[mounts[str(key_file.parent)]["name"]]["secret"]
    assert key["secretName"] == "tether-fingerprint-key"
    assert all(m.get("readOnly") for m in mounts.values() if m["mountPath"] != "/tmp")


# --- the injected example is the hand-wired one --------------------------------------------------


@pytest.mark.skipif(kubectl() is None, reason="kubectl is not installed (renders deploy/)")
def test_injecting_the_plain_example_gives_the_hand_wired_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What deploy/base wires by hand, `tether inject` produces: the same server container
    (with the drain hook), grace period, label, and a sidecar with the same settings, probes,
    resources and (at least the same) locks. Differences: the sidecar's settings are inline
    instead of in a ConfigMap, its port names are prefixed, and it allows more Host names."""
    rendered = render(DEPLOY / "overlays" / "external-etcd")  # image tether:0.1.0
    wired = find(rendered, "Deployment", "mcp-example")
    config = InjectConfig(control_plane="tether-control-plane:50051")
    plain = find(load(PLAIN_EXAMPLE.read_text()), "Deployment", "mcp-example")
    # As `tether inject -n tether` does it: the Service of the file names the sidecar's hosts.
    objects = load(
        inject_stream(PLAIN_EXAMPLE.read_text(), config, force=False, namespace="tether")
    )
    ours = find(objects, "Deployment", "mcp-example")
    check_pod_locked_down(ours)
    check_long_running_containers_have_probes(ours)
    mine, theirs = pod_template(ours), pod_template(wired)
    assert mine["spec"]["containers"] == theirs["spec"]["containers"]
    for key in ("terminationGracePeriodSeconds", "securityContext", "automountServiceAccountToken"):
        assert mine["spec"][key] == theirs["spec"][key], key
    assert theirs["metadata"]["labels"].items() <= mine["metadata"]["labels"].items()
    (wired_sidecar,) = theirs["spec"]["initContainers"]
    sidecar, _ = sidecar_and_server(ours)
    for key in ("image", "imagePullPolicy", "restartPolicy", "args", "resources"):
        assert sidecar[key] == wired_sidecar[key], key
    names = {"tether-http": "http", "tether-admin": "admin"}
    assert [{**p, "name": names[p["name"]]} for p in sidecar["ports"]] == wired_sidecar["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        mine_probe = copy.deepcopy(sidecar[probe])
        mine_probe["httpGet"]["port"] = names[mine_probe["httpGet"]["port"]]
        assert mine_probe == wired_sidecar[probe], probe
    assert wired_sidecar["securityContext"].items() <= sidecar["securityContext"].items()
    env, wired_env = container_env([], sidecar), container_env(rendered, wired_sidecar)
    hosts = "TETHER_ALLOWED_HOST"
    assert {k: v for k, v in env.items() if k != hosts} == {
        k: v for k, v in wired_env.items() if k != hosts
    }
    config_mine = sidecar_config(monkeypatch, sidecar, resolve_env(env, {"metadata.name": "a"}))
    service = find(objects, "Service", "mcp-example")
    check_sidecar_answers_service(config_mine, service, "tether")
    check_server_drains_its_sidecar(
        ours,
        sidecar,
        mine["spec"]["containers"][0],
        config_mine,
        server_stop_s=demo_server.SHUTDOWN_GRACE_S,
    )
    assert uninject(ours) == plain


def test_the_hand_wired_example_is_refused_not_injected_twice() -> None:
    wired = find(
        load((DEPLOY / "base" / "mcp-example.yaml").read_text()), "Deployment", "mcp-example"
    )
    with pytest.raises(InjectError, match="already has a container named tether-sidecar"):
        inject(wired, CONFIG, force=True)


# --- generated workloads stay valid ------------------------------------------------------------


def _complete(obj: Obj) -> Obj:
    """The fields the schemas require that the generator leaves out."""
    out = copy.deepcopy(obj)
    kind = out["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        out["spec"]["selector"] = {"matchLabels": {"app": "x"}}
    if kind == "StatefulSet":
        out["spec"]["serviceName"] = "x"
    if kind == "CronJob":
        out["spec"]["schedule"] = "0 * * * *"
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generated_workloads())
def test_injecting_a_valid_workload_gives_a_valid_one(obj: Obj) -> None:
    obj = _complete(obj)
    validate(obj, KUBERNETES_VERSIONS[0])
    try:
        out = inject(obj, CONFIG, force=True)
    except InjectError:
        return
    for version in KUBERNETES_VERSIONS:
        validate(out, version)
