"""Put Tether beside an MCP server in any workload, and take it away again (issue 15).

Sans-IO: plain mappings in (as parsed from YAML or JSON), new dicts out; no Kubernetes client,
no files. `tether inject`/`uninject` (`tether.cli_inject`) and the admission webhook are thin
front ends over `inject`, `inject_pod`, `uninject` and the Service functions below.

What an injection adds to the pod template (every value is that of the hand-wired example,
`deploy/base/mcp-example.yaml`, unless `InjectConfig` says otherwise):
- the native sidecar: an init container `tether-sidecar` with `restartPolicy: Always`, last
  among the init containers (the pod's own init containers finish before it starts; other
  native sidecars, a mesh proxy say, start before it and stop after it), its settings inline
  as `TETHER_*` variables (no ConfigMap has to exist in the workload's namespace), its owner
  name from the downward API, probes on its admin port, the locked-down security context
  and the resources of `deploy/`, a 16 MiB emptyDir on /tmp (its root filesystem is
  read-only);
- the preStop drain hook (`GET /drain` on the sidecar's admin port) on the MCP container;
- terminationGracePeriodSeconds = drain timeout + the pod's own grace period (what it gave
  its server to stop; 30 s, Kubernetes' default, when unset) + sidecar stop + margin
  (README, "Rolling an MCP server");
- the label the control plane's NetworkPolicy admits (`tether.dev/control-plane-client`).

Rules it keeps:
1. Never mutates its input: results are deep copies (of the input's own types, so a
   comment-keeping YAML loader's mappings keep their comments).
2. Only Pod (v1), Deployment, StatefulSet, DaemonSet, ReplicaSet (apps/v1), Job and CronJob
   (batch/v1) are injected; any other object comes back unchanged (a copy). Of those, one
   without the opt-in (`tether.dev/inject: "true"` as an annotation or a label, on the object
   or its pod template) comes back unchanged unless `force`; `"false"` opts out even then.
3. Idempotent: an object that is already injected is un-injected and injected again, so
   `inject(inject(x)) == inject(x)`, and a new version or setting replaces an old injection.
4. Reversible: every field an injection sets is recorded, with its value before (or its
   absence), in the pod template's annotation `tether.dev/injected-changes`; `uninject`
   replays that record backwards, so `uninject(inject(x)) == x`. Only the pod template
   changes; Services are retargeted (and restored) by their own functions, recorded on the
   Service.
5. An MCP container that already has a preStop hook other than the drain hook is refused
   (`InjectError`) unless the workload says what to do with it: `tether.dev/pre-stop:
   replace` (the drain hook takes its place; uninject puts it back) or `keep` (no drain on
   rollout: calls in flight when the pod stops are cut, clients resume elsewhere). Kubernetes
   runs one handler per hook, so the two cannot be chained.
6. Errors (`InjectError`) are one line naming the object (kind/namespace/name) and what to set.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from tether import __version__

INJECT_ANNOTATION: Final = "tether.dev/inject"
"""`"true"` on a workload or its pod template (annotation or label): inject it."""
NAMESPACE_INJECT_LABEL: Final = "tether.dev/inject"
"""`enabled` on a Namespace: the webhook injects its pods (those not opted out)."""
NAMESPACE_INJECT_VALUE: Final = "enabled"
UPSTREAM_PORT_ANNOTATION: Final = "tether.dev/upstream-port"
"""The MCP server's port, a number or the name of one of its container's ports."""
CONTAINER_ANNOTATION: Final = "tether.dev/container"
"""Which container is the MCP server, when the pod has several."""
PRE_STOP_ANNOTATION: Final = "tether.dev/pre-stop"
"""`replace` or `keep`: what to do with the MCP container's own preStop hook (rule 5)."""
ALLOWED_HOSTS_ANNOTATION: Final = "tether.dev/allowed-hosts"
"""More Host names clients use (comma-separated; an ingress's, say): `TETHER_ALLOWED_HOST`."""
INJECTED_ANNOTATION: Final = "tether.dev/injected"
"""Set by an injection: the Tether version that made it."""
CHANGES_ANNOTATION: Final = "tether.dev/injected-changes"
"""Set by an injection: JSON, what it changed and what was there before (rule 4)."""
RETARGETED_ANNOTATION: Final = "tether.dev/retargeted-ports"
"""Set on a retargeted Service: JSON, each changed port's index and its targetPort before."""
CLIENT_LABEL: Final = "tether.dev/control-plane-client"
"""The pod label the control plane's NetworkPolicy admits."""

