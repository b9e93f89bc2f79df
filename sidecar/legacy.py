"""Legacy HTTP+SSE (MCP 2024-11-05): the `endpoint` event points the client back at us.

The server's first event on `GET /sse` names the URL the client must POST its messages to.
That URL is on the upstream; the client must reach it through the sidecar, so the event is
rewritten to the same path on the sidecar (minus the upstream base path). Pure: no I/O.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urljoin, urlsplit

from sidecar.sse import SSEEvent

log = logging.getLogger("tether.sidecar.legacy")


def legacy_session_name(query: str) -> str | None:
    """The upstream's session name in an endpoint URL's query (`session_id`/`sessionId`)."""
    parsed = parse_qs(query)
    names = parsed.get("session_id") or parsed.get("sessionId")
    return names[0] if names else None


class EndpointRewriter:
    """Rewrites `endpoint` events of streams from one upstream base URL."""

    def __init__(self, upstream_base: str) -> None:
        self._base = urlsplit(upstream_base)

    def __call__(self, event: SSEEvent, stream_url: str) -> tuple[SSEEvent, str | None]:
        """The event as the client must see it, and the session name its URL carries."""
        if event.event != "endpoint" or not event.data:
            return event, None
        target = urlsplit(urljoin(stream_url, event.data.strip()))
        base = self._base
        if (target.scheme, target.netloc) != (base.scheme, base.netloc):
            log.warning("legacy endpoint %r is not on the upstream; left as is", event.data)
            return event, None
        path = target.path
        prefix = base.path.rstrip("/")
        if prefix and path.startswith(prefix + "/"):
            path = path[len(prefix) :]
        rewritten = path + (f"?{target.query}" if target.query else "")
        rewritten_event = SSEEvent(
            data=rewritten, event=event.event, id=event.id, last_event_id=event.last_event_id
        )
        return rewritten_event, legacy_session_name(target.query)
