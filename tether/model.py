"""Domain types of session records, shared by the sidecar and the control plane.

These frozen dataclasses are what the code handles; the generated protobuf types exist only at
the gRPC edge (`tether.api.convert`). This module imports neither grpc nor protobuf.

Invariants the types encode:
  1. A stream position is ordered by `(owner_epoch, seq)` (`StreamPosition.order`): a new owner's
     first event beats anything the previous owner wrote, and within one owner `seq` grows.
  2. A session's `owner_epoch` is its fencing token: only writes carrying exactly that epoch are
     applied; `ClaimSession` is the only way to raise it.
  3. Ids are validated (`parse_session_id`, `parse_stream_id`, `parse_owner`) before they are
     used as keys: 1 to 256 characters from `[A-Za-z0-9._~+=:@-]`, not starting with `.`, so
     an id can never be a path (`/`, `..`) in a store's key space.
  4. Times are seconds since the Unix epoch (floats), set by the control plane.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NewType

SessionId = NewType("SessionId", str)
"""The client-facing session id (`Mcp-Session-Id`)."""

StreamId = NewType("StreamId", str)
"""The sidecar's id of one SSE stream of a session."""

OwnerName = NewType("OwnerName", str)
"""The sidecar (pod) that owns a session."""

MAX_ID_LENGTH = 256
_ID_PATTERN = re.compile(r"[A-Za-z0-9_~+=:@-][A-Za-z0-9._~+=:@-]*")


class InvalidIdError(ValueError):
    """An id that must not be used: wrong length or characters."""


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidIdError(f"{what} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidIdError(f"{what} is longer than {MAX_ID_LENGTH} characters")
    if _ID_PATTERN.fullmatch(value) is None:
        raise InvalidIdError(
            f"{what} {value[:64]!r} may only contain A-Z a-z 0-9 . _ ~ + = : @ - "
            "and must not start with '.'"
        )
    return value


def parse_session_id(value: str) -> SessionId:
    """Return `value` as a `SessionId`, or raise `InvalidIdError`."""
    return SessionId(_check_id(value, "session id"))


def parse_stream_id(value: str) -> StreamId:
    """Return `value` as a `StreamId`, or raise `InvalidIdError`."""
    return StreamId(_check_id(value, "stream id"))


def parse_owner(value: str) -> OwnerName:
    """Return `value` as an `OwnerName`, or raise `InvalidIdError`."""
    return OwnerName(_check_id(value, "owner"))


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where one SSE stream of a session has got to."""

    stream_id: StreamId
    last_event_id: str
    """The last client-facing event id sent to the client (`<stream_id>.<epoch>.<seq>`)."""
    upstream_event_id: str
    """The last event id received from the upstream server."""
    seq: int
    owner_epoch: int
    """The owner epoch under which the position was written."""

    @property
    def order(self) -> tuple[int, int]:
        """The key that orders updates of one stream: greater wins, equal or less is a no-op."""
        return (self.owner_epoch, self.seq)


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """Everything needed to resume an MCP session on another sidecar.

    `streams` maps stream ids to positions; treat it as read-only (records are values).
    """

    session_id: SessionId
    upstream_session_id: str
    upstream_address: str
    owner: OwnerName
    owner_epoch: int
    protocol_version: str = ""
    initialize_request: bytes = b""
    """The client's `initialize` request body (JSON bytes)."""
    credential_fingerprint: str = ""
    """HMAC-SHA256 (hex) of the Authorization header that created the session, keyed with the
    sidecars' shared key (plain SHA-256 without one: development only); "" if none. Set once,
    at creation (`controlplane.records` rule 8)."""
    streams: Mapping[StreamId, StreamPosition] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    expires_at: float = 0.0

    @staticmethod
    def streams_of(positions: Iterable[StreamPosition]) -> dict[StreamId, StreamPosition]:
        """Index positions by stream id, keeping the greatest `order` for a repeated id."""
        out: dict[StreamId, StreamPosition] = {}
        for p in positions:
            old = out.get(p.stream_id)
            if old is None or p.order > old.order:
                out[p.stream_id] = p
        return out


@dataclass(frozen=True, slots=True)
class SessionUpsert:
    """Create a session, or refresh its metadata and streams as its current owner.

    The record's timestamps are ignored: the control plane sets them.
    """

    session: SessionRecord
    writer: OwnerName | None = None
    """The authenticated sidecar that sent the write (set by the control plane, never on the
    wire); None for a trusted caller (development). See `controlplane.records` rule 6."""


@dataclass(frozen=True, slots=True)
class StreamUpdate:
    """Move one stream forward; `position.owner_epoch` is the reporter's epoch."""

    session_id: SessionId
    position: StreamPosition
    writer: OwnerName | None = None
    """As `SessionUpsert.writer`: who sent it, when the caller is an authenticated sidecar."""


SessionWrite = SessionUpsert | StreamUpdate


def write_session_id(write: SessionWrite) -> SessionId:
    """The session a write is about."""
    if isinstance(write, SessionUpsert):
        return write.session.session_id
    return write.session_id


def write_epoch(write: SessionWrite) -> int:
    """The owner epoch a write carries (its fencing token)."""
    if isinstance(write, SessionUpsert):
        return write.session.owner_epoch
    return write.position.owner_epoch


class RejectionReason(enum.Enum):
    FENCED = "fenced"
    """The writer's owner epoch is not the session's current one."""
    UNKNOWN_SESSION = "unknown_session"
    """The session is not in the store (never created, deleted or expired)."""
    INVALID = "invalid"
    """The item is malformed and will never be accepted."""
    OWNER_LIMIT = "owner_limit"
    """Storing it would give its owner more sessions than the control plane allows."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one item of a reported batch was not applied."""

    session_id: str
    stream_id: str
    """Empty when the whole session item was rejected."""
    reason: RejectionReason
    detail: str = ""
    current_owner: str = ""
    current_owner_epoch: int = 0


@dataclass(frozen=True, slots=True)
class ReportBatch:
    """One message of a sidecar's `ReportEvents` stream: upserts are applied before updates."""

    batch_id: int
    upserts: tuple[SessionUpsert, ...] = ()
    updates: tuple[StreamUpdate, ...] = ()


@dataclass(frozen=True, slots=True)
class BatchAck:
    """Every item of batch `batch_id` is durable, a no-op, or listed in `rejections`."""

    batch_id: int
    rejections: tuple[Rejection, ...] = ()
    session_ttl: float = 0.0
    """Seconds a session lives without a write on this control plane (0.0: not said)."""


class SessionEventType(enum.Enum):
    PUT = "put"
    """Created or changed (or, during a watch's snapshot, existing)."""
    DELETE = "delete"
    """Deleted on request."""
    EXPIRE = "expire"
    """Idle for longer than the TTL."""
    SYNCED = "synced"
    """The snapshot is complete; later events are changes."""


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """One item of a session watch. `session` is the new state for PUT, the last known state
    for DELETE and EXPIRE (None if unknown), and None for SYNCED."""

    type: SessionEventType
    session_id: SessionId | None = None
    session: SessionRecord | None = None


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of a listing, ordered by session id; `next_page_token` is empty at the end."""

    sessions: tuple[SessionRecord, ...]
    next_page_token: str = ""
