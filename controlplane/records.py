"""The pure rules for changing a session record: the same for every store backend.

A store reads a session's current record, calls `apply_writes` or `claim`, and writes the
result atomically (or nothing when `changed` is false). No I/O here, so the rules are tested
on their own, exhaustively.

Rules:
  1. Monotonic: a stream position is replaced only by one with a greater `(owner_epoch, seq)`;
     a stale or replayed update changes nothing (not even timestamps): idempotent.
  2. Fencing: a write is applied only if its epoch equals the session's `owner_epoch`. An older
     epoch is a zombie owner; a newer one was never granted (only `claim` raises the epoch).
  3. An upsert of a missing session creates it (epoch at least 1). An upsert by the current
     owner refreshes the metadata and timestamps (it doubles as a liveness heartbeat); an
     empty `initialize_request` keeps the stored one.
  4. A stream update of a missing session is skipped (the caller reports UNKNOWN_SESSION).
  5. Every applied change sets `updated_at = now` and `expires_at = now + ttl`.
  6. Only the owner writes: a write carrying a `writer` (the authenticated sidecar that sent
     it) is applied only to a session owned by `writer`, and an upsert creates a session only
     if it names `writer` as the owner. A write without one comes from a trusted caller.
  7. The owner changes only by `claim`: an upsert at the current epoch naming another owner is
     refused (otherwise anyone knowing the epoch could take a session over by writing it).
  8. The credential binding is set once, at creation: an upsert whose non-empty
     `credential_fingerprint` differs from the stored one is refused whole (an empty one keeps
     the stored one), so no write can hand a session to another credential.
  9. Re-creation over a tombstone: a deleted or expired session leaves a `Tombstone` (its
     id, last owner, last owner epoch and credential fingerprint) for one `session_ttl`. An
     upsert that would create the session while its tombstone lasts is refused whole
     (`recreation_refusal`) unless its credential fingerprint is the tombstone's and its
     epoch is above the tombstone's, or equal to it with the tombstone's owner: the last
     owner re-sending a session the store lost or let expire while it still serves it (the
     reporter's re-creation, a renewal after a partition). So delete-and-re-create cannot
     rebind a session to another credential, and no owner epoch goes backwards (a sidecar
     fenced before the delete is below the epoch it was fenced at). A created session's
     tombstone is gone.
  10. An upstream session belongs to one session: an upsert naming a non-empty
     `upstream_session_id` that another live session has (`upstream_holders`, which the
     store reads for the ids `new_upstream_ids` lists, atomically with the write) is
     refused, and so are the session's other writes in the batch. Otherwise whoever read
     the id (a viewer's listing, a log) could create a session of its own bound to its own
     credential, and a sidecar would forward its requests into another client's upstream
     session.
  11. Bounded: a record keeps the positions of at most `MAX_STREAM_POSITIONS` streams, the
     most recently moved; past it the one that moved longest ago is dropped. Every call of a
     session is a stream, so a long-lived session would otherwise grow its record (and every
     watch event carrying it) with each call, past etcd's value limit. A dropped position is a
     stream finished long ago, which a sidecar adopting the session no longer resumes (410).
Refused writes change nothing; `refusal` and `recreation_refusal` say why, for the
acknowledgement.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tether.model import (
    OwnerName,
    SessionId,
    SessionRecord,
    SessionUpsert,
    SessionWrite,
    StreamId,
    StreamPosition,
    StreamUpdate,
)

MAX_STREAM_POSITIONS = 128
"""Rule 11: stream positions one record keeps."""


@dataclass(frozen=True, slots=True)
class MergeResult:
    """The record after the writes (None if the session does not exist) and whether it differs
    from the stored one (if not, the store writes nothing)."""

    record: SessionRecord | None
    changed: bool
    refused: str = ""
    """Rules 9 and 10: why the session's writes were refused whole ("": they were not)."""


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What a deleted or expired session leaves behind for a while (rule 9)."""

    session_id: SessionId
    owner: OwnerName
    owner_epoch: int
    credential_fingerprint: str
    expires_at: float
    """When the tombstone is forgotten: one `session_ttl` after the session ended."""


def tombstone_of(record: SessionRecord, *, ended_at: float, ttl: float) -> Tombstone:
    """The tombstone `record` leaves when it is deleted or expires at `ended_at`."""
    return Tombstone(
        record.session_id,
        record.owner,
        record.owner_epoch,
        record.credential_fingerprint,
        ended_at + ttl,
    )


def recreation_refusal(tombstone: Tombstone | None, upsert: SessionUpsert) -> str:
    """Why rule 9 refuses `upsert` creating a session over `tombstone` ("" if allowed)."""
    if tombstone is None:
        return ""
    new = upsert.session
    if new.credential_fingerprint != tombstone.credential_fingerprint:
        return (
            "this session was deleted or expired bound to another credential; "
            "its id cannot be re-created with a different credential fingerprint"
        )
    epoch = upsert_epoch(upsert)
    if epoch > tombstone.owner_epoch or (
        epoch == tombstone.owner_epoch and new.owner == tombstone.owner
    ):
        return ""
    return (
        f"this session was deleted or expired at owner epoch {tombstone.owner_epoch} "
        f"(owner {tombstone.owner!r}); it cannot be re-created at epoch {epoch} by {new.owner!r}"
    )


class ClaimRefusedError(Exception):
    """A claim with `expected_owner_epoch` found the session at another epoch."""

    def __init__(self, current: SessionRecord) -> None:
        super().__init__(
            f"session {current.session_id} is at owner epoch {current.owner_epoch} "
            f"(owner {current.owner})"
        )
        self.current = current


def _merge_streams(
    streams: dict[StreamId, StreamPosition], positions: Iterable[StreamPosition], epoch: int
) -> bool:
    """Merge positions written under `epoch` into `streams` in place, a moved one placed last
    (rule 11: the dict is in order of last move), then bound it; True if any moved."""
    moved = False
    for p in positions:
        if p.owner_epoch != epoch:
            continue
        old = streams.get(p.stream_id)
        if old is None or p.order > old.order:
            streams.pop(p.stream_id, None)
            streams[p.stream_id] = p
            moved = True
    while len(streams) > MAX_STREAM_POSITIONS:
        del streams[next(iter(streams))]
    return moved


class Refusal(enum.Enum):
    """Why rules 6 to 8 refuse a write at the right epoch."""

    NOT_OWNER = "not_owner"
    """Rules 6 and 7: the writer, or the owner the upsert names, does not own the session."""
    BINDING_CHANGED = "binding_changed"
    """Rule 8: the upsert names another credential fingerprint than the stored one."""


def refusal(current: SessionRecord | None, write: SessionWrite) -> Refusal | None:
    """Why rules 6 to 8 refuse `write` against `current` (None if missing); None if they
    allow it. Fencing (rule 2) is checked apart: this looks at who writes, not when."""
    if isinstance(write, StreamUpdate):
        if current is None or write.writer is None or write.writer == current.owner:
            return None
        return Refusal.NOT_OWNER
    new = write.session
    owner = new.owner if current is None else current.owner
    if new.owner != owner or (write.writer is not None and write.writer != owner):
        return Refusal.NOT_OWNER
    fingerprint = new.credential_fingerprint
    if current is not None and fingerprint and fingerprint != current.credential_fingerprint:
        return Refusal.BINDING_CHANGED
    return None


def upsert_epoch(upsert: SessionUpsert) -> int:
    """The epoch an upsert writes under: 0 (unset on the wire) means the first epoch, 1."""
    return max(upsert.session.owner_epoch, 1)


def new_upstream_ids(current: SessionRecord | None, writes: Iterable[SessionWrite]) -> set[str]:
    """The upstream session ids the upserts among `writes` would give the session and that
    it does not have yet: those whose holders rule 10 needs."""
    have = current.upstream_session_id if current is not None else ""
    return {
        w.session.upstream_session_id
        for w in writes
        if isinstance(w, SessionUpsert) and w.session.upstream_session_id not in ("", have)
    }


def upstream_refusal(
    session_id: SessionId, upsert: SessionUpsert, holders: Mapping[str, SessionId]
) -> str:
    """Why rule 10 refuses `upsert` ("" if allowed); `holders`: live holder per upstream id."""
    upstream = upsert.session.upstream_session_id
    holder = holders.get(upstream) if upstream else None
    if holder is None or holder == session_id:
        return ""
    return (
        "the upstream session this session names belongs to another session; "
        "an upstream session belongs to one session only"
    )


def apply_writes(
    current: SessionRecord | None,
    writes: Iterable[SessionWrite],
    *,
    now: float,
    ttl: float,
    tombstone: Tombstone | None = None,
    upstream_holders: Mapping[str, SessionId] | None = None,
) -> MergeResult:
    """Apply the writes of one session, upserts first, to `current` (None if missing; then
    `tombstone` is what it left, if it lasts: rule 9). `upstream_holders`: the live session
    holding each id of `new_upstream_ids` (rule 10)."""
    writes = list(writes)
    upserts = [w for w in writes if isinstance(w, SessionUpsert)]
    if upstream_holders:
        for upsert in upserts:
            sid = upsert.session.session_id
            if why := upstream_refusal(sid, upsert, upstream_holders):
                return MergeResult(current, False, why)
    updates = [w for w in writes if isinstance(w, StreamUpdate)]
    record = current
    changed = False
    streams: dict[StreamId, StreamPosition] = dict(current.streams) if current else {}
    refused = ""

    for upsert in upserts:
        new = upsert.session
        epoch = upsert_epoch(upsert)
        if refusal(record, upsert) is not None:
            continue
        if record is None:
            if why := recreation_refusal(tombstone, upsert):
                refused = why
                continue
            streams = {}
            _merge_streams(streams, new.streams.values(), epoch)
            record = dataclasses.replace(new, owner_epoch=epoch, created_at=now)
            changed = True
        elif epoch == record.owner_epoch:
            _merge_streams(streams, new.streams.values(), record.owner_epoch)
            record = dataclasses.replace(
                record,
                upstream_session_id=new.upstream_session_id,
                upstream_address=new.upstream_address,
                protocol_version=new.protocol_version,
                initialize_request=new.initialize_request or record.initialize_request,
                credential_fingerprint=new.credential_fingerprint or record.credential_fingerprint,
            )
            changed = True

    if record is not None:
        positions = [u.position for u in updates if refusal(record, u) is None]
        if _merge_streams(streams, positions, record.owner_epoch):
            changed = True

    if record is None or not changed:
        return MergeResult(current, False, refused)
    record = dataclasses.replace(record, streams=streams, updated_at=now, expires_at=now + ttl)
    return MergeResult(record, True)


def claim(
    current: SessionRecord,
    *,
    owner: OwnerName,
    expected_owner_epoch: int | None,
    now: float,
    ttl: float,
) -> SessionRecord:
    """Hand `current` to `owner` with the next epoch; raise `ClaimRefusedError` if
    `expected_owner_epoch` is given and is not the current epoch. Streams are kept: the new
    owner resumes from them, and its first position (a higher epoch) beats all of them."""
    if expected_owner_epoch is not None and expected_owner_epoch != current.owner_epoch:
        raise ClaimRefusedError(current)
    return dataclasses.replace(
        current,
        owner=owner,
        owner_epoch=current.owner_epoch + 1,
        updated_at=now,
        expires_at=now + ttl,
    )