SIDECAR_NAME: Final = "tether-sidecar"
PROXY_PORT_NAME: Final = "tether-http"
ADMIN_PORT_NAME: Final = "tether-admin"
TMP_VOLUME: Final = "tether-tmp"
TOKEN_VOLUME: Final = "tether-token"
TOKEN_DIR: Final = "/var/run/secrets/tether/token"
FINGERPRINT_VOLUME: Final = "tether-fingerprint-key"
FINGERPRINT_DIR: Final = "/etc/tether/fingerprint"
DEFAULT_GRACE_S: Final = 30
"""Kubernetes' terminationGracePeriodSeconds when a pod sets none."""

_TRUE = frozenset({"true"})
_FALSE = frozenset({"false", "disabled"})
_TEMPLATE_PATHS: Final[Mapping[tuple[str, str], tuple[str, ...]]] = {
    ("v1", "Pod"): (),
    ("apps/v1", "Deployment"): ("spec", "template"),
    ("apps/v1", "StatefulSet"): ("spec", "template"),
    ("apps/v1", "DaemonSet"): ("spec", "template"),
    ("apps/v1", "ReplicaSet"): ("spec", "template"),
    ("batch/v1", "Job"): ("spec", "template"),
    ("batch/v1", "CronJob"): ("spec", "jobTemplate", "spec", "template"),
}

Obj = dict[str, Any]


@dataclass(frozen=True)
class InjectConfig:
    """What the injected sidecar runs with. The defaults are those of `deploy/`, seen from
    another namespace: the control plane of `deploy/` (namespace `tether`) by its full name."""

    image: str = f"tether:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    control_plane: str = "tether-control-plane.tether.svc:50051"
    home_namespace: str = "tether"
    """The control plane's `--home-namespace`: its pods act under their bare pod name, pods
    of any other namespace as `<pod>@<namespace>` (controlplane/identity.py rule 6)."""
    proxy_port: int = 8080
    admin_port: int = 9090
    drain_timeout_s: int = 30
    sidecar_stop_s: int = 5
    margin_s: int = 5
    reconnect_attempts: int = 100
    reconnect_max_seconds: int = 120
    allowed_hosts: tuple[str, ...] = ("*.svc", "*.svc.cluster.local")
    """Host names every injected sidecar accepts besides its Services' (which `tether inject`
    adds when it sees them) and the workload's `tether.dev/allowed-hosts`. In-cluster DNS
    names only: a rebinding attacker's domain is none of them."""
    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"
    run_as_user: int = 10001
    token_audience: str | None = None
    """If set, the sidecar proves its pod to the control plane with a projected
    ServiceAccount token of this audience (`deploy/overlays/prod`: `tether-control-plane`)."""
    fingerprint_key_secret: str | None = None
    """If set, the Secret (in the workload's namespace, key `key`) that keys credential
    fingerprints (`deploy/overlays/prod`: `tether-fingerprint-key`)."""


class InjectError(ValueError):
    """The object cannot be injected (or un-injected) as it is; the message names it and says
    what to set."""


# --- opt-in -----------------------------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _marks(meta: Mapping[str, Any]) -> Iterable[str]:
    for field in ("annotations", "labels"):
        values = meta.get(field)
        if isinstance(values, Mapping) and INJECT_ANNOTATION in values:
            yield str(values[INJECT_ANNOTATION]).strip().lower()


