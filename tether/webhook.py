"""Answering the API server's `admission.k8s.io/v1` AdmissionReview for `tether injector`.

Sans-IO: bytes in, a `Decision` and the response document out; `tether.injector` is the HTTPS
loop around it. The injection itself is `tether.inject.inject_pod`, `tether inject`'s function
for a Pod, so the webhook and the command line patch a pod the same way.

Which pods: the request names no namespace labels, so the MutatingWebhookConfiguration
(`deploy/components/injector`) has two webhooks that differ in their namespaceSelector and in
the path they call, and the path is the `Scope`:

- `/mutate/namespace` (`Scope.NAMESPACE`): namespaces labelled `tether.dev/inject=enabled`.
  Every pod is injected unless it opts out (`tether.dev/inject: "false"`).
- `/mutate` (`Scope.POD`): every other namespace (but the injector's own, those labelled
  `tether.dev/inject=disabled`, and kube-system). Only pods marked `tether.dev/inject: "true"`
  are injected. An objectSelector cannot pick them: it selects labels, and the opt-in is
  usually an annotation.
The marks are read by `tether.inject` (an annotation or a label on the pod).

Rules this module keeps:

1. Every review that carries a `request.uid` is answered `allowed: true` with that uid, also
   when the pod cannot be injected (an `InjectError`: the reason goes to `response.warnings`,
   which kubectl prints). The injector never blocks a pod: an injector bug must not stop a
   cluster's workloads (the configuration's `failurePolicy: Ignore` says the same for a
   webhook that does not answer).
2. A body that is not such a review raises `MalformedReview`, whose message says what is
   wrong (the server answers it 400).
3. Only a Pod CREATE is patched; any other kind or operation gets no patch.
4. The patch is `jsonpatch.make_patch(pod, inject_pod(pod))`: applied to `request.object` it
   gives exactly what `inject_pod` returns. A pod already injected (by an earlier invocation,
   or made from a template `tether inject` wrote) comes back equal, so it gets an empty patch,
   and so does a reinvocation (`reinvocationPolicy: IfNeeded`).
5. An empty patch is sent as no patch at all (no `patchType`), as the API server expects.
"""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import jsonpatch

from tether.inject import InjectConfig, InjectError, inject_pod, is_opted_in, is_opted_out

API_VERSION: Final = "admission.k8s.io/v1"
MAX_WARNING_CHARS: Final = 256
"""The API server may truncate longer warnings (AdmissionResponse.warnings: "120 characters
if possible", over 256 may be cut); the log line has the whole reason."""


class MalformedReview(ValueError):
    """The body is not an AdmissionReview v1 request; the message says why, in one line."""


class Scope(enum.Enum):
    """Which webhook of the configuration called: decides what opts a pod in."""

    POD = "pod"
    """Only pods annotated `tether.dev/inject: "true"`."""
    NAMESPACE = "namespace"
    """The namespace is labelled `tether.dev/inject=enabled`: every pod but those opting out."""


PATHS: Final = {Scope.POD: "/mutate", Scope.NAMESPACE: "/mutate/namespace"}
"""Where each webhook of the configuration sends its reviews (`clientConfig.service.path`)."""


class Outcome(enum.Enum):
    """What the injector did with one review (the `outcome` label of its metrics)."""

    INJECTED = "injected"
    """A non-empty patch was returned."""
    UNCHANGED = "unchanged"
    """Opted in, but already injected: an empty patch (a reinvocation, or a re-applied pod)."""
    SKIPPED = "skipped"
    """Not a Pod CREATE, or not opted in: no patch."""
    FAILED = "failed"
    """`inject` refused the pod (`InjectError`): allowed as it is, with a warning."""


@dataclass(frozen=True)
class Decision:
    """The answer to one review, and what the log line says about it."""

    uid: str
    outcome: Outcome
    reason: str
    """Why, in a few words (`not opted in`, `3 patch operations`, the InjectError's text)."""
    subject: str
    """`namespace/name` of the pod (`namespace/generateName*` before it has a name)."""
    patch: tuple[Mapping[str, Any], ...] = ()
    warnings: tuple[str, ...] = ()


