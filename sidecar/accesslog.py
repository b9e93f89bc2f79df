"""The proxied port's access log: one line per request, at INFO on `tether.sidecar.access`.

A line says `POST /mcp 200 12.3ms 456B session=... mcp=tools/call id=7`; in JSON the same
facts are fields (`http_method`, `path`, `status`, `duration_ms`, `bytes_sent`, `session`,
`mcp_method`, `request_id`, and `client_closed` when the client left first).

Rules:
  1. One line per request, written when its response ends: aiohttp writes it after the last
     byte (a stream's line comes when the stream ends, its duration to the end). A client
     that goes away cancels its handler, and aiohttp writes nothing then, so the proxy writes
     that line itself (`log_client_closed`), with what was sent so far: 499 when that is
     nothing, not even the headers.
  2. What the proxy learns while handling the request (the MCP method once the body is read)
     is noted on the request (`notes`), not passed through the stages.
  3. No work when the logger is disabled (`--no-access-log`, or a level above INFO): aiohttp
     asks `enabled` and calls nothing; the proxy checks the same before its own line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from sidecar.headers import SESSION_HEADER
from tether.logsetup import MCP_METHOD, REQUEST_ID, SESSION

ACCESS_LOGGER = logging.getLogger("tether.sidecar.access")

CLIENT_CLOSED = 499
"""The status written for a client that left before its response began (nginx's number)."""


@dataclass(slots=True)
class RequestNotes:
    """What the proxy learned about a request, for its access line (rule 2)."""

    mcp_method: str | None = None
    request_id: str | int | None = None
    response: web.StreamResponse | None = None
    """The response once prepared (`on_response_prepare`). It began only when bytes of it went
    out: its headers may wait for its first write (`sidecar.writer` rule 5)."""


NOTES = web.RequestKey("tether_access_notes", RequestNotes)


def notes(request: BaseRequest) -> RequestNotes:
    found = request.get(NOTES)
    if found is None:
        found = request[NOTES] = RequestNotes()
    return found


async def note_response(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: remember the response (rule 1's client-closed line)."""
    if ACCESS_LOGGER.isEnabledFor(logging.INFO):
        notes(request).response = response


def _session(request: BaseRequest, response: web.StreamResponse | None) -> str | None:
    found = request.headers.get(SESSION_HEADER)
    if found is None and response is not None:
        found = response.headers.get(SESSION_HEADER)
    return found


def write_line(
    logger: logging.Logger,
    request: BaseRequest,
    *,
    status: int,
    sent: int,
    seconds: float,
    response: web.StreamResponse | None,
    client_closed: bool = False,
) -> None:
    noted = request.get(NOTES) or RequestNotes()
    session = _session(request, response)
    millis = seconds * 1000
    text = "%s %s %d %.1fms %dB"
    args: list[object] = [request.method, request.path, status, millis, sent]
    if session:
        text += " session=%s"
        args.append(session)
    if noted.mcp_method:
        text += " mcp=%s"
        args.append(noted.mcp_method)
    if noted.request_id is not None:
        text += " id=%s"
        args.append(noted.request_id)
    if client_closed:
        text += " (client closed)"
    logger.info(
        text,
        *args,
        extra={
            "http_method": request.method,
            "path": request.path,
            "status": status,
            "duration_ms": round(millis, 3),
            "bytes_sent": sent,
            SESSION: session,
            MCP_METHOD: noted.mcp_method,
            REQUEST_ID: noted.request_id,
            "client_closed": True if client_closed else None,
        },
    )


class AccessLog(AbstractAccessLogger):
    """aiohttp's hook (rule 1): called after a response's last byte, unless disabled."""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        write_line(
            self.logger,
            request,
            status=response.status,
            sent=response.body_length,
            seconds=time,
            response=response,
        )


def log_client_closed(request: BaseRequest, seconds: float) -> None:
    """Rule 1: the line aiohttp does not write for a handler cancelled by its client."""
    if not ACCESS_LOGGER.isEnabledFor(logging.INFO):
        return
    response = notes(request).response
    sent = _sent_so_far(response)
    status = response.status if response is not None and sent else CLIENT_CLOSED
    write_line(
        ACCESS_LOGGER,
        request,
        status=status,
        sent=sent,
        seconds=seconds,
        response=response,
        client_closed=True,
    )


def _sent_so_far(response: web.StreamResponse | None) -> int:
    """Bytes of a response that did not end: aiohttp counts them in its payload writer
    (`output_size`, what `body_length` reports once the response ends) and exposes no
    public name for it before the end."""
    if response is None:
        return 0
    writer = getattr(response, "_payload_writer", None)
    return int(getattr(writer, "output_size", 0) or 0)
