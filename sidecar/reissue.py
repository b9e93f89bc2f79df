"""Which requests the sidecar may send to its upstream again, and whether a request's routing
headers tell the truth (issue #13). Sans-IO: fed bodies, headers and results; returns facts.

MCP 2026-07-28 has no sessions and no resumption: a response stream that breaks loses its
request, and the client must re-issue it. Where the upstream failed before any byte of its
answer reached the client, the client cannot tell a re-issue from a slow first attempt, so the
sidecar re-issues the requests that are safe to run twice and spares the client the error.

Rules:
1. A request is re-issued only when running it twice is harmless: one of `SAFE_METHODS`, or a
   `tools/call` of a tool whose annotations, as the upstream last listed them, say
   `readOnlyHint: true` or `idempotentHint: true`. Nothing else is ever sent twice.
2. Annotations are learned only from `tools/list` results of this sidecar's upstream, per
   path (one upstream may serve several MCP servers on several paths, each with its own
   tools), and a later listing replaces what an earlier one said of the same tool. At most
   `MAX_TOOLS` (path, name) pairs are kept, the least recently listed dropped first, so a
   server that lists millions of tools costs bounded memory (a dropped tool is simply not
   re-issued).
3. `Mcp-Method` and `Mcp-Name` headers, when present, must equal the body's method and, for
   `tools/call` and `prompts/get` its `params.name`, for `resources/read` its `params.uri`
   (after decoding the `=?base64?...?=` form), and appear once each: otherwise the request
   is refused with 400 and JSON-RPC error -32020 (HeaderMismatch), before anything is
   forwarded, so a balancer that routed on a header and the server that runs the body cannot
   disagree. Absent headers are the server's business (it knows which revision requires them).
4. Only a single JSON-RPC request (an object with a method and an id) is ever re-issued or
   checked; batches, notifications and unparseable bodies pass through as they are.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from multidict import MultiMapping

from sidecar.jsonrpc import RequestId

HEADER_MISMATCH: Final = -32020
"""JSON-RPC error code of a request whose `Mcp-*` headers disagree with its body."""
MCP_METHOD: Final = "Mcp-Method"
MCP_NAME: Final = "Mcp-Name"
PROTOCOL_VERSION: Final = "MCP-Protocol-Version"

SAFE_METHODS: Final = frozenset(
    {
        "server/discover",
        "ping",
        "tools/list",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "completion/complete",
    }
)
"""Rule 1: methods that read and never change anything on the server."""

NAME_PARAM: Final[Mapping[str, str]] = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
}
"""Rule 3: the body parameter `Mcp-Name` mirrors, per method."""

MAX_TOOLS: Final = 4096
"""Rule 2: tool annotations remembered per upstream."""

_SENTINEL_HEAD: Final = "=?base64?"
_SENTINEL_TAIL: Final = "?="


@dataclass(frozen=True, slots=True)
class Call:
    """What one POST body asks: a single JSON-RPC request, or nothing this module reads."""

    method: str | None = None
    request_id: RequestId | None = None
    name: str | None = None
    """The parameter `Mcp-Name` mirrors (rule 3), when the method has one and it is a string."""
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_request(self) -> bool:
        return self.method is not None and self.request_id is not None


NOT_A_CALL: Final = Call()


def read_call(body: bytes) -> Call:
    """Rule 4: the single request a body carries, else `NOT_A_CALL`."""
    try:
        msg = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return NOT_A_CALL
    if not isinstance(msg, dict):
        return NOT_A_CALL
    method = msg.get("method")
    request_id = msg.get("id")
    if not isinstance(method, str) or isinstance(request_id, bool):
        return NOT_A_CALL
    if not isinstance(request_id, int | str):
        return Call(method=method)  # a notification: checked (rule 3), never re-issued
    params = msg.get("params")
    params = params if isinstance(params, dict) else {}
    key = NAME_PARAM.get(method)
    name = params.get(key) if key is not None else None
    return Call(
        method=method,
        request_id=request_id,
        name=name if isinstance(name, str) else None,
        params=params,
    )


def decode_header_value(value: str) -> str | None:
    """An `Mcp-Name` value as the client meant it: the `=?base64?...?=` form decoded (None
    when it does not decode to UTF-8 text)."""
    if not (value.startswith(_SENTINEL_HEAD) and value.endswith(_SENTINEL_TAIL)):
        return value
    payload = value[len(_SENTINEL_HEAD) : -len(_SENTINEL_TAIL)]
    try:
        return base64.b64decode(payload, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def header_mismatch(headers: MultiMapping[str], call: Call) -> str | None:
    """Rule 3: why the request's `Mcp-Method`/`Mcp-Name` disagree with its body, or None.
    `headers` must look names up case-insensitively (aiohttp's do)."""
    if call.method is None:
        return None
    for header in (MCP_METHOD, MCP_NAME, PROTOCOL_VERSION):
        if len(headers.getall(header, ())) > 1:
            return f"{header} header appears more than once"
    method = headers.get(MCP_METHOD)
    if method is not None and method != call.method:
        return (
            f"{MCP_METHOD} header {method[:80]!r} does not match the body's method {call.method!r}"
        )
    raw_name = headers.get(MCP_NAME)
    key = NAME_PARAM.get(call.method)
    if raw_name is None or key is None:
        return None
    name = decode_header_value(raw_name)
    if name is None:
        return f"{MCP_NAME} header is not valid base64 UTF-8"
    if call.name is None or name != call.name:
        return (
            f"{MCP_NAME} header {name[:80]!r} does not match the body's "
            f"params.{key} {(call.name or '')[:80]!r}"
        )
    return None


class ToolHints:
    """Rule 2: which tools the upstream says are read-only or idempotent, per path."""

    def __init__(self, max_tools: int = MAX_TOOLS) -> None:
        self._max = max_tools
        self._safe: OrderedDict[tuple[str, str], bool] = OrderedDict()

    def __len__(self) -> int:
        return len(self._safe)

    def learn(self, result: Mapping[str, Any], path: str = "") -> int:
        """Take in one `tools/list` result (a page) listed at `path`; returns how many tools
        it named."""
        tools = result.get("tools")
        if not isinstance(tools, list):
            return 0
        seen = 0
        for tool in tools:
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                continue
            notes = tool.get("annotations")
            notes = notes if isinstance(notes, dict) else {}
            safe = notes.get("readOnlyHint") is True or notes.get("idempotentHint") is True
            key = (path, tool["name"])
            self._safe.pop(key, None)
            self._safe[key] = safe
            seen += 1
        while len(self._safe) > self._max:
            self._safe.popitem(last=False)
        return seen

    def learn_answer(self, data: bytes | str, path: str = "") -> int:
        """Take in a JSON-RPC response to `tools/list` as it came from the upstream (a JSON
        body, or one SSE event's data); anything else teaches nothing."""
        if b'"tools"' not in (data if isinstance(data, bytes) else data.encode()):
            return 0
        try:
            msg = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return 0
        result = msg.get("result") if isinstance(msg, dict) else None
        return self.learn(result, path) if isinstance(result, dict) else 0

    def safe(self, tool: str, path: str = "") -> bool:
        return self._safe.get((path, tool), False)


def may_reissue(call: Call, hints: ToolHints, path: str = "") -> bool:
    """Rule 1 (`path`: where the call goes, whose tools/list taught `hints`)."""
    if not call.is_request:
        return False
    if call.method in SAFE_METHODS:
        return True
    return call.method == "tools/call" and call.name is not None and hints.safe(call.name, path)


RETRY_STATUSES: Final = frozenset({502, 503, 504})
"""Upstream answers that mean "not processed, try again": a gateway or a server starting."""
