"""The ownership protocol (docs/ownership.md), tested as a protocol: Hypothesis interleaves
client reads, client switches between sidecars, sidecar restarts (graceful or crash-like) and
the passing of time (leases, expiry), and the invariants are checked after every step.

Everything is real and in-process: a control plane (grpc.aio on port 0) over a SQLite file
with a short session TTL, three sidecars reporting to it, and the numbered upstream, whose
standalone GET stream sends `data.k = 1, 2, 3, ...` and resumes from any `Last-Event-ID`.
One event loop per state-machine run; each rule's coroutine runs on it to completion.

Invariants (numbered as in docs/ownership.md):
  I1. The client gets every event k = 1..n exactly once, in order, across every switch; a
      resume refused while the session must still exist is a loss.
  I2. The ids the client sees increase in (epoch, seq) and stay on one stream.
  I3. Lease: while a live sidecar holds the session, the store has it (a session being
      served does not expire).
  I4-I6. Stored positions and owner epochs never go backwards; one owner per epoch
      (`tests.support.ownership_observer`, fed by WatchSessions and by polling the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.server import RunningControlPlane, start_control_plane
from controlplane.store.sqlite import SqliteSessionStore, SqliteStoreConfig
from sidecar.app import RunningSidecar, start_sidecar
from sidecar.config import SidecarConfig
from sidecar.tracker import EventId, TrackerLimits
from tests.integration.conftest import serve_app
from tests.support.numbered_upstream import make_app
from tests.support.ownership_observer import OwnershipObserver
from tests.support.sse_client import Received, events
from tests.support.waiting import eventually
from tether import tasks
from tether.api.client import SessionClient
from tether.model import SessionEventType, SessionId

T = TypeVar("T")

SLOTS = 3
TTL = 1.0
"""The control plane's session TTL: short, so that leases and expiry happen within a run."""
SWEEP = 0.05
LONGER_THAN_TTL = TTL * 1.6
"""What `time_passes` sleeps: the scenario itself (a client away for more than a TTL)."""
MAY_HAVE_EXPIRED_AFTER = TTL * 0.5
"""Once no live sidecar owns the session, it may legitimately expire after this long (a
lease renewed every TTL/2 or more often has at least this much left)."""
EVENT_INTERVAL_MS = 10
READ_TIMEOUT = 5.0
MCP = "/mcp"
VERSION = "2025-11-25"
HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": VERSION,
}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": VERSION,
        "capabilities": {},
        "clientInfo": {"name": "protocol-test", "version": "1"},
    },
}


class Client:
    """An MCP client holding one session and at most one open GET stream."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self.session_id = ""
        self.slot: int | None = None
        """The sidecar whose stream is open, if any."""
        self.resp: aiohttp.ClientResponse | None = None
        self.reader: AsyncIterator[Received] | None = None
        self.ks: list[int] = []
        self.ids: list[EventId] = []
        self.sessions_started = 0

    @property
    def last_event_id(self) -> str:
        return str(self.ids[-1])

    async def disconnect(self) -> None:
        if self.reader is not None:
            with contextlib.suppress(Exception):
                await self.reader.aclose()  # type: ignore[attr-defined]
        if self.resp is not None:
            self.resp.close()
        self.resp, self.reader, self.slot = None, None, None

    async def open(self, base: str, slot: int, *, last_event_id: str | None) -> int:
        """GET the session's standalone stream (a resume with `last_event_id`); the status."""
        headers = {**HEADERS, "Accept": "text/event-stream", "Mcp-Session-Id": self.session_id}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        resp = await self.http.get(base + MCP, headers=headers)
        if resp.status != 200:
            await resp.read()
            resp.release()
            return resp.status
        self.resp, self.slot = resp, slot
        self.reader = events(resp).__aiter__()
        return 200

    async def read(self, k: int) -> str | None:
        """Read k events; None, or what went wrong (the stream ended or stalled)."""
        assert self.reader is not None
        for _ in range(k):
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    ev = await anext(self.reader)
            except StopAsyncIteration:
                return f"the stream ended under the client after {self.ks[-1:]}"
            except TimeoutError:
                return f"no event within {READ_TIMEOUT} s after {self.ks[-1:]}"
            except aiohttp.ClientError as e:
                return f"the stream broke after {self.ks[-1:]}: {e!r}"
            self.ks.append(int(ev.json()["params"]["data"]["k"]))
            parsed = EventId.parse(ev.id or "")
            if parsed is None:
                return f"event {self.ks[-1]} carries no Tether id: {ev.id!r}"
            self.ids.append(parsed)
        return None


