"""Tether on a real Kubernetes cluster (kind): the dev overlay as a user applies it, an MCP
client through the sidecar, the MCP server's pod deleted mid-stream, a rollout, and the
injecting webhook adding Tether to an unmodified MCP server Deployment.

Skipped, with the reason, where kind, kubectl or a Docker engine is missing (see conftest.py
for the one command that runs them).
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from tests.kind.conftest import HERE, INJECTED_MCP_URL, MCP_URL, REPO_ROOT, SKIP_REASON, Cluster
from tests.support.certs import CertificateAuthority
from tests.support.waiting import eventually

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or ""),
    # Building the image and creating the cluster happen in the first test's setup.
    pytest.mark.timeout(1800),
]

NUMBERED_UPSTREAM = REPO_ROOT / "tests" / "support" / "numbered_upstream.py"


class Progress:
    """Every progress notification the client saw, in order, and a signal per arrival."""

    def __init__(self) -> None:
        self.seen: list[float] = []
        self.arrived = asyncio.Event()

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.seen.append(progress)
        self.arrived.set()

    async def wait_for(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(self.seen) < count:
                self.arrived.clear()
                await self.arrived.wait()


def text_of(result: Any) -> str:
    (content,) = result.content
    text: str = content.text
    return text


async def wait_until_served(timeout: float = 120) -> None:
    """The node port answers once kube-proxy has the endpoints: a bounded retry."""

    async def served() -> bool:
        async with Client(MCP_URL, mode="legacy") as client:
            await client.list_tools()
        return True

    # Connection refused or reset while the endpoints settle means "not yet".
    await eventually(
        served, timeout=timeout, interval=1, ignoring=(Exception,), what="the node port serving"
    )


async def kubectl(cluster: Cluster, *args: str) -> str:
    return await asyncio.to_thread(cluster.kubectl, *args)


async def test_sdk_client_through_the_sidecar(kind_cluster: Cluster) -> None:
    await wait_until_served()
    progress = Progress()
    async with Client(MCP_URL, mode="legacy") as client:
        result = await client.call_tool(
            "count", {"n": 5, "interval_ms": 50}, progress_callback=progress
        )
    assert text_of(result) == "counted 5"
    assert progress.seen == [1.0, 2.0, 3.0, 4.0, 5.0]


async def stream_owner(cluster: Cluster) -> dict[str, Any]:
    """The session being streamed: owned by a running pod, with a stream, the newest."""
    pods = set(
        (
            await kubectl(
                cluster,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=mcp-example",
                "--field-selector=status.phase=Running",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            )
        ).split()
    )
    listing = json.loads(
        await kubectl(
            cluster,
            "exec",
            "deployment/tether-control-plane",
            "--",
            "tether",
            "sessions",
            "list",
            "-o",
            "json",
            "--control-plane",
            "127.0.0.1:50051",
        )
    )
    live = [s for s in listing.get("sessions", []) if s.get("owner") in pods]
    assert live, f"no session owned by a running pod {pods}: {listing}"

    def streaming_and_recent(s: dict[str, Any]) -> tuple[int, datetime]:
        return len(s.get("streams", [])), datetime.fromisoformat(s["updatedAt"])

    newest: dict[str, Any] = max(live, key=streaming_and_recent)
    return newest


async def test_mcp_server_pod_deleted_mid_stream_loses_nothing(kind_cluster: Cluster) -> None:
    """The SDK client calls `count`; after 10 progress notifications the pod whose sidecar
    owns the session is deleted. The client resumes through the Service, the other pod's
    sidecar claims the session, and every notification arrives exactly once, in order."""
    configmap = await kubectl(
        kind_cluster,
        "create",
        "configmap",
        "numbered-upstream",
        f"--from-file={NUMBERED_UPSTREAM}",
        "--dry-run=client",
        "-o",
        "yaml",
    )
    await asyncio.to_thread(kind_cluster.kubectl, "apply", "-f", "-", stdin=configmap)
    await asyncio.to_thread(kind_cluster.apply, HERE / "overlays" / "resume")
    await asyncio.to_thread(kind_cluster.wait_rollouts)
    await wait_until_served()

    n = 60
    progress = Progress()
    async with Client(MCP_URL, mode="legacy") as client:
        call = asyncio.ensure_future(
            client.call_tool("count", {"n": n, "interval_ms": 100}, progress_callback=progress)
        )
        await progress.wait_for(10, timeout=60)
        session = await stream_owner(kind_cluster)
        doomed = session["owner"]
        await kubectl(kind_cluster, "delete", "pod", doomed, "--wait=false")
        result = await asyncio.wait_for(call, 180)
        # Read the record before leaving: the client deletes its session on the way out.
        record = json.loads(
            await kubectl(
                kind_cluster,
                "exec",
                "deployment/tether-control-plane",
                "--",
                "tether",
                "sessions",
                "get",
                session["sessionId"],
                "-o",
                "json",
                "--control-plane",
                "127.0.0.1:50051",
            )
        )

    assert text_of(result) == f"counted {n}"
    assert progress.seen == [float(i) for i in range(1, n + 1)], "lost or repeated progress"
    assert record["owner"] != doomed, "another pod's sidecar claimed the session"
    assert int(record["ownerEpoch"]) > int(session.get("ownerEpoch", 1))


async def test_rollout_restart_mid_calls_fails_no_call(kind_cluster: Cluster) -> None:
    """Issue #12 on a real cluster: SDK clients (legacy and default mode) call `count` back to
    back through the Service while `kubectl rollout restart` replaces every MCP pod (demo
    server without an event store). Each deleted pod's preStop hook drains its sidecar, so
    calls in flight finish there and the next ones go to the new pods: no call fails, and
    every call sees each progress notification exactly once, in order."""
    await asyncio.to_thread(kind_cluster.apply, HERE / "overlays" / "rollout")
    await asyncio.to_thread(kind_cluster.wait_rollouts)
    await wait_until_served()

    n = 20
    calls = 0
    failures: list[str] = []
    rolling = asyncio.Event()
    rolling.set()

    async def calling(mode: str) -> None:
        nonlocal calls
        async with Client(MCP_URL, mode=mode) as client:
            while rolling.is_set():
                progress = Progress()
                calls += 1
                try:
                    result = await asyncio.wait_for(
                        client.call_tool(
                            "count", {"n": n, "interval_ms": 200}, progress_callback=progress
                        ),
                        120,
                    )
                except Exception as exc:
                    failures.append(f"{mode}: {exc!r}")
                    return
                if text_of(result) != f"counted {n}" or progress.seen != [
                    float(i) for i in range(1, n + 1)
                ]:
                    failures.append(f"{mode}: {text_of(result)!r}, progress {progress.seen}")

    clients = [asyncio.ensure_future(calling("legacy" if i % 2 else "auto")) for i in range(6)]
    try:

        async def all_calling() -> bool:
            return calls >= len(clients)

        await eventually(all_calling, timeout=60, interval=0.2, what="every client calling")
        await kubectl(kind_cluster, "rollout", "restart", "deployment/mcp-example")
        await kubectl(kind_cluster, "rollout", "status", "deployment/mcp-example", "--timeout=600s")
    finally:
        rolling.clear()
        await asyncio.gather(*clients, return_exceptions=True)
    assert failures == [], failures
    assert calls > 2 * len(clients), "the calls went on through the rollout"


async def test_an_unmodified_deployment_in_an_injection_namespace_runs_behind_tether(
    kind_cluster: Cluster, tmp_path: Path
) -> None:
    """Issue #15 on a real cluster: the injecting webhook (deploy/components/injector, its
    certificate provided as the README's "Secret you provide" says) adds the sidecar to the
    pods of a plain MCP server Deployment in a namespace labelled `tether.dev/inject=enabled`;
    an SDK client reaches the server through that sidecar, and the session is in the control
    plane under the pod's name."""
    ca = CertificateAuthority(tmp_path)
    names = ("tether-injector.tether.svc", "tether-injector.tether.svc.cluster.local")
    serving = ca.issue("injector", server=True, dns_names=names)
    await kubectl(
        kind_cluster,
        "create",
        "secret",
        "tls",
        "tether-injector-tls",
        f"--cert={serving.cert}",
        f"--key={serving.key}",
    )
    await asyncio.to_thread(kind_cluster.apply, HERE / "overlays" / "injector")
    bundle = base64.b64encode(ca.pair.cert.read_bytes()).decode()
    patch = [
        {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle}
        for i in (0, 1)
    ]
    await kubectl(
        kind_cluster,
        "patch",
        "mutatingwebhookconfiguration",
        "tether-injector",
        "--type=json",
        f"--patch={json.dumps(patch)}",
    )
    await kubectl(kind_cluster, "rollout", "status", "deployment/tether-injector", "--timeout=240s")

    # Its objects name their namespace: applied there, not in tether's.
    app = str(HERE / "overlays" / "injected-app")
    await asyncio.to_thread(kind_cluster.kubectl, "apply", "-k", app, namespace="mcp-injected")

    def in_app(*args: str) -> str:
        return kind_cluster.kubectl(*args, namespace="mcp-injected")

    await asyncio.to_thread(in_app, "rollout", "status", "deployment/plain-mcp", "--timeout=240s")
    pods = json.loads(
        await asyncio.to_thread(in_app, "get", "pods", "-l", "app=plain-mcp", "-o", "json")
    )
    (pod,) = pods["items"]
    sidecars = [c for c in pod["spec"].get("initContainers", []) if c["name"] == "tether-sidecar"]
    assert len(sidecars) == 1, pod["spec"]
    assert sidecars[0]["restartPolicy"] == "Always"  # a native sidecar
    (server,) = pod["spec"]["containers"]
    assert server["lifecycle"]["preStop"]["httpGet"]["path"] == "/drain"
    assert "tether.dev/injected" in pod["metadata"]["annotations"]

    async def served() -> bool:
        async with Client(INJECTED_MCP_URL, mode="legacy") as client:
            result = await client.call_tool("echo", {"text": "through tether"})
            return text_of(result) == "through tether"

    await eventually(
        served, timeout=120, interval=1, ignoring=(Exception,), what="the injected pod serving"
    )
    owner = f"{pod['metadata']['name']}@mcp-injected"  # a pod outside the home namespace
    listed = await kubectl(
        kind_cluster,
        "exec",
        "deployment/tether-control-plane",
        "--",
        "tether",
        "sessions",
        "list",
        "--control-plane",
        "127.0.0.1:50051",
    )
    assert owner in listed, listed
