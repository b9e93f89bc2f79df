"""`sidecar.reissue`: which requests may be sent twice, and whether `Mcp-*` headers match the
body. Pure functions fed bodies and headers."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from sidecar.reissue import (
    MAX_TOOLS,
    NOT_A_CALL,
    SAFE_METHODS,
    Call,
    ToolHints,
    decode_header_value,
    header_mismatch,
    may_reissue,
    read_call,
)


def body(method: str, rid: Any = 1, **params: Any) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
    if rid is not None:
        msg["id"] = rid
    return json.dumps(msg).encode()


def b64(text: str) -> str:
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


def test_read_call_takes_one_request_and_its_named_parameter() -> None:
    call = read_call(body("tools/call", 7, name="echo", arguments={"text": "x"}))
    assert call == Call(
        method="tools/call",
        request_id=7,
        name="echo",
        params={"name": "echo", "arguments": {"text": "x"}},
    )
    assert read_call(body("resources/read", "r1", uri="file:///a")).name == "file:///a"
    assert read_call(body("tools/list", 2)).name is None


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        json.dumps([json.loads(body("tools/list"))]).encode(),  # a batch: rule 4
        json.dumps({"jsonrpc": "2.0", "id": 1}).encode(),  # no method
        json.dumps({"jsonrpc": "2.0", "id": True, "method": "ping"}).encode(),
        b"42",
    ],
)
def test_read_call_reads_nothing_into_what_is_not_a_single_request(raw: bytes) -> None:
    assert not read_call(raw).is_request


def test_a_notification_is_checked_but_never_a_request() -> None:
    call = read_call(body("notifications/cancelled", None))
    assert call.method == "notifications/cancelled"
    assert not call.is_request
    assert not may_reissue(call, ToolHints())


def test_headers_that_match_the_body_pass() -> None:
    call = read_call(body("tools/call", 1, name="get_weather"))
    headers = CIMultiDict({"mcp-method": "tools/call", "MCP-NAME": "get_weather"})
    assert header_mismatch(headers, call) is None
    assert header_mismatch(CIMultiDict(), call) is None  # absent: the server's business


@pytest.mark.parametrize(
    ("method", "params", "headers", "complaint"),
    [
        ("tools/list", {}, {"Mcp-Method": "tools/call"}, "Mcp-Method"),
        ("tools/call", {"name": "a"}, {"Mcp-Method": "tools/call", "Mcp-Name": "b"}, "Mcp-Name"),
        ("prompts/get", {"name": "a"}, {"Mcp-Name": "A"}, "Mcp-Name"),  # values are exact
        ("resources/read", {"uri": "file:///x"}, {"Mcp-Name": "file:///y"}, "Mcp-Name"),
        ("tools/call", {}, {"Mcp-Name": "a"}, "Mcp-Name"),  # a name the body does not have
        ("tools/call", {"name": "a"}, {"Mcp-Name": "=?base64?***?="}, "base64"),
    ],
)
def test_headers_that_disagree_with_the_body_are_named(
    method: str, params: dict[str, Any], headers: dict[str, str], complaint: str
) -> None:
    reason = header_mismatch(CIMultiDict(headers), read_call(body(method, 1, **params)))
    assert reason is not None
    assert complaint in reason


def test_an_encoded_name_is_compared_decoded() -> None:
    for name in ("Hello, 世界", " padded ", "line1\nline2", "=?base64?literal?="):
        call = read_call(body("tools/call", 1, name=name))
        assert header_mismatch(CIMultiDict({"Mcp-Name": b64(name)}), call) is None
        assert decode_header_value(b64(name)) == name


def test_mcp_name_on_a_method_without_a_name_is_not_compared() -> None:
    assert header_mismatch(CIMultiDict({"Mcp-Name": "x"}), read_call(body("ping"))) is None


def tool(name: str, **hints: Any) -> dict[str, Any]:
    return {"name": name, "inputSchema": {"type": "object"}, "annotations": hints}


def test_only_read_only_or_idempotent_tools_and_safe_methods_are_sent_twice() -> None:
    hints = ToolHints()
    listed = {
        "tools": [
            tool("read", readOnlyHint=True),
            tool("put", idempotentHint=True, destructiveHint=True),
            tool("append", readOnlyHint=False),
            tool("hinted_as_text", readOnlyHint="true"),  # not the JSON true: not trusted
            {"name": "bare"},
        ]
    }
    assert hints.learn(listed) == 5

    def call(name: str) -> Call:
        return read_call(body("tools/call", 1, name=name))

    assert may_reissue(call("read"), hints)
    assert may_reissue(call("put"), hints)
    for name in ("append", "hinted_as_text", "bare", "never_listed"):
        assert not may_reissue(call(name), hints)
    for method in SAFE_METHODS:
        assert may_reissue(read_call(body(method)), hints)
    for method in ("initialize", "sampling/createMessage", "tasks/cancel", "logging/setLevel"):
        assert not may_reissue(read_call(body(method)), hints)
    assert not may_reissue(NOT_A_CALL, hints)


def test_a_later_listing_replaces_what_an_earlier_one_said() -> None:
    hints = ToolHints()
    hints.learn({"tools": [tool("t", readOnlyHint=True)]})
    assert hints.safe("t")
    hints.learn({"tools": [tool("t", readOnlyHint=False)]})
    assert not hints.safe("t")


def test_answers_teach_from_their_result_only() -> None:
    hints = ToolHints()
    answer = {"jsonrpc": "2.0", "id": 3, "result": {"tools": [tool("r", readOnlyHint=True)]}}
    assert hints.learn_answer(json.dumps(answer).encode()) == 1
    assert hints.safe("r")
    error = {"jsonrpc": "2.0", "id": 3, "error": {"code": 1, "message": "tools"}}
    for junk in (b"", b"{", json.dumps(error).encode(), b'{"tools": []}', b'"tools"'):
        assert hints.learn_answer(junk) == 0


@given(st.lists(st.integers(min_value=0, max_value=3 * MAX_TOOLS), max_size=60))
def test_hints_stay_bounded_and_keep_the_latest(pages: list[int]) -> None:
    hints = ToolHints(max_tools=50)
    for start in pages:
        hints.learn({"tools": [tool(f"t{start + i}", readOnlyHint=True) for i in range(20)]})
        assert len(hints) <= 50
        assert all(hints.safe(f"t{start + i}") for i in range(20))  # the latest page is kept


def test_hints_are_per_path() -> None:
    """Rule 2: one upstream may serve several MCP servers, one per path."""
    hints = ToolHints()
    hints.learn({"tools": [tool("delete", readOnlyHint=True)]}, "/a/mcp")
    hints.learn({"tools": [tool("delete", readOnlyHint=False)]}, "/b/mcp")
    call = read_call(body("tools/call", 1, name="delete"))
    assert may_reissue(call, hints, "/a/mcp")
    assert not may_reissue(call, hints, "/b/mcp")
    assert not may_reissue(call, hints, "/c/mcp")


def test_a_routing_header_given_twice_is_refused() -> None:
    call = read_call(body("tools/list"))
    twice = CIMultiDict([("Mcp-Method", "tools/list"), ("mcp-method", "tools/list")])
    reason = header_mismatch(twice, call)
    assert reason is not None
    assert "more than once" in reason
