"""Converters between the generated wire types (`tether.api.v1.sessions_pb2`) and the domain
dataclasses of `tether.model`: the only code outside the gRPC edge that sees protobuf.

Messages from the wire are validated here: every id goes through `tether.model.parse_*`, so
a bad one raises `InvalidIdError` before it reaches a store. Times are float seconds in the
domain and `google.protobuf.Timestamp` on the wire, durations float seconds and
`google.protobuf.Duration`; 0.0 means unset.
"""

from __future__ import annotations

import math

from google.protobuf import timestamp_pb2

from tether.api.v1 import sessions_pb2 as pb
from tether.model import (
    BatchAck,
    InvalidIdError,
    Rejection,
    RejectionReason,
    ReportBatch,
    SessionEvent,
    SessionEventType,
    SessionPage,
    SessionRecord,
    SessionUpsert,
    StreamPosition,
    StreamUpdate,
    parse_owner,
    parse_session_id,
    parse_stream_id,
)

_NANOS = 1_000_000_000


def _nanoseconds(seconds: float) -> int:
    """`seconds` in whole nanoseconds, rounded once: `seconds * 1e9` would round the product
    to a float first (its last bit is worth 16 ns near 1e17), so a time would not come back
    as the float it was. The whole seconds are exact; only the fraction is scaled."""
    whole = math.floor(seconds)
    return whole * _NANOS + round((seconds - whole) * _NANOS)


def _ts_to_pb(seconds: float, out: timestamp_pb2.Timestamp) -> None:
    if seconds:
        out.FromNanoseconds(_nanoseconds(seconds))


def _ts_from_pb(msg: pb.Session, field: str) -> float:
    if not msg.HasField(field):
        return 0.0
    ts: timestamp_pb2.Timestamp = getattr(msg, field)
    return ts.ToNanoseconds() / _NANOS


def position_to_pb(p: StreamPosition) -> pb.StreamPosition:
    return pb.StreamPosition(
        stream_id=p.stream_id,
        last_event_id=p.last_event_id,
        upstream_event_id=p.upstream_event_id,
        seq=p.seq,
        owner_epoch=p.owner_epoch,
    )


def position_from_pb(msg: pb.StreamPosition) -> StreamPosition:
    return StreamPosition(
        stream_id=parse_stream_id(msg.stream_id),
        last_event_id=msg.last_event_id,
        upstream_event_id=msg.upstream_event_id,
        seq=msg.seq,
        owner_epoch=msg.owner_epoch,
    )


def session_to_pb(rec: SessionRecord) -> pb.Session:
    msg = pb.Session(
        session_id=rec.session_id,
        upstream_session_id=rec.upstream_session_id,
        upstream_address=rec.upstream_address,
        owner=rec.owner,
        owner_epoch=rec.owner_epoch,
        protocol_version=rec.protocol_version,
        initialize_request=rec.initialize_request,
        credential_fingerprint=rec.credential_fingerprint,
        streams=[position_to_pb(p) for _, p in sorted(rec.streams.items())],
    )
    _ts_to_pb(rec.created_at, msg.created_at)
    _ts_to_pb(rec.updated_at, msg.updated_at)
    _ts_to_pb(rec.expires_at, msg.expires_at)
    return msg


def session_from_pb(msg: pb.Session, *, positions: bool = True) -> SessionRecord:
    """The record a message carries; raises `InvalidIdError` for a bad session, stream or
    owner id. `positions=False` leaves its streams out (and unchecked): a reader that needs
    only who owns a session does not pay for up to 128 positions per change."""
    return SessionRecord(
        session_id=parse_session_id(msg.session_id),
        upstream_session_id=msg.upstream_session_id,
        upstream_address=msg.upstream_address,
        owner=parse_owner(msg.owner),
        owner_epoch=msg.owner_epoch,
        protocol_version=msg.protocol_version,
        initialize_request=msg.initialize_request,
        credential_fingerprint=msg.credential_fingerprint,
        streams=SessionRecord.streams_of(position_from_pb(p) for p in msg.streams)
        if positions
        else {},
        created_at=_ts_from_pb(msg, "created_at"),
        updated_at=_ts_from_pb(msg, "updated_at"),
        expires_at=_ts_from_pb(msg, "expires_at"),
    )


def update_from_pb(msg: pb.StreamUpdate) -> StreamUpdate:
    if not msg.HasField("position"):
        raise InvalidIdError("stream update without a position")
    return StreamUpdate(parse_session_id(msg.session_id), position_from_pb(msg.position))


def batch_to_pb(batch: ReportBatch) -> pb.ReportEventsRequest:
    return pb.ReportEventsRequest(
        batch_id=batch.batch_id,
        upserts=[pb.SessionUpsert(session=session_to_pb(u.session)) for u in batch.upserts],
        updates=[
            pb.StreamUpdate(session_id=u.session_id, position=position_to_pb(u.position))
            for u in batch.updates
        ],
    )