def parse_review(body: bytes) -> Mapping[str, Any]:
    """The review's `request`, checked enough to answer it: a JSON object of kind
    AdmissionReview, `admission.k8s.io/v1`, whose `request` has a string `uid`."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedReview(f"the body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MalformedReview(f"expected a JSON object, got {type(doc).__name__}")
    kind, version = doc.get("kind"), doc.get("apiVersion")
    if kind != "AdmissionReview" or version != API_VERSION:
        raise MalformedReview(
            f"expected kind AdmissionReview of apiVersion {API_VERSION}, "
            f"got kind {kind!r} of apiVersion {version!r}"
        )
    request = doc.get("request")
    if not isinstance(request, dict):
        raise MalformedReview("the AdmissionReview has no `request` object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview("the AdmissionReview's request has no `uid`")
    return request


def _subject(request: Mapping[str, Any], obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    namespace = request.get("namespace") or meta.get("namespace") or "?"
    name = request.get("name") or meta.get("name")
    if not name:
        name = f"{meta.get('generateName') or ''}*"
    return f"{namespace}/{name}"


def _is_pod_create(request: Mapping[str, Any]) -> bool:
    kind = request.get("kind")
    return (
        request.get("operation") == "CREATE"
        and isinstance(kind, Mapping)
        and (kind.get("group"), kind.get("version"), kind.get("kind")) == ("", "v1", "Pod")
        and not request.get("subResource")
    )


def _opted_in(obj: Mapping[str, Any], scope: Scope) -> bool:
    """`tether.inject` reads the marks (annotation or label, `"true"` in, `"false"` out)."""
    if scope is Scope.NAMESPACE:
        return not is_opted_out(obj)
    return is_opted_in(obj)


def _warning(text: str) -> str:
    one_line = " ".join(text.split())
    if len(one_line) <= MAX_WARNING_CHARS:
        return one_line
    return one_line[: MAX_WARNING_CHARS - 3] + "..."


def decide(request: Mapping[str, Any], config: InjectConfig, *, scope: Scope) -> Decision:
    """The decision for one review's `request` (from `parse_review`)."""
    uid: str = request["uid"]
    obj = request.get("object")
    if not isinstance(obj, Mapping):
        obj = {}
    subject = _subject(request, obj)
    if not _is_pod_create(request):
        what = f"{request.get('operation')} of {(request.get('kind') or {}).get('kind')}"
        return Decision(uid, Outcome.SKIPPED, f"not a Pod CREATE ({what})", subject)
    if not obj:
        reason = "the review carries no pod (request.object)"
        return Decision(uid, Outcome.FAILED, reason, subject, warnings=(_warning(reason),))
    if not _opted_in(obj, scope):
        why = "opted out" if scope is Scope.NAMESPACE else "not opted in"
        return Decision(uid, Outcome.SKIPPED, why, subject)
    try:
        injected = inject_pod(obj, config, namespace=request.get("namespace") or None)
    except InjectError as exc:
        reason = f"Tether not injected: {exc}"
        return Decision(uid, Outcome.FAILED, reason, subject, warnings=(_warning(reason),))
    patch = tuple(jsonpatch.make_patch(dict(obj), injected).patch)
    if not patch:
        return Decision(uid, Outcome.UNCHANGED, "already injected", subject)
    return Decision(uid, Outcome.INJECTED, f"{len(patch)} patch operations", subject, patch)


def response(decision: Decision) -> dict[str, Any]:
    """The AdmissionReview the API server reads back (rules 1 and 5)."""
    answer: dict[str, Any] = {"uid": decision.uid, "allowed": True}
    if decision.patch:
        text = json.dumps(list(decision.patch), separators=(",", ":"))
        answer["patchType"] = "JSONPatch"
        answer["patch"] = base64.b64encode(text.encode()).decode("ascii")
    if decision.warnings:
        answer["warnings"] = list(decision.warnings)
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": answer}
