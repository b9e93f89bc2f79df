"""deploy/components/injector as rendered in overlays/injector (the general conventions, and
strict validation for Kubernetes 1.29 and 1.37, are applied to it by test_manifests.py): the
webhooks reach the injector's real routes through its Service, their namespace selectors send
each namespace to the right route and never the injector's own, cert-manager's objects name the
Secret the injector mounts, and the component also renders with a certificate you provide."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from tests.deploy.render import (
    DEPLOY,
    KUBERNETES_VERSIONS,
    Obj,
    container_env,
    find,
    kubectl,
    pod_spec,
    render,
    validate,
)
from tether.cli import build_parser
from tether.injector import config_from_args
from tether.webhook import PATHS, Scope

pytestmark = pytest.mark.skipif(
    kubectl() is None, reason="kubectl is not installed (it renders the kustomize overlays)"
)

OVERLAY = DEPLOY / "overlays" / "injector"
NAMESPACE_LABEL = "tether.dev/inject"


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    return render(OVERLAY)


def injector_settings(objects: list[Obj], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    (container,) = pod_spec(find(objects, "Deployment", "tether-injector"))["containers"]
    for key in list(os.environ):
        if key.startswith("TETHER_"):
            monkeypatch.delenv(key)
    for key, value in container_env(objects, container).items():
        monkeypatch.setenv(key, value)
    return build_parser().parse_args(container["args"])


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Kubernetes' label selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def namespace_labels(name: str, **labels: str) -> dict[str, str]:
    """A namespace's labels as the API server keeps them (it adds its name, from 1.21)."""
    return {"kubernetes.io/metadata.name": name, **labels}


def webhooks(objects: list[Obj]) -> dict[str, Obj]:
    config = find(objects, "MutatingWebhookConfiguration", "tether-injector")
    return {w["name"]: w for w in config["webhooks"]}


