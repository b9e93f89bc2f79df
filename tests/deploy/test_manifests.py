"""deploy/ renders with `kubectl kustomize`, every object is valid for Kubernetes 1.29 and
1.37 (strict: unknown fields fail), and the rendered objects keep the conventions the README
promises: probes, requests and limits, a locked-down securityContext, Tether as a native
sidecar, flags and variables the real CLI accepts."""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import pytest

from controlplane.admin import parse_listen
from controlplane.config import EtcdUrl, SqliteUrl, parse_store_url
from controlplane.identity import Principal, PrincipalKind
from controlplane.policy import Policy, Role
from sidecar.cli import config_from_args
from sidecar.config import SidecarConfig
from tests.deploy.conventions import (
    check_container_locked_down,
    check_control_plane_client_label,
    check_long_running_containers_have_probes,
    check_pod_locked_down,
    check_server_drains_its_sidecar,
    check_sidecar_answers_service,
    check_sidecar_outlasts_termination,
    check_sidecar_probes,
    sidecar_config,
)
from tests.deploy.render import (
    CLUSTER_SCOPED,
    CUSTOM_API_VERSIONS,
    DEPLOY,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    REPO_ROOT,
    Obj,
    all_containers,
    container_env,
    find,
    kubectl,
    pod_spec,
    render,
    validate,
    workloads,
)
from tether import demo_server
from tether.cli import build_parser
from tether.injector import config_from_args as injector_config
from tether.model import OwnerName

pytestmark = pytest.mark.skipif(
    kubectl() is None, reason="kubectl is not installed (it renders the kustomize overlays)"
)

KIND_OVERLAYS = REPO_ROOT / "tests" / "kind" / "overlays"
CLIENT_LABEL = "tether.dev/control-plane-client"
SCRAPER_LABEL = "tether.dev/metrics-scraper"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: render(DEPLOY / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, list[Obj]]) -> list[Obj]:
    objects: list[Obj] = rendered[request.param]
    return objects


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_for_kubernetes(overlay: list[Obj], version: str) -> None:
    assert overlay
    for obj in overlay:
        if obj["apiVersion"] not in CUSTOM_API_VERSIONS:
            validate(obj, version)


def test_the_validator_rejects_what_it_should(rendered: dict[str, list[Obj]]) -> None:
    """Guard against a vacuous check: broken copies of real objects must fail."""
    deployment = find(rendered["dev"], "Deployment", "mcp-example")
    validate(deployment, "1.29.0")  # a native sidecar is accepted

    typo = copy.deepcopy(deployment)
    pod_spec(typo)["containers"][0]["resource"] = pod_spec(typo)["containers"][0]["resources"]
    validate(typo, "1.29.0", strict=False)  # only strict mode catches unknown fields
    with pytest.raises(ValueError, match="'resource' was unexpected"):
        validate(typo, "1.29.0")

    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(ValueError, match="is not of type 'integer'"):
        validate(wrong_type, "1.29.0")

    bad_port = copy.deepcopy(deployment)
    pod_spec(bad_port)["initContainers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(ValueError, match="Deployment/mcp-example"):
        validate(bad_port, "1.37.0")


def test_kind_test_overlays_render_and_validate() -> None:
    for directory in sorted(p for p in KIND_OVERLAYS.iterdir() if p.is_dir()):
        for obj in render(directory):
            validate(obj, KUBERNETES_VERSIONS[0])


# --- conventions ----------------------------------------------------------------------------


def test_every_container_is_locked_down_and_bounded(overlay: list[Obj]) -> None:
    for workload in workloads(overlay):
        check_pod_locked_down(workload)
        for c in all_containers(workload):
            check_container_locked_down(workload, c)


def test_every_long_running_container_has_probes(overlay: list[Obj]) -> None:
    for workload in workloads(overlay):
        check_long_running_containers_have_probes(workload)


def test_control_plane_probes_grpc_health_and_has_a_budget(overlay: list[Obj]) -> None:
    deployment = find(overlay, "Deployment", "tether-control-plane")
    (container,) = pod_spec(deployment)["containers"]
    assert container["args"] == ["control-plane"]
    # Readiness follows the store; liveness and startup ask for the service that stays
    # SERVING while the process answers (`controlplane.health` rule 1): a restart cannot bring
    # etcd back.
    assert container["readinessProbe"]["grpc"] == {"port": 50051}
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051, "service": "liveness"}, probe
    env = container_env(overlay, container)
    assert env["TETHER_LISTEN"] == "0.0.0.0:50051"
    service = find(overlay, "Service", "tether-control-plane")
    assert [p["port"] for p in service["spec"]["ports"]] == [50051]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    budget = find(overlay, "PodDisruptionBudget", "tether-control-plane")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    assert budget["spec"] == {"maxUnavailable": 1, "selector": budget["spec"]["selector"]}


