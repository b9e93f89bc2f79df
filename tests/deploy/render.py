"""Render kustomize directories with the real `kubectl kustomize` and validate the objects
offline against the Kubernetes OpenAPI schemas bundled in the `kubernetes-validate` package.

Neither needs a cluster. `kubernetes_validate` and PyYAML ship no type information, so they
are imported through `importlib` and used behind the small typed functions below.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
OVERLAYS = ("dev", "prod", "external-etcd", "injector")
CUSTOM_API_VERSIONS = frozenset({"cert-manager.io/v1"})
"""Kinds of CRDs (cert-manager's Issuer and Certificate), which kubernetes-validate has no
schema for: their tests check the fields Tether relies on instead."""
CLUSTER_SCOPED = frozenset({"Namespace", "MutatingWebhookConfiguration"})
# Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29:
# the oldest release the manifests promise to work on, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")

Obj = dict[str, Any]

_yaml: Any = importlib.import_module("yaml")
_validator: Any = importlib.import_module("kubernetes_validate")


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(directory: Path, *extra: str) -> list[Obj]:
    """`kubectl kustomize DIR` as a list of objects; raises with kustomize's own message."""
    exe = kubectl()
    if exe is None:
        raise RuntimeError("kubectl is not installed")
    done = subprocess.run(
        [exe, "kustomize", str(directory), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    return [doc for doc in _yaml.safe_load_all(done.stdout) if doc]


def validate(obj: Obj, version: str, *, strict: bool = True) -> None:
    """Raise `ValueError` naming the object when it does not match the schema of `version`
    (strict: unknown fields are errors too)."""
    try:
        _validator.validate(obj, version, strict=strict)
    except _validator.ValidationError as exc:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        raise ValueError(f"{name} is invalid for Kubernetes {version}: {exc.message}") from exc


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    """The one object of `kind` whose name is `name` (generated ConfigMaps: the name prefix)."""
    hits = [
        o
        for o in objects
        if o["kind"] == kind
        and (
            o["metadata"]["name"] == name
            or (kind == "ConfigMap" and o["metadata"]["name"].startswith(name + "-"))
        )
    ]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def workloads(objects: list[Obj]) -> Iterator[Obj]:
    return (o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"))


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def all_containers(workload: Obj) -> list[Obj]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def container_env(objects: list[Obj], container: Obj) -> dict[str, str]:
    """The variables a container starts with: ConfigMaps of `envFrom`, then `env` (which wins,
    as in Kubernetes). Downward-API values become `<fieldPath>` placeholders, other references
    (a Secret's key, say) `<kind:...>` ones."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        maps = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == ref]
        assert len(maps) == 1, f"envFrom names ConfigMap {ref!r}, which is not rendered"
        env.update(maps[0].get("data", {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in item["valueFrom"]:
            env[item["name"]] = "<" + item["valueFrom"]["fieldRef"]["fieldPath"] + ">"
        else:
            ((kind, ref),) = item["valueFrom"].items()
            env[item["name"]] = f"<{kind}:{ref.get('name')}/{ref.get('key')}>"
    return env


def dump(obj: Obj) -> str:
    text: str = _yaml.safe_dump(obj, sort_keys=False)
    return text
