"""Which headers cross the sidecar, in which direction, and the errors it answers itself.

Rules:
1. Hop-by-hop headers (RFC 9110 7.6.1), and any a `Connection` header names, never cross.
2. `Host` names the sidecar and is set anew for the upstream; `Accept-Encoding` is not sent
   (compressing over the pod's loopback only costs CPU); `Last-Event-ID` is answered here.
3. `X-Forwarded-For/-Proto/-Host` say what the sidecar saw. A client's own values are kept
   only when it is a configured trusted proxy; from anyone else they are overwritten, and the
   other headers of that family (`Forwarded`, `X-Real-IP`, `X-Forwarded-Port`, ...) dropped,
   so an upstream that trusts them cannot be told a made-up address, scheme, host or port.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.jsonrpc import error_body

SESSION_HEADER = "Mcp-Session-Id"
PROTOCOL_HEADER = "MCP-Protocol-Version"
LAST_EVENT_ID = "Last-Event-ID"
SSE_TYPE = "text/event-stream"
PRIMING_SINCE = "2025-11-25"
"""First revision whose clients expect a priming event (an id with empty data) on SSE streams."""


def expects_priming(request: web.Request, session_version: str | None) -> bool:
    """Whether the client speaks a revision that expects priming events: its
    MCP-Protocol-Version header, else the one its session negotiated."""
    version = request.headers.get(PROTOCOL_HEADER) or session_version
    return (version or "") >= PRIMING_SINCE


_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
_FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
_FORWARDED_FAMILY = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-scheme",
        "x-original-forwarded-for",
        "x-client-ip",
        "true-client-ip",
    }
)
"""Set only by proxies: passed on from a trusted one, dropped from anyone else (rule 3)."""
_NOT_UPSTREAM = _HOP_BY_HOP | _FORWARDED | {"host", "accept-encoding", "last-event-id"}
_NOT_UPSTREAM |= {"content-length"}
_NOT_DOWNSTREAM = _HOP_BY_HOP | {"content-length"}


def _connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    listed: set[str] = set()
    for value in headers.getall("Connection", []):
        listed.update(v.strip().lower() for v in value.split(",") if v.strip())
    return listed


def upstream_request_headers(request: web.Request, *, trusted_peer: bool) -> CIMultiDict[str]:
    """End-to-end headers of the client request, plus `X-Forwarded-*` (rule 3)."""
    extra = _connection_listed(request.headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lname = name.lower()
        if lname in _NOT_UPSTREAM or lname in extra:
            continue
        if lname in _FORWARDED_FAMILY and not trusted_peer:
            continue
        out.add(name, value)
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For") if trusted_peer else None
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    proto = request.headers.get("X-Forwarded-Proto") if trusted_peer else None
    out["X-Forwarded-Proto"] = proto or request.scheme
    host = request.headers.get("X-Forwarded-Host") if trusted_peer else None
    out["X-Forwarded-Host"] = host or request.host
    return out


def downstream_headers(headers: CIMultiDictProxy[str], *, keep_length: bool) -> CIMultiDict[str]:
    """End-to-end headers of an upstream response (Content-Length only when the body passes
    through unchanged)."""
    extra = _connection_listed(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        if (lname in _NOT_DOWNSTREAM and not (keep_length and lname == "content-length")) or (
            lname in extra
        ):
            continue
        out.add(name, value)
    return out


def error_response(
    status: int, message: str, *, code: int = -32000, request_id: int | str | None = None
) -> web.Response:
    """An HTTP error in JSON-RPC shape, which MCP clients already know how to read."""
    return web.Response(
        status=status,
        body=error_body(f"tether: {message}", request_id, code),
        content_type="application/json",
    )


def is_sse(status: int, content_type: str) -> bool:
    return status == 200 and content_type.startswith(SSE_TYPE)


def cut_short(request: web.Request) -> None:
    """Pass on an upstream body that broke as broken: the client's connection is cut before the
    response's end, so a truncated answer never reads as a whole one (a cleanly ended chunked
    body, or a JSON answer missing its tail)."""
    if request.transport is not None:
        request.transport.abort()
