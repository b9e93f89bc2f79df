"""Building blocks of the chaos suite: a client that records what it receives and when, the
exactly-once check, a watcher that holds the control plane to "persisted positions never go
backwards", and the row each scenario adds to the summary table.

Invariants the checks enforce (they are what Tether promises, README "Sessions that outlive a
sidecar"):
1. The client sees every event of a resumable stream exactly once, in order: the progress
   numbers are 1..N with no gap and no repeat, one final result, and the sidecar's ids
   (`<stream>.<epoch>.<seq>`) are unique and strictly increasing by `(epoch, seq)`.
2. Per (session, stream), the `(owner_epoch, seq)` the control plane persists never decreases
   across everything a watcher observes: the snapshot, every change, and again after the watch
   is re-opened (a control plane that restarted must not have lost what it acknowledged).
   A `get_session` answer is held to what the watch had shown before the call was made, and to
   the previous answers: a read and a watch event in flight at the same time on two
   connections may arrive in either order, so only those comparisons say something about the
   store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp
import grpc
import pytest

from sidecar.tracker import EventId
from tests.conftest import CHAOS_ROW
from tests.integration.test_proxy import HEADERS, MCP, count_call, initialize
from tests.support.relay import Relay
from tests.support.sse_client import Received, events
from tether.api.client import SessionClient
from tether.model import SessionEventType, SessionId, SessionRecord, StreamId, StreamPosition
from tether.tasks import cancel_and_wait, spawn

DEADLINE_S = 15.0
"""The longest any single wait in a scenario may take before the scenario fails."""
POLL_S = 0.02
"""How often a deadline poll looks again (readiness-probe style, never a synchronisation)."""
WATCH_RETRY_S = 0.05
"""Pause before re-opening a broken watch (a retry backoff)."""


# --- the table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChaosRow:
    """One line of the summary table."""

    scenario: str
    sent: int
    """Events the upstream produced for the client's stream(s) (by construction of the
    numbered upstream, or as read by the sidecar when the upstream cannot replay)."""
    received: int
    lost: int
    duplicated: int
    recover_s: float | None
    """Seconds from the end of the fault to recovery (see the scenario's docstring); None
    when it never recovered (an expected failure)."""
    note: str = ""

    @classmethod
    def of(cls, scenario: str, got: Delivery, recover_s: float | None) -> ChaosRow:
        """The row of a scenario whose stream was checked by `assert_exactly_once`."""
        return cls(scenario, got.sent, got.received, got.lost, got.duplicated, recover_s)


@dataclass
class ChaosTable:
    """Rows of the summary table; `tests/conftest.py` prints it at the end of the run."""

    rows: list[ChaosRow] = field(default_factory=list)

    def add(self, row: ChaosRow) -> None:
        self.rows.append(row)

    def render(self) -> list[str]:
        header = ("scenario", "sent", "received", "lost", "duplicated", "recover_s")
        lines = [header]
        for r in self.rows:
            recover = "-" if r.recover_s is None else f"{r.recover_s:.2f}"
            name = f"{r.scenario} ({r.note})" if r.note else r.scenario
            lines.append(
                (name, str(r.sent), str(r.received), str(r.lost), str(r.duplicated), recover)
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

        def fmt(line: tuple[str, ...]) -> str:
            first = line[0].ljust(widths[0])
            rest = (c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))
            return "| " + " | ".join([first, *rest]) + " |"

        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return [fmt(lines[0]), rule, *(fmt(line) for line in lines[1:])]


class ReportedChaosTable(ChaosTable):
    """One test's handle on the table: `add` puts the row into the test's report
    (`user_properties`), which reaches the process that prints the summary (tests/conftest.py)
    even when the test ran in a pytest-xdist worker."""

    def __init__(self, item: pytest.Item) -> None:
        super().__init__()
        self._item = item

    def add(self, row: ChaosRow) -> None:
        self._item.user_properties.append((CHAOS_ROW, dataclasses.asdict(row)))


# --- the client ----------------------------------------------------------------------------


class StreamConsumer:
    """Reads SSE responses in a background task, recording each message event and the
    monotonic time it arrived; tests wait on counts with a deadline while injecting faults."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.arrival: list[float] = []
        self.broken: list[str] = []
        """Why each read ended abnormally (the connection died with a sidecar)."""
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()

    @property
    def last_id(self) -> str:
        last = self.received[-1].id if self.received else None
        assert last is not None, "no event with an id received yet"
        return last

    def start(
        self, opener: Callable[[], Any], *, expect_status: int = 200, name: str = "chaos-client"
    ) -> None:
        """Read the response `opener()` gives (an aiohttp request context manager) until it
        ends; call again for the next connection once `finished()` returned."""
        assert self._task is None or self._task.done(), "still reading the previous response"
        self._done.clear()
        self._task = spawn(self._read(opener, expect_status), name=name)

    async def _read(self, opener: Callable[[], Any], expect_status: int) -> None:
        try:
            async with opener() as resp:
                assert resp.status == expect_status, await resp.text()
                async for ev in events(resp):
                    self.received.append(ev)
                    self.arrival.append(time.monotonic())
                    self._changed.set()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            self.broken.append(type(exc).__name__)
        finally:
            self._done.set()
            self._changed.set()

    async def wait_count(self, n: int, *, timeout: float = DEADLINE_S) -> None:
        """Return once `n` events are in; fail with what arrived if not within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.received) < n:
                    if self._done.is_set():
                        raise AssertionError(
                            f"stream ended after {len(self.received)} events, wanted {n}"
                        )
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"only {len(self.received)} events within {timeout}s, wanted {n}"
            ) from None

    async def wait_new_event(self, *, timeout: float) -> bool:
        """True once one more event arrives, False if none does within `timeout`."""
        start = len(self.received)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while len(self.received) == start and not self._done.is_set():
                    self._changed.clear()
                    await self._changed.wait()
        return len(self.received) > start

    async def finished(self, *, timeout: float = DEADLINE_S) -> None:
        """Wait until the current response has ended (normally or not)."""
        assert self._task is not None
        try:
            async with asyncio.timeout(timeout):
                await self._done.wait()
        except TimeoutError:
            raise AssertionError(
                f"the stream did not end within {timeout}s ({len(self.received)} events)"
            ) from None
        await self._task  # re-raises an unexpected status

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)

    def longest_gap(self) -> float:
        """The longest time the client waited between two events."""
        return max((b - a for a, b in zip(self.arrival, self.arrival[1:], strict=False)), default=0)

    def first_arrival_after(self, moment: float) -> float | None:
        """Seconds from `moment` to the first event that arrived after it."""
        for t in self.arrival:
            if t > moment:
                return t - moment
        return None


# --- delivery checks -----------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """What a client got from one `count` stream, compared with what was sent."""

    sent: int
    received: int
    lost: int
    duplicated: int
    progress: list[int]
    results: list[Any]


def payload(ev: Received) -> Any:
    return ev.json()


def progress_of(received: list[Received]) -> list[int]:
    out = []
    for ev in received:
        msg = payload(ev)
        if msg.get("method") == "notifications/progress":
            out.append(int(msg["params"]["progress"]))
    return out


def results_of(received: list[Received]) -> list[Any]:
    return [m for m in map(payload, received) if "result" in m or "error" in m]


def delivery(received: list[Received], *, sent: int) -> Delivery:
    """Count lost and duplicated events of a `count` stream whose upstream sent `sent` events
    (progress 1..sent-1, then the result)."""
    progress = progress_of(received)
    results = results_of(received)
    expected = set(range(1, sent))
    duplicated = (len(progress) - len(set(progress))) + max(0, len(results) - 1)
    lost = len(expected - set(progress)) + (0 if results else 1)
    return Delivery(sent, len(received), lost, duplicated, progress, results)


def assert_sidecar_ids_in_order(received: list[Received]) -> list[EventId]:
    """Every event carries a sidecar id; ids are unique and `(epoch, seq)` strictly grows
    per stream."""
    ids = []
    for ev in received:
        parsed = EventId.parse(ev.id or "")
        assert parsed is not None, f"not a sidecar id: {ev.id!r}"
        ids.append(parsed)
    assert len({str(i) for i in ids}) == len(ids), "an event id was delivered twice"
    last: dict[str, tuple[int, int]] = {}
    for i in ids:
        prev = last.get(i.stream)
        assert prev is None or i.order > prev, f"id {i} after {prev}: out of order"
        last[i.stream] = i.order
    return ids


def assert_exactly_once(received: list[Received], *, n: int) -> Delivery:
    """The `count n` stream arrived whole: 1..n once each, in order, then one result."""
    d = delivery(received, sent=n + 1)
    assert d.progress == list(range(1, n + 1)), (
        f"progress not 1..{n} exactly once in order: lost {d.lost}, duplicated {d.duplicated}"
    )
    assert len(d.results) == 1, d.results
    assert "result" in d.results[0], d.results[0]
    assert payload(received[-1]) == d.results[0], "the result is not the last event"
    assert_sidecar_ids_in_order(received)
    return d


# --- the control plane, watched --------------------------------------------------------------


@dataclass(frozen=True)
class Regression:
    """A persisted position that went backwards: the invariant this watcher exists for."""

    session_id: str
    stream_id: str
    before: tuple[int, int]
    after: tuple[int, int]
    source: str


class PositionWatcher:
    """Watches every session on a control plane (snapshot, then changes) for a scenario's
    whole length, re-opening the watch when the control plane goes away, and records any
    `(owner_epoch, seq)` that decreases. `async with PositionWatcher(address) as w:`."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.positions: dict[tuple[str, str], StreamPosition] = {}
        """The greatest position of each (session, stream) the watch has shown."""
        self.reads: dict[tuple[str, str], StreamPosition] = {}
        """The greatest position of each (session, stream) `get_session` has answered."""
        self.regressions: list[Regression] = []
        self.events_seen = 0
        self.watches_opened = 0
        self._changed = asyncio.Event()
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PositionWatcher:
        self._task = spawn(self._run(), name=f"chaos-watch {self.address}")
        try:
            async with asyncio.timeout(DEADLINE_S):
                await self._synced.wait()
        except BaseException:
            await cancel_and_wait(self._task)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_and_wait(self._task)

    async def reopen(self) -> None:
        """Drop the current watch and open a new one (what is known so far is kept). For a
        control plane replaced behind a silent network: this watch only reads, so it would
        never learn that its connection is dead."""
        await cancel_and_wait(self._task)
        self._synced.clear()
        self._task = spawn(self._run(), name=f"chaos-watch {self.address}")
        try:
            async with asyncio.timeout(DEADLINE_S):
                await self._synced.wait()
        except TimeoutError:
            raise AssertionError(f"the watch of {self.address} did not sync again") from None

    async def _run(self) -> None:
        while True:
            try:
                async with grpc.aio.insecure_channel(self.address) as channel:
                    self.watches_opened += 1
                    async for ev in SessionClient(channel).watch_sessions():
                        self.events_seen += 1
                        if ev.type is SessionEventType.SYNCED:
                            self._synced.set()
                        elif ev.type is SessionEventType.PUT and ev.session is not None:
                            self.observe(ev.session, source=f"watch #{self.watches_opened}")
            except grpc.aio.AioRpcError:
                pass  # the control plane went away: watch again once it is back
            await asyncio.sleep(WATCH_RETRY_S)  # a re-watch pace, not a wait

    def observe(self, record: SessionRecord, *, source: str) -> None:
        """Check and remember every stream position of `record`, as the watch delivered it
        (in the store's order)."""
        self._check(record, self.positions, source)
        self._remember(record, self.positions)
        self._changed.set()

    def floor(self) -> dict[tuple[str, str], StreamPosition]:
        """What the watch has shown so far: a read made from now on must show at least this."""
        return dict(self.positions)

    def observe_read(
        self, record: SessionRecord, floor: Mapping[tuple[str, str], StreamPosition]
    ) -> None:
        """Check a `get_session` answer against `floor` (taken before the call) and against
        the previous answers (reads are made one after the other)."""
        self._check(record, floor, "get_session vs watch")
        self._check(record, self.reads, "get_session vs earlier get_session")
        self._remember(record, self.reads)

    def _check(
        self,
        record: SessionRecord,
        seen: Mapping[tuple[str, str], StreamPosition],
        source: str,
    ) -> None:
        for stream_id, pos in record.streams.items():
            old = seen.get((record.session_id, stream_id))
            if old is not None and pos.order < old.order:
                self.regressions.append(
                    Regression(record.session_id, stream_id, old.order, pos.order, source)
                )

    @staticmethod
    def _remember(record: SessionRecord, into: dict[tuple[str, str], StreamPosition]) -> None:
        for stream_id, pos in record.streams.items():
            key = (record.session_id, stream_id)
            old = into.get(key)
            if old is None or pos.order > old.order:
                into[key] = pos

    def position(self, session_id: str, stream_id: str) -> StreamPosition | None:
        return self.positions.get((session_id, stream_id))

    async def wait_position(
        self, session_id: str, target: EventId, *, timeout: float = DEADLINE_S
    ) -> StreamPosition:
        """Return the persisted position of `target`'s stream once it reaches `target`."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    pos = self.position(session_id, target.stream)
                    if pos is not None and pos.order >= target.order:
                        return pos
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"the watch never showed {target} persisted within {timeout}s "
                f"(last seen: {self.position(session_id, target.stream)})"
            ) from None

    async def wait_any_change(self, *, timeout: float) -> bool:
        """True once any position changes, False if none does within `timeout`."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        return self._changed.is_set()

    def assert_never_backwards(self) -> None:
        assert not self.regressions, f"persisted positions went backwards: {self.regressions}"
        assert self.positions, "the watch observed no stream position at all"


async def poll_persisted(
    address: str,
    session_id: str,
    target: EventId,
    *,
    watcher: PositionWatcher | None = None,
    exact: bool = True,
    timeout: float = DEADLINE_S,
) -> StreamPosition:
    """Poll `get_session` until `target`'s stream is persisted at `target`'s order (a deadline
    poll: the control plane may be restarting); with `exact`, fail if it is beyond it (the
    client was sent less than that). Every answer is also checked by `watcher`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: StreamPosition | None = None
    async with grpc.aio.insecure_channel(address) as channel:
        client = SessionClient(channel)
        while True:
            record: SessionRecord | None = None
            floor = watcher.floor() if watcher is not None else {}
            with contextlib.suppress(grpc.aio.AioRpcError):
                record = await client.get_session(SessionId(session_id), timeout=1.0)
            if record is not None:
                if watcher is not None:
                    watcher.observe_read(record, floor)
                last = record.streams.get(StreamId(target.stream))
                if last is not None and last.order >= target.order:
                    assert not exact or last.order == target.order, (
                        f"persisted {last.last_event_id} is beyond what the client was sent "
                        f"({target})"
                    )
                    return last
            if loop.time() >= deadline:
                raise AssertionError(
                    f"persisted position never reached {target} within {timeout}s (last: {last})"
                )
            await asyncio.sleep(POLL_S)  # poll interval; the deadline is above


async def assert_delivered_and_persisted(
    client: StreamConsumer, *, n: int, address: str, session_id: str, watcher: PositionWatcher
) -> tuple[Delivery, EventId, StreamPosition]:
    """The end of a `count n` scenario: the client got the stream whole
    (`assert_exactly_once`) and the store holds exactly the client's last event."""
    got = assert_exactly_once(client.received, n=n)
    last = EventId.parse(client.last_id)
    assert last is not None
    persisted = await poll_persisted(address, session_id, last, watcher=watcher)
    return got, last, persisted


# --- loopback partitions -----------------------------------------------------------------------


class LoopbackPartition(Relay):
    """A relay that can partition its two sides: `partition()` aborts every open connection
    (the peers see a reset) and refuses new ones until `heal()`. The loopback stand-in for a
    network cut where network namespaces are not available; unlike a real cut it is never
    silent, so it cannot show a peer that waits forever on a dead connection."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.down = False
        self.refused = 0

    async def __aenter__(self) -> LoopbackPartition:
        await super().__aenter__()
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def partition(self) -> None:
        self.down = True
        self.cut()

    def heal(self) -> None:
        self.down = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            self.refused += 1
            writer.transport.abort()
            return
        await super()._accept(reader, writer)


async def start_count_stream(
    http: aiohttp.ClientSession, base: str, *, n: int, interval_ms: int
) -> tuple[str, dict[str, str], StreamConsumer]:
    """Open a session through `base` and start reading a `count` tool call of `n` events in
    the background; returns the session id, its request headers and the consumer."""
    sid = await initialize(http, base)
    headers = {**HEADERS, "Mcp-Session-Id": sid}
    client = StreamConsumer()
    client.start(
        lambda: http.post(base + MCP, json=count_call(n, interval_ms=interval_ms), headers=headers)
    )
    return sid, headers, client