def test_tether_runs_as_a_native_sidecar_of_the_mcp_server(overlay: list[Obj]) -> None:
    deployment = find(overlay, "Deployment", "mcp-example")
    spec = pod_spec(deployment)
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == "tether-sidecar"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == ["sidecar"]
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"http": 8080, "admin": 9090}
    # Health on the admin port, never on the proxied one; startup gates the MCP server.
    check_sidecar_probes(sidecar)
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    env = container_env(overlay, sidecar)
    assert env["POD_NAME"] == "<metadata.name>"
    assert env["TETHER_UPSTREAM"] == "http://127.0.0.1:3000"
    assert env["TETHER_ADMIN_LISTEN"] == "0.0.0.0:9090"
    assert env["TETHER_CONTROL_PLANE"] == "tether-control-plane:50051"
    (server,) = spec["containers"]
    assert server["command"] == ["python", "-m", "tether.demo_server"]
    # Clients reach the sidecar's port, not the server's, and not its admin port (`/drain`).
    service = find(overlay, "Service", "mcp-example")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http"}


def test_network_policy_admits_only_sidecars_and_the_cli(overlay: list[Obj]) -> None:
    """gRPC only from the control plane's clients; the admin port (`/metrics`) only from
    metrics scrapers, as the sidecars' admin port."""
    policy = find(overlay, "NetworkPolicy", "tether-control-plane")
    deployment = find(overlay, "Deployment", "tether-control-plane")
    assert policy["spec"]["podSelector"] == deployment["spec"]["selector"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rule, scrape = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 50051, "protocol": "TCP"}]
    (peer,) = rule["from"]
    assert peer["podSelector"] == {"matchLabels": {CLIENT_LABEL: "true"}}
    assert scrape["ports"] == [{"port": 9090, "protocol": "TCP"}]
    (scraper,) = scrape["from"]
    assert scraper["podSelector"] == {"matchLabels": {SCRAPER_LABEL: "true"}}
    sidecar_policy = find(overlay, "NetworkPolicy", "mcp-example")
    assert scrape in sidecar_policy["spec"]["ingress"]
    (container,) = pod_spec(deployment)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "admin": 9090}
    assert container_env(overlay, container)["TETHER_ADMIN_LISTEN"] == "0.0.0.0:9090"
    # Every pod that is configured to reach the control plane carries the label.
    for workload in workloads(overlay):
        check_control_plane_client_label(workload, lambda c: container_env(overlay, c))


