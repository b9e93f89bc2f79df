"""`tether injector` as the API server meets it: a real HTTPS server (certificates made by a
test CA) answering AdmissionReview v1 JSON shaped as the API server sends it
(`admission/pod-create.json`: a ReplicaSet's pod, defaulted, with its projected token volume).
The returned patch is applied with the JSONPatch library and the pod validated strictly for
Kubernetes 1.29 and 1.37."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import os
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest

from tests.deploy.render import KUBERNETES_VERSIONS, validate
from tests.support.certs import CertificateAuthority, Pair
from tests.support.procs import ProcessPool, free_port, python_module
from tests.support.waiting import eventually
from tether.inject import InjectConfig, inject_pod
from tether.injector import MAX_REVIEW_BYTES, InjectorConfig, RunningInjector, start_injector

FIXTURE = json.loads((Path(__file__).parent / "admission" / "pod-create.json").read_text())
INJECT = InjectConfig(image="tether:0.1.0", control_plane="tether-control-plane.tether.svc:50051")
Review = dict[str, Any]


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path)


@pytest.fixture
def serving(ca: CertificateAuthority, tmp_path: Path) -> Pair:
    """The files the injector serves from, as a Secret volume would hold them."""
    pair = ca.issue("issued", server=True)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pair.cert.read_bytes())
    key.write_bytes(pair.key.read_bytes())
    return Pair(cert, key)


@pytest.fixture
async def injector(serving: Pair) -> AsyncIterator[RunningInjector]:
    running = await start_injector(
        InjectorConfig(
            listen_host="127.0.0.1",
            listen_port=0,
            tls_cert=serving.cert,
            tls_key=serving.key,
            inject=INJECT,
            admin_host="127.0.0.1",
            admin_port=0,
            tls_reload_interval=0.05,
        )
    )
    yield running
    await running.stop()


def trusting(ca: CertificateAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.pair.cert))


@pytest.fixture
async def client(ca: CertificateAuthority) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=trusting(ca))
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        yield session


def review(*, annotations: dict[str, str] | None = None, **request: Any) -> Review:
    doc: Review = copy.deepcopy(FIXTURE)
    if annotations is not None:
        doc["request"]["object"]["metadata"]["annotations"] = annotations
    doc["request"].update(request)
    return doc


async def post(
    client: aiohttp.ClientSession, injector: RunningInjector, body: Any, path: str = "/mutate"
) -> Review:
    url = f"https://localhost:{injector.port}{path}"
    async with client.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        answer: Review = await resp.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == body["request"]["uid"]
    assert answer["response"]["allowed"] is True
    return answer


def patched(pod: Review, answer: Review) -> Review:
    """The pod as the API server stores it after applying the webhook's answer."""
    response = answer["response"]
    if "patch" not in response:
        assert "patchType" not in response
        return pod
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"], validate=True))
    assert ops, "an empty patch is sent as none"
    result: Review = jsonpatch.apply_patch(pod, ops)
    return result


def sidecars(pod: Review) -> list[Review]:
    return [c for c in pod["spec"].get("initContainers", []) if c.get("restartPolicy") == "Always"]


async def test_an_opted_in_pod_gets_a_patch_that_makes_a_valid_injected_pod(
    client: aiohttp.ClientSession, injector: RunningInjector
) -> None:
    body = review()
    pod = body["request"]["object"]
    answer = await post(client, injector, body)
    result = patched(pod, answer)
    assert result == inject_pod(pod, INJECT, namespace="mcp")
    assert sidecars(result), "no native sidecar was added"
    assert result["spec"]["containers"][0]["image"] == pod["spec"]["containers"][0]["image"]
    for version in KUBERNETES_VERSIONS:
        validate(result, version)
    assert "warnings" not in answer["response"]


async def test_reinvocation_on_the_patched_pod_gives_no_patch(
    client: aiohttp.ClientSession, injector: RunningInjector
) -> None:
    body = review()
    first = patched(body["request"]["object"], await post(client, injector, body))
    again = review(object=first, uid="2f7a0c55-0d1e-4b9e-8f3c-5a6b7c8d9e0f")
    for path in ("/mutate", "/mutate/namespace"):
        answer = await post(client, injector, again, path)
        assert set(answer["response"]) == {"uid", "allowed"}, answer


async def test_a_pod_without_opt_in_gets_no_patch(
    client: aiohttp.ClientSession, injector: RunningInjector
) -> None:
    for marks in ({}, {"tether.dev/inject": "false"}, {"tether.dev/inject": "yes"}):
        answer = await post(client, injector, review(annotations=marks))
        assert set(answer["response"]) == {"uid", "allowed"}, marks