def test_each_webhook_calls_a_route_of_the_injector_through_its_service(
    objects: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config_from_args(injector_settings(objects, monkeypatch))
    deployment = find(objects, "Deployment", "tether-injector")
    assert deployment["spec"]["replicas"] == 2
    service = find(objects, "Service", "tether-injector")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == 443
    (container,) = pod_spec(deployment)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == settings.listen_port
    paths = set()
    for hook in webhooks(objects).values():
        target = hook["clientConfig"]["service"]
        assert target == {
            "name": "tether-injector",
            "namespace": service["metadata"]["namespace"],
            "path": target["path"],
            "port": 443,
        }
        paths.add(target["path"])
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["failurePolicy"] == "Ignore"
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["sideEffects"] == "None"
        assert 1 <= hook["timeoutSeconds"] <= 10
        (rule,) = hook["rules"]
        assert rule == {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
        assert "objectSelector" not in hook
    assert paths == set(PATHS.values())
    budget = find(objects, "PodDisruptionBudget", "tether-injector")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]


def test_namespace_selectors_route_each_namespace_once_and_never_the_injectors_own(
    objects: list[Obj],
) -> None:
    hooks = webhooks(objects)
    by_path = {h["clientConfig"]["service"]["path"]: h for h in hooks.values()}
    namespace_hook = by_path[PATHS[Scope.NAMESPACE]]
    pod_hook = by_path[PATHS[Scope.POD]]
    own = find(
        objects, "Namespace", find(objects, "Service", "tether-injector")["metadata"]["namespace"]
    )
    own_labels = namespace_labels(own["metadata"]["name"], **own["metadata"].get("labels", {}))
    cases = {
        "the injector's own": (own_labels, set()),
        "kube-system": (namespace_labels("kube-system"), set()),
        "kube-system, even if enabled": (
            namespace_labels("kube-system", **{NAMESPACE_LABEL: "enabled"}),
            set(),
        ),
        "enabled": (namespace_labels("mcp", **{NAMESPACE_LABEL: "enabled"}), {"namespace"}),
        "unlabelled": (namespace_labels("apps"), {"pod"}),
        "disabled": (namespace_labels("legacy", **{NAMESPACE_LABEL: "disabled"}), set()),
    }
    for what, (labels, expected) in cases.items():
        matched = {
            name
            for name, hook in (("namespace", namespace_hook), ("pod", pod_hook))
            if selects(hook["namespaceSelector"], labels)
        }
        assert matched == expected, what


def test_the_injected_image_and_control_plane_are_the_deployed_ones(
    objects: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The overlay's replacements: the image the injector runs (after `images:`), and the
    control plane's Service in the namespace the overlay chose."""
    settings = config_from_args(injector_settings(objects, monkeypatch))
    (container,) = pod_spec(find(objects, "Deployment", "tether-injector"))["containers"]
    assert settings.inject.image == container["image"] == "tether:0.1.0"
    plane = find(objects, "Service", "tether-control-plane")
    (grpc,) = plane["spec"]["ports"]
    name, namespace = plane["metadata"]["name"], plane["metadata"]["namespace"]
    assert settings.inject.control_plane == f"{name}.{namespace}.svc:{grpc['port']}"
    # prod verifies callers' tokens: injected sidecars send one of the audience it expects.
    (cp,) = pod_spec(find(objects, "Deployment", "tether-control-plane"))["containers"]
    cp_env = container_env(objects, cp)
    assert settings.inject.token_audience == cp_env["TETHER_JWT_AUDIENCE"]
    assert settings.inject.home_namespace == namespace


def test_cert_manager_issues_the_secret_the_injector_serves(
    objects: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config_from_args(injector_settings(objects, monkeypatch))
    deployment = find(objects, "Deployment", "tether-injector")
    (container,) = pod_spec(deployment)["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path in (settings.tls_cert, settings.tls_key):
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True
        # Mounted as a directory, not with subPath: a subPath mount never sees a renewal.
        assert "subPath" not in mount
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    secret = volumes[mounts[str(settings.tls_cert.parent)]["name"]]["secret"]["secretName"]
    assert (settings.tls_cert.name, settings.tls_key.name) == ("tls.crt", "tls.key")

    certificate = find(objects, "Certificate", "tether-injector")
    assert certificate["spec"]["secretName"] == secret
    service = find(objects, "Service", "tether-injector")
    namespace = service["metadata"]["namespace"]
    assert certificate["metadata"]["namespace"] == namespace
    # The name the API server checks: <service>.<namespace>.svc.
    assert f"{service['metadata']['name']}.{namespace}.svc" in certificate["spec"]["dnsNames"]
    issuer = certificate["spec"]["issuerRef"]
    assert issuer["kind"] == "Issuer"
    assert find(objects, "Issuer", issuer["name"])["metadata"]["namespace"] == namespace
    config = find(objects, "MutatingWebhookConfiguration", "tether-injector")
    annotation = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert annotation == f"{namespace}/{certificate['metadata']['name']}"


def test_the_api_server_reaches_the_webhook_and_only_scrapers_the_metrics(
    objects: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config_from_args(injector_settings(objects, monkeypatch))
    policy = find(objects, "NetworkPolicy", "tether-injector")
    deployment = find(objects, "Deployment", "tether-injector")
    assert policy["spec"]["podSelector"] == deployment["spec"]["selector"]
    webhook, scrape = policy["spec"]["ingress"]
    # From anywhere: the API server is no pod a selector could name.
    assert webhook == {"ports": [{"port": settings.listen_port, "protocol": "TCP"}]}
    assert scrape["ports"] == [{"port": settings.admin_port, "protocol": "TCP"}]
    (scraper,) = scrape["from"]
    assert scraper["podSelector"] == {"matchLabels": {"tether.dev/metrics-scraper": "true"}}


def test_with_a_certificate_you_provide(tmp_path: Path) -> None:
    """The README's other way: the component alone (no cert-manager), your Secret, and the
    caBundle patched in by your overlay."""
    here = Path(os.path.relpath(DEPLOY, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        f"""apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: tether
resources:
  - {here}/overlays/prod
components:
  - {here}/components/injector
patches:
  - target:
      kind: MutatingWebhookConfiguration
      name: tether-injector
    patch: |-
      - op: add
        path: /webhooks/0/clientConfig/caBundle
        value: Q0EgUEVN
      - op: add
        path: /webhooks/1/clientConfig/caBundle
        value: Q0EgUEVN
"""
    )
    objects = render(tmp_path)
    assert not [o for o in objects if o["apiVersion"].startswith("cert-manager.io/")]
    config = find(objects, "MutatingWebhookConfiguration", "tether-injector")
    assert "annotations" not in config["metadata"]
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            validate(obj, version)
    assert {w["clientConfig"]["caBundle"] for w in config["webhooks"]} == {"Q0EgUEVN"}
