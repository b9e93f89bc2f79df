"""Real processes for end-to-end tests: start, wait until listening, kill, restart, clean up.

A `ManagedProcess` writes stdout and stderr to `<log_dir>/<name>.log` (appended across
restarts, each start marked) so a failing test can show what the server said. `ProcessPool`
is the cleanup guarantee: leaving it stops every process it started, even when the test failed,
so no server outlives its test. The only timed waiting is the bounded readiness poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_POLL_S = 0.02


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def python_module(module: str, *args: str | int) -> list[str]:
    """argv running `python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *(str(a) for a in args)]


def _default_name(argv: Sequence[str]) -> str:
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1].rpartition(".")[2]
    return Path(argv[0]).name


class ProcessError(RuntimeError):
    """A managed process exited or never became ready; the message ends with its log tail."""


class ManagedProcess:
    """One server process that a test can start, kill and start again on the same port."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_dir: Path,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO_ROOT,
    ) -> None:
        self.argv = list(argv)
        self.name = name or _default_name(self.argv)
        self.log_path = log_dir / f"{self.name}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.ready_port: int | None = None
        self.starts = 0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        """None while running (or never started); negative -N when killed by signal N."""
        return None if self._proc is None else self._proc.returncode

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, *, ready_port: int, timeout: float = 15.0) -> None:
        """Start the process and return once `ready_port` on 127.0.0.1 accepts connections."""
        if self.running:
            raise ProcessError(f"{self.name} is already running (pid {self.pid})")
        self.ready_port = ready_port
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            log_file.write(f"--- start #{self.starts}: {' '.join(self.argv)}\n".encode())
            log_file.flush()
            # The child keeps its own copy of the descriptor; ours closes with this block.
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
            )
        try:
            await self._wait_ready(ready_port, timeout)
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self, port: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if not self.running:
                raise ProcessError(
                    f"{self.name} exited with {self.returncode} before listening on {port}\n"
                    + self.log_tail()
                )
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), max(0.0, deadline - loop.time())
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
                    f"{self.name} not listening on {port} after {timeout}s\n" + self.log_tail()
                )
            await asyncio.sleep(READY_POLL_S)  # poll interval; the deadline is above

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` (SIGKILL: a crash) if the process is still running."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the process to end and return its exit status."""
        if self._proc is None:
            raise ProcessError(f"{self.name} was never started")
        try:
            return await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            raise ProcessError(
                f"{self.name} still running after {timeout}s\n" + self.log_tail()
            ) from None

    async def restart(self, *, timeout: float = 15.0, sig: int = signal.SIGKILL) -> None:
        """Kill (if needed) and start again on the same port, with the same argv."""
        if self.ready_port is None:
            raise ProcessError(f"{self.name} was never started")
        if self.running:
            self.kill(sig)
            await self.wait_exit()
        await self.start(ready_port=self.ready_port, timeout=timeout)

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `grace`; its status, if started."""
        if self._proc is None:
            return None
        if self._proc.returncode is None:
            self.kill(signal.SIGTERM)
            try:
                return await asyncio.wait_for(self._proc.wait(), grace)
            except TimeoutError:
                self.kill(signal.SIGKILL)
        return await self._proc.wait()

    def log_tail(self, n: int = 40) -> str:
        """The last `n` lines of the log, labelled, for assertion messages."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except FileNotFoundError:
            return f"[{self.name}: no log]"
        return f"[{self.name} log, last {len(lines)} lines]\n" + "\n".join(lines)


class ProcessPool:
    """Owns processes for one test; `async with` stops them all on the way out.

    Use it from a fixture so cleanup runs however the test ends::

        @pytest.fixture
        async def procs(tmp_path: Path) -> AsyncIterator[ProcessPool]:
            async with ProcessPool(tmp_path) as pool:
                yield pool
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[ManagedProcess] = []

    def add(
        self, argv: Sequence[str], *, name: str, env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        proc = ManagedProcess(argv, log_dir=self.log_dir, name=name, env=env)
        self._procs.append(proc)
        return proc

    async def start(
        self,
        argv: Sequence[str],
        *,
        name: str,
        ready_port: int,
        timeout: float = 15.0,
        env: Mapping[str, str] | None = None,
    ) -> ManagedProcess:
        proc = self.add(argv, name=name, env=env)
        await proc.start(ready_port=ready_port, timeout=timeout)
        return proc

    async def aclose(self) -> None:
        await asyncio.gather(*(p.stop() for p in self._procs))

    async def __aenter__(self) -> ProcessPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
        if exc is not None:
            # Captured output is shown for failing tests: this is what the servers said.
            for p in self._procs:
                print(p.log_tail(), file=sys.stderr)