class OwnershipProtocol(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="tether-protocol-"))
        self.stack = contextlib.AsyncExitStack()
        self.observer = OwnershipObserver()
        self.sidecars: list[RunningSidecar] = []
        self.generation = [0] * SLOTS
        self.owner_slot: int | None = None
        """The sidecar the client last reached: the session's rightful owner (model)."""
        self.unowned_since: float | None = None
        """When the rightful owner went away (restarted); None while it lives."""
        self.problems: list[str] = []
        """Client-side violations (I1, I2) noticed inside rules."""
        self.watch_task: asyncio.Task[None] | None = None
        self.closing = False
        self._run(self._start())

    # -- plumbing --------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def _start(self) -> None:
        store = await SqliteSessionStore.open(
            SqliteStoreConfig(path=self.tmp / "sessions.db", session_ttl=TTL, sweep_interval=SWEEP)
        )
        self.cp: RunningControlPlane = await start_control_plane(
            ControlPlaneConfig(
                listen="127.0.0.1:0",
                store=SqliteUrl(self.tmp / "sessions.db"),
                session_ttl=TTL,
                flush_interval=0.01,
                shutdown_grace=0.5,
            ),
            store=store,
        )
        self.upstream = await self.stack.enter_async_context(
            serve_app(make_app(interval_ms=EVENT_INTERVAL_MS))
        )
        self.channel = grpc.aio.insecure_channel(self.cp.address)
        self.watch_task = tasks.spawn(self._watch(), name="protocol-test-watch")
        for slot in range(SLOTS):
            self.sidecars.append(await self._start_sidecar(slot))
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        self.client = Client(self.http)
        await self._new_session(0)

    async def _start_sidecar(self, slot: int) -> RunningSidecar:
        self.generation[slot] += 1
        return await start_sidecar(
            SidecarConfig(
                listen_host="127.0.0.1",
                listen_port=0,
                upstream=self.upstream,
                control_plane=self.cp.address,
                owner=f"s{slot}-g{self.generation[slot]}",
                report_interval=0.02,
                # A stream nobody reads pauses after 32 events: its reports stop, so only a
                # lease keeps its session alive.
                tracker=TrackerLimits(replay_max_events=64, index_max_events=4096),
            )
        )

    def _base(self, slot: int) -> str:
        return f"http://127.0.0.1:{self.sidecars[slot].port}"

    async def _new_session(self, slot: int) -> None:
        """Initialize a session on `slot`, open its GET stream, read its first event."""
        client = self.client
        await client.disconnect()
        async with self.http.post(self._base(slot) + MCP, json=INITIALIZE, headers=HEADERS) as r:
            assert r.status == 200, await r.text()
            client.session_id = r.headers["Mcp-Session-Id"]
            await r.read()
        client.ks, client.ids = [], []
        client.sessions_started += 1
        sid = SessionId(client.session_id)
        await eventually(
            lambda: self.cp.store.get(session_id=sid),
            timeout=5,
            what="the new session in the store",
        )
        status = await client.open(self._base(slot), slot, last_event_id=None)
        assert status == 200, f"opening the GET stream answered {status}"
        self.owner_slot, self.unowned_since = slot, None
        await self._read(1)

    async def _watch(self) -> None:
        """Feed every record the control plane publishes to the observer (I4-I6)."""
        try:
            async for ev in SessionClient(self.channel).watch_sessions():
                if ev.type is SessionEventType.PUT and ev.session is not None:
                    self.observer.observe(ev.session, source="watch")
        except grpc.aio.AioRpcError as e:
            if not self.closing:
                self.problems.append(f"the watch ended: {e.code().name} {e.details()}")

    async def _read(self, k: int) -> None:
        problem = await self.client.read(k)
        if problem is not None:
            self.problems.append(f"I1: {problem}")

    # -- rules -----------------------------------------------------------------------------

    # No preconditions on what the system did (a switch that failed, say): Hypothesis needs
    # the same draws when it replays a case, so a rule that does not apply is a no-op.
    @rule(k=st.integers(1, 12))
    def read(self, k: int) -> None:
        """The client reads k events from its current sidecar, if it has one."""
        if self.client.slot is not None:
            self._run(self._read(k))

    @rule(to=st.integers(0, SLOTS - 1))
    def switch(self, to: int) -> None:
        """The client (connected or not) resumes its stream on sidecar `to` with its
        Last-Event-ID alone, as a client behind a load balancer would."""
        self._run(self._switch(to))

    async def _switch(self, to: int) -> None:
        client = self.client
        await client.disconnect()
        status = await client.open(self._base(to), to, last_event_id=client.last_event_id)
        if status == 200:
            self.owner_slot, self.unowned_since = to, None
            return
        may_be_gone = (
            self.unowned_since is not None
            and time.monotonic() - self.unowned_since > MAY_HAVE_EXPIRED_AFTER
        )
        if may_be_gone and status in (404, 410):
            # Nobody owned it for longer than a lease may last: gone by design. Start over.
            await self._new_session(to)
            return
        self.problems.append(
            f"I1: resuming at {client.last_event_id} (k={client.ks[-1]}) on sidecar {to} "
            f"answered {status}; the session's owner "
            + (
                f"is sidecar {self.owner_slot}, alive"
                if self.unowned_since is None
                else f"went away {time.monotonic() - self.unowned_since:.2f} s ago"
            )
        )

    @rule()
    def leave(self) -> None:
        """The client drops its connection (it keeps its Last-Event-ID)."""
        self._run(self.client.disconnect())

    @rule(slot=st.integers(0, SLOTS - 1), crash=st.booleans())
    def restart(self, slot: int, crash: bool) -> None:
        """Sidecar `slot` goes away (a crash loses its unsent reports) and a new sidecar
        with a new name takes its place."""
        self._run(self._restart(slot, crash=crash))

    async def _restart(self, slot: int, *, crash: bool) -> None:
        if self.client.slot == slot:
            await self.client.disconnect()
        old = self.sidecars[slot]
        reporter = old.proxy.continuity.reporter
        if crash and reporter is not None:
            await reporter.stop(flush_timeout=0)
        await old.stop()
        if self.owner_slot == slot:
            self.owner_slot, self.unowned_since = None, time.monotonic()
        self.sidecars[slot] = await self._start_sidecar(slot)

    @rule()
    def time_passes(self) -> None:
        """More than a TTL goes by: leases must be renewed, or sessions expire."""
        self._run(asyncio.sleep(LONGER_THAN_TTL))  # the scenario, not synchronisation

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def client_got_every_event_once_in_order(self) -> None:
        """I1 and I2."""
        problems = [p for p in self.problems if p.startswith("I1")]
        assert not problems, problems[0]
        ks = self.client.ks
        assert ks == list(range(1, len(ks) + 1)), f"I1: the client got {_runs(ks)}"
        ids = self.client.ids
        assert len({i.stream for i in ids}) <= 1, f"I2: ids on several streams: {ids}"
        orders = [i.order for i in ids]
        assert all(a < b for a, b in itertools.pairwise(orders)), (
            f"I2: ids went backwards or repeated: {orders}"
        )

    @invariant()
    def a_session_served_is_not_expired(self) -> None:
        """I3, the lease: while a live sidecar holds the session, the store has it."""
        sid = SessionId(self.client.session_id)
        record = self._run(self.cp.store.get(session_id=sid))
        holders = [
            s.proxy.continuity.owner for s in self.sidecars if sid in s.proxy.registry.sessions
        ]
        assert record is not None or not holders, (
            f"I3: session {sid} is gone from the store while {holders} hold it"
        )
        if record is not None:
            self.observer.observe(record, source="poll")

    @invariant()
    def the_store_never_goes_back(self) -> None:
        """I4, I5, I6 (as observed through WatchSessions and polling)."""
        assert not self.observer.violations, self.observer.violations[0]
        others = [p for p in self.problems if not p.startswith("I1")]
        assert not others, others[0]

    def teardown(self) -> None:
        try:
            self._run(self._stop())
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    async def _stop(self) -> None:
        self.closing = True
        await self.client.disconnect()
        await self.http.close()
        for s in self.sidecars:
            await s.stop()
        await tasks.cancel_and_wait(self.watch_task)
        await self.channel.close(None)
        await self.cp.stop(grace=0.5)
        await self.stack.aclose()


def _runs(ks: list[int]) -> str:
    """`1..40, 38..55` for a list with a repeat: readable in a failure message."""
    if not ks:
        return "nothing"
    runs, start = [], ks[0]
    for a, b in itertools.pairwise(ks):
        if b != a + 1:
            runs.append(f"{start}..{a}")
            start = b
    runs.append(f"{start}..{ks[-1]}")
    return ", ".join(runs)


OwnershipProtocol.TestCase.settings = settings(
    max_examples=6,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestOwnershipProtocol = OwnershipProtocol.TestCase
