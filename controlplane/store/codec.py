"""How a `SessionRecord` is stored: compact JSON, and opaque page tokens.

JSON rather than protobuf so that stores do not depend on the generated wire code and a value
can be read with `etcdctl get` or `sqlite3`. `initialize_request` is base64 (it is bytes).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from controlplane.store.protocol import InvalidPageTokenError
from tether.model import (
    InvalidIdError,
    OwnerName,
    SessionId,
    SessionRecord,
    StreamId,
    StreamPosition,
    parse_session_id,
)

FORMAT_VERSION = 1


def encode_record(record: SessionRecord) -> bytes:
    """The stored form of `record`."""
    doc: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "session_id": record.session_id,
        "upstream_session_id": record.upstream_session_id,
        "upstream_address": record.upstream_address,
        "owner": record.owner,
        "owner_epoch": record.owner_epoch,
        "protocol_version": record.protocol_version,
        "initialize_request": base64.b64encode(record.initialize_request).decode("ascii"),
        "credential_fingerprint": record.credential_fingerprint,
        "streams": [
            [p.stream_id, p.last_event_id, p.upstream_event_id, p.seq, p.owner_epoch]
            for p in sorted(record.streams.values(), key=lambda p: p.stream_id)
        ],
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "expires_at": record.expires_at,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_record(data: bytes | str) -> SessionRecord:
    """The record stored as `data` (raises ValueError if it is not one)."""
    doc = json.loads(data)
    if doc.get("v") != FORMAT_VERSION:
        raise ValueError(f"unknown session record format {doc.get('v')!r}")
    streams = {
        StreamId(s[0]): StreamPosition(
            stream_id=StreamId(s[0]),
            last_event_id=s[1],
            upstream_event_id=s[2],
            seq=int(s[3]),
            owner_epoch=int(s[4]),
        )
        for s in doc["streams"]
    }
    return SessionRecord(
        session_id=SessionId(doc["session_id"]),
        upstream_session_id=doc["upstream_session_id"],
        upstream_address=doc["upstream_address"],
        owner=OwnerName(doc["owner"]),
        owner_epoch=int(doc["owner_epoch"]),
        protocol_version=doc["protocol_version"],
        initialize_request=base64.b64decode(doc["initialize_request"]),
        # Absent in records written before the field existed.
        credential_fingerprint=doc.get("credential_fingerprint", ""),
        streams=streams,
        created_at=float(doc["created_at"]),
        updated_at=float(doc["updated_at"]),
        expires_at=float(doc["expires_at"]),
    )


def encode_page_token(last_session_id: SessionId) -> str:
    """A token that resumes a listing after `last_session_id`."""
    return base64.urlsafe_b64encode(last_session_id.encode()).decode("ascii").rstrip("=")


def decode_page_token(token: str) -> SessionId | None:
    """The session id a listing resumes after (None for the first page)."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return parse_session_id(raw.decode("ascii"))
    except (binascii.Error, UnicodeDecodeError, InvalidIdError, ValueError) as e:
        raise InvalidPageTokenError(f"invalid page token {token[:64]!r}") from e


def clamp_page_size(page_size: int, *, default: int, maximum: int) -> int:
    """`page_size` within 1..maximum, `default` for 0 or less."""
    if page_size <= 0:
        return default
    return min(page_size, maximum)
