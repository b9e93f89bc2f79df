"""A 2026-07-28 `subscriptions/listen` stream that outlives its upstream (issue #13).

A listen response is a stream of change notifications that ends only when the client or the
server ends it. When the server dies mid-stream the revision has no cursor to resume from, so
the sidecar keeps the client's stream open, listens again upstream with the same request (same
JSON-RPC id, so every frame keeps the subscription id the client knows), and tells the client
to refetch whatever it subscribed to: the revision's events are level triggers ("this changed,
refetch if you care"), so one of each is exactly what a gap can have hidden.

Sans-IO: `ListenKeeper` is fed the bytes of each upstream listen response and returns what to
write to the client; `sidecar.resilient` does the I/O and the waiting.

Invariants:
1. The client sees one acknowledgement: the first one any upstream listen sent. The
   acknowledgement of a listen re-issued after the client had one is dropped.
2. Only whole events reach the client. An upstream that breaks mid-event loses that partial
   event (its upstream could not have delivered it either), and nothing the sidecar writes
   later can run into half an event.
3. After a re-issued listen is acknowledged, before any of its events, the client gets one
   `notifications/{tools,prompts,resources}/list_changed` per list the first acknowledgement
   honoured and one `notifications/resources/updated` per honoured resource URI, each stamped
   with the subscription id. Too many such events would overflow the pending queue of a client
   (the Python SDK's holds 1024, events it has not consumed yet included) and lose the
   subscription anyway, so past `MAX_REFETCH` the stream ends instead and the client listens
   again and refetches everything.
4. The JSON-RPC response to the listen (its id) is the graceful end: it goes to the client and
   the stream is over. A response stream that ends without it is "lost": listen again.
5. Frames pass through re-encoded from the parsed event (data, event type, id), with LF line
   endings. A chunk of comments only (the upstream's keep-alives) becomes one comment of the
   sidecar's, so a quiet stream stays as alive for balancers and clients as it was upstream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from sidecar.jsonrpc import RequestId
from sidecar.sse import SSEError, SSEEvent, SSEParser, encode_comment, encode_event

ACKNOWLEDGED: Final = "notifications/subscriptions/acknowledged"
SUBSCRIPTION_ID: Final = "io.modelcontextprotocol/subscriptionId"
MAX_REFETCH: Final = 512
"""Invariant 3: most refetch events sent after one re-issued listen."""

_LIST_CHANGED: Final = (
    ("toolsListChanged", "notifications/tools/list_changed"),
    ("promptsListChanged", "notifications/prompts/list_changed"),
    ("resourcesListChanged", "notifications/resources/list_changed"),
)


@dataclass(frozen=True, slots=True)
class Fed:
    """What one upstream chunk means for the client."""

    out: bytes = b""
    """Bytes to write to the client (possibly empty)."""
    done: bool = False
    """Invariant 4: the listen's response went out; end the client stream."""
    broken: str | None = None
    """The upstream stream is unusable (a parse error); treat it as lost."""
    too_many: bool = False
    """Invariant 3: the refetch would exceed `MAX_REFETCH`; end the stream."""


