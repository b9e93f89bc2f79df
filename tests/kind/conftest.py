"""A kind cluster running deploy/overlays/dev, for the tests in this folder.

They need `kind`, `kubectl` and a reachable Docker engine, and skip (naming what is missing)
anywhere else. On a laptop with those, the one command is:

    pytest tests/kind

The fixture builds the image (`docker build -t tether:dev .`), creates the cluster
`tether-kind-test` from kind-config.yaml (or reuses it), loads the image, applies the dev
overlay and waits for the rollouts; the cluster is deleted afterwards unless
TETHER_KIND_KEEP=1. TETHER_KIND_SKIP_BUILD=1 uses an image you built yourself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
IMAGE = "tether:dev"
NAMESPACE = "tether"
CLUSTER = os.environ.get("TETHER_KIND_CLUSTER", "tether-kind-test")
# kind-config.yaml maps the MCP example's node port here.
MCP_URL = "http://127.0.0.1:30080/mcp"
# ... and the injected example's (overlays/injected-app) here.
INJECTED_MCP_URL = "http://127.0.0.1:30081/mcp"
ROLLOUT_TIMEOUT = "240s"


def missing_tools() -> str | None:
    """Why these tests cannot run here, or None when they can."""
    for tool in ("kubectl", "kind", "docker"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (the kind tests need kind, kubectl and Docker)"
    try:
        info = subprocess.run(
            ["docker", "info"], capture_output=True, timeout=30, check=False, text=True
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no Docker engine reachable (`docker info`: {exc})"
    if info.returncode != 0:
        return "no Docker engine reachable (`docker info` failed: the docker CLI has no daemon)"
    return None


SKIP_REASON = missing_tools()


def run(argv: Sequence[str], *, timeout: float = 600, stdin: str | None = None) -> str:
    """Run a command; fail the test with its output when it fails."""
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=stdin, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@dataclass(frozen=True)
class Cluster:
    name: str

    def kubectl(
        self, *args: str, timeout: float = 300, stdin: str | None = None, namespace: str = NAMESPACE
    ) -> str:
        return run(
            ["kubectl", "--context", f"kind-{self.name}", "-n", namespace, *args],
            timeout=timeout,
            stdin=stdin,
        )

    def apply(self, directory: Path) -> None:
        self.kubectl("apply", "-k", str(directory))

    def wait_rollouts(self) -> None:
        for deployment in ("tether-control-plane", "mcp-example"):
            self.kubectl(
                "rollout", "status", f"deployment/{deployment}", f"--timeout={ROLLOUT_TIMEOUT}"
            )


@pytest.fixture(scope="session")
def kind_cluster() -> Iterator[Cluster]:
    if os.environ.get("TETHER_KIND_SKIP_BUILD") != "1":
        run(["docker", "build", "-t", IMAGE, str(REPO_ROOT)], timeout=1800)
    existing = run(["kind", "get", "clusters"]).split()
    if CLUSTER not in existing:
        run(
            [
                "kind",
                "create",
                "cluster",
                "--name",
                CLUSTER,
                "--config",
                str(HERE / "kind-config.yaml"),
                "--wait",
                "180s",
            ]
        )
    cluster = Cluster(CLUSTER)
    try:
        run(["kind", "load", "docker-image", IMAGE, "--name", CLUSTER])
        cluster.apply(REPO_ROOT / "deploy" / "overlays" / "dev")
        cluster.wait_rollouts()
        cluster.apply(HERE / "overlays" / "nodeport")
        yield cluster
    finally:
        if os.environ.get("TETHER_KIND_KEEP") != "1":
            run(["kind", "delete", "cluster", "--name", CLUSTER])
