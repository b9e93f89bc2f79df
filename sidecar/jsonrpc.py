"""What the sidecar reads of JSON-RPC: request ids, answers, and the errors it writes itself.

Pure functions, no I/O. The sidecar never rewrites a client's or a server's JSON-RPC messages;
it reads just enough of them to know when a POST stream is complete and which requests to
answer with an error when one cannot be.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

RequestId = int | str


@dataclass(frozen=True, slots=True)
class PostBody:
    """What a POST body says: its request ids, and the `initialize` it carries if any."""

    request_ids: frozenset[RequestId] = frozenset()
    initialize: bool = False
    protocol_version: str | None = None
    """The `protocolVersion` an `initialize` request asks for."""
    listen: bool = False
    """A `subscriptions/listen` request (2026-07-28): its answer is a stream of notifications
    that ends only when the client or the server ends it."""


def read_post_body(body: bytes) -> PostBody:
    """Parse a POST body (one message or a batch); an unparseable body says nothing."""
    try:
        msg = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return PostBody()
    msgs = msg if isinstance(msg, list) else [msg]
    ids: set[RequestId] = set()
    initialize = False
    version: str | None = None
    listen = False
    for m in msgs:
        if not isinstance(m, dict):
            continue
        if "method" in m and isinstance(m.get("id"), int | str):
            ids.add(m["id"])
        listen = listen or m.get("method") == "subscriptions/listen"
        if m.get("method") == "initialize":
            initialize = True
            params = m.get("params")
            if isinstance(params, dict) and isinstance(params.get("protocolVersion"), str):
                version = params["protocolVersion"]
    return PostBody(frozenset(ids), initialize, version, listen)


def answered_ids(data: str) -> list[RequestId]:
    """Ids of the JSON-RPC responses carried by one event's data (cheap pre-check first)."""
    if '"result"' not in data and '"error"' not in data:
        return []
    try:
        msg = json.loads(data)
    except ValueError:
        return []
    msgs = msg if isinstance(msg, list) else [msg]
    return [
        m["id"]
        for m in msgs
        if isinstance(m, dict) and "method" not in m and isinstance(m.get("id"), int | str)
    ]


def error_body(message: str, request_id: Any = None, code: int = -32000) -> bytes:
    """A JSON-RPC error response: MCP clients already know how to read one."""
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    ).encode()