@dataclass
class ListenKeeper:
    """One client's listen stream, across the upstream listens that serve it."""

    request_id: RequestId
    params: Mapping[str, Any]
    """The listen request's params: the filter, should no acknowledgement carry one."""
    max_event_bytes: int = 1 << 20
    honoured: dict[str, Any] | None = None
    """The filter of the acknowledgement the client got (invariant 1)."""
    listens: int = 0
    """Upstream listens opened for this client so far."""
    acked_this_listen: bool = False
    _parser: SSEParser = field(init=False)

    def __post_init__(self) -> None:
        self._parser = SSEParser(max_event_bytes=self.max_event_bytes)

    @property
    def client_acked(self) -> bool:
        return self.honoured is not None

    def opened(self) -> None:
        """A new upstream listen response began (its bytes follow)."""
        self.listens += 1
        self.acked_this_listen = False
        self._parser = SSEParser(max_event_bytes=self.max_event_bytes)

    def feed(self, chunk: bytes) -> Fed:
        out: list[bytes] = []
        items = self._parser.feed(chunk)
        if chunk and not items and not self._parser.mid_event:
            return Fed(self.keepalive(upstream=True))  # invariant 5
        for item in items:
            if isinstance(item, SSEError):
                return Fed(b"".join(out), broken=item.message)
            fed = self._event(item)
            if fed.too_many:
                return Fed(b"".join(out), too_many=True)
            out.append(fed.out)
            if fed.done:
                return Fed(b"".join(out), done=True)
        return Fed(b"".join(out))

    def _event(self, event: SSEEvent) -> Fed:
        event_id = event.id if event.id is None or "\0" not in event.id else None
        frame = encode_event(data=event.data, event=event.event, id=event_id)
        msg = _json(event.data)
        if msg is None:
            return Fed(frame)
        if msg.get("method") == ACKNOWLEDGED and not self.acked_this_listen:
            self.acked_this_listen = True
            if self.honoured is None:
                params = msg.get("params")
                filt = params.get("notifications") if isinstance(params, dict) else None
                self.honoured = filt if isinstance(filt, dict) else self._requested()
                return Fed(frame)
            refetch = self.refetch()  # invariant 1: dropped; invariant 3: refetch instead
            if refetch is None:
                return Fed(too_many=True)
            return Fed(refetch)
        if (
            "method" not in msg
            and msg.get("id") == self.request_id
            and _same_type(msg.get("id"), self.request_id)
        ):
            return Fed(frame, done=True)  # invariant 4
        return Fed(frame)

    def _requested(self) -> dict[str, Any]:
        filt = self.params.get("notifications")
        return dict(filt) if isinstance(filt, dict) else {}

    def refetch(self) -> bytes | None:
        """Invariant 3: the events that make the client refetch what it subscribed to; None
        when there would be more than `MAX_REFETCH`."""
        filt = self.honoured if self.honoured is not None else self._requested()
        methods = [method for key, method in _LIST_CHANGED if filt.get(key) is True]
        uris = filt.get("resourceSubscriptions")
        uris = [u for u in uris if isinstance(u, str)] if isinstance(uris, list) else []
        if len(methods) + len(uris) > MAX_REFETCH:
            return None
        meta = {SUBSCRIPTION_ID: self.request_id}
        frames = [_notification(method, {"_meta": meta}) for method in methods]
        frames += [
            _notification("notifications/resources/updated", {"uri": uri, "_meta": meta})
            for uri in dict.fromkeys(uris)
        ]
        return b"".join(frames)

    @staticmethod
    def keepalive(*, upstream: bool = False) -> bytes:
        """A comment: the upstream's keep-alive passed on, or the sidecar's own while the
        upstream is quiet or gone."""
        if upstream:
            return encode_comment("keep-alive")
        return encode_comment("tether: the upstream listen ended; listening again")

    def answer_as_event(self, body: bytes) -> bytes:
        """A non-stream answer to a re-issued listen (the server refused it), as the event
        that ends the client's stream: a JSON-RPC error for the client's listen request."""
        msg = _json(body.decode("utf-8", "replace"))
        if msg is not None and ("error" in msg or "result" in msg):
            msg["id"] = self.request_id
            data = json.dumps(msg, separators=(",", ":"))
        else:
            data = json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": self.request_id,
                    "error": {"code": -32000, "message": "tether: the upstream refused to listen"},
                },
                separators=(",", ":"),
            )
        return encode_event(data=data)


def _notification(method: str, params: dict[str, Any]) -> bytes:
    data = json.dumps({"jsonrpc": "2.0", "method": method, "params": params}, separators=(",", ":"))
    return encode_event(data=data)


def _json(data: str) -> dict[str, Any] | None:
    if not data.startswith("{"):
        return None
    try:
        msg = json.loads(data)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def _same_type(a: object, b: object) -> bool:
    """JSON-RPC ids match by value and type: 1 is not "1" (and True is not 1)."""
    return type(a) is type(b)
