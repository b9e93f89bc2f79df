"""The connection to the MCP server: one aiohttp client, bounded waits, counted requests.

Rules:
1. Every upstream request waits at most `upstream_response_timeout` for its response headers
   (then `UpstreamTimeoutError`); reading a body is bounded elsewhere (SSE streams may idle
   for hours, a dead peer is found by TCP keepalive).
2. `waiting` counts requests waiting for their response headers; admission refuses new
   requests past `max_upstream_requests`, so a hung upstream cannot pile up requests.
3. A client body is read whole, bounded by `max_request_body_bytes` and in time by
   `upstream_response_timeout`, before anything is sent: its JSON-RPC request says whether it
   may be sent again (`sidecar.reissue`), and MCP bodies are small.
4. An answered SSE body is read to its end, briefly (`finish_body`), before it is released:
   released with its last chunk unread, its connection was closed instead of going back to
   the pool, and the next request paid for a new one (issue 16).
5. An upstream connection idle for `UPSTREAM_IDLE_REUSE_S` is not used again: servers close
   their idle keep-alive connections (uvicorn and Node's http server after 5 s), and a
   request sent on one just as its server closes it fails with "the upstream closed the
   connection" (a 502 to the client: a POST is not sent again). aiohttp checks a pooled
   connection's idle time when it takes it, so this bound is exact.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web
from multidict import CIMultiDict

from sidecar.config import SidecarConfig
from sidecar.headers import LAST_EVENT_ID
from sidecar.tracing import NO_TRACING, Tracing

UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)
"""What a failed upstream exchange raises (UpstreamTimeoutError is a TimeoutError)."""

MID_BODY = "the upstream closed the response mid-body"


FINISH_S = 1.0
FINISH_BYTES = 1 << 16
"""Rule 4: how long, and how much, an answered body is read for its end."""


async def finish_body(resp: aiohttp.ClientResponse) -> None:
    """Rule 4: read the rest of an answered body (a server closes an SSE response once it has
    sent the answer) for at most `FINISH_S` seconds and `FINISH_BYTES`, throwing it away, so
    that releasing `resp` keeps its connection; a body that does not end in time is left to
    `release` to close."""
    left = FINISH_BYTES
    try:
        async with asyncio.timeout(FINISH_S):
            while left > 0 and not resp.content.at_eof():
                chunk = await resp.content.readany()
                if not chunk:
                    return
                left -= len(chunk)
    except (aiohttp.ClientError, TimeoutError):
        return


def describe_upstream_error(exc: BaseException) -> str:
    """What went wrong with the upstream, in words, for a log line or a 502 body.

    aiohttp's own texts mislead here: a refused connection reads "Cannot connect to host
    127.0.0.1:8931 ssl:default [Connect call failed ...]" on plain HTTP, and a server that
    closes mid-body reads "TransferEncodingError: 400" (a status nobody sent).
    """
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {_os_reason(exc.os_error)}"
    if isinstance(exc, aiohttp.ClientPayloadError):
        cause = exc.__cause__
        if isinstance(cause, aiohttp.http_exceptions.HttpProcessingError) and (
            "Not enough data" in (cause.message or "")
        ):
            return MID_BODY
        return f"the upstream's response body is malformed: {cause or exc}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the upstream closed the connection"
    if isinstance(exc, aiohttp.ClientOSError | ConnectionError):
        return f"the connection to the upstream failed: {_os_reason(exc)}"
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    return str(exc) or type(exc).__name__


def _os_reason(error: OSError) -> str:
    """`connection refused`, not `[Errno 111] Connect call failed ('127.0.0.1', 8931)`."""
    if error.errno is not None and error.errno > 0:
        return os.strerror(error.errno).lower()
    text = error.strerror or str(error) or type(error).__name__
    return text[:1].lower() + text[1:]


class BodyTooLargeError(Exception):
    """The client's request body exceeded the configured limit."""


