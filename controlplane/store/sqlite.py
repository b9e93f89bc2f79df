"""The embedded session store: one SQLite file in WAL mode (`sqlite:///path`).

Implements `controlplane.store.protocol.SessionStore` for a single control-plane process:

  * All SQLite work runs on one dedicated thread with one connection, so the event loop never
    blocks on disk and operations are serialised in submission order.
  * Every `apply` batch is one `BEGIN IMMEDIATE` transaction: many sessions, one fsync.
Rules:
  1. Each committed change gets an in-process revision, and the store's thread hands the
     events of a transaction to the event loop (`call_soon_threadsafe`) before it runs the
     next operation: watchers receive changes in revision order, even if the coroutine that
     asked for the write was cancelled meanwhile.
  2. A watch subscribes first, then reads its snapshot in pages of `SNAPSHOT_PAGE_SIZE`
     (keyset pagination by session id), each page on the store's thread at a known revision.
     Page i shows the sessions in its id range as of its revision r_i, so a queued change of
     a session in that range is delivered after SYNCED only if its revision is above r_i:
     no change is lost and none shown twice or backwards. Memory: one page, plus one
     (id, revision) pair per page read.
  3. Expiry: a sweeper task deletes sessions whose `expires_at` has passed, every
     `sweep_interval` seconds, in transactions of at most `SNAPSHOT_PAGE_SIZE` sessions, and
     watchers get EXPIRE events. Until swept, an expired row is already invisible to reads
     and is treated as missing (and expired) by writes.
  4. Sessions per owner: a write that gives an owner a session counts the owner's live
     sessions inside the same `BEGIN IMMEDIATE` transaction (writers are serialised), so the
     limit is exact.
  5. Tombstones (`controlplane.records` rule 9): a delete, and an expiry found by a read or
     a sweep, put the session's tombstone in the same transaction, kept until one
     `session_ttl` after the session ended; the sweeper removes tombstones past that. A
     creation reads the tombstone and removes it inside the `BEGIN IMMEDIATE` transaction
     that inserts the session, so the check and the creation are atomic.
  6. Upstream sessions (`controlplane.records` rule 10): `upstream_sessions` maps an
     upstream session id to the session that named it last; a delete or an expiry removes
     the session's row. A holder counts only if it is live and still names that id, so a
     row left behind refuses nothing. The lookup and the write share the transaction.
  7. Durability: `synchronous=NORMAL` with WAL survives a process crash or restart; a power
     loss may drop the last transactions (acknowledged batches included).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import sqlite3
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from controlplane import records
from controlplane.store.codec import (
    clamp_page_size,
    decode_page_token,
    decode_record,
    encode_page_token,
    encode_record,
)
from controlplane.store.protocol import (
    DEFAULT_MAX_SESSIONS_PER_OWNER,
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    SNAPSHOT_PAGE_SIZE,
    ApplyResult,
    OwnerLimitError,
    OwnerLimitReached,
    SessionNotFoundError,
    StoreUnavailableError,
    WatchLaggedError,
    WritesRefused,
)
from tether import tasks
from tether.model import (
    OwnerName,
    SessionEvent,
    SessionEventType,
    SessionId,
    SessionPage,
    SessionRecord,
    SessionWrite,
    write_session_id,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL,
    record BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, session_id);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);
CREATE INDEX IF NOT EXISTS sessions_by_owner_expiry ON sessions (owner, expires_at);
CREATE TABLE IF NOT EXISTS tombstones (
    session_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    owner_epoch INTEGER NOT NULL,
    credential_fingerprint TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tombstones_by_expiry ON tombstones (expires_at);
CREATE TABLE IF NOT EXISTS upstream_sessions (
    upstream_session_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class SqliteStoreConfig:
    path: Path
    session_ttl: float = 3600.0
    """Seconds without a write after which a session expires."""
    sweep_interval: float | None = None
    """Seconds between expiry sweeps; default: a tenth of the TTL, between 0.1 and 30 s.
    0 disables the sweeper (tests call `sweep()` themselves)."""
    watch_buffer: int = 10_000
    """Events a watcher may fall behind by before it is dropped with `WatchLaggedError`."""
    max_sessions_per_owner: int = DEFAULT_MAX_SESSIONS_PER_OWNER
    """Sessions one owner may hold (rule 4); 0: no limit."""
    page_size: int = SNAPSHOT_PAGE_SIZE
    """Rows a watch snapshot or an expiry sweep reads at a time."""

    def effective_sweep_interval(self) -> float:
        if self.sweep_interval is not None:
            return self.sweep_interval
        return min(max(self.session_ttl / 10, 0.1), 30.0)


_Event = tuple[int, SessionEvent]


class _Subscriber:
    """One watcher's queue of (revision, event), bounded by the config."""

    def __init__(self, limit: int) -> None:
        self.items: collections.deque[_Event] = collections.deque()
        self.limit = limit
        self.wakeup = asyncio.Event()
        self.lagged = False
        self.closed = False

    def push(self, item: _Event) -> None:
        if len(self.items) >= self.limit:
            self.lagged = True
        else:
            self.items.append(item)
        self.wakeup.set()

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()


