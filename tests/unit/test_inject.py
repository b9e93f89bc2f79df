"""`tether.inject`: the sans-IO injection. Its rules (module docstring) as examples and as
Hypothesis properties over generated workloads of every kind: never mutates its input,
idempotent, `uninject` is its exact inverse, nothing without the opt-in. Validation against the
Kubernetes schemas and the deploy conventions is in tests/deploy/test_inject_manifests.py."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tether.cli_inject import inject_stream, uninject_stream
from tether.inject import (
    CHANGES_ANNOTATION,
    CLIENT_LABEL,
    INJECTED_ANNOTATION,
    SIDECAR_NAME,
    InjectConfig,
    InjectError,
    drain_hook,
    inject,
    inject_pod,
    injected_workload,
    is_injected,
    is_opted_in,
    restore_service,
    retarget_service,
    uninject,
)

Obj = dict[str, Any]
CONFIG = InjectConfig()

KINDS = {
    "Pod": ("v1", ()),
    "Deployment": ("apps/v1", ("spec", "template")),
    "StatefulSet": ("apps/v1", ("spec", "template")),
    "DaemonSet": ("apps/v1", ("spec", "template")),
    "ReplicaSet": ("apps/v1", ("spec", "template")),
    "Job": ("batch/v1", ("spec", "template")),
    "CronJob": ("batch/v1", ("spec", "jobTemplate", "spec", "template")),
}


def workload(kind: str, pod_spec: Obj, *, annotations: Obj | None = None, **meta: Any) -> Obj:
    """A `kind` whose pod template has `pod_spec`; `annotations` on the object itself."""
    api, path = KINDS[kind]
    template: Obj = {"metadata": {"labels": {"app": "x"}}, "spec": pod_spec}
    obj: Obj = {"apiVersion": api, "kind": kind, "metadata": {"name": "x", **meta}}
    if annotations is not None:
        obj["metadata"]["annotations"] = dict(annotations)
    if not path:
        obj["metadata"].setdefault("labels", {"app": "x"})
        obj["spec"] = pod_spec
        return obj
    node = obj
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = template
    return obj


def server(name: str = "mcp", *ports: Obj) -> Obj:
    return {
        "name": name,
        "image": "example/mcp:1",
        "ports": list(ports or [{"containerPort": 3000}]),
    }


OPTED_IN = {"tether.dev/inject": "true"}


def template_of(obj: Obj) -> Obj:
    _, path = KINDS[obj["kind"]]
    node = obj
    for key in path:
        node = node[key]
    return node


def sidecar_of(obj: Obj) -> Obj:
    found: list[Obj] = [
        c for c in template_of(obj)["spec"]["initContainers"] if c["name"] == SIDECAR_NAME
    ]
    (sidecar,) = found
    return sidecar


def env_of(container: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "<ref>") for e in container["env"]}


# --- examples ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_gets_the_sidecar_the_hook_the_label_and_a_longer_grace(kind: str) -> None:
    before = workload(kind, {"containers": [server()]}, annotations=OPTED_IN)
    after = inject(before, CONFIG)
    template = template_of(after)
    sidecar = sidecar_of(after)
    assert sidecar["restartPolicy"] == "Always"
    assert env_of(sidecar)["TETHER_UPSTREAM"] == "http://127.0.0.1:3000"
    assert template["spec"]["containers"][0]["lifecycle"]["preStop"] == drain_hook(CONFIG)
    assert template["metadata"]["labels"][CLIENT_LABEL] == "true"
    # The pod's own grace (Kubernetes' default, 30) is what the server keeps to stop.
    assert template["spec"]["terminationGracePeriodSeconds"] == 30 + 30 + 5 + 5
    assert template["metadata"]["annotations"][INJECTED_ANNOTATION]
    assert uninject(after) == before


def test_without_the_opt_in_nothing_changes_unless_forced() -> None:
    before = workload("Deployment", {"containers": [server()]})
    assert not is_opted_in(before)
    assert inject(before, CONFIG) == before
    assert is_injected(inject(before, CONFIG, force=True))


@pytest.mark.parametrize(
    "mark",
    ["workload annotation", "workload label", "template annotation", "template label"],
)
def test_the_opt_in_is_an_annotation_or_a_label_on_the_workload_or_its_template(mark: str) -> None:
    obj = workload("Deployment", {"containers": [server()]})
    where, field = mark.split()
    meta = obj["metadata"] if where == "workload" else obj["spec"]["template"]["metadata"]
    meta.setdefault(field + "s", {})["tether.dev/inject"] = "true"
    assert is_opted_in(obj)
    assert is_injected(inject(obj, CONFIG))


def test_an_opt_out_wins_even_over_force() -> None:
    obj = workload("Deployment", {"containers": [server()]}, annotations=OPTED_IN)
    obj["spec"]["template"]["metadata"]["annotations"] = {"tether.dev/inject": "false"}
    assert inject(obj, CONFIG, force=True) == obj
    assert inject_pod(
        workload("Pod", {"containers": [server()]}, labels={"tether.dev/inject": "false"}),
        CONFIG,
        namespace="a",
    ) == workload("Pod", {"containers": [server()]}, labels={"tether.dev/inject": "false"})


def test_other_kinds_come_back_unchanged() -> None:
    for obj in (
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "x", "annotations": OPTED_IN},
        },
        {
            "apiVersion": "example.com/v1",
            "kind": "Deployment",
            "metadata": {"annotations": OPTED_IN},
        },
    ):
        assert inject(obj, CONFIG, force=True) == obj


def test_the_input_is_never_mutated() -> None:
    before = workload("Deployment", {"containers": [server()]}, annotations=OPTED_IN)
    frozen = copy.deepcopy(before)
    after = inject(before, CONFIG)
    assert before == frozen
    uninject(after)
    assert is_injected(after)


def test_owner_name_carries_the_namespace_outside_the_home_namespace() -> None:
    pod = workload("Pod", {"containers": [server()]})
    home = env_of(sidecar_of(inject_pod(pod, CONFIG, namespace="tether")))
    assert "TETHER_OWNER" not in home
    away = env_of(sidecar_of(inject_pod(pod, CONFIG, namespace="team-a")))
    assert away["TETHER_OWNER"] == "$(POD_NAME)@$(POD_NAMESPACE)"
    names = [e["name"] for e in sidecar_of(inject_pod(pod, CONFIG, namespace="a"))["env"]]
    # Kubernetes expands $(VAR) only from variables defined before.
    assert names.index("POD_NAME") < names.index("TETHER_OWNER")
    assert names.index("POD_NAMESPACE") < names.index("TETHER_OWNER")


def test_inject_pod_leaves_an_injected_pod_alone_and_refuses_other_kinds() -> None:
    pod = inject_pod(workload("Pod", {"containers": [server()]}), CONFIG, namespace="a")
    other = InjectConfig(image="tether:other")
    assert inject_pod(pod, other, namespace="a") == pod
    with pytest.raises(InjectError, match="not a v1 Pod"):
        inject_pod(workload("Deployment", {"containers": [server()]}), CONFIG, namespace="a")


def test_reinjecting_takes_the_new_settings() -> None:
    once = inject(workload("Job", {"containers": [server()]}, annotations=OPTED_IN), CONFIG)
    again = inject(once, InjectConfig(image="registry.example/tether:9"))
    assert sidecar_of(again)["image"] == "registry.example/tether:9"
    assert uninject(again) == uninject(once)


def test_upstream_port_by_annotation_number_or_name() -> None:
    ports = ({"name": "mcp", "containerPort": 3000}, {"name": "metrics", "containerPort": 9100})
    obj = workload("Deployment", {"containers": [server("s", *ports)]}, annotations=OPTED_IN)
    two_ports = (
        r"Deployment/x: container s has 2 ports \(mcp, metrics\): set tether\.dev/upstream-p"
    )
    with pytest.raises(InjectError, match=two_ports):
        inject(obj, CONFIG)
    obj["metadata"]["annotations"]["tether.dev/upstream-port"] = "metrics"
    assert env_of(sidecar_of(inject(obj, CONFIG)))["TETHER_UPSTREAM"].endswith(":9100")
    obj["metadata"]["annotations"]["tether.dev/upstream-port"] = "4000"
    assert env_of(sidecar_of(inject(obj, CONFIG)))["TETHER_UPSTREAM"].endswith(":4000")
    obj["metadata"]["annotations"]["tether.dev/upstream-port"] = "grpc"
    with pytest.raises(InjectError, match="'grpc' names no port of container s"):
        inject(obj, CONFIG)


def test_errors_name_the_object_and_what_to_set() -> None:
    def fails(spec: Obj, match: str, **annotations: str) -> None:
        obj = workload("StatefulSet", spec, annotations={**OPTED_IN, **annotations}, namespace="ns")
        with pytest.raises(InjectError, match=match) as caught:
            inject(obj, CONFIG)
        assert str(caught.value).startswith("StatefulSet/ns/x: ")
        assert "\n" not in str(caught.value)

    fails(
        {"containers": [{"name": "s", "image": "i:1"}]}, "has no port: set tether.dev/upstream-port"
    )
    fails(
        {"containers": [server("a"), server("b")]},
        r"2 containers \(a, b\): set tether.dev/container",
    )
    fails(
        {"containers": [server("a")]},
        "tether.dev/container='c' names no container",
        **{"tether.dev/container": "c"},
    )
    fails(
        {"containers": [server("a", {"containerPort": 8080})]},
        "uses port 8080, the sidecar's proxy port",
    )
    fails(
        {"containers": [server(), server("metrics", {"containerPort": 9090})]},
        "container metrics uses port 9090, the sidecar's admin port",
        **{"tether.dev/container": "mcp"},
    )
    fails({"containers": []}, "no containers")
    hand_wired = {
        "containers": [server()],
        "initContainers": [{"name": SIDECAR_NAME, "image": "t:1"}],
    }
    fails(hand_wired, "already has a container named tether-sidecar")


def test_an_existing_prestop_hook_is_refused_replaced_or_kept() -> None:
    theirs = {"exec": {"command": ["sleep", "5"]}}
    mcp = {
        **server(),
        "lifecycle": {"preStop": theirs, "postStart": {"exec": {"command": ["true"]}}},
    }
    obj = workload("Deployment", {"containers": [mcp]}, annotations=dict(OPTED_IN))
    with pytest.raises(
        InjectError, match=r"already has a preStop hook; set tether\.dev/pre-stop: replace"
    ):
        inject(obj, CONFIG)
    obj["metadata"]["annotations"]["tether.dev/pre-stop"] = "replace"
    replaced = inject(obj, CONFIG)
    lifecycle = template_of(replaced)["spec"]["containers"][0]["lifecycle"]
    assert lifecycle == {"preStop": drain_hook(CONFIG), "postStart": mcp["lifecycle"]["postStart"]}
    assert uninject(replaced) == obj
    obj["metadata"]["annotations"]["tether.dev/pre-stop"] = "keep"
    kept = inject(obj, CONFIG)
    assert template_of(kept)["spec"]["containers"][0]["lifecycle"]["preStop"] == theirs
    assert uninject(kept) == obj


def test_a_hand_wired_drain_hook_is_recognised_and_left_in_place() -> None:
    mcp = {**server(), "lifecycle": {"preStop": drain_hook(CONFIG)}}
    obj = workload("Deployment", {"containers": [mcp]}, annotations=OPTED_IN)
    assert uninject(inject(obj, CONFIG)) == obj


def test_uninject_refuses_a_record_that_no_longer_fits() -> None:
    injected = inject(
        workload("Deployment", {"containers": [server()]}, annotations=OPTED_IN), CONFIG
    )
    broken = copy.deepcopy(injected)
    del broken["spec"]["template"]["metadata"]["annotations"][CHANGES_ANNOTATION]
    with pytest.raises(InjectError, match="cannot undo the injection"):
        uninject(broken)
    renamed = copy.deepcopy(injected)
    renamed["spec"]["template"]["spec"]["containers"][0]["name"] = "renamed"
    with pytest.raises(InjectError, match="Deployment/x: the injected parts were changed since"):
        uninject(renamed)
    assert uninject({"kind": "Deployment", "apiVersion": "apps/v1"}) == {
        "kind": "Deployment",
        "apiVersion": "apps/v1",
    }


def test_services_pointing_at_the_mcp_port_move_to_the_sidecar_and_back() -> None:
    ports = ({"name": "mcp", "containerPort": 3000}, {"name": "metrics", "containerPort": 9100})
    obj = workload(
        "Deployment",
        {"containers": [server("s", *ports)]},
        annotations={**OPTED_IN, "tether.dev/upstream-port": "mcp"},
    )
    target = injected_workload(inject(obj, CONFIG))
    assert target is not None
    service: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "svc"},
        "spec": {
            "selector": {"app": "x"},
            "ports": [
                {"name": "a", "port": 80, "targetPort": "mcp"},
                {"name": "b", "port": 81, "targetPort": 3000},
                {"name": "c", "port": 3000},
                {"name": "d", "port": 9100, "targetPort": "metrics"},
            ],
        },
    }
    moved = retarget_service(service, [target])
    assert [p.get("targetPort") for p in moved["spec"]["ports"]] == ["tether-http"] * 3 + [
        "metrics"
    ]
    assert retarget_service(moved, [target]) == moved
    assert restore_service(moved) == service
    elsewhere = {**service, "spec": {**service["spec"], "selector": {"app": "other"}}}
    assert retarget_service(elsewhere, [target]) == elsewhere


# --- properties -------------------------------------------------------------------------------

NAMES = st.sampled_from(["mcp", "server", "app", "proxy", "logs", "metrics", "worker"])
PORT_NAMES = st.sampled_from(["http", "mcp", "metrics", "grpc", "web"])
PORT_NUMBERS = st.sampled_from([80, 3000, 3001, 5000, 8000, 8811, 9100])
SMALL_TEXT = st.text(alphabet="abcxyz-0123", min_size=1, max_size=6)


@st.composite
def ports(draw: st.DrawFn) -> list[Obj]:
    # Mostly one port (the common case, injected without a setting), sometimes none or more.
    size = draw(st.sampled_from([0, 1, 1, 1, 2, 3]))
    numbers = draw(st.lists(PORT_NUMBERS, min_size=size, max_size=size, unique=True))
    names = draw(st.lists(PORT_NAMES, min_size=len(numbers), max_size=len(numbers), unique=True))
    out = []
    for number, name in zip(numbers, names, strict=True):
        port: Obj = {"containerPort": number}
        if draw(st.booleans()):
            port["name"] = name
        if draw(st.booleans()):
            port["protocol"] = "TCP"
        out.append(port)
    return out


@st.composite
def containers(draw: st.DrawFn, names: list[str]) -> list[Obj]:
    out = []
    for name in names:
        c: Obj = {"name": name, "image": "example/" + name + ":1"}
        if p := draw(ports()):
            c["ports"] = p
        hooks = draw(st.sampled_from([None, "exec", "drain", "empty-lifecycle"]))
        if hooks == "exec":
            c["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", "1"]}}}
        elif hooks == "drain":
            c["lifecycle"] = {"preStop": drain_hook(CONFIG)}
        elif hooks == "empty-lifecycle":
            c["lifecycle"] = {}
        out.append(c)
    return out


@st.composite
def maybe_map(draw: st.DrawFn, extra: st.SearchStrategy[dict[str, str]]) -> Obj | None:
    kind = draw(st.sampled_from(["absent", "null", "map"]))
    if kind == "absent":
        return {"__absent__": True}
    if kind == "null":
        return None
    return draw(extra)


@st.composite
def workloads(draw: st.DrawFn) -> Obj:  # noqa: C901, PLR0912 (one branch per shape)
    kind = draw(st.sampled_from(sorted(KINDS)))
    names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    spec: Obj = {"containers": draw(containers(names))}
    if draw(st.booleans()):
        spec["initContainers"] = draw(
            st.lists(
                st.builds(lambda n: {"name": "init-" + n, "image": "i:1"}, SMALL_TEXT),
                max_size=2,
                unique_by=lambda c: c["name"],
            )
        )
    if draw(st.booleans()):
        spec["volumes"] = [{"name": "data", "emptyDir": {}}]
    if draw(st.booleans()):
        spec["terminationGracePeriodSeconds"] = draw(st.integers(0, 600))
    settings_: dict[str, str] = {}
    opt = draw(st.sampled_from(["annotation", "label", "template", "none", "false"]))
    if len(names) > 1 or draw(st.booleans()):
        settings_["tether.dev/container"] = draw(st.sampled_from(names))
    chosen = next(
        (
            c
            for c in spec["containers"]
            if c["name"] == settings_.get("tether.dev/container", names[0])
        ),
        spec["containers"][0],
    )
    choice = draw(st.sampled_from(["none", "number", "name"]))
    if choice == "number":
        settings_["tether.dev/upstream-port"] = str(draw(PORT_NUMBERS))
    elif choice == "name" and any("name" in p for p in chosen.get("ports", [])):
        settings_["tether.dev/upstream-port"] = next(
            p["name"] for p in chosen["ports"] if "name" in p
        )
    if draw(st.booleans()):
        settings_["tether.dev/pre-stop"] = draw(st.sampled_from(["replace", "keep"]))
    api, path = KINDS[kind]
    template_annotations = draw(maybe_map(st.dictionaries(SMALL_TEXT, SMALL_TEXT, max_size=2)))
    template_labels = draw(maybe_map(st.just({"app": "x"})))
    meta: Obj = {}
    for key, value in (("annotations", template_annotations), ("labels", template_labels)):
        if value is None or "__absent__" not in value:
            meta[key] = value
    where_settings = draw(st.sampled_from(["object", "template"]))
    obj: Obj = {"apiVersion": api, "kind": kind, "metadata": {"name": "w"}}
    target_meta = obj["metadata"] if where_settings == "object" or not path else meta
    if opt in ("annotation", "template", "false"):
        settings_["tether.dev/inject"] = "false" if opt == "false" else "true"
    if settings_:
        if target_meta.get("annotations") is None:
            target_meta["annotations"] = {}
        target_meta["annotations"].update(settings_)
    if opt == "label":
        if target_meta.get("labels") is None:
            target_meta["labels"] = {}
        target_meta["labels"]["tether.dev/inject"] = "true"
    template: Obj = {"spec": spec}
    empty_metadata: bool = draw(st.booleans())
    if meta or empty_metadata:
        template = {"metadata": meta, "spec": spec}
    if not path:
        obj["metadata"].update({k: v for k, v in meta.items() if k not in obj["metadata"]})
        obj["spec"] = spec
        return obj
    node = obj
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = template
    return obj


REFUSALS = ("ports", "no port", "containers", "preStop", "uses port", "names no")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(workloads(), st.booleans())
def test_injection_is_idempotent_and_uninject_is_its_inverse(obj: Obj, force: bool) -> None:
    frozen = json.dumps(obj, sort_keys=True)
    try:
        once = inject(obj, CONFIG, force=force)
    except InjectError as exc:
        event("refused: " + next(w for w in REFUSALS if w in str(exc)))
        assert json.dumps(obj, sort_keys=True) == frozen
        return
    assert json.dumps(obj, sort_keys=True) == frozen  # rule 1
    if not is_injected(once):
        event("left alone")
        assert once == obj
        assert not (force or is_opted_in(obj)) or "false" in frozen
        return
    event("injected")
    assert force or is_opted_in(obj)
    assert inject(once, CONFIG, force=force) == once  # idempotent
    assert inject(once, CONFIG) == once  # also without force: it is marked injected...
    assert uninject(once) == obj  # ...and uninject is the exact inverse
    assert uninject(uninject(once)) == obj


@settings(max_examples=100, deadline=None)
@given(workloads())
def test_a_workload_without_the_opt_in_is_returned_equal(obj: Obj) -> None:
    if is_opted_in(obj):
        return
    assert inject(obj, CONFIG) == obj


SERVICE: Obj = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "svc"},
    "spec": {"selector": {"app": "x"}, "ports": [{"port": 80, "targetPort": 3000}]},
}


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(workloads(), st.booleans())
def test_the_stream_commands_are_idempotent_and_inverse(obj: Obj, force: bool) -> None:
    """The same properties through `tether inject`/`uninject`'s stream functions: YAML text
    in and out, with a Service that may select the workload."""
    text = yaml.safe_dump_all([obj, SERVICE], sort_keys=False)
    try:
        once = inject_stream(text, CONFIG, force=force)
    except InjectError:
        return
    assert inject_stream(once, CONFIG, force=force) == once
    assert list(yaml.safe_load_all(uninject_stream(once))) == [obj, SERVICE]
