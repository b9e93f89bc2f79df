"""The tests' one SSE reader, for whatever they read: the sidecar's output, the numbered
upstream's, the demo server's.

Written independently of the sidecar's parser (`sidecar.sse`) on purpose: tests read the
sidecar's output with it, so a parser bug that the sidecar's own framing shares cannot hide
itself, and it reads what the product parser refuses (a non-UTF-8 event stays bytes in
`RawEvent.data`, for the tests of malformed upstreams). It follows the event-stream rules for
LF and CRLF streams: a blank line ends a block, `:` lines are comments, a field's value loses
one leading space, `data` lines join with LF, and a block dispatches only if it has a `data`
line (a priming event's is empty). Lone-CR line endings are not supported: no tested server
sends them.

Two views of the same events: `RawEvent` (bytes-level facts, `id` None when the block had no
`id` field) from `parse_sse`, `read_sse` and `read_sse_for`; `Received` (decoded text, event
type "message" by default, priming events left out unless asked for) from `events` and `collect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientResponse


@dataclass(frozen=True)
class RawEvent:
    """One SSE event as sent: fields kept as bytes-level facts, `data` undecoded."""

    id: str | None
    data: bytes
    retry: int | None = None
    event: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass(frozen=True)
class Received:
    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class _Block:
    """The event being read: one line (without its ending) at a time; a blank line ends it."""

    def __init__(self) -> None:
        self._fields: dict[bytes, bytes] = {}
        self._data: list[bytes] | None = None

    def line(self, line: bytes) -> RawEvent | None:
        """Take one line; return the event it dispatched, if it ended one."""
        if not line:
            fields, data = self._fields, self._data
            self._fields, self._data = {}, None
            if data is None:
                return None  # nothing, a comment-only block, or fields without data
            return RawEvent(
                id=fields[b"id"].decode() if b"id" in fields else None,
                data=b"\n".join(data),
                retry=int(fields[b"retry"]) if b"retry" in fields else None,
                event=fields[b"event"].decode() if b"event" in fields else None,
            )
        if line.startswith(b":"):
            return None  # a comment, such as a keep-alive ping
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"data":
            self._data = [*(self._data or []), value]
        else:
            self._fields[name] = value
        return None


def _strip_eol(line: bytes) -> bytes:
    return line.rstrip(b"\n").rstrip(b"\r")


def parse_sse(body: bytes) -> list[RawEvent]:
    """The events of a complete SSE body (LF or CRLF); an unterminated last block is dropped."""
    block = _Block()
    events = (block.line(line) for line in body.replace(b"\r\n", b"\n").split(b"\n"))
    return [e for e in events if e is not None]


async def read_sse(response: ClientResponse, max_events: int | None = None) -> list[RawEvent]:
    """Read events from an aiohttp response until `max_events` or the end of the body."""
    events: list[RawEvent] = []
    block = _Block()
    while max_events is None or len(events) < max_events:
        line = await response.content.readline()
        if not line:
            break
        event = block.line(_strip_eol(line))
        if event is not None:
            events.append(event)
    return events


async def read_sse_for(resp: ClientResponse, *, seconds: float) -> list[RawEvent]:
    """Whatever events arrive within `seconds` (for a stream that stays open)."""
    events: list[RawEvent] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                got = await read_sse(resp, max_events=1)
                if not got:
                    break
                events += got
    return events


async def events(resp: ClientResponse, *, include_priming: bool = False) -> AsyncIterator[Received]:
    """Yield events as they arrive until the body ends."""
    block = _Block()
    while True:
        line = await resp.content.readline()
        if not line:
            return
        raw = block.line(_strip_eol(line))
        if raw is None or (raw.data == b"" and not include_priming):
            continue
        event = "message" if raw.event is None else raw.event
        yield Received(raw.id, event, raw.data.decode())


async def collect(resp: ClientResponse, *, limit: int | None = None) -> list[Received]:
    out: list[Received] = []
    async for ev in events(resp):
        out.append(ev)
        if limit is not None and len(out) >= limit:
            break
    return out
