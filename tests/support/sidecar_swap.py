"""A sidecar that dies and is replaced, the way a pod's sidecar is: for end-to-end SDK tests.

`SidecarSwap.start` runs the demo MCP server (official Python SDK, with its event store) and
sidecar A as processes, A on a fixed port in front of it with a control plane. `replace()`
SIGKILLs A and starts B on the same port with the same control plane: a client keeps its URL
and must carry on through B. What a client sees is the test's business; this only moves the
parts, and reads the sidecars' logs for what they refused.
"""

from __future__ import annotations

import asyncio
import enum
import re
import signal
import sys
from collections import Counter
from dataclasses import dataclass

from sidecar.tracker import EventId, StreamKind
from tests.support.procs import ManagedProcess, ProcessPool, free_port, python_module

RESUME_REFUSED = "refused"
_LOG_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


def sidecar_argv(
    port: int, upstream: str, control_plane: str, owner: str, *extra: str
) -> list[str]:
    """argv of a sidecar process (`tether sidecar`) on 127.0.0.1:`port` using a control plane."""
    return [
        sys.executable,
        "-m",
        "tether.cli",
        "sidecar",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        upstream,
        "--control-plane",
        control_plane,
        "--owner",
        owner,
        *extra,
    ]


class GetStreamBeforeKill(enum.Enum):
    """What the client's standalone GET stream had carried when its sidecar was killed, which
    decides what the client resumes it from: the last notification's id, or the priming event's
    (the stream's first event: an id and `retry:`, no data)."""

    CARRIED_EVENTS = "get-stream-carried-events"
    ONLY_PRIMING = "get-stream-carried-only-priming"


@dataclass
class SidecarSwap:
    procs: ProcessPool
    control_plane: str
    port: int
    upstream: str
    extra_flags: tuple[str, ...]
    sidecar: ManagedProcess
    generation: int = 0

    @classmethod
    async def start(
        cls, procs: ProcessPool, *, control_plane: str, client_retry_ms: int
    ) -> SidecarSwap:
        """The demo MCP server and sidecar A, both listening; A sends `retry: client_retry_ms`.
        They start at once (two boots, not one after the other): a sidecar reaches its
        upstream only when a request comes, and the caller sends none before both listen."""
        up_port, port = free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        extra = ("--client-retry-ms", str(client_retry_ms))
        _, sidecar = await asyncio.gather(
            procs.start(
                python_module("tether.demo_server", "--port", up_port, "--log-level", "WARNING"),
                name="mcp-server",
                ready_port=up_port,
            ),
            procs.start(
                sidecar_argv(port, upstream, control_plane, "sidecar-a", *extra),
                name="sidecar-a",
                ready_port=port,
            ),
        )
        return cls(procs, control_plane, port, upstream, extra, sidecar)

    @property
    def url(self) -> str:
        """The MCP endpoint clients use: the same whichever sidecar serves it."""
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def name(self) -> str:
        return self.sidecar.name

    async def replace(self) -> ManagedProcess:
        """SIGKILL the current sidecar, wait until it is gone, start the next one (B, C, ...)
        on the same port with the same control plane, and return it once it listens."""
        self.sidecar.kill(signal.SIGKILL)
        await self.sidecar.wait_exit()
        self.generation += 1
        owner = f"sidecar-{chr(ord('a') + self.generation)}"
        self.sidecar = await self.procs.start(
            sidecar_argv(self.port, self.upstream, self.control_plane, owner, *self.extra_flags),
            name=owner,
            ready_port=self.port,
        )
        return self.sidecar

    def refused_resumes(self) -> list[str]:
        """The current sidecar's log lines about a client resume (Last-Event-ID) it refused."""
        try:
            lines = self.sidecar.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        refused = [line for line in lines if "resume of" in line and RESUME_REFUSED in line]
        return [_LOG_TIMESTAMP.sub("", line) for line in refused]

    def refused_resumes_summary(self) -> str:
        """The distinct refusals of `refused_resumes`, each with how often it happened."""
        counts = Counter(self.refused_resumes())
        if not counts:
            return f"{self.name} refused no resume"
        return f"{self.name} refused resumes:\n" + "\n".join(
            f"  {n} x {line}" for line, n in counts.items()
        )


def resumes_get_stream(last_event_id: str | None) -> bool:
    """Whether a GET with this Last-Event-ID resumes a session's standalone GET stream (rather
    than a POST's stream, which clients also resume with a GET, or nothing: a new stream)."""
    parsed = EventId.parse(last_event_id) if last_event_id is not None else None
    return parsed is not None and StreamKind.of(parsed.stream) is StreamKind.STANDALONE
