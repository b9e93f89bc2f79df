"""What a caller-chosen `Mcp-Session-Id` may cost a sidecar: bounded memory and bounded
control-plane calls, whatever the ids and however many.

Invalid ids create no state and never reach the control plane; an unknown id costs one
`GetSession` per cache period; every per-session structure (locks, the unknown cache, the
fenced set, the reporter's session table) is freed when its session ends here: deleted,
expired or fenced. `GetSession` calls are counted where they land, on a real control plane
(a grpc.aio server interceptor in front of the real servicer).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import pytest

import controlplane.identity
import controlplane.server
from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.server import RunningControlPlane, start_control_plane
from sidecar.app import RunningSidecar
from sidecar.continuity import (
    ADOPT_GRACE,
    ADOPT_POLL,
    ADOPT_WAITERS,
    UNKNOWN_SESSION_CACHE,
    UNKNOWN_SESSION_TTL,
    Continuity,
    KeyedLocks,
    RecentIds,
)
from sidecar.reporter import Reporter
from tests.integration.conftest import SidecarFactory
from tests.integration.test_proxy import HEADERS, MCP, count_call, progress_numbers
from tests.integration.test_security import initialize_as
from tests.support.sse_client import collect
from tether.api.client import SessionClient
from tether.model import SessionId

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

DEADLINE = 20.0
PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


class CallCounter(_ServerInterceptor):
    """Counts the control plane's incoming calls by method name (`GetSession`, ...)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        self.calls[details.method.rpartition("/")[2]] += 1
        return await continuation(details)


