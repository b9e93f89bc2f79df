"""Pods in their own network namespaces, linked by veth pairs, whose links a test can cut.

As in Kubernetes, a pod is one network namespace that its containers (here: processes started
with `ip netns exec`) share. `PodNetwork` builds, for one test, namespaces
`tether-<random>-<pod>` and:

- a "node" link per pod to the test's own (root) namespace, which the test uses as the
  outside world: it probes readiness, plays the MCP client, watches the control plane;
- a point-to-point link per pair of pods that talk to each other (sidecar <-> upstream,
  sidecar <-> control plane): cutting it (`ip link set DEV down`, both ends) is a network
  partition between exactly those two pods, silent to TCP (no RST, no FIN).

Every link is a /30 in 10.254.<X>.0/24, X chosen at random among the ones this machine does not
use; the addresses exist only inside these namespaces and on the root ends of the node links.
Pods get no default route, so traffic between pods can only take their direct link.
`aclose()` deletes everything, and runs however the test ends (use `async with`).

Each namespace has its own port space, so processes inside use fixed, well-known ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.support.procs import READY_POLL_S, ManagedProcess, ProcessError

IP = shutil.which("ip") or "/usr/sbin/ip"


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP, *args], check=check, capture_output=True, text=True, timeout=10)


@functools.cache
def netns_unavailable_reason() -> str | None:
    """None if this process may create network namespaces and veth pairs; else why not
    (probed once per run)."""
    if not Path(IP).is_file():
        return "iproute2 is not installed (apt-get install -y iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"tether-probe-{secrets.token_hex(3)}"
    try:
        made = _run("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
        link = _run(
            *f"link add tp{probe[-6:]} type veth peer name tq netns {probe}".split(), check=False
        )
        if link.returncode != 0:
            return f"veth pairs are not permitted here: {link.stderr.strip()}"
        return None
    finally:
        _run("link", "del", f"tp{probe[-6:]}", check=False)
        _run("netns", "del", probe, check=False)


def _used_subnets() -> set[int]:
    """Third octets X of 10.254.X.* addresses already on this machine's root namespace."""
    out = _run("-4", "-o", "addr", "show", check=False).stdout
    used = set()
    for word in out.split():
        if word.startswith("10.254."):
            with contextlib.suppress(ValueError, IndexError):
                used.add(int(word.split(".")[2]))
    return used


@dataclass(frozen=True)
class Link:
    """A veth pair: `a_dev` in namespace `a` (None: the root namespace), `b_dev` in `b`."""

    a: str | None
    a_dev: str
    a_ip: str
    b: str
    b_dev: str
    b_ip: str