async def test_an_enabled_namespace_injects_every_pod_but_those_that_opt_out(
    client: aiohttp.ClientSession, injector: RunningInjector
) -> None:
    """`/mutate/namespace` is what the webhook whose namespaceSelector matched
    `tether.dev/inject=enabled` calls: no annotation needed, `"false"` opts out."""
    body = review(annotations={})
    pod = body["request"]["object"]
    result = patched(pod, await post(client, injector, body, "/mutate/namespace"))
    assert sidecars(result)
    for version in KUBERNETES_VERSIONS:
        validate(result, version)
    opted_out = review(annotations={"tether.dev/inject": "false"})
    answer = await post(client, injector, opted_out, "/mutate/namespace")
    assert set(answer["response"]) == {"uid", "allowed"}


async def test_only_pod_creation_is_patched(
    client: aiohttp.ClientSession, injector: RunningInjector
) -> None:
    update = review(operation="UPDATE", oldObject=FIXTURE["request"]["object"])
    assert "patch" not in (await post(client, injector, update))["response"]
    deployment = review(
        kind={"group": "apps", "version": "v1", "kind": "Deployment"},
        resource={"group": "apps", "version": "v1", "resource": "deployments"},
    )
    assert "patch" not in (await post(client, injector, deployment))["response"]


async def test_a_pod_that_cannot_be_injected_is_allowed_with_a_warning(
    client: aiohttp.ClientSession, injector: RunningInjector
) -> None:
    """No port on the MCP container and no `tether.dev/upstream-port`: no upstream to put
    Tether in front of. The pod is still created (as it is), and kubectl shows why."""
    body = review()
    del body["request"]["object"]["spec"]["containers"][0]["ports"]
    answer = await post(client, injector, body)
    response = answer["response"]
    assert "patch" not in response
    (warning,) = response["warnings"]
    assert warning.startswith("Tether not injected: Pod/mcp/filesystem-mcp-7d9c6b5f8-*: ")
    assert "set tether.dev/upstream-port" in warning
    assert len(warning) <= 256
    assert "\n" not in warning


async def test_a_malformed_review_is_a_400_that_says_why_and_the_server_keeps_serving(
    client: aiohttp.ClientSession, injector: RunningInjector
) -> None:
    url = f"https://localhost:{injector.port}/mutate"
    no_uid = review()
    del no_uid["request"]["uid"]
    cases: list[tuple[bytes, str]] = [
        (b"{not json", "not JSON"),
        (b"[]", "expected a JSON object"),
        (json.dumps({**FIXTURE, "apiVersion": "admission.k8s.io/v1beta1"}).encode(), "v1beta1"),
        (
            json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}).encode(),
            "no `request`",
        ),
        (json.dumps(no_uid).encode(), "no `uid`"),
    ]
    for raw, message in cases:
        async with client.post(url, data=raw, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400, raw
            text = await resp.text()
            assert text.startswith("malformed AdmissionReview: "), text
            assert message in text, text
    async with client.post(url, data=io.BytesIO(b" " * (MAX_REVIEW_BYTES + 1))) as resp:
        assert resp.status == 413
    assert "patch" in (await post(client, injector, review()))["response"]
    assert injector.metrics.malformed._value.get() == len(cases) + 1


async def test_health_and_metrics(client: aiohttp.ClientSession, injector: RunningInjector) -> None:
    await post(client, injector, review())
    await post(client, injector, review(annotations={}))
    for path in ("/healthz", "/readyz"):
        async with client.get(f"https://localhost:{injector.port}{path}") as resp:
            assert resp.status == 200, path
    async with client.get(f"http://127.0.0.1:{injector.admin_port}/metrics") as resp:
        text = await resp.text()
    assert 'tether_injector_reviews_total{outcome="injected"} 1.0' in text
    assert 'tether_injector_reviews_total{outcome="skipped"} 1.0' in text
    assert 'tether_build_info{component="injector"' in text
    assert "tether_injector_certificate_expiry_timestamp_seconds" in text
    injector.ready.clear()
    async with client.get(f"https://localhost:{injector.port}/readyz") as resp:
        assert resp.status == 503


# --- certificate rotation -------------------------------------------------------------------


async def served_certificate(port: int, context: ssl.SSLContext) -> bytes:
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        await writer.wait_closed()
    assert isinstance(der, bytes)
    return der


def der(pair: Pair) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pair.cert.read_text())