class _Db:
    """The SQLite side: used only on the store's thread."""

    def __init__(
        self,
        config: SqliteStoreConfig,
        publish: Callable[[list[_Event]], None],
    ) -> None:
        self.conn = sqlite3.connect(config.path, isolation_level=None, check_same_thread=True)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(_SCHEMA)
        self.ttl = config.session_ttl
        self.limit = config.max_sessions_per_owner
        self.page_size = config.page_size
        self.revision = 0
        self._publish = publish
        """Thread-safe: hands committed events to the event loop (rule 1)."""

    def _event(self, events: list[_Event], type_: SessionEventType, rec: SessionRecord) -> None:
        self.revision += 1
        events.append((self.revision, SessionEvent(type_, rec.session_id, rec)))

    def _load(self, sid: SessionId, now: float, events: list[_Event]) -> SessionRecord | None:
        row = self.conn.execute(
            "SELECT record, expires_at FROM sessions WHERE session_id = ?", (sid,)
        ).fetchone()
        if row is None:
            return None
        rec = decode_record(row[0])
        if row[1] <= now:
            self.conn.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))
            self._bury(rec, rec.expires_at)
            self._event(events, SessionEventType.EXPIRE, rec)
            return None
        return rec

    def _holders(self, upstream_ids: set[str], now: float) -> dict[str, SessionId]:
        """The live session holding each of `upstream_ids` (rule 6)."""
        out: dict[str, SessionId] = {}
        for upstream in upstream_ids:
            row = self.conn.execute(
                "SELECT s.record FROM upstream_sessions u JOIN sessions s "
                "ON s.session_id = u.session_id "
                "WHERE u.upstream_session_id = ? AND s.expires_at > ?",
                (upstream, now),
            ).fetchone()
            if row is not None:
                holder = decode_record(row[0])
                if holder.upstream_session_id == upstream:
                    out[upstream] = holder.session_id
        return out

    def _bury(self, rec: SessionRecord, ended_at: float) -> None:
        """Leave `rec`'s tombstone (rule 5) and free its upstream session (rule 6)."""
        self.conn.execute(
            "DELETE FROM upstream_sessions WHERE upstream_session_id = ? AND session_id = ?",
            (rec.upstream_session_id, rec.session_id),
        )
        t = records.tombstone_of(rec, ended_at=ended_at, ttl=self.ttl)
        self.conn.execute(
            "INSERT OR REPLACE INTO tombstones (session_id, owner, owner_epoch, "
            "credential_fingerprint, expires_at) VALUES (?, ?, ?, ?, ?)",
            (t.session_id, t.owner, t.owner_epoch, t.credential_fingerprint, t.expires_at),
        )

    def _tombstone(self, sid: SessionId, now: float) -> records.Tombstone | None:
        row = self.conn.execute(
            "SELECT owner, owner_epoch, credential_fingerprint, expires_at FROM tombstones "
            "WHERE session_id = ? AND expires_at > ?",
            (sid, now),
        ).fetchone()
        if row is None:
            return None
        return records.Tombstone(sid, OwnerName(row[0]), int(row[1]), str(row[2]), row[3])

    def _save(self, rec: SessionRecord) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO sessions (session_id, owner, expires_at, record) "
            "VALUES (?, ?, ?, ?)",
            (rec.session_id, rec.owner, rec.expires_at, encode_record(rec)),
        )

    def _transaction(self, body: Callable[[list[_Event]], T]) -> tuple[T, list[_Event]]:
        events: list[_Event] = []
        start = self.revision
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(events)
        except BaseException:
            self.conn.execute("ROLLBACK")
            self.revision = start
            raise
        self.conn.execute("COMMIT")
        if events:
            self._publish(events)
        return result, events

    def _owned(self, owner: OwnerName, now: float) -> int:
        row = self.conn.execute(
            "SELECT COUNT(*) FROM sessions WHERE owner = ? AND expires_at > ?", (owner, now)
        ).fetchone()
        return int(row[0])

    def apply(self, writes: Sequence[SessionWrite], now: float) -> dict[SessionId, ApplyResult]:
        by_session: dict[SessionId, list[SessionWrite]] = {}
        for w in writes:
            by_session.setdefault(write_session_id(w), []).append(w)

        def body(events: list[_Event]) -> dict[SessionId, ApplyResult]:
            out: dict[SessionId, ApplyResult] = {}
            # Live sessions per owner, counted once per transaction and kept up to date here.
            owned: dict[OwnerName, int] = {}
            for sid, ws in by_session.items():
                current = self._load(sid, now, events)
                tombstone = self._tombstone(sid, now) if current is None else None
                holders = self._holders(records.new_upstream_ids(current, ws), now)
                merged = records.apply_writes(
                    current,
                    ws,
                    now=now,
                    ttl=self.ttl,
                    tombstone=tombstone,
                    upstream_holders=holders,
                )
                new = merged.record
                if merged.refused and not merged.changed:
                    out[sid] = WritesRefused(merged.refused)
                    continue
                if not merged.changed or new is None:
                    out[sid] = new
                    continue
                if self.limit > 0 and (current is None or current.owner != new.owner):
                    count = owned.get(new.owner)
                    if count is None:
                        count = owned[new.owner] = self._owned(new.owner, now)
                    if count >= self.limit:
                        out[sid] = OwnerLimitReached(new.owner, self.limit, current)
                        continue
                    owned[new.owner] = count + 1
                    if current is not None and current.owner in owned:
                        owned[current.owner] -= 1
                self._save(new)
                if current is None:
                    self.conn.execute("DELETE FROM tombstones WHERE session_id = ?", (sid,))
                upstream = new.upstream_session_id
                if upstream and (current is None or current.upstream_session_id != upstream):
                    self.conn.execute(
                        "INSERT OR REPLACE INTO upstream_sessions VALUES (?, ?)", (upstream, sid)
                    )
                self._event(events, SessionEventType.PUT, new)
                out[sid] = new
            return out

        return self._transaction(body)[0]

    def get(self, sid: SessionId, now: float) -> SessionRecord | None:
        row = self.conn.execute(
            "SELECT record FROM sessions WHERE session_id = ? AND expires_at > ?", (sid, now)
        ).fetchone()
        return None if row is None else decode_record(row[0])

    def list_page(
        self, owner: OwnerName | None, after: SessionId | None, limit: int, now: float
    ) -> list[SessionRecord]:
        sql = "SELECT record FROM sessions WHERE session_id > ? AND expires_at > ?"
        params: list[object] = [after or "", now]
        if owner is not None:
            sql += " AND owner = ?"
            params.append(owner)
        sql += " ORDER BY session_id LIMIT ?"
        params.append(limit)
        return [decode_record(r[0]) for r in self.conn.execute(sql, params)]

    def count(self, now: float) -> int:
        row = self.conn.execute(
            "SELECT COUNT(*) FROM sessions WHERE expires_at > ?", (now,)
        ).fetchone()
        return int(row[0])

    def delete(self, sid: SessionId, now: float) -> SessionRecord | None:
        def body(events: list[_Event]) -> SessionRecord | None:
            rec = self._load(sid, now, events)
            if rec is not None:
                self.conn.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))
                self._bury(rec, now)
                self._event(events, SessionEventType.DELETE, rec)
            return rec

        return self._transaction(body)[0]

    def claim(
        self, sid: SessionId, owner: OwnerName, expected: int | None, now: float
    ) -> SessionRecord:
        def body(events: list[_Event]) -> SessionRecord:
            rec = self._load(sid, now, events)
            if rec is None:
                raise SessionNotFoundError(sid)
            new = records.claim(
                rec, owner=owner, expected_owner_epoch=expected, now=now, ttl=self.ttl
            )
            if self.limit > 0 and owner != rec.owner and self._owned(owner, now) >= self.limit:
                raise OwnerLimitError(owner, self.limit)
            self._save(new)
            self._event(events, SessionEventType.PUT, new)
            return new

        # A refusal rolls back an expiry found on the way; the sweeper publishes it later.
        return self._transaction(body)[0]

    def sweep(self, now: float) -> int:
        """Expire what is due, a page per transaction (rule 3); return how many."""
        total = 0
        while True:

            def body(events: list[_Event]) -> int:
                rows = self.conn.execute(
                    "SELECT session_id, record FROM sessions WHERE expires_at <= ? "
                    "ORDER BY expires_at LIMIT ?",
                    (now, self.page_size),
                ).fetchall()
                self.conn.executemany(
                    "DELETE FROM sessions WHERE session_id = ?", [(r[0],) for r in rows]
                )
                for _, data in rows:
                    rec = decode_record(data)
                    self._bury(rec, rec.expires_at)
                    self._event(events, SessionEventType.EXPIRE, rec)
                if len(rows) < self.page_size:
                    self.conn.execute("DELETE FROM tombstones WHERE expires_at <= ?", (now,))
                return len(rows)

            done = self._transaction(body)[0]
            total += done
            if done < self.page_size:
                return total

    def snapshot_page(self, after: str, now: float) -> tuple[int, list[SessionRecord]]:
        """The next page of live sessions with ids above `after`, and the revision it shows
        (rule 2)."""
        rows = self.conn.execute(
            "SELECT record FROM sessions WHERE session_id > ? AND expires_at > ? "
            "ORDER BY session_id LIMIT ?",
            (after, now, self.page_size),
        )
        return self.revision, [decode_record(r[0]) for r in rows]

    def close(self) -> None:
        self.conn.close()


