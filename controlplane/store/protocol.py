"""The `SessionStore` seam: what every store backend promises, and the errors it may raise.

Backends: `controlplane.store.sqlite` (embedded default) and `controlplane.store.etcd`. They
do not import each other; both share the pure rules in `controlplane.records` and the value
encoding in `controlplane.store.codec`, and both pass `tests/contract`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from controlplane.records import ClaimRefusedError
from tether.model import (
    OwnerName,
    SessionEvent,
    SessionId,
    SessionPage,
    SessionRecord,
    SessionWrite,
)

__all__ = [
    "DEFAULT_MAX_SESSIONS_PER_OWNER",
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "SNAPSHOT_PAGE_SIZE",
    "ApplyResult",
    "ClaimRefusedError",
    "InvalidPageTokenError",
    "OwnerLimitError",
    "OwnerLimitReached",
    "SessionNotFoundError",
    "SessionStore",
    "StoreError",
    "StoreUnavailableError",
    "WatchLaggedError",
    "WritesRefused",
]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
SNAPSHOT_PAGE_SIZE = 500
"""Sessions a watch's snapshot reads from the backend at a time: its memory, whatever the
number of sessions."""
DEFAULT_MAX_SESSIONS_PER_OWNER = 10_000
"""Sessions one owner may hold (0: no limit); `--max-sessions-per-owner`."""


class StoreError(Exception):
    """Base of the errors a store raises on purpose."""


class SessionNotFoundError(StoreError, KeyError):
    """The session does not exist (never created, deleted or expired)."""

    def __str__(self) -> str:
        return f"session {self.args[0]} not found"


class InvalidPageTokenError(StoreError, ValueError):
    """A page token that no listing of this store produced."""


class StoreUnavailableError(StoreError):
    """The backend cannot be reached or failed; the operation may be retried."""


class WatchLaggedError(StoreError):
    """A watcher fell too far behind and was dropped; watch again for a fresh snapshot."""


class OwnerLimitError(StoreError):
    """A claim refused: it would give `owner` more than `limit` sessions."""

    def __init__(self, owner: OwnerName, limit: int) -> None:
        super().__init__(
            f"owner {owner} already holds {limit} sessions, the most allowed "
            "(--max-sessions-per-owner)"
        )
        self.owner = owner
        self.limit = limit


@dataclass(frozen=True, slots=True)
class OwnerLimitReached:
    """An `apply` outcome: the session's writes were refused, because they would have given
    `owner` (creating the session, or taking it from another owner) more than `limit`
    sessions. `record` is the session as it stays (None: it still does not exist)."""

    owner: OwnerName
    limit: int
    record: SessionRecord | None = None

    @property
    def detail(self) -> str:
        return (
            f"owner {self.owner} already holds {self.limit} sessions, the most allowed "
            "(--max-sessions-per-owner): not stored"
        )


@dataclass(frozen=True, slots=True)
class WritesRefused:
    """An `apply` outcome: the session's writes were refused whole, by its tombstone or by
    another session holding the upstream session it names (`controlplane.records` rules 9
    and 10); `detail` says why. The session stays as it was."""

    detail: str


ApplyResult = SessionRecord | OwnerLimitReached | WritesRefused | None
"""What `apply` says of one session: its record after the writes, None if it does not exist
(its stream updates were skipped), or why its writes were refused."""


class SessionStore(Protocol):
    """Persistent session records.

    Contract, for every method (all are coroutines except `watch`, an async iterator):
      * Ids arrive validated (`tether.model.parse_*`); stores use them as keys as they are.
      * Every write is atomic per session: readers and watchers see a session either before
        or after a write, never half of it. `apply` is not atomic across sessions.
      * Writes follow `controlplane.records`: monotonic per stream, fenced by owner epoch,
        idempotent under replay. A stale write changes nothing, timestamps included.
      * A session not written for `session_ttl` seconds expires: it disappears and watchers
        get an EXPIRE event (within a backend-specific delay, documented by the backend).
      * `StoreUnavailableError` means the backend failed; nothing else is raised for I/O.
      * Sessions per owner are limited (`max_sessions_per_owner` in each backend's config, 0:
        no limit). A write that gives an owner a session (creates it, or moves it from
        another owner) is refused when the owner already holds the limit; the count and the
        write are one atomic step, so concurrent writers never exceed it (each backend says
        how). Writes to sessions an owner already holds are never refused by the limit.
      * A deleted or expired session leaves a tombstone for `session_ttl` seconds; a
        re-creation it refuses (`controlplane.records` rule 9) is `WritesRefused`, and
        the check and the creation are one atomic step (each backend says how).
      * An upstream session belongs to one session: a write naming an `upstream_session_id`
        another live session has is `WritesRefused` (`controlplane.records` rule 10), the
        check and the write one atomic step.
      * `aclose` stops background work, ends open watches and releases the backend.
    """

    async def apply(self, *, writes: Sequence[SessionWrite]) -> Mapping[SessionId, ApplyResult]:
        """Apply a batch of writes (any sessions, any order: per session, upserts first).

        Returns, for each session written to, its record after the writes (None if it does
        not exist: its stream updates were skipped), `OwnerLimitReached` if its writes
        were refused by the owner limit, or `WritesRefused` (records rules 9 and 10). The
        caller derives rejections from it.
        """
        ...

    async def get(self, *, session_id: SessionId) -> SessionRecord | None:
        """The session's record, or None."""
        ...

    async def list_page(
        self,
        *,
        owner: OwnerName | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> SessionPage:
        """A page of sessions ordered by id, optionally only those of `owner`.

        `page_size` is clamped to 1..MAX_PAGE_SIZE; a token not produced by a previous call
        raises `InvalidPageTokenError`.
        """
        ...

    async def count(self) -> int:
        """How many live sessions the store holds: one read that decodes no record (for
        the sessions gauge; an expired session may count until the backend removes it)."""
        ...

    async def delete(self, *, session_id: SessionId) -> SessionRecord | None:
        """Delete the session; return its last record, or None if it did not exist.
        Watchers get a DELETE event."""
        ...

    async def claim(
        self,
        *,
        session_id: SessionId,
        owner: OwnerName,
        expected_owner_epoch: int | None = None,
    ) -> SessionRecord:
        """Give the session to `owner` with the next owner epoch, atomically.

        Raises `SessionNotFoundError`, `ClaimRefusedError` if `expected_owner_epoch` is
        given and the session is at another epoch, or `OwnerLimitError` if `owner` (not the
        current owner) already holds the most sessions allowed. From then on writes with
        older epochs are refused.
        """
        ...

    def watch(self) -> AsyncGenerator[SessionEvent, None]:
        """Every session as a PUT event, one SYNCED event, then every change in order.

        No change is lost between the snapshot and the changes, and a session is never shown
        going backwards. The snapshot is read in pages of `SNAPSHOT_PAGE_SIZE` and yielded as
        it is read: a watch's memory does not grow with the number of sessions' records.
        A backend may resynchronise a watch whose change history is lost (etcd after a
        compaction): it then sends a PUT for every live session, a DELETE or EXPIRE for every
        session it had shown that is gone, and SYNCED again, then changes; the stream does
        not end. Ends when the store closes; raises `WatchLaggedError` if the watcher fell
        too far behind, `StoreUnavailableError` if the backend failed for good.
        """
        ...

    async def aclose(self) -> None:
        """Stop background work and release the backend; idempotent."""
        ...
