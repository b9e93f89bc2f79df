"""Real etcd members for tests: started on free loopback ports in a temporary directory.

Never touches a system etcd (2379): every member gets ports picked by the kernel. Members
use a short heartbeat so that leader elections and lease expiry take about a second.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.procs import free_port
from tests.support.waiting import eventually

ETCD_BINARY = shutil.which("etcd") or "/usr/bin/etcd"


def etcd_available() -> bool:
    return Path(ETCD_BINARY).is_file()


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, *, state: str = "new") -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        client_url = f"http://127.0.0.1:{self.client_port}"
        args = [
            ETCD_BINARY,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={initial_cluster}",
            f"--initial-cluster-state={state}",
            "--initial-cluster-token=tether-test",
            "--heartbeat-interval=20",
            "--election-timeout=200",
            "--logger=zap",
            "--log-level=warn",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.client_port}/health", timeout=0.5
            ) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class EtcdCluster:
    members: list[EtcdMember]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """The store URL a control plane takes: `etcd://h1:p1,h2:p2`."""
        return "etcd://" + ",".join(self.endpoints)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Poll the members' /health until all answer (a readiness probe with a deadline)."""
        deadline = time.monotonic() + timeout
        pending = [m for m in self.members if m.process is not None]
        while pending:
            for m in pending:
                if m.process is not None and m.process.poll() is not None:
                    raise RuntimeError(
                        f"etcd {m.name} exited: {m.log_path.read_text(errors='replace')[-2000:]}"
                    )
            pending = [m for m in pending if not m.healthy()]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"etcd members not healthy: {[m.name for m in pending]}")
            if pending:
                time.sleep(0.05)  # poll interval (sync: called from sync fixtures)

    def stop(self) -> None:
        for m in self.members:
            m.stop()


def start_etcd(base_dir: Path, *, members: int = 1) -> EtcdCluster:
    """Start an etcd cluster of `members` members under `base_dir`; wait until healthy."""
    cluster = EtcdCluster(
        [
            EtcdMember(
                name=f"m{i}",
                client_port=free_port(),
                peer_port=free_port(),
                data_dir=base_dir / f"m{i}.etcd",
                log_path=base_dir / f"m{i}.log",
            )
            for i in range(members)
        ]
    )
    initial = ",".join(f"{m.name}={m.peer_url}" for m in cluster.members)
    try:
        for m in cluster.members:
            m.start(initial)
        cluster.wait_healthy()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def post(member: EtcdMember, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """etcd's HTTP gateway (JSON over the v3 API); blocking."""
    request = urllib.request.Request(
        f"http://{member.endpoint}{path}", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=2) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def member_ids(cluster: EtcdCluster) -> dict[str, str]:
    return {
        m.name: post(m, "/v3/maintenance/status", {})["header"]["member_id"]
        for m in cluster.members
    }


def leader_of(members: list[EtcdMember], ids: dict[str, str]) -> EtcdMember | None:
    """The member every live member agrees is the leader, or None (an election is on)."""
    seen = {post(m, "/v3/maintenance/status", {}).get("leader", "0") for m in members}
    if len(seen) != 1:
        return None
    (leader_id,) = seen
    return next((m for m in members if ids[m.name] == leader_id), None)


async def wait_leader(
    members: list[EtcdMember], ids: dict[str, str], *, timeout: float = 15.0
) -> EtcdMember:
    leader = await eventually(
        lambda: asyncio.to_thread(leader_of, members, ids),
        timeout=timeout,
        interval=0.02,
        what="an etcd leader elected",
    )
    assert leader is not None
    return leader


async def make_leader(cluster: EtcdCluster, target: EtcdMember) -> None:
    """Move leadership to `target` (etcd's transfer-leadership, asked of the leader)."""
    ids = await asyncio.to_thread(member_ids, cluster)
    leader = await wait_leader(cluster.members, ids)
    if leader is not target:
        body = {"targetID": ids[target.name]}
        await asyncio.to_thread(post, leader, "/v3/maintenance/transfer-leadership", body)
        leader = await wait_leader(cluster.members, ids)
    assert leader is target
