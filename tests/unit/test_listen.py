"""`sidecar.listen.ListenKeeper` as a playbook: upstream listen bytes in, client bytes out. What
the client gets is read back with the official SDK's own listen-frame reader
(`mcp.shared.subscriptions.event_from_wire`) and message models, so "the client understands
it" is the SDK's verdict, not ours."""

from __future__ import annotations

import json
from typing import Any

import mcp_types
from mcp.shared.subscriptions import (
    SUBSCRIPTION_ID_META_KEY,
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ToolsListChanged,
    event_from_wire,
)

from sidecar.listen import ACKNOWLEDGED, MAX_REFETCH, ListenKeeper
from sidecar.sse import SSEEvent, SSEParser

SID = "listen-1"
META = {SUBSCRIPTION_ID_META_KEY: SID}
FILTER = {
    "toolsListChanged": True,
    "resourcesListChanged": True,
    "resourceSubscriptions": ["file:///a", "file:///b"],
}


def frame(msg: dict[str, Any], *, crlf: bool = True) -> bytes:
    """How the SDK server writes an event."""
    nl = "\r\n" if crlf else "\n"
    return f"event: message{nl}data: {json.dumps(msg)}{nl}{nl}".encode()


def ack(notifications: dict[str, Any] = FILTER) -> bytes:
    params = {"notifications": notifications, "_meta": META}
    return frame({"jsonrpc": "2.0", "method": ACKNOWLEDGED, "params": params})


def note(method: str, **params: Any) -> bytes:
    return frame({"jsonrpc": "2.0", "method": method, "params": {**params, "_meta": META}})


RESULT = frame({"jsonrpc": "2.0", "id": SID, "result": {"_meta": META}})


def keeper() -> ListenKeeper:
    params = {"notifications": {"toolsListChanged": True}, "_meta": {}}
    return ListenKeeper(SID, params)


def client_reads(data: bytes) -> list[dict[str, Any]]:
    """The messages a client parses out of what the keeper wrote (each checked by the SDK)."""
    events = [e for e in SSEParser().feed(data) if isinstance(e, SSEEvent)]
    msgs = [json.loads(e.data) for e in events]
    for msg in msgs:
        mcp_types.jsonrpc_message_adapter.validate_python(msg)
    return msgs


def sdk_events(msgs: list[dict[str, Any]]) -> list[object]:
    return [event_from_wire(m["method"], m.get("params")) for m in msgs if "method" in m]


def test_a_listen_passes_its_acknowledgement_events_and_result() -> None:
    k = keeper()
    k.opened()
    fed = k.feed(ack() + note("notifications/tools/list_changed"))
    assert not fed.done
    msgs = client_reads(fed.out)
    assert [m["method"] for m in msgs] == [ACKNOWLEDGED, "notifications/tools/list_changed"]
    assert k.honoured == FILTER
    end = k.feed(RESULT)
    assert end.done
    assert client_reads(end.out)[0]["id"] == SID


def test_a_relisten_drops_its_acknowledgement_and_asks_for_a_refetch_of_each_subscription() -> None:
    k = keeper()
    k.opened()
    k.feed(ack())
    k.opened()  # the upstream died; listened again
    fed = k.feed(ack({"toolsListChanged": True}) + note("notifications/resources/updated", uri="x"))
    msgs = client_reads(fed.out)
    assert ACKNOWLEDGED not in [m["method"] for m in msgs]  # invariant 1
    assert sdk_events(msgs) == [  # invariant 3: the first acknowledgement's filter, then live
        ToolsListChanged(),
        ResourcesListChanged(),
        ResourceUpdated(uri="file:///a"),
        ResourceUpdated(uri="file:///b"),
        ResourceUpdated(uri="x"),
    ]
    for m in msgs:
        assert m["params"]["_meta"][SUBSCRIPTION_ID_META_KEY] == SID


def test_a_listen_lost_before_its_acknowledgement_passes_the_next_one() -> None:
    k = keeper()
    k.opened()
    assert k.feed(b'event: message\r\ndata: {"jsonrpc"').out == b""  # cut mid-event
    k.opened()
    msgs = client_reads(k.feed(ack()).out)
    assert [m["method"] for m in msgs] == [ACKNOWLEDGED]  # nothing to refetch: never acked


def test_half_an_event_never_reaches_the_client() -> None:
    k = keeper()
    k.opened()
    k.feed(ack())
    whole = note("notifications/tools/list_changed")
    assert k.feed(whole[:20]).out == b""
    k.opened()  # the rest never comes
    out = k.feed(ack()).out
    assert client_reads(out)  # parses cleanly: no half event before it


def test_an_answer_for_another_id_or_type_is_not_the_end() -> None:
    k = ListenKeeper(1, {})
    k.opened()
    k.feed(ack())
    assert not k.feed(frame({"jsonrpc": "2.0", "id": "1", "result": {}})).done
    assert not k.feed(frame({"jsonrpc": "2.0", "id": 2, "result": {}})).done
    assert k.feed(frame({"jsonrpc": "2.0", "id": 1, "result": {}}, crlf=False)).done


def test_more_subscriptions_than_a_client_can_queue_end_the_stream() -> None:
    k = keeper()
    k.opened()
    many = {"resourceSubscriptions": [f"file:///{i}" for i in range(MAX_REFETCH + 1)]}
    k.feed(ack(many))
    k.opened()
    assert k.feed(ack(many)).too_many


def test_no_filter_in_the_acknowledgement_falls_back_to_the_request() -> None:
    k = keeper()
    k.opened()
    k.feed(frame({"jsonrpc": "2.0", "method": ACKNOWLEDGED, "params": {"_meta": META}}))
    assert k.honoured == {"toolsListChanged": True}
    assert sdk_events(client_reads(k.refetch() or b"")) == [ToolsListChanged()]
    assert PromptsListChanged() not in sdk_events(client_reads(k.refetch() or b""))


def test_a_refused_relisten_becomes_an_error_for_the_clients_request() -> None:
    k = keeper()
    refused = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -1, "message": "full"}})
    (msg,) = client_reads(k.answer_as_event(refused.encode()))
    assert msg["id"] == SID
    assert msg["error"]["message"] == "full"
    (msg,) = client_reads(k.answer_as_event(b"<html>bad gateway</html>"))
    assert msg["id"] == SID
    assert "tether" in msg["error"]["message"]


def test_keepalives_are_comments() -> None:
    assert SSEParser().feed(ListenKeeper.keepalive()) == []
    assert ListenKeeper.keepalive().startswith(b":")


def test_a_broken_upstream_stream_is_reported() -> None:
    k = ListenKeeper(SID, {}, max_event_bytes=64)
    k.opened()
    fed = k.feed(b"data: " + b"x" * 200 + b"\n\n")
    assert fed.broken is not None