async def test_a_renewed_certificate_is_served_without_a_restart(
    injector: RunningInjector, serving: Pair, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """cert-manager renews the Secret (here: a certificate of another CA, so a client that
    trusts only the new CA proves which one is served); the kubelet updates the files. A
    half-done update (the new key beside the old certificate) is refused and the old pair kept
    until the certificate arrives too."""
    old = der(serving)
    assert await served_certificate(injector.port, trusting(ca)) == old
    (tmp_path / "other").mkdir()
    other = CertificateAuthority(tmp_path / "other", name="renewed-ca")
    renewed = other.issue("renewed", server=True)

    serving.key.write_bytes(renewed.key.read_bytes())  # the key first: a mismatched pair
    await eventually(
        lambda: injector.metrics.reloads.labels("failed")._value.get() >= 1,
        timeout=10,
        what="the mismatched pair refused",
    )
    assert await served_certificate(injector.port, trusting(ca)) == old

    serving.cert.write_bytes(renewed.cert.read_bytes())

    async def serves_renewed() -> bool:
        return await served_certificate(injector.port, trusting(other)) == der(renewed)

    await eventually(serves_renewed, timeout=10, ignoring=(ssl.SSLError,), what="the renewal")
    connector = aiohttp.TCPConnector(ssl=trusting(other))
    async with aiohttp.ClientSession(connector=connector) as session:
        assert "patch" in (await post(session, injector, review()))["response"]


# --- the command ----------------------------------------------------------------------------


def injector_argv(serving: Pair, port: int, *extra: str) -> list[str]:
    return python_module(
        "tether.cli",
        "injector",
        "--listen",
        f"127.0.0.1:{port}",
        "--tls-cert",
        str(serving.cert),
        "--tls-key",
        str(serving.key),
        "--sidecar-image",
        "tether:0.1.0",
        *extra,
    )


@pytest.fixture
def env() -> dict[str, str]:
    """This environment without TETHER_ variables, which would set the command's flags."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}


async def test_tether_injector_as_a_process(
    procs: ProcessPool, serving: Pair, client: aiohttp.ClientSession, env: dict[str, str]
) -> None:
    port = free_port()
    proc = await procs.start(
        injector_argv(serving, port), name="injector", ready_port=port, env=env
    )
    body = review()
    async with client.post(f"https://localhost:{port}/mutate", json=body) as resp:
        assert resp.status == 200
        answer = await resp.json()
    result = patched(body["request"]["object"], answer)
    for version in KUBERNETES_VERSIONS:
        validate(result, version)
    proc.kill(signal.SIGTERM)
    assert await proc.wait_exit() == 0
    log = proc.log_tail()
    assert (
        f"review {body['request']['uid']} (pod): pod mcp/filesystem-mcp-7d9c6b5f8-* injected" in log
    )


async def tether_cli(*argv: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *python_module("tether.cli", *argv),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_an_unusable_certificate_is_one_line_and_exit_1(
    serving: Pair, ca: CertificateAuthority, env: dict[str, str]
) -> None:
    other = ca.issue("other", server=True)
    serving.key.write_bytes(other.key.read_bytes())
    code, err = await tether_cli(*injector_argv(serving, 0)[3:], env=env)
    assert code == 1, err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"tether injector: cannot load --tls-cert {serving.cert} with --tls-key")

    code, err = await tether_cli(
        *injector_argv(Pair(serving.cert, Path("/nonexistent/key")), 0)[3:], env=env
    )
    assert code == 1, err
    (line,) = err.strip().splitlines()
    assert line == (
        "tether injector: cannot read --tls-key /nonexistent/key: No such file or directory"
    )


async def test_after_sigterm_it_is_unready_but_still_answers_until_the_delay_ends(
    procs: ProcessPool, serving: Pair, client: aiohttp.ClientSession, env: dict[str, str]
) -> None:
    """`--shutdown-delay`: the Service takes the pod out (readiness fails) while reviews that
    were already routed to it are still answered."""
    port = free_port()
    argv = injector_argv(serving, port, "--shutdown-delay", "120")
    proc = await procs.start(argv, name="injector", ready_port=port, env=env)
    base = f"https://localhost:{port}"

    async def readiness() -> int:
        async with client.get(f"{base}/readyz") as resp:
            return resp.status

    assert await readiness() == 200
    proc.kill(signal.SIGTERM)

    async def unready() -> bool:
        return await readiness() == 503

    await eventually(unready, timeout=10, what="/readyz 503")
    body = review()
    async with client.post(f"{base}/mutate", json=body) as resp:
        assert resp.status == 200
        assert "patch" in (await resp.json())["response"]
    assert proc.running
    proc.kill()  # the rest of the 120 s delay is not under test
    await proc.wait_exit()
