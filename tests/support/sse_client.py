"""A client-side SSE reader for tests, written independently of the sidecar's parser so that a
bug there cannot hide itself. Comment-only blocks and empty-data (priming) events are kept
apart from message events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientResponse


@dataclass(frozen=True)
class Received:
    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


async def events(resp: ClientResponse, *, include_priming: bool = False) -> AsyncIterator[Received]:
    """Yield events as they arrive until the body ends."""
    fields: dict[str, str] = {}
    data: list[str] | None = None
    while True:
        raw = await resp.content.readline()
        if not raw:
            return
        line = raw.decode().rstrip("\n").rstrip("\r")
        if line == "":
            if data is not None and (data != [""] or include_priming):
                yield Received(fields.get("id"), fields.get("event", "message"), "\n".join(data))
            fields, data = {}, None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data = [*(data or []), value]
        else:
            fields[name] = value


async def collect(resp: ClientResponse, *, limit: int | None = None) -> list[Received]:
    out: list[Received] = []
    async for ev in events(resp):
        out.append(ev)
        if limit is not None and len(out) >= limit:
            break
    return out