class SqliteSessionStore:
    """`SessionStore` on a SQLite file; create with `await SqliteSessionStore.open(config)`."""

    def __init__(
        self, config: SqliteStoreConfig, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tether-sqlite")
        self._db: _Db | None = None
        self._subscribers: set[_Subscriber] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(
        cls, config: SqliteStoreConfig, *, clock: Callable[[], float] = time.time
    ) -> SqliteSessionStore:
        store = cls(config, clock=clock)
        loop = asyncio.get_running_loop()

        def publish(events: list[_Event]) -> None:
            loop.call_soon_threadsafe(store._publish, events)

        try:
            store._db = await store._run(_Db, config, publish)
        except BaseException:
            store._executor.shutdown(wait=False)
            raise
        interval = config.effective_sweep_interval()
        if interval > 0:
            store._sweeper = tasks.spawn(store._sweep_loop(interval), name="sqlite-store-sweeper")
        return store

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise StoreUnavailableError("store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as e:
            raise StoreUnavailableError(f"sqlite: {e}") from e

    @property
    def _conn(self) -> _Db:
        if self._db is None:
            raise StoreUnavailableError("store is not open")
        return self._db

    def _publish(self, events: list[_Event]) -> None:
        for item in events:
            for sub in self._subscribers:
                sub.push(item)

    async def apply(self, *, writes: Sequence[SessionWrite]) -> Mapping[SessionId, ApplyResult]:
        if not writes:
            return {}
        return await self._run(self._conn.apply, writes, self._clock())

    async def get(self, *, session_id: SessionId) -> SessionRecord | None:
        return await self._run(self._conn.get, session_id, self._clock())

    async def list_page(
        self,
        *,
        owner: OwnerName | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> SessionPage:
        after = decode_page_token(page_token)
        size = clamp_page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        rows = await self._run(self._conn.list_page, owner, after, size + 1, self._clock())
        if len(rows) > size:
            rows = rows[:size]
            return SessionPage(tuple(rows), encode_page_token(rows[-1].session_id))
        return SessionPage(tuple(rows))

    async def count(self) -> int:
        return await self._run(self._conn.count, self._clock())

    async def delete(self, *, session_id: SessionId) -> SessionRecord | None:
        return await self._run(self._conn.delete, session_id, self._clock())

    async def claim(
        self,
        *,
        session_id: SessionId,
        owner: OwnerName,
        expected_owner_epoch: int | None = None,
    ) -> SessionRecord:
        return await self._run(
            self._conn.claim, session_id, owner, expected_owner_epoch, self._clock()
        )

    async def sweep(self) -> int:
        """Expire every session past its `expires_at` now; return how many."""
        return await self._run(self._conn.sweep, self._clock())

    async def _sweep_loop(self, interval: float) -> None:
        while True:
            # Pacing, not synchronisation: expiry is allowed to lag by one interval.
            await asyncio.sleep(interval)
            try:
                expired = await self.sweep()
            except StoreUnavailableError:
                log.exception("expiry sweep failed; retrying in %.1f s", interval)
                continue
            if expired:
                log.info("expired %d idle session(s)", expired)

    async def watch(self) -> AsyncGenerator[SessionEvent, None]:
        sub = _Subscriber(self.config.watch_buffer)
        self._subscribers.add(sub)
        try:
            # Rule 2: page i covers the ids above page_ends[i - 1] up to page_ends[i] (the last
            # page: all above) and shows them as of page_revisions[i].
            page_ends: list[str] = []
            page_revisions: list[int] = []
            after = ""
            while True:
                revision, page = await self._run(self._conn.snapshot_page, after, self._clock())
                page_revisions.append(revision)
                for rec in page:
                    yield SessionEvent(SessionEventType.PUT, rec.session_id, rec)
                if len(page) < self.config.page_size:
                    break
                after = page[-1].session_id
                page_ends.append(after)
                del page
            yield SessionEvent(SessionEventType.SYNCED)
            delivered = 0
            while True:
                while not sub.items:
                    if sub.lagged:
                        raise WatchLaggedError("watcher fell behind; watch again")
                    if sub.closed:
                        return
                    sub.wakeup.clear()
                    await sub.wakeup.wait()
                rev, event = sub.items.popleft()
                sid = event.session_id
                if sid is None or rev <= delivered:
                    continue
                if rev <= page_revisions[bisect.bisect_left(page_ends, sid)]:
                    continue  # the snapshot already showed it
                delivered = rev
                yield event
        finally:
            self._subscribers.discard(sub)

    async def aclose(self) -> None:
        if self._closed:
            return
        await tasks.cancel_and_wait(self._sweeper)
        for sub in self._subscribers:
            sub.close()
        db = self._db
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._closed = True
        # The thread is idle now (the close ran last), so this does not block.
        self._executor.shutdown(wait=False)
