"""The official TypeScript MCP SDK client as a process a test drives: tests/ts/client.mjs.

The program (its header lists the protocol) reads commands as JSON lines on stdin and reports
what the SDK did as JSON lines on stdout: `progress`, `result`, `error`, `notification`, `get`
(each GET its transport made, with the answer's status), `transport_error`. `TsSdkClient` keeps
every report in `events`, in arrival order, and `wait_for` reads reports until one matches, with
a deadline: the test waits on what the client saw, never on time.

`npm ci --prefix tests/ts` (scripts/test.sh runs it) installs the SDK version the lockfile pins.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import REPO_ROOT

TS_DIR = REPO_ROOT / "tests" / "ts"
CLIENT_PROGRAM = TS_DIR / "client.mjs"
SDK_PACKAGE = TS_DIR / "node_modules" / "@modelcontextprotocol" / "sdk" / "package.json"

Report = dict[str, Any]


def require_ts_sdk() -> str:
    """The `node` executable, or fail the test saying what is missing.

    A failure, not a skip: scripts/test.sh installs Node and the SDK, so a missing one is a
    broken setup, and a skipped test would hide it.
    """
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (scripts/test.sh apt-installs nodejs)")
    if not SDK_PACKAGE.exists():
        pytest.fail(f"the TypeScript SDK is not installed: run `npm ci --prefix {TS_DIR}`")
    return node


def installed_sdk_version() -> str:
    version: str = json.loads(SDK_PACKAGE.read_text())["version"]
    return version


class TsClientError(AssertionError):
    """The client program ended, or a report did not come in time; the message shows both
    what it reported and what it wrote on stderr."""


class TsSdkClient:
    """One running tests/ts/client.mjs, connected to an MCP endpoint."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self._proc = proc
        self._stderr_path = stderr_path
        self.events: list[Report] = []
        self.arrived: list[float] = []
        """When each of `events` arrived (monotonic clock)."""

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls,
        url: str,
        *,
        log_dir: Path,
        connect_timeout: float = 30.0,
        keepalive: bool = True,
    ) -> AsyncIterator[TsSdkClient]:
        """Start the client against `url` and yield it once it has connected (the initialize
        handshake is done); close it on the way out, killing it if it does not exit.
        `keepalive=False`: each request on a new connection (client.mjs `--no-keepalive`)."""
        node = require_ts_sdk()
        stderr_path = log_dir / "ts-client.stderr.log"
        with stderr_path.open("ab") as stderr:
            proc = await asyncio.create_subprocess_exec(
                node,
                str(CLIENT_PROGRAM),
                url,
                *([] if keepalive else ["--no-keepalive"]),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=TS_DIR,
            )
        client = cls(proc, stderr_path)
        try:
            await client.wait_for(
                lambda r: r["event"] == "connected", timeout=connect_timeout, what="connected"
            )
            yield client
        finally:
            await client.close()

    def send(self, **command: Any) -> None:
        """Write one command line (see client.mjs), e.g. `send(op="close")`."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(command).encode() + b"\n")

    def call(self, tag: str, tool: str, **args: Any) -> None:
        """Start a tool call; its reports carry `tag`. Calls run concurrently."""
        self.send(op="call", tag=tag, tool=tool, args=args)

    def matching(self, check: Callable[[Report], bool]) -> list[Report]:
        return [r for r in self.events if check(r)]

    async def wait_for(
        self, check: Callable[[Report], bool], *, timeout: float, what: str, since: int = 0
    ) -> Report:
        """The first report (already read or still to come) for which `check` is true,
        among the reports from index `since` of `events` on (`len(events)` at some moment:
        only what came after it)."""
        for report in self.events[since:]:
            if check(report):
                return report
        try:
            async with asyncio.timeout(timeout):
                while True:
                    report = await self._read_one()
                    if check(report):
                        return report
        except TimeoutError:
            raise TsClientError(
                f"TypeScript client: waited {timeout} s for {what}\n{self.describe()}"
            ) from None

    async def wait_for_result(self, tag: str, *, timeout: float) -> Report:
        """Call `tag`'s `result` report; its `error` report fails the test."""
        report = await self.wait_for(
            lambda r: r["event"] in ("result", "error") and r.get("tag") == tag,
            timeout=timeout,
            what=f"result of call {tag}",
        )
        if report["event"] == "error":
            raise TsClientError(f"call {tag} failed: {report}\n{self.describe()}")
        return report

    async def _read_one(self) -> Report:
        assert self._proc.stdout is not None
        line = await self._proc.stdout.readline()
        if not line:
            await self._proc.wait()
            raise TsClientError(
                f"TypeScript client exited ({self._proc.returncode})\n{self.describe()}"
            )
        report: Report = json.loads(line)
        self.arrived.append(time.monotonic())
        self.events.append(report)
        return report

    def longest_gap(self, check: Callable[[Report], bool]) -> float:
        """The longest wait, in seconds, between two consecutive reports that `check`
        accepts: the longest stall the client saw."""
        return longest_gap([t for t, r in zip(self.arrived, self.events, strict=True) if check(r)])

    async def close(self, timeout: float = 10.0) -> None:
        """Ask the client to close; read its last reports; kill it if it does not exit."""
        if self._proc.returncode is None and self._proc.stdin is not None:
            with contextlib.suppress(ConnectionError):
                self.send(op="close")
                self._proc.stdin.close()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self._read_one()
        except (TsClientError, TimeoutError):
            pass
        if self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()

    def describe(self) -> str:
        """Every report so far and the stderr tail, for assertion messages."""
        try:
            stderr = self._stderr_path.read_text(errors="replace").splitlines()[-20:]
        except FileNotFoundError:
            stderr = []
        reports = "\n".join(collapse_repeats([json.dumps(r) for r in self.events]))
        return f"[reports]\n{reports}\n[stderr, last {len(stderr)} lines]\n" + "\n".join(stderr)


def collapse_repeats(lines: list[str]) -> list[str]:
    """`lines` with each run of a repeated group of up to 4 lines (a client retrying every
    250 ms for 30 s) shown once, followed by how often it repeated."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        for size in range(1, 5):
            group = lines[i : i + size]
            times = 1
            while lines[i + times * size : i + (times + 1) * size] == group:
                times += 1
            if times > 2:
                out += [*group, f"  ... the {size} line(s) above {times} times in all"]
                i += times * size
                break
        else:
            out.append(lines[i])
            i += 1
    return out


def longest_gap(times: list[float]) -> float:
    """The longest wait between two consecutive `times` (0 for fewer than two)."""
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)