@pytest.fixture
async def counted_plane(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[RunningControlPlane, CallCounter]]:
    """A real control plane over a SQLite file, with a call counter among its interceptors
    (added where the server takes its interceptors from, so the server is built as in
    production)."""
    counter = CallCounter()
    production = controlplane.identity.server_interceptors
    monkeypatch.setattr(
        controlplane.server,
        "server_interceptors",
        lambda security: [*production(security), counter],
    )
    plane = await start_control_plane(
        ControlPlaneConfig(listen="127.0.0.1:0", store=SqliteUrl(tmp_path / "s.db"))
    )
    try:
        yield plane, counter
    finally:
        await plane.stop()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition` (state changed by the sidecar's own tasks), up to DEADLINE."""
    try:
        async with asyncio.timeout(DEADLINE):
            while not condition():  # noqa: ASYNC110 - condition poll with a deadline
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


async def ping_all(
    http: aiohttp.ClientSession, base: str, ids: Iterable[str], *, parallel: int = 32
) -> Counter[int]:
    """POST a ping naming each id as the session; the statuses seen."""
    statuses: Counter[int] = Counter()
    gate = asyncio.Semaphore(parallel)

    async def one(sid: str) -> None:
        async with (
            gate,
            http.post(base + MCP, json=PING, headers={**HEADERS, "Mcp-Session-Id": sid}) as resp,
        ):
            await resp.read()
            statuses[resp.status] += 1

    async with asyncio.TaskGroup() as group:
        for sid in ids:
            group.create_task(one(sid))
    return statuses


def invalid_ids(n: int) -> list[str]:
    """Ids `parse_session_id` refuses: path-like, leading dot, spaces, too long."""
    shapes = ["../{}", ".{}", "a/{}", "a b {}", "{}#", "%2e%2e{}", "y" * 257 + "{}"]
    return [shapes[i % len(shapes)].format(i) for i in range(n)]


def state_of(c: Continuity) -> dict[str, int]:
    assert c.reporter is not None
    return {
        "locks": len(c.locks),
        "unknown": len(c.unknown_sessions),
        "fenced": len(c.fenced_sessions),
        "reporter sessions": c.reporter.sessions,
        "reporter fences": c.reporter.fences,
    }


def reporter_of(sidecar: RunningSidecar) -> Reporter:
    reporter = sidecar.proxy.continuity.reporter
    assert reporter is not None
    return reporter


async def settled(reporter: Reporter) -> None:
    async with asyncio.timeout(DEADLINE):
        await reporter.flushed()


async def test_unknown_and_invalid_ids_cost_bounded_calls_and_memory(
    counted_plane: tuple[RunningControlPlane, CallCounter],
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    plane, counter = counted_plane
    async with numbered_upstream(strict_sessions=True) as up:
        sidecar = await sidecar_factory(up, control_plane=plane.address, owner="a")
        continuity = sidecar.proxy.continuity
        base = f"http://127.0.0.1:{sidecar.port}"

        # One unknown id, over and over: the lookups of one wait for it to be stored
        # (continuity invariant 11) per cache period.
        per_wait = 1 + round(ADOPT_GRACE / ADOPT_POLL)
        started = time.monotonic()
        stale = secrets.token_hex(16)
        assert await ping_all(http, base, [stale] * 1000) == {404: 1000}
        periods = 1 + int((time.monotonic() - started) / UNKNOWN_SESSION_TTL)
        assert 1 <= counter.calls["GetSession"] <= periods * per_wait

        # Invalid ids: no call, no state.
        before = counter.calls["GetSession"]
        assert await ping_all(http, base, invalid_ids(2000)) == {404: 2000}
        assert counter.calls["GetSession"] == before
        assert len(continuity.locks) == 0

        # Random unknown ids: one call each, or a few more for the ones that waited for the
        # session to be stored (continuity invariant 11: at most ADOPT_WAITERS at once), and
        # the memory stays bounded.
        before = counter.calls["GetSession"]
        started = time.monotonic()
        fresh = [secrets.token_hex(16) for _ in range(2000)]
        assert await ping_all(http, base, fresh) == {404: 2000}
        calls = counter.calls["GetSession"] - before
        waited = ADOPT_WAITERS * (1 + int((time.monotonic() - started) / ADOPT_GRACE))
        assert len(fresh) <= calls <= len(fresh) + (per_wait - 1) * waited
        state = state_of(continuity)
        assert 0 < state.pop("unknown") <= UNKNOWN_SESSION_CACHE  # some may have expired
        assert state == {
            "locks": 0,
            "fenced": 0,
            "reporter sessions": 0,
            "reporter fences": 0,
        }
        assert not sidecar.proxy.registry.sessions
        # The cache lets go of what it holds once its period is over.
        await until(lambda: len(continuity.unknown_sessions) == 0, "the unknown ids expire")


async def test_a_fenced_then_deleted_session_leaves_nothing_behind(
    counted_plane: tuple[RunningControlPlane, CallCounter],
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """A creates the session, B takes it over, A is fenced off (and keeps only the fence);
    the client then deletes the session through A: nothing of it remains on A."""
    plane, _ = counted_plane
    async with numbered_upstream(interval_ms=1) as up:
        a = await sidecar_factory(up, control_plane=plane.address, owner="a")
        b = await sidecar_factory(up, control_plane=plane.address, owner="b")
        await until(a.proxy.continuity.watch_synced.is_set, "A follows its sessions")
        base_a, base_b = f"http://127.0.0.1:{a.port}", f"http://127.0.0.1:{b.port}"
        sid = await initialize_as(http, base_a, "alice")
        alice = {**HEADERS, "Mcp-Session-Id": sid, "Authorization": "Bearer alice"}
        async with http.post(base_a + MCP, json=count_call(3), headers=alice) as resp:
            assert progress_numbers(await collect(resp)) == [1, 2, 3]
        await settled(reporter_of(a))
        assert reporter_of(a).sessions == 1

        async with http.post(base_b + MCP, json=count_call(3), headers=alice) as resp:
            assert progress_numbers(await collect(resp)) == [1, 2, 3]
        assert b.proxy.continuity.adoptions == 1
        # A learns of the takeover from its ownership watch, without reporting anything.
        await until(lambda: sid in a.proxy.continuity.fenced_sessions, "A is fenced off")
        await settled(reporter_of(a))
        assert state_of(a.proxy.continuity) == {
            "locks": 0,
            "unknown": 0,
            "fenced": 1,
            "reporter sessions": 0,
            "reporter fences": 1,
        }

        # Back to A: it adopts the session again (epoch 3), reports it again, and forgets the
        # fence (here and in its reporter).
        async with http.post(base_a + MCP, json=count_call(2, rid=10), headers=alice) as resp:
            back = await collect(resp)
        assert progress_numbers(back) == [1, 2]
        await settled(reporter_of(a))
        assert state_of(a.proxy.continuity) == {
            "locks": 0,
            "unknown": 0,
            "fenced": 0,
            "reporter sessions": 1,
            "reporter fences": 0,
        }
        async with grpc.aio.insecure_channel(plane.address) as channel:
            stored = await SessionClient(channel).get_session(SessionId(sid), timeout=DEADLINE)
        assert stored is not None
        assert (stored.owner, stored.owner_epoch) == ("a", 3)
        assert back[-1].id in {p.last_event_id for p in stored.streams.values()}

        async with http.delete(base_a + MCP, headers=alice) as resp:
            assert resp.status in (200, 202, 204)
        await settled(reporter_of(a))
        assert not a.proxy.registry.sessions
        assert state_of(a.proxy.continuity) == {
            "locks": 0,
            "unknown": 1,  # continuity rule 3: a late request must not restore it
            "fenced": 0,
            "reporter sessions": 0,
            "reporter fences": 0,
        }
        # ...for UNKNOWN_SESSION_TTL only.
        await until(lambda: not a.proxy.continuity.unknown_sessions, "the deleted id let go")


async def test_sessions_that_expire_here_are_let_go(
    counted_plane: tuple[RunningControlPlane, CallCounter],
    sidecar_factory: SidecarFactory,
    numbered_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    """Idle sessions expire from the registry, fenced ones from the fenced set: the reporter
    lets both go (once what it had of them is acknowledged)."""
    plane, _ = counted_plane
    short = {"orphan_timeout": 0.2, "stream_linger": 0.2, "session_idle_timeout": 0.3}
    async with numbered_upstream(interval_ms=1) as up:
        a = await sidecar_factory(up, control_plane=plane.address, owner="a", **short)
        b = await sidecar_factory(up, control_plane=plane.address, owner="b")
        a.proxy.continuity.fenced_sessions.ttl = 0.5
        await until(a.proxy.continuity.watch_synced.is_set, "A follows its sessions")
        base_a, base_b = f"http://127.0.0.1:{a.port}", f"http://127.0.0.1:{b.port}"
        idle = await initialize_as(http, base_a, "alice")
        taken = await initialize_as(http, base_a, "alice")
        for sid in (idle, taken):
            headers = {**HEADERS, "Mcp-Session-Id": sid, "Authorization": "Bearer alice"}
            async with http.post(base_a + MCP, json=count_call(2), headers=headers) as resp:
                assert progress_numbers(await collect(resp)) == [1, 2]
        await settled(reporter_of(a))
        assert reporter_of(a).sessions == 2

        headers = {**HEADERS, "Mcp-Session-Id": taken, "Authorization": "Bearer alice"}
        async with http.post(base_b + MCP, json=count_call(2), headers=headers) as resp:
            assert progress_numbers(await collect(resp)) == [1, 2]
        await until(lambda: taken in a.proxy.continuity.fenced_sessions, "A is fenced off")

        await until(lambda: not a.proxy.registry.sessions, "both sessions leave A's registry")
        await until(lambda: reporter_of(a).sessions == 0, "the reporter lets them go")
        await until(lambda: len(a.proxy.continuity.fenced_sessions) == 0, "the fence expires")
        assert len(a.proxy.continuity.locks) == 0


# The bounded structures on their own (no I/O, fake time).


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_recent_ids_are_bounded_and_expire() -> None:
    clock = FakeTime()
    ids = RecentIds(capacity=3, ttl=2.0, clock=clock)
    for k in "abcd":
        ids.add(k)
    assert len(ids) == 3
    assert "a" not in ids  # the oldest went first
    clock.now += 1.0
    ids.add("b")  # re-adding refreshes
    clock.now += 1.5
    assert ("b" in ids, "c" in ids, "d" in ids) == (True, False, False)
    ids.discard("b")
    assert len(ids) == 0
    off = RecentIds(capacity=3, ttl=0.0, clock=clock)
    off.add("a")
    assert "a" not in off


async def test_keyed_locks_exist_only_while_used() -> None:
    locks = KeyedLocks()
    inside = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("k"):
            inside.set()
            await release.wait()

    async def waiter() -> None:
        async with locks.hold("k"):
            pass

    async with asyncio.TaskGroup() as group:
        group.create_task(holder())
        await inside.wait()
        group.create_task(waiter())
        cancelled = group.create_task(waiter())
        await until(lambda: locks.users("k") == 3, "both wait for the lock")
        assert len(locks) == 1
        cancelled.cancel()
        await until(lambda: locks.users("k") == 2, "the cancelled one left")
        release.set()
    assert cancelled.cancelled()
    assert len(locks) == 0