def batch_from_pb(msg: pb.ReportEventsRequest) -> tuple[ReportBatch, tuple[Rejection, ...]]:
    """The valid part of a reported batch, and an INVALID rejection for every bad item (a bad
    item never spoils the rest of its batch)."""
    upserts: list[SessionUpsert] = []
    updates: list[StreamUpdate] = []
    invalid: list[Rejection] = []
    for u in msg.upserts:
        try:
            upserts.append(SessionUpsert(session_from_pb(u.session)))
        except InvalidIdError as e:
            invalid.append(
                Rejection(u.session.session_id[:256], "", RejectionReason.INVALID, str(e))
            )
    for s in msg.updates:
        try:
            updates.append(update_from_pb(s))
        except InvalidIdError as e:
            invalid.append(
                Rejection(
                    s.session_id[:256], s.position.stream_id[:256], RejectionReason.INVALID, str(e)
                )
            )
    return ReportBatch(msg.batch_id, tuple(upserts), tuple(updates)), tuple(invalid)


_REASONS = {
    RejectionReason.FENCED: pb.REJECTION_REASON_FENCED,
    RejectionReason.UNKNOWN_SESSION: pb.REJECTION_REASON_UNKNOWN_SESSION,
    RejectionReason.INVALID: pb.REJECTION_REASON_INVALID,
    RejectionReason.OWNER_LIMIT: pb.REJECTION_REASON_OWNER_LIMIT,
}
_REASONS_BACK = {v: k for k, v in _REASONS.items()}


def rejection_to_pb(r: Rejection) -> pb.Rejection:
    return pb.Rejection(
        session_id=r.session_id,
        stream_id=r.stream_id,
        reason=_REASONS[r.reason],
        detail=r.detail,
        current_owner=r.current_owner,
        current_owner_epoch=r.current_owner_epoch,
    )


def rejection_from_pb(msg: pb.Rejection) -> Rejection:
    return Rejection(
        session_id=msg.session_id,
        stream_id=msg.stream_id,
        reason=_REASONS_BACK.get(msg.reason, RejectionReason.INVALID),
        detail=msg.detail,
        current_owner=msg.current_owner,
        current_owner_epoch=msg.current_owner_epoch,
    )


def ack_to_pb(ack: BatchAck) -> pb.ReportEventsResponse:
    msg = pb.ReportEventsResponse(
        batch_id=ack.batch_id, rejections=[rejection_to_pb(r) for r in ack.rejections]
    )
    if ack.session_ttl > 0:
        msg.session_ttl.FromNanoseconds(_nanoseconds(ack.session_ttl))
    return msg


def ack_from_pb(msg: pb.ReportEventsResponse) -> BatchAck:
    ttl = msg.session_ttl.ToNanoseconds() / _NANOS if msg.HasField("session_ttl") else 0.0
    return BatchAck(
        msg.batch_id, tuple(rejection_from_pb(r) for r in msg.rejections), max(ttl, 0.0)
    )


_EVENT_TYPES = {
    SessionEventType.PUT: pb.SESSION_EVENT_TYPE_PUT,
    SessionEventType.DELETE: pb.SESSION_EVENT_TYPE_DELETE,
    SessionEventType.EXPIRE: pb.SESSION_EVENT_TYPE_EXPIRE,
    SessionEventType.SYNCED: pb.SESSION_EVENT_TYPE_SYNCED,
}
_EVENT_TYPES_BACK = {v: k for k, v in _EVENT_TYPES.items()}


def event_to_pb(ev: SessionEvent) -> pb.SessionEvent:
    msg = pb.SessionEvent(type=_EVENT_TYPES[ev.type], session_id=ev.session_id or "")
    if ev.session is not None:
        msg.session.CopyFrom(session_to_pb(ev.session))
    return msg


def event_from_pb(msg: pb.SessionEvent, *, positions: bool = True) -> SessionEvent:
    if msg.type not in _EVENT_TYPES_BACK:
        raise ValueError(f"unknown session event type {msg.type}")
    return SessionEvent(
        type=_EVENT_TYPES_BACK[msg.type],
        session_id=parse_session_id(msg.session_id) if msg.session_id else None,
        session=session_from_pb(msg.session, positions=positions)
        if msg.HasField("session")
        else None,
    )


def page_to_pb(page: SessionPage) -> pb.ListSessionsResponse:
    return pb.ListSessionsResponse(
        sessions=[session_to_pb(r) for r in page.sessions],
        next_page_token=page.next_page_token,
    )


def page_from_pb(msg: pb.ListSessionsResponse) -> SessionPage:
    return SessionPage(tuple(session_from_pb(s) for s in msg.sessions), msg.next_page_token)