def _example_sidecar(
    overlay: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> tuple[Obj, Obj, Obj, SidecarConfig]:
    deployment = find(overlay, "Deployment", "mcp-example")
    (sidecar,) = pod_spec(deployment)["initContainers"]
    (server,) = pod_spec(deployment)["containers"]
    config = sidecar_config(monkeypatch, sidecar, container_env(overlay, sidecar))
    return deployment, sidecar, server, config


def test_sidecar_outlasts_its_pod_termination(
    overlay: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment, _, _, config = _example_sidecar(overlay, monkeypatch)
    check_sidecar_outlasts_termination(deployment, config)


def test_the_mcp_server_drains_its_sidecar_before_it_stops(
    overlay: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment, sidecar, server, config = _example_sidecar(overlay, monkeypatch)
    check_server_drains_its_sidecar(
        deployment, sidecar, server, config, server_stop_s=demo_server.SHUTDOWN_GRACE_S
    )


def test_sidecar_answers_every_name_of_the_service_in_front_of_it(
    overlay: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, _, config = _example_sidecar(overlay, monkeypatch)
    service = find(overlay, "Service", "mcp-example")
    check_sidecar_answers_service(config, service, service["metadata"]["namespace"])


# --- the settings are ones the real CLI accepts ---------------------------------------------


def _subcommand(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices[name]
    return parser


def _variables(command: str) -> set[str]:
    return {
        "TETHER_" + a.dest.upper()
        for a in _subcommand(command)._actions
        if a.option_strings and a.dest != "help"
    }


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("TETHER_") or key == "POD_NAME":
            monkeypatch.delenv(key)
    return monkeypatch


def test_tether_containers_use_real_flags_and_variables(
    overlay: list[Obj], clean_environ: pytest.MonkeyPatch
) -> None:
    """Parse each container's command line with the real parsers, in the environment the
    container gets, and check every TETHER_ variable names an option of its subcommand."""
    seen: set[str] = set()
    for workload in workloads(overlay):
        for c in all_containers(workload):
            if not c["image"].startswith("tether:"):
                continue
            env = container_env(overlay, c)
            if "command" in c:  # the example MCP server, from the same image
                assert c["command"] == ["python", "-m", "tether.demo_server"]
                args = demo_server.build_parser().parse_args(c["args"])
                assert (args.host, args.port) == ("0.0.0.0", 3000)
                seen.add("demo_server")
                continue
            command = c["args"][0]
            unknown = {k for k in env if k.startswith("TETHER_")} - _variables(command)
            assert not unknown, f"{c['name']}: no such option of `tether {command}`: {unknown}"
            with clean_environ.context() as patch:
                for key, value in env.items():
                    patch.setenv(key, value)
                parsed = build_parser().parse_args(c["args"])
                if command == "sidecar":
                    config = config_from_args(parsed)
                    assert config.listen_port == 8080
                    assert config.admin_port == 9090
                elif command == "control-plane":
                    assert parsed.store, "every overlay chooses a store"
                    parse_store_url(parsed.store)
                    assert parse_listen(parsed.admin_listen) == ("0.0.0.0", 9090)
                elif command == "injector":
                    injector = injector_config(parsed)
                    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                    assert (injector.listen_port, injector.admin_port) == (
                        ports["https"],
                        ports["admin"],
                    )
                    assert injector.inject.image == c["image"]
                else:
                    pytest.fail(f"unexpected command {command!r}")
            seen.add(command)
    injecting = any(w["metadata"]["name"] == "tether-injector" for w in workloads(overlay))
    expected = {"sidecar", "control-plane", "demo_server", *(["injector"] if injecting else [])}
    assert seen == expected


# --- per overlay ----------------------------------------------------------------------------


def _control_plane_store(objects: list[Obj]) -> str:
    (container,) = pod_spec(find(objects, "Deployment", "tether-control-plane"))["containers"]
    return container_env(objects, container)["TETHER_STORE"]


def test_dev_runs_one_control_plane_on_sqlite_in_a_writable_volume(
    rendered: dict[str, list[Obj]],
) -> None:
    objects = rendered["dev"]
    deployment = find(objects, "Deployment", "tether-control-plane")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    store = parse_store_url(_control_plane_store(objects))
    assert isinstance(store, SqliteUrl)
    (container,) = pod_spec(deployment)["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume_name = mounts[str(store.path.parent)]
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert set(volumes[volume_name]) & {"emptyDir", "persistentVolumeClaim"}
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    example = find(objects, "Deployment", "mcp-example")
    for c in all_containers(deployment) + all_containers(example):
        assert c["image"] == "tether:dev"


def test_prod_runs_two_control_planes_on_a_three_member_etcd(
    rendered: dict[str, list[Obj]],
) -> None:
    objects = rendered["prod"]
    assert find(objects, "Deployment", "tether-control-plane")["spec"]["replicas"] == 2
    etcd = find(objects, "StatefulSet", "etcd")
    assert etcd["spec"]["replicas"] == 3
    assert etcd["spec"]["podManagementPolicy"] == "Parallel"
    headless = find(objects, "Service", etcd["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    store = parse_store_url(_control_plane_store(objects))
    assert isinstance(store, EtcdUrl)
    members = {f"etcd-{i}.{headless['metadata']['name']}" for i in range(3)}
    assert {host for host, _ in store.endpoints} == members
    assert {port for _, port in store.endpoints} == {2379}
    assert find(objects, "PodDisruptionBudget", "etcd")["spec"]["maxUnavailable"] == 1


def test_prod_mounts_the_tls_secret_and_encrypts_etcd_peers(
    rendered: dict[str, list[Obj]],
) -> None:
    objects = rendered["prod"]
    deployment = find(objects, "Deployment", "tether-control-plane")
    (container,) = pod_spec(deployment)["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["tls"]["mountPath"] == "/etc/tether/tls"
    assert mounts["tls"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "tether-control-plane-tls"
    (etcd,) = pod_spec(find(objects, "StatefulSet", "etcd"))["containers"]
    args = etcd["args"]
    assert "--peer-auto-tls" in args
    peer_urls = [a for a in args if a.startswith(("--listen-peer-urls", "--initial-"))]
    assert all("http://" not in a for a in peer_urls), peer_urls


def test_external_etcd_brings_no_etcd_of_its_own(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["external-etcd"]
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    assert isinstance(parse_store_url(_control_plane_store(objects)), EtcdUrl)


def test_overlays_share_the_base(rendered: dict[str, list[Obj]]) -> None:
    for name, objects in rendered.items():
        namespaces = {
            o["metadata"].get("namespace") for o in objects if o["kind"] not in CLUSTER_SCOPED
        }
        assert namespaces == {"tether"}, name
        assert Path(DEPLOY / "overlays" / name / "kustomization.yaml").is_file()


def _mounted(workload: Obj, container: Obj, path: str) -> Obj:
    """The volume that holds the file `path` in `container` (mounted on one of its parents)."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert len(mounts) == 1, f"{container['name']}: {path} is on no (or several) mounts"
    assert mounts[0].get("readOnly") is True
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    volume: Obj = volumes[mounts[0]["name"]]
    return volume


def test_prod_callers_prove_who_they_are_and_the_policy_names_them(
    rendered: dict[str, list[Obj]],
) -> None:
    """The README's production configuration, checked on the rendered objects: sidecars send
    a projected token of the control plane's audience naming their pod, the control plane
    verifies it against a mounted JWKS and a policy that makes exactly the MCP pods' account
    a sidecar, and sidecars key their fingerprints with a mounted Secret."""
    objects = rendered["prod"]
    plane = find(objects, "Deployment", "tether-control-plane")
    (cp,) = pod_spec(plane)["containers"]
    cp_env = container_env(objects, cp)
    jwks = _mounted(plane, cp, cp_env["TETHER_JWT_JWKS_FILE"])
    assert jwks["configMap"]["name"] == "tether-jwks"
    assert "optional" not in jwks["configMap"]
    policy_file = cp_env["TETHER_POLICY_FILE"]
    policy_volume = _mounted(plane, cp, policy_file)
    policy_map = find(objects, "ConfigMap", "tether-policy")
    assert policy_volume["configMap"]["name"] == policy_map["metadata"]["name"]
    policy = Policy.parse(policy_map["data"][Path(policy_file).name])

    mcp = find(objects, "Deployment", "mcp-example")
    account = pod_spec(mcp)["serviceAccountName"]
    assert find(objects, "ServiceAccount", account)["automountServiceAccountToken"] is False
    namespace = mcp["metadata"]["namespace"]

    def roles(service_account: str) -> frozenset[Role]:
        pod = Principal(
            PrincipalKind.SERVICE_ACCOUNT,
            (
                f"pod:{namespace}/mcp-example-0",
                f"system:serviceaccount:{namespace}:{service_account}",
            ),
            OwnerName("mcp-example-0"),
        )
        return policy.roles_of(pod)

    assert roles(account) == {Role.SIDECAR}
    for tool, role in (("tether-viewer", Role.VIEWER), ("tether-admin", Role.ADMIN)):
        assert find(objects, "ServiceAccount", tool)["automountServiceAccountToken"] is False
        assert roles(tool) == {role}
    # The control plane's own account (and any other) is nothing.
    assert roles(pod_spec(plane)["serviceAccountName"]) == frozenset()

    (sidecar,) = [c for c in all_containers(mcp) if c["args"][:1] == ["sidecar"]]
    env = container_env(objects, sidecar)
    token = _mounted(mcp, sidecar, env["TETHER_CONTROL_PLANE_TOKEN_FILE"])
    (source,) = token["projected"]["sources"]
    projected = source["serviceAccountToken"]
    assert projected["audience"] == cp_env["TETHER_JWT_AUDIENCE"]
    assert projected["path"] == Path(env["TETHER_CONTROL_PLANE_TOKEN_FILE"]).name
    assert projected["expirationSeconds"] <= 3600
    key = _mounted(mcp, sidecar, env["TETHER_FINGERPRINT_KEY_FILE"])
    assert key["secret"]["secretName"] == "tether-fingerprint-key"
    assert "optional" not in key["secret"]
    # The sidecar's owner name is its pod's name: what the token proves. Bare, because the
    # MCP pods run in the control plane's namespace, its home namespace (identity rule 6).
    assert env["POD_NAME"] == "<metadata.name>"
    assert "TETHER_OWNER" not in env
    assert cp_env["TETHER_HOME_NAMESPACE"] == "<metadata.namespace>"
    assert mcp["metadata"]["namespace"] == plane["metadata"]["namespace"]


def test_dev_keeps_the_development_defaults(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["dev"]
    (cp,) = pod_spec(find(objects, "Deployment", "tether-control-plane"))["containers"]
    assert not {
        k for k in container_env(objects, cp) if k.startswith(("TETHER_JWT", "TETHER_POLICY"))
    }