@dataclass
class PodNetwork:
    """Namespaces for `pods`, node links to the root namespace and direct links for `pairs`."""

    pods: Sequence[str]
    pairs: Sequence[tuple[str, str]]
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    log_dir: Path = field(default_factory=Path.cwd)
    links: dict[tuple[str | None, str], Link] = field(default_factory=dict)
    processes: list[PodProcess] = field(default_factory=list)
    _octet: int = 0
    _next_net: int = 0

    def ns(self, pod: str) -> str:
        return f"tether-{self.tag}-{pod}"

    def node_ip(self, pod: str) -> str:
        """The pod's address on its node link: where the test reaches it from outside."""
        return self.links[(None, pod)].b_ip

    def ip_toward(self, pod: str, peer: str) -> str:
        """The address of `pod` on its direct link with `peer` (what `peer` connects to)."""
        link = self.links.get((pod, peer)) or self.links[(peer, pod)]
        return link.a_ip if link.a == pod else link.b_ip

    def exec_argv(self, pod: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the pod's namespace (`ip netns exec` execs it: same pid)."""
        return [IP, "netns", "exec", self.ns(pod), *argv]

    async def __aenter__(self) -> PodNetwork:
        try:
            await asyncio.to_thread(self._build)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every process started in a pod, then delete the namespaces and links."""
        await asyncio.gather(*(p.stop() for p in self.processes))
        await asyncio.to_thread(self._teardown)

    async def start(
        self,
        pod: str,
        argv: Sequence[str],
        *,
        name: str,
        ready_port: int,
        timeout: float = 15.0,
        env: Mapping[str, str] | None = None,
    ) -> PodProcess:
        """Start `argv` in `pod`; return once it listens on `ready_port` (probed from outside,
        on the pod's node address). It is stopped by `aclose()`."""
        proc = PodProcess(self, pod, argv, log_dir=self.log_dir, name=name, env=env)
        self.processes.append(proc)
        await proc.start(ready_port=ready_port, timeout=timeout)
        return proc

    def _build(self) -> None:
        free = sorted(set(range(1, 255)) - _used_subnets())
        self._octet = random.choice(free)
        for pod in self.pods:
            _run("netns", "add", self.ns(pod))
            _run("-n", self.ns(pod), "link", "set", "lo", "up")
        for pod in self.pods:
            self._add_link(None, pod)
        for a, b in self.pairs:
            self._add_link(a, b)

    def _add_link(self, a: str | None, b: str) -> None:
        net = ipaddress.ip_network(f"10.254.{self._octet}.{self._next_net * 4}/30")
        self._next_net += 1
        a_ip, b_ip = (str(h) for h in net.hosts())
        n = len(self.links)
        link = Link(a, f"t{self.tag}{n}a", a_ip, b, f"t{self.tag}{n}b", b_ip)
        self.links[(a, b)] = link
        self._create(link)

    def _create(self, link: Link) -> None:
        a_ns = f"netns {self.ns(link.a)} " if link.a else ""
        peer = f"peer name {link.b_dev} netns {self.ns(link.b)}"
        _run(*f"link add {link.a_dev} {a_ns}type veth {peer}".split())
        for ns, dev, ip in ((link.a, link.a_dev, link.a_ip), (link.b, link.b_dev, link.b_ip)):
            where = ["-n", self.ns(ns)] if ns else []
            _run(*where, "addr", "add", f"{ip}/30", "dev", dev)
            _run(*where, "link", "set", dev, "up")

    def _set(self, link: Link, state: str) -> None:
        for ns, dev in ((link.a, link.a_dev), (link.b, link.b_dev)):
            where = ["-n", self.ns(ns)] if ns else []
            _run(*where, "link", "set", dev, state)

    async def cut(self, a: str, b: str) -> None:
        """Partition pods `a` and `b`: their direct link goes down at both ends. Packets are
        dropped silently; open TCP connections are not told."""
        await asyncio.to_thread(self._set, self.links[(a, b)], "down")

    async def heal(self, a: str, b: str) -> None:
        await asyncio.to_thread(self._set, self.links[(a, b)], "up")

    async def replace_pod(self, pod: str) -> None:
        """The pod is deleted and a new one comes up with the same addresses (a rescheduled
        pod keeping its IPs): its namespace and links are recreated, its kernel state (TCP
        connections included) is gone without a word to the peers. Stop its processes first."""
        await asyncio.to_thread(self._replace, pod)

    def _replace(self, pod: str) -> None:
        _run("netns", "del", self.ns(pod))
        _run("netns", "add", self.ns(pod))
        _run("-n", self.ns(pod), "link", "set", "lo", "up")
        for link in self.links.values():
            if pod in (link.a, link.b):
                # The pair died with the namespace; the other end may linger briefly.
                other_ns = link.b if link.a == pod else link.a
                other_dev = link.b_dev if link.a == pod else link.a_dev
                where = ["-n", self.ns(other_ns)] if other_ns else []
                _run(*where, "link", "del", other_dev, check=False)
                self._create(link)

    def _teardown(self) -> None:
        for pod in self.pods:
            _run("netns", "del", self.ns(pod), check=False)
        # Root ends of node links vanish with their peers; make sure of it.
        for link in self.links.values():
            if link.a is None:
                _run("link", "del", link.a_dev, check=False)


class PodProcess(ManagedProcess):
    """A process in a pod: readiness is probed on the pod's node address, not loopback
    (`ManagedProcess` probes 127.0.0.1 only; its readiness loop is redone here with a host)."""

    def __init__(
        self,
        net: PodNetwork,
        pod: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        name: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(net.exec_argv(pod, argv), log_dir=log_dir, name=name, env=env)
        self.net = net
        self.pod = pod

    async def _wait_ready(self, port: int, timeout: float) -> None:
        host = self.net.node_ip(self.pod)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if not self.running:
                raise ProcessError(
                    f"{self.name} exited with {self.returncode} before listening on "
                    f"{host}:{port}\n" + self.log_tail()
                )
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), max(0.0, deadline - loop.time())
                )
            except (OSError, TimeoutError):
                pass
            else:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            if loop.time() >= deadline:
                raise ProcessError(
                    f"{self.name} not listening on {host}:{port} after {timeout}s\n"
                    + self.log_tail()
                )
            await asyncio.sleep(READY_POLL_S)  # poll interval; the deadline is above
