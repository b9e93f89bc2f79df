# mypy: disable-error-code="type-arg"
import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RejectionReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECTION_REASON_UNSPECIFIED: _ClassVar[RejectionReason]
    REJECTION_REASON_FENCED: _ClassVar[RejectionReason]
    REJECTION_REASON_UNKNOWN_SESSION: _ClassVar[RejectionReason]
    REJECTION_REASON_INVALID: _ClassVar[RejectionReason]
    REJECTION_REASON_OWNER_LIMIT: _ClassVar[RejectionReason]

class SessionEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_EVENT_TYPE_UNSPECIFIED: _ClassVar[SessionEventType]
    SESSION_EVENT_TYPE_PUT: _ClassVar[SessionEventType]
    SESSION_EVENT_TYPE_DELETE: _ClassVar[SessionEventType]
    SESSION_EVENT_TYPE_EXPIRE: _ClassVar[SessionEventType]
    SESSION_EVENT_TYPE_SYNCED: _ClassVar[SessionEventType]
REJECTION_REASON_UNSPECIFIED: RejectionReason
REJECTION_REASON_FENCED: RejectionReason
REJECTION_REASON_UNKNOWN_SESSION: RejectionReason
REJECTION_REASON_INVALID: RejectionReason
REJECTION_REASON_OWNER_LIMIT: RejectionReason
SESSION_EVENT_TYPE_UNSPECIFIED: SessionEventType
SESSION_EVENT_TYPE_PUT: SessionEventType
SESSION_EVENT_TYPE_DELETE: SessionEventType
SESSION_EVENT_TYPE_EXPIRE: SessionEventType
SESSION_EVENT_TYPE_SYNCED: SessionEventType

class StreamPosition(_message.Message):
    __slots__ = ("stream_id", "last_event_id", "upstream_event_id", "seq", "owner_epoch")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OWNER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    last_event_id: str
    upstream_event_id: str
    seq: int
    owner_epoch: int
    def __init__(self, stream_id: _Optional[str] = ..., last_event_id: _Optional[str] = ..., upstream_event_id: _Optional[str] = ..., seq: _Optional[int] = ..., owner_epoch: _Optional[int] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "upstream_session_id", "upstream_address", "owner", "owner_epoch", "protocol_version", "initialize_request", "streams", "created_at", "updated_at", "expires_at", "credential_fingerprint")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    OWNER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INITIALIZE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    upstream_session_id: str
    upstream_address: str
    owner: str
    owner_epoch: int
    protocol_version: str
    initialize_request: bytes
    streams: _containers.RepeatedCompositeFieldContainer[StreamPosition]
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    credential_fingerprint: str
    def __init__(self, session_id: _Optional[str] = ..., upstream_session_id: _Optional[str] = ..., upstream_address: _Optional[str] = ..., owner: _Optional[str] = ..., owner_epoch: _Optional[int] = ..., protocol_version: _Optional[str] = ..., initialize_request: _Optional[bytes] = ..., streams: _Optional[_Iterable[_Union[StreamPosition, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., credential_fingerprint: _Optional[str] = ...) -> None: ...

class SessionUpsert(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class StreamUpdate(_message.Message):
    __slots__ = ("session_id", "position")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: StreamPosition
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[_Union[StreamPosition, _Mapping]] = ...) -> None: ...

class ReportEventsRequest(_message.Message):
    __slots__ = ("batch_id", "upserts", "updates")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    UPSERTS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    upserts: _containers.RepeatedCompositeFieldContainer[SessionUpsert]
    updates: _containers.RepeatedCompositeFieldContainer[StreamUpdate]
    def __init__(self, batch_id: _Optional[int] = ..., upserts: _Optional[_Iterable[_Union[SessionUpsert, _Mapping]]] = ..., updates: _Optional[_Iterable[_Union[StreamUpdate, _Mapping]]] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("session_id", "stream_id", "reason", "detail", "current_owner", "current_owner_epoch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CURRENT_OWNER_FIELD_NUMBER: _ClassVar[int]
    CURRENT_OWNER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    stream_id: str
    reason: RejectionReason
    detail: str
    current_owner: str
    current_owner_epoch: int
    def __init__(self, session_id: _Optional[str] = ..., stream_id: _Optional[str] = ..., reason: _Optional[_Union[RejectionReason, str]] = ..., detail: _Optional[str] = ..., current_owner: _Optional[str] = ..., current_owner_epoch: _Optional[int] = ...) -> None: ...

class ReportEventsResponse(_message.Message):
    __slots__ = ("batch_id", "rejections", "session_ttl")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    session_ttl: _duration_pb2.Duration
    def __init__(self, batch_id: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., session_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "owner")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    owner: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ClaimSessionRequest(_message.Message):
    __slots__ = ("session_id", "owner", "expected_owner_epoch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OWNER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    owner: str
    expected_owner_epoch: int
    def __init__(self, session_id: _Optional[str] = ..., owner: _Optional[str] = ..., expected_owner_epoch: _Optional[int] = ...) -> None: ...

class ClaimSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class WatchSessionsRequest(_message.Message):
    __slots__ = ("owner",)
    OWNER_FIELD_NUMBER: _ClassVar[int]
    owner: str
    def __init__(self, owner: _Optional[str] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("type", "session_id", "session")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    type: SessionEventType
    session_id: str
    session: Session
    def __init__(self, type: _Optional[_Union[SessionEventType, str]] = ..., session_id: _Optional[str] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...