def _template_path(obj: Mapping[str, Any]) -> tuple[str, ...] | None:
    return _TEMPLATE_PATHS.get((str(obj.get("apiVersion")), str(obj.get("kind"))))


def _lookup(obj: Mapping[str, Any], path: Sequence[str]) -> Any:
    node: Any = obj
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _opt_marks(obj: Mapping[str, Any]) -> list[str]:
    path = _template_path(obj)
    marks = list(_marks(_meta(obj)))
    if path:
        template = _lookup(obj, path)
        if isinstance(template, Mapping):
            marks += _marks(_meta(template))
    return marks


def is_opted_in(obj: Mapping[str, Any]) -> bool:
    """The object or its pod template is marked `tether.dev/inject: "true"` (annotation or
    label), and neither says `"false"`."""
    marks = _opt_marks(obj)
    return bool(_TRUE & set(marks)) and not _FALSE & set(marks)


def is_opted_out(obj: Mapping[str, Any]) -> bool:
    """The object or its pod template says `tether.dev/inject: "false"` (or `disabled`): not
    even a namespace enabled for injection, nor `force`, injects it."""
    return bool(_FALSE & set(_opt_marks(obj)))


def is_injected(obj: Mapping[str, Any]) -> bool:
    path = _template_path(obj)
    template = _lookup(obj, path) if path is not None else None
    annotations = _meta(template).get("annotations") if isinstance(template, Mapping) else None
    return isinstance(annotations, Mapping) and INJECTED_ANNOTATION in annotations


def describe(obj: Mapping[str, Any], namespace: str | None = None) -> str:
    """`Kind/namespace/name` (the namespace left out when unknown; a pod that has only a
    `generateName` is named by it)."""
    meta = _meta(obj)
    name = meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else "?")
    ns = namespace or meta.get("namespace")
    return "/".join(str(p) for p in (obj.get("kind", "?"), ns, name) if p)


def _copy(obj: Mapping[str, Any]) -> Obj:
    """A deep copy of the caller's own mapping type (rule 1: a round-trip YAML loader's
    mappings are dicts that carry their comments)."""
    if isinstance(obj, dict):
        return copy.deepcopy(obj)
    return copy.deepcopy(dict(obj))


# --- the recorded editor (rule 4) -------------------------------------------------------------


class _Editor:
    """Sets fields below a root mapping, recording each one's value before. A path is keys of
    mappings, and below a list the `name` of one of its items. Setting a value equal to the
    one there records nothing."""

    def __init__(self, root: Obj) -> None:
        self.root = root
        self.changes: list[Obj] = []

    def _parent(self, path: Sequence[str]) -> Any:
        node: Any = self.root
        for i, key in enumerate(path[:-1]):
            if isinstance(node, list):
                node = _by_name(node, key)
                continue
            if key not in node:
                self.changes.append({"path": list(path[: i + 1]), "created": True})
            elif node[key] is None:  # `annotations: null`: put back as it was
                self.changes.append({"path": list(path[: i + 1]), "was": None})
            if node.get(key) is None:
                node[key] = [] if key in _LIST_FIELDS else {}
            node = node[key]
        return node

    def set(self, path: Sequence[str], value: Any) -> None:
        parent = self._parent(path)
        key = path[-1]
        if key in parent:
            if parent[key] == value:
                return
            self.changes.append({"path": list(path), "was": copy.deepcopy(parent[key])})
        else:
            self.changes.append({"path": list(path)})
        parent[key] = value

    def append(self, path: Sequence[str], item: Obj) -> None:
        """Append `item` to the list at `path` (created if absent)."""
        parent = self._parent([*path, ""])
        parent.append(item)
        self.changes.append({"path": list(path), "added": item["name"]})


_LIST_FIELDS = frozenset({"initContainers", "containers", "volumes", "env", "ports"})