class UpstreamTimeoutError(TimeoutError):
    """The upstream did not answer with response headers in time (rule 1)."""


def keepalive_socket(addr_info: Any, *, dead_after: float) -> socket.socket:
    """An upstream socket that notices a dead peer on its own.

    The sidecar mostly only reads from the upstream, so a peer that vanished without a reset
    (a network cut, a pod replaced) would never be noticed. TCP keepalive probes after half of
    `dead_after` of silence, three probes over the other half, find it; TCP_USER_TIMEOUT bounds
    unacknowledged sends the same way. A live but idle peer answers the probes."""
    family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(dead_after / 2))
    interval = max(1, int(dead_after / 6))
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", int(dead_after * 1000)),
    ):
        option = getattr(socket, name, None)
        if option is not None:  # Linux has them all; others keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return sock


UPSTREAM_IDLE_REUSE_S = 4.0
"""Rule 5: under the 5 s idle keep-alive timeout of uvicorn (the Python SDK's server) and of
Node's http server (the TypeScript SDK's)."""


class Upstream:
    """The sidecar's client for its one MCP server."""

    def __init__(self, config: SidecarConfig, *, tracing: Tracing = NO_TRACING) -> None:
        self.config = config
        self.tracing = tracing
        """Every upstream request is a client span carrying its `traceparent`
        (`sidecar.tracing` rule 2); the pump and re-issues open their spans here too."""
        self.base = config.upstream_base
        self.waiting = 0
        """Requests waiting for response headers now (rule 2)."""
        self._client: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        dead_after = self.config.upstream_dead_after
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,
                keepalive_timeout=UPSTREAM_IDLE_REUSE_S,  # rule 5
                enable_cleanup_closed=True,
                socket_factory=lambda info: keepalive_socket(info, dead_after=dead_after),
            ),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self.config.connect_timeout, sock_read=None
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    @property
    def client(self) -> aiohttp.ClientSession:
        assert self._client is not None, "Upstream.start() not called"
        return self._client

    @property
    def full(self) -> bool:
        return self.waiting >= self.config.max_upstream_requests

    async def request(
        self,
        method: str,
        path_qs: str,
        *,
        headers: CIMultiDict[str],
        data: AsyncIterator[bytes] | bytes | None = None,
    ) -> aiohttp.ClientResponse:
        """Send one request; returns once the response headers are in (rule 1)."""
        timeout = self.config.upstream_response_timeout
        deadline = asyncio.timeout(timeout)
        url = self.base + path_qs
        self.waiting += 1
        try:
            with self.tracing.upstream(method, url, headers) as span:
                async with deadline:
                    resp = await self.client.request(
                        method, url, headers=headers, data=data, allow_redirects=False
                    )
                span.http_status(resp.status)
                return resp
        except TimeoutError as exc:
            if not deadline.expired():
                raise  # aiohttp's own connect timeout
            raise UpstreamTimeoutError(
                f"no response headers within {timeout:g} s (--upstream-response-timeout)"
            ) from exc
        finally:
            self.waiting -= 1

    async def read_body(self, request: web.Request) -> bytes:
        """The client's whole body (rule 3), read within `upstream_response_timeout`."""
        limit = self.config.max_request_body_bytes
        parts: list[bytes] = []
        total = 0
        async with asyncio.timeout(self.config.upstream_response_timeout):
            async for chunk in request.content.iter_any():
                total += len(chunk)
                if total > limit:
                    raise BodyTooLargeError
                parts.append(chunk)
        return b"".join(parts)

    async def get_stream(
        self, path_qs: str, headers: CIMultiDict[str], cursor: str
    ) -> aiohttp.ClientResponse:
        """GET a stream's path with its session's headers, resuming after `cursor` when there
        is one (the upstream's own Last-Event-ID)."""
        h = CIMultiDict(headers)
        if cursor:
            h[LAST_EVENT_ID] = cursor
        return await self.request("GET", path_qs, headers=h)
