"""The sans-IO core of `tether injector` (`tether.webhook`), no sockets: given a review, expect
this decision and this response. Over the pods that the chart-shaped workloads of
tests/deploy/fixtures would create, the patch applied with the JSONPatch library gives exactly
`inject_pod(pod)`, validates strictly for Kubernetes 1.29 and 1.37, keeps the conventions of
tests/deploy, and a reinvocation on the result patches nothing."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from tests.deploy.conventions import (
    check_container_locked_down,
    check_control_plane_client_label,
    check_sidecar_probes,
    check_sidecar_variables_are_real,
    native_sidecars,
    pod_template,
)
from tests.deploy.render import KUBERNETES_VERSIONS, validate
from tether.inject import InjectConfig, inject_pod
from tether.webhook import (
    MalformedReview,
    Outcome,
    Scope,
    decide,
    parse_review,
    response,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "deploy" / "fixtures"
REVIEW = json.loads((ROOT / "integration" / "admission" / "pod-create.json").read_text())
CONFIG = InjectConfig(image="tether:0.1.0")
WORKLOADS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
Obj = dict[str, Any]


def fixture_pods() -> list[tuple[str, Obj]]:
    """Each fixture workload's pod, as its controller creates it: the template's metadata and
    spec, a generateName, the namespace."""
    pods = []
    for path in sorted(FIXTURES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") not in WORKLOADS:
                continue
            template = copy.deepcopy(pod_template(doc))
            meta = template.get("metadata") or {}
            if doc["kind"] != "Pod":
                meta["generateName"] = f"{doc['metadata']['name']}-"
            meta["namespace"] = "mcp"
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]}
            pods.append((f"{path.stem}:{doc['kind']}/{doc['metadata']['name']}", pod))
    return pods


PODS = fixture_pods()


def request_for(pod: Obj, **changes: Any) -> Obj:
    request: Obj = copy.deepcopy(REVIEW["request"])
    request["object"] = copy.deepcopy(pod)
    request.update(changes)
    return request


def apply(pod: Obj, answer: Obj) -> Obj:
    body = answer["response"]
    if "patch" not in body:
        return pod
    ops = json.loads(base64.b64decode(body["patch"]))
    result: Obj = jsonpatch.apply_patch(pod, ops)
    return result


def env_of(container: Obj) -> dict[str, str]:
    return {
        e["name"]: e.get(
            "value", "<" + e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "?") + ">"
        )
        for e in container.get("env", [])
    }


def test_the_fixtures_give_pods_of_every_outcome() -> None:
    """Guard against a vacuous property below: the fixtures both inject and refuse. (Their
    opt-outs are on the workloads, which the webhook never sees: a pod carries only its
    template's marks, so opting a pod out means marking the template.)"""
    outcomes = {decide(request_for(pod), CONFIG, scope=Scope.NAMESPACE).outcome for _, pod in PODS}
    assert outcomes >= {Outcome.INJECTED, Outcome.FAILED}, outcomes


@pytest.mark.parametrize(("name", "pod"), PODS, ids=[n for n, _ in PODS])
def test_the_patch_makes_the_injected_pod_and_a_reinvocation_patches_nothing(
    name: str, pod: Obj
) -> None:
    decision = decide(request_for(pod), CONFIG, scope=Scope.NAMESPACE)
    answer = response(decision)
    assert answer["response"]["uid"] == REVIEW["request"]["uid"]
    assert answer["response"]["allowed"] is True
    if decision.outcome is Outcome.FAILED:
        assert "patch" not in answer["response"]
        (warning,) = answer["response"]["warnings"]
        assert warning.startswith("Tether not injected: "), warning
        return
    result = apply(pod, answer)
    assert result == inject_pod(pod, CONFIG, namespace="mcp")
    if decision.outcome is Outcome.SKIPPED:
        assert result == pod
        return
    assert decision.outcome is Outcome.INJECTED
    for version in KUBERNETES_VERSIONS:
        validate(result, version)
    (sidecar,) = native_sidecars(result["spec"])
    check_container_locked_down(result, sidecar)
    check_sidecar_probes(sidecar)
    check_sidecar_variables_are_real(sidecar, env_of(sidecar))
    check_control_plane_client_label(result, env_of)
    again = decide(request_for(result), CONFIG, scope=Scope.NAMESPACE)
    assert (again.outcome, again.patch) == (Outcome.UNCHANGED, ()), name
    assert set(response(again)["response"]) == {"uid", "allowed"}


def test_the_pod_webhook_injects_only_marked_pods() -> None:
    pod = copy.deepcopy(REVIEW["request"]["object"])
    pod["metadata"]["annotations"] = {}
    assert decide(request_for(pod), CONFIG, scope=Scope.POD).outcome is Outcome.SKIPPED
    pod["metadata"]["labels"]["tether.dev/inject"] = "true"  # a label opts in too
    assert decide(request_for(pod), CONFIG, scope=Scope.POD).outcome is Outcome.INJECTED
    pod["metadata"]["annotations"] = {"tether.dev/inject": "false"}  # "false" wins
    assert decide(request_for(pod), CONFIG, scope=Scope.POD).outcome is Outcome.SKIPPED
    assert decide(request_for(pod), CONFIG, scope=Scope.NAMESPACE).outcome is Outcome.SKIPPED


def test_only_a_pod_create_is_considered() -> None:
    pod = REVIEW["request"]["object"]
    for changes in (
        {"operation": "UPDATE"},
        {"operation": "DELETE", "object": None},
        {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
        {"subResource": "ephemeralcontainers"},
    ):
        decision = decide(request_for(pod, **changes), CONFIG, scope=Scope.NAMESPACE)
        assert (decision.outcome, decision.patch) == (Outcome.SKIPPED, ()), changes


def test_a_create_without_its_pod_is_allowed_with_a_warning() -> None:
    decision = decide(request_for({}, object=None), CONFIG, scope=Scope.NAMESPACE)
    assert decision.outcome is Outcome.FAILED
    assert response(decision)["response"]["warnings"]


def test_the_subject_names_the_pod_or_its_generate_name() -> None:
    request = request_for(REVIEW["request"]["object"])
    assert decide(request, CONFIG, scope=Scope.POD).subject == "mcp/filesystem-mcp-7d9c6b5f8-*"
    request["name"] = "web-0"
    assert decide(request, CONFIG, scope=Scope.POD).subject == "mcp/web-0"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff", "not JSON"),
        (b"null", "expected a JSON object, got NoneType"),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "v1"}',
            "got kind 'AdmissionReview' of apiVersion 'v1'",
        ),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": []}',
            "no `request`",
        ),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {}}',
            "no `uid`",
        ),
    ],
)
def test_malformed_reviews_say_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(MalformedReview, match=message.replace("(", r"\(")):
        parse_review(body)


def test_a_well_formed_review_parses_to_its_request() -> None:
    assert parse_review(json.dumps(REVIEW).encode()) == REVIEW["request"]