def _by_name(items: list[Any], name: str) -> Any:
    for item in items:
        if isinstance(item, Mapping) and item.get("name") == name:
            return item
    raise KeyError(name)


def _undo(root: Obj, changes: Sequence[Mapping[str, Any]]) -> None:
    """Replay `changes` backwards (rule 4); KeyError/TypeError if the object no longer has
    the shape they describe."""
    for change in reversed(changes):
        path = [str(p) for p in change["path"]]
        node: Any = root
        for key in path[:-1]:
            node = _by_name(node, key) if isinstance(node, list) else node[key]
        key = path[-1]
        if isinstance(node, list):
            raise TypeError(f"{'.'.join(path)} is a list item")
        if "added" in change:
            items = node[key]
            items.remove(_by_name(items, str(change["added"])))
        elif "was" in change:
            node[key] = change["was"]
        elif change.get("created"):
            if key in node and not node[key]:  # left alone if something else is in it now
                del node[key]
        else:
            node.pop(key, None)


# --- inject -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    container: str
    upstream_port: int
    upstream_port_name: str | None


def _settings(obj: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, str]:
    """The workload's `tether.dev/*` annotations; the pod template's win."""
    found: dict[str, str] = {}
    for meta in (_meta(obj), _meta(template)):
        annotations = meta.get("annotations")
        if isinstance(annotations, Mapping):
            found.update({str(k): str(v) for k, v in annotations.items()})
    return found


def _pick_target(where: str, spec: Mapping[str, Any], settings: Mapping[str, str]) -> _Target:
    containers = [c for c in spec.get("containers") or [] if isinstance(c, Mapping)]
    if not containers:
        raise InjectError(f"{where}: the pod has no containers")
    names = [str(c.get("name")) for c in containers]
    chosen = settings.get(CONTAINER_ANNOTATION)
    if chosen is None:
        if len(containers) > 1:
            raise InjectError(
                f"{where}: {len(containers)} containers ({', '.join(names)}): set "
                f"{CONTAINER_ANNOTATION} to the MCP server's"
            )
        chosen = names[0]
    if chosen not in names:
        raise InjectError(
            f"{where}: {CONTAINER_ANNOTATION}={chosen!r} names no container "
            f"(there are: {', '.join(names)})"
        )
    container = containers[names.index(chosen)]
    ports = [p for p in container.get("ports") or [] if isinstance(p, Mapping)]
    wanted = settings.get(UPSTREAM_PORT_ANNOTATION, "").strip()
    if wanted.isdigit():
        number = int(wanted)
        if not 0 < number < 65536:
            raise InjectError(f"{where}: {UPSTREAM_PORT_ANNOTATION}={wanted} is not a port")
        named = [p.get("name") for p in ports if p.get("containerPort") == number]
        return _Target(chosen, number, str(named[0]) if named and named[0] else None)
    if wanted:
        hits = [p for p in ports if p.get("name") == wanted]
        if not hits:
            raise InjectError(
                f"{where}: {UPSTREAM_PORT_ANNOTATION}={wanted!r} names no port of container "
                f"{chosen}"
            )
        return _Target(chosen, int(hits[0]["containerPort"]), wanted)
    if len(ports) != 1:
        listed = ", ".join(str(p.get("name") or p.get("containerPort")) for p in ports)
        what = "no port" if not ports else f"{len(ports)} ports ({listed})"
        raise InjectError(
            f"{where}: container {chosen} has {what}: set {UPSTREAM_PORT_ANNOTATION} to the "
            f"MCP server's port"
        )
    name = ports[0].get("name")
    return _Target(chosen, int(ports[0]["containerPort"]), str(name) if name else None)


def _check_free(where: str, spec: Mapping[str, Any], target: _Target, config: InjectConfig) -> None:
    """The sidecar shares the pod's network and its port and volume names: nothing of the
    pod's may already use them."""
    taken_ports: dict[int, str] = {target.upstream_port: f"the MCP server ({target.container})"}
    taken_names: set[str] = set()
    for field in ("initContainers", "containers"):
        for c in spec.get(field) or []:
            if c.get("name") == SIDECAR_NAME:
                raise InjectError(
                    f"{where}: it already has a container named {SIDECAR_NAME} (wired by "
                    "hand?): remove it first"
                )
            for p in c.get("ports") or []:
                taken_ports.setdefault(int(p.get("containerPort", 0)), f"container {c['name']}")
                taken_names.add(str(p.get("name")))
    for port, what in ((config.proxy_port, "proxy"), (config.admin_port, "admin")):
        if port in taken_ports:
            raise InjectError(
                f"{where}: {taken_ports[port]} uses port {port}, the sidecar's {what} port: "
                f"choose another (tether inject --{what}-port)"
            )
    for name in (PROXY_PORT_NAME, ADMIN_PORT_NAME):
        if name in taken_names:
            raise InjectError(f"{where}: a container already has a port named {name}")
    volumes = {str(v.get("name")) for v in spec.get("volumes") or []}
    for name in sorted({TMP_VOLUME, TOKEN_VOLUME, FINGERPRINT_VOLUME} & volumes):
        raise InjectError(f"{where}: the pod already has a volume named {name}")


def drain_hook(config: InjectConfig) -> Obj:
    """The MCP container's preStop hook. HTTP, because the server's container cannot run
    `tether`; a number, because a named port would have to be that container's own."""
    return {"httpGet": {"path": "/drain", "port": config.admin_port}}


def _env(name: str, value: str) -> Obj:
    return {"name": name, "value": value}


def _field(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _sidecar(
    config: InjectConfig, target: _Target, *, owner_suffix: bool, hosts: str, grace: int
) -> Obj:
    env = [
        _env("TETHER_LISTEN", f"0.0.0.0:{config.proxy_port}"),
        _env("TETHER_UPSTREAM", f"http://127.0.0.1:{target.upstream_port}"),
        _env("TETHER_ADMIN_LISTEN", f"0.0.0.0:{config.admin_port}"),
        _env("TETHER_CONTROL_PLANE", config.control_plane),
        _env("TETHER_ALLOWED_HOST", hosts),
        _env("TETHER_DRAIN_TIMEOUT", str(config.drain_timeout_s)),
        # Outlast the pod's termination (deploy/base/kustomization.yaml says why): the retry
        # budget grows with the grace period, twice it plus 30 s (deploy/'s 120 for its 45).
        _env("TETHER_RECONNECT_ATTEMPTS", str(config.reconnect_attempts)),
        _env(
            "TETHER_RECONNECT_MAX_SECONDS",
            str(max(config.reconnect_max_seconds, 2 * grace + 30)),
        ),
        _field("POD_NAME", "metadata.name"),
    ]
    if owner_suffix:  # outside the control plane's home namespace (identity rule 6)
        env += [
            _field("POD_NAMESPACE", "metadata.namespace"),
            _env("TETHER_OWNER", "$(POD_NAME)@$(POD_NAMESPACE)"),
        ]
    mounts: list[Obj] = [{"name": TMP_VOLUME, "mountPath": "/tmp"}]
    if config.token_audience:
        env.append(_env("TETHER_CONTROL_PLANE_TOKEN_FILE", f"{TOKEN_DIR}/token"))
        mounts.append({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True})
    if config.fingerprint_key_secret:
        env.append(_env("TETHER_FINGERPRINT_KEY_FILE", f"{FINGERPRINT_DIR}/key"))
        mounts.append({"name": FINGERPRINT_VOLUME, "mountPath": FINGERPRINT_DIR, "readOnly": True})

    def probe(path: str, **timing: int) -> Obj:
        return {"httpGet": {"path": path, "port": ADMIN_PORT_NAME}, **timing}

    return {
        "name": SIDECAR_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "restartPolicy": "Always",  # native sidecar (Kubernetes >= 1.29)
        "args": ["sidecar"],
        "env": env,
        "ports": [
            {"name": PROXY_PORT_NAME, "containerPort": config.proxy_port, "protocol": "TCP"},
            {"name": ADMIN_PORT_NAME, "containerPort": config.admin_port, "protocol": "TCP"},
        ],
        # A sidecar's startup probe also gates the start of the MCP server container.
        "startupProbe": probe("/healthz", periodSeconds=1, failureThreshold=30),
        "readinessProbe": probe("/readyz", periodSeconds=5, failureThreshold=2),
        "livenessProbe": probe("/healthz", periodSeconds=10, timeoutSeconds=3, failureThreshold=3),
        "resources": {
            "requests": {"cpu": config.cpu_request, "memory": config.memory_request},
            "limits": {"cpu": config.cpu_limit, "memory": config.memory_limit},
        },
        # The pod's own securityContext is the workload's business: the sidecar carries all
        # of deploy/'s settings itself, so it satisfies the "restricted" Pod Security
        # Standard in any pod.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.run_as_user,
            "runAsGroup": config.run_as_user,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }


def _volumes(config: InjectConfig) -> list[Obj]:
    volumes: list[Obj] = [{"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "16Mi"}}]
    if config.token_audience:
        token = {"path": "token", "audience": config.token_audience, "expirationSeconds": 3600}
        volumes.append(
            {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": token}]}}
        )
    if config.fingerprint_key_secret:
        secret = {"secretName": config.fingerprint_key_secret, "defaultMode": 0o440}
        volumes.append({"name": FINGERPRINT_VOLUME, "secret": secret})
    return volumes


def _split_hosts(text: str) -> list[str]:
    return [h.strip() for h in text.split(",") if h.strip()]


def inject(
    obj: Mapping[str, Any],
    config: InjectConfig,
    *,
    force: bool = False,
    namespace: str | None = None,
    allowed_hosts: Sequence[str] = (),
) -> Obj:
    """`obj` with Tether injected into its pod template (module docstring; rules 1-6).

    `force` injects without the opt-in (not past an opt-out). `namespace` is where the object
    lives when its metadata does not say (the webhook's request namespace). `allowed_hosts`
    are Host names clients use to reach it, added to `TETHER_ALLOWED_HOST` (`tether inject`
    passes the names of the Services that select it). Raises `InjectError`.
    """
    out = _copy(obj)
    path = _template_path(obj)
    if path is None or is_opted_out(obj) or not (force or is_opted_in(obj)):
        return out
    if is_injected(out):
        out = uninject(out)
    namespace = namespace or _meta(obj).get("namespace")
    where = describe(obj, namespace)
    template = _lookup(out, path)
    if not isinstance(template, dict) or not isinstance(template.get("spec"), Mapping):
        raise InjectError(f"{where}: no pod template ({'.'.join(path) or 'spec'})")
    settings = _settings(out, template)
    spec = template["spec"]
    target = _pick_target(where, spec, settings)
    _check_free(where, spec, target, config)

    edit = _Editor(template)
    edit.set(["metadata", "labels", CLIENT_LABEL], "true")
    container = ["spec", "containers", target.container]
    hook = drain_hook(config)
    mcp = _by_name(spec["containers"], target.container)
    theirs = (mcp.get("lifecycle") or {}).get("preStop")
    policy = settings.get(PRE_STOP_ANNOTATION, "").strip().lower()
    if theirs in (None, hook) or policy == "replace":
        edit.set([*container, "lifecycle", "preStop"], hook)
    elif policy != "keep":
        raise InjectError(
            f"{where}: container {target.container} already has a preStop hook; set "
            f"{PRE_STOP_ANNOTATION}: replace (Tether's drain hook takes its place, uninject "
            "restores it) or keep (no drain: calls in flight are cut when a pod stops)"
        )
    grace = spec.get("terminationGracePeriodSeconds")
    server_stop = DEFAULT_GRACE_S if grace is None else int(grace)
    new_grace = config.drain_timeout_s + server_stop + config.sidecar_stop_s + config.margin_s
    edit.set(["spec", "terminationGracePeriodSeconds"], new_grace)
    hosts = [
        *allowed_hosts,
        *config.allowed_hosts,
        *_split_hosts(settings.get(ALLOWED_HOSTS_ANNOTATION, "")),
    ]
    sidecar = _sidecar(
        config,
        target,
        owner_suffix=namespace != config.home_namespace,
        hosts=",".join(dict.fromkeys(hosts)),
        grace=new_grace,
    )
    edit.append(["spec", "initContainers"], sidecar)
    for volume in _volumes(config):
        edit.append(["spec", "volumes"], volume)
    edit.set(["metadata", "annotations", INJECTED_ANNOTATION], __version__)
    record = {
        "container": target.container,
        "upstreamPort": target.upstream_port,
        "upstreamPortName": target.upstream_port_name,
        "proxyPort": config.proxy_port,
        "changes": edit.changes,
    }
    template["metadata"]["annotations"][CHANGES_ANNOTATION] = json.dumps(
        record, separators=(",", ":")
    )
    return out


def inject_pod(pod: Mapping[str, Any], config: InjectConfig, *, namespace: str | None) -> Obj:
    """The webhook's call: a whole `v1` Pod (an AdmissionReview's `request.object`) with Tether
    injected, whatever its opt-in (the webhook has decided: the namespace's label or the pod's
    annotation; an opt-out still wins). `namespace` is the request's (a pod created by a
    ReplicaSet has none in its metadata yet). A pod that is already injected (by an earlier
    invocation, or made from a template `tether inject` wrote, whose sidecar knows the
    Service's names) comes back equal: a reinvocation adds nothing. Raises `InjectError`
    (also for anything that is not a v1 Pod).
    """
    if (pod.get("apiVersion"), pod.get("kind")) != ("v1", "Pod"):
        raise InjectError(f"{describe(pod, namespace)}: not a v1 Pod")
    if is_injected(pod):
        return _copy(pod)
    return inject(pod, config, force=True, namespace=namespace)


# --- uninject -----------------------------------------------------------------------------------


def _record(where: str, template: Mapping[str, Any]) -> Obj:
    annotations = _meta(template).get("annotations") or {}
    try:
        record: Obj = json.loads(annotations[CHANGES_ANNOTATION])
        _ = record["changes"], record["container"], record["upstreamPort"], record["proxyPort"]
    except (KeyError, TypeError, ValueError) as exc:
        raise InjectError(
            f"{where}: {INJECTED_ANNOTATION} is set but {CHANGES_ANNOTATION} is missing or "
            f"unreadable ({type(exc).__name__}: {exc}): cannot undo the injection"
        ) from None
    return record


def uninject(obj: Mapping[str, Any]) -> Obj:
    """`obj` as it was before `inject` (rule 4). An object without an injection comes back
    unchanged (a copy). Raises `InjectError` when the record is missing or no longer fits
    (the injected parts were edited by hand)."""
    out = _copy(obj)
    if not is_injected(out):
        return out
    path = _template_path(out)
    assert path is not None  # is_injected
    template = _lookup(out, path)
    where = describe(obj)
    record = _record(where, template)
    del template["metadata"]["annotations"][CHANGES_ANNOTATION]
    try:
        _undo(template, record["changes"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InjectError(
            f"{where}: the injected parts were changed since ({type(exc).__name__}: {exc}); "
            "cannot undo the injection"
        ) from None
    return out


# --- Services ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InjectedWorkload:
    """What a Service needs to know of an injected workload to send clients to its sidecar."""

    namespace: str | None
    labels: Mapping[str, str]
    upstream_port: int
    upstream_port_name: str | None


def injected_workload(obj: Mapping[str, Any]) -> InjectedWorkload | None:
    """The injected workload `obj` describes; None if it is not one."""
    if not is_injected(obj):
        return None
    path = _template_path(obj)
    assert path is not None
    template = _lookup(obj, path)
    record = _record(describe(obj), template)
    labels = _meta(template).get("labels") or {}
    return InjectedWorkload(
        namespace=_meta(obj).get("namespace"),
        labels={str(k): str(v) for k, v in labels.items()},
        upstream_port=int(record["upstreamPort"]),
        upstream_port_name=record.get("upstreamPortName"),
    )


def selects(service: Mapping[str, Any], workload: InjectedWorkload) -> bool:
    """The Service sends traffic to the workload's pods: a selector that the pod template's
    labels satisfy, in the same namespace (an object without one is where `kubectl -n` puts
    it, so it matches any)."""
    if service.get("kind") != "Service" or service.get("apiVersion") != "v1":
        return False
    selector = (service.get("spec") or {}).get("selector")
    ns = _meta(service).get("namespace")
    if not selector or (ns and workload.namespace and ns != workload.namespace):
        return False
    return all(workload.labels.get(str(k)) == str(v) for k, v in selector.items())


def service_host_names(service: Mapping[str, Any], namespace: str | None) -> list[str]:
    """The names clients reach a Service by: `name`, and with a known namespace
    `name.ns`, `name.ns.svc`, `name.ns.svc.cluster.local`."""
    name = str(_meta(service).get("name", ""))
    ns = _meta(service).get("namespace") or namespace
    if not name:
        return []
    if not ns:
        return [name]
    return [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]


def retarget_service(service: Mapping[str, Any], workloads: Sequence[InjectedWorkload]) -> Obj:
    """`service` with each port that pointed at an injected workload's MCP port (by number or
    by name; no targetPort means the port's own number) pointed at the sidecar's proxied port
    instead, and the old targets recorded for `restore_service`. A Service already
    retargeted, or selecting none of `workloads`, comes back unchanged (a copy)."""
    out = _copy(service)
    chosen = [w for w in workloads if selects(service, w)]
    annotations = _meta(service).get("annotations") or {}
    if not chosen or RETARGETED_ANNOTATION in annotations:
        return out
    changed: list[Obj] = []
    for index, port in enumerate(out["spec"].get("ports") or []):
        target = port.get("targetPort", port.get("port"))
        for w in chosen:
            if target in (w.upstream_port, w.upstream_port_name or w.upstream_port):
                change: Obj = {"index": index}
                if "targetPort" in port:
                    change["was"] = port["targetPort"]
                changed.append(change)
                port["targetPort"] = PROXY_PORT_NAME
                break
    if changed:
        edit = _Editor(out)
        edit.set(["metadata", "annotations", RETARGETED_ANNOTATION], "")
        record = {"ports": changed, "changes": edit.changes}
        out["metadata"]["annotations"][RETARGETED_ANNOTATION] = json.dumps(
            record, separators=(",", ":")
        )
    return out


def restore_service(service: Mapping[str, Any]) -> Obj:
    """`service` as it was before `retarget_service`; unchanged (a copy) if it was not."""
    out = _copy(service)
    annotations = _meta(out).get("annotations") or {}
    if service.get("kind") != "Service" or RETARGETED_ANNOTATION not in annotations:
        return out
    try:
        record = json.loads(annotations[RETARGETED_ANNOTATION])
        ports = out["spec"]["ports"]
        for change in record["ports"]:
            port = ports[int(change["index"])]
            if "was" in change:
                port["targetPort"] = change["was"]
            else:
                del port["targetPort"]
        del annotations[RETARGETED_ANNOTATION]
        _undo(out, record["changes"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InjectError(
            f"{describe(service)}: {RETARGETED_ANNOTATION} no longer fits the Service "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return out
