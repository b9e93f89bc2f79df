"""Sans-IO Server-Sent Events parser and encoder.

The sidecar reads every event of every proxied stream through `SSEParser`, so the parser is
both exact to the WHATWG "event stream interpretation" rules and cheap per event. It owns no
I/O: feed it bytes as they arrive, get back frozen `SSEEvent`s (or one `SSEError`).

Invariants the parser keeps:

1. Line endings are normalized per chunk with `bytes.replace`: CRLF and lone CR become LF. A CR
   that ends a chunk ends its line at once (a live stream may pause right there); a LF that
   starts the next chunk is then dropped, because it was the second half of a CRLF.
2. After normalization an event block ends at `\\n\\n`. Each chunk is cut once, after its
   last complete block, and everything before the cut is decoded and parsed in one pass;
   the unterminated tail waits in `_parts` and never contains `\\n\\n`, never starts with
   LF and ends with at most one LF.
3. One leading UTF-8 BOM is removed at stream start, even when split across chunks; a BOM
   anywhere else is data.
4. Blocks are decoded as strict UTF-8. LF and CR never occur inside a multi-byte UTF-8
   sequence, so splitting bytes before decoding cannot cut a character.
5. Sizes are counted in normalized bytes of a block without its line terminators. The pending
   tail is always a prefix of the block it will become, so an oversized block is reported the
   same way however the stream is chunked, and memory stays bounded if it never ends.
6. After an `SSEError` (or `close()`) the parser is finished: `feed()` returns `[]`.
7. With `runs=True`, a stretch of complete blocks that all have one plain shape comes back as
   one `SSERun` instead of one `SSEEvent` each; `SSERun.events()` is exactly what the event
   path returns for it (a property test holds the two paths to that).
"""

from __future__ import annotations

import contextlib
import re
from typing import Final, Literal, NamedTuple, cast

from sidecar import runcore

__all__ = ["SSEError", "SSEEvent", "SSEParser", "SSERun", "encode_comment", "encode_event"]

_BOM: Final = b"\xef\xbb\xbf"
_LF: Final = 0x0A
_CR: Final = 0x0D
_LONE_CR: Final = re.compile(rb"\r(?!\n)")


class SSEEvent(NamedTuple):
    """One dispatched event, as the WHATWG algorithm would hand it to a listener.

    A NamedTuple rather than a frozen dataclass: just as immutable and typed, but built by
    C's tuple constructor. One is made per event on the sidecar's hot path, and the frozen
    dataclass's per-field `object.__setattr__` was 12% of the sidecar's profile at 256 B.
    """

    data: str
    """The data buffer with its final LF removed."""
    event: str = "message"
    """The event type; "message" when the `event` field was absent or empty."""
    id: str | None = None
    """The `id` field of this very block: None if it had none, "" if it was empty."""
    last_event_id: str = ""
    """The stream's last-event-ID buffer at dispatch; it persists across events."""
    retry: int | None = None
    """A valid `retry` value (ms) from this block, else None."""


class SSEError(NamedTuple):
    """Why the parser gave up on a stream; it is the last thing `feed()` returns."""

    kind: Literal["too_large", "undecodable"]
    message: str
    """Human-readable, meant for a log line."""


class SSERun:
    """Consecutive plain events kept as their wire lines: no Python object per event.

    Made by a parser with `runs=True` for complete blocks that all have the same shape: one
    non-empty `data: ` line, at most one `id: ` line with a non-empty value, at most one
    `event: message` line, in the same order in every block. That is how real servers stream
    (the MCP SDK, the benchmark generator), and the tracker relays such a stretch with a few
    list and bytes operations that run in C instead of a Python step per event.

    A consumer may take a prefix and leave the rest: `start` counts events already taken.
    """

    __slots__ = ("data_lines", "ids", "last_event_id", "notifications", "plain_ids", "start")

    def __init__(
        self,
        data_lines: list[bytes],
        ids: list[str] | None,
        last_event_id: str,
        notifications: bool = False,
        plain_ids: bool = False,
    ) -> None:
        self.data_lines = data_lines
        """Each event's `data: ...` line, without its LF."""
        self.ids = ids
        """Each event's id, or None when the blocks have no `id:` line."""
        self.last_event_id = last_event_id
        """The last-event-ID buffer before the run (every event's, when there are no ids)."""
        self.notifications = notifications
        """Every event is an MCP notification (`runcore.NOTIFICATION_DATA`): none is an answer."""
        self.plain_ids = plain_ids
        """Every id goes into our ids as it is (`runcore.plain_ids`); False means unknown."""
        self.start = 0

    def __len__(self) -> int:
        return len(self.data_lines) - self.start

    def events(self) -> list[SSEEvent]:
        """The events not yet taken, as the event path would have returned them."""
        out: list[SSEEvent] = []
        ids = self.ids
        for i in range(self.start, len(self.data_lines)):
            data = self.data_lines[i][6:].decode("utf-8")
            if ids is None:
                out.append(SSEEvent(data, "message", None, self.last_event_id))
            else:
                out.append(SSEEvent(data, "message", ids[i], ids[i]))
        return out


Item = SSEEvent | SSEError | SSERun
"""What `feed_runs()` returns items of."""


class SSEParser:
    """Incremental event-stream parser: `feed()` bytes, get completed events.

    `feed()` never raises on bad input. On error it returns every event completed before the
    bad block, then the `SSEError`; from then on `failed` is set and `feed()` returns `[]`.
    """

    __slots__ = (
        "_at_start",
        "_closed",
        "_failed",
        "_head",
        "_last_event_id",
        "_max",
        "_parts",
        "_pending_len",
        "_pending_lf",
        "_retry",
        "_skip_lf",
    )

    def __init__(self, *, max_event_bytes: int = 1 << 20) -> None:
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be positive")
        self._max = max_event_bytes
        self._last_event_id = ""
        self._retry: int | None = None
        self._failed: SSEError | None = None
        self._closed = False
        # Stream start: bytes that may still turn out to be a BOM.
        self._at_start = True
        self._head = b""
        # The previous chunk ended with CR, so a LF opening the next one belongs to it.
        self._skip_lf = False
        # The unterminated tail (invariant 2), kept as pieces so that a large event arriving
        # in small chunks costs linear time, not quadratic.
        self._parts: list[bytes] = []
        self._pending_len = 0
        self._pending_lf = False

    @property
    def last_event_id(self) -> str:
        """The WHATWG last-event-ID buffer as of the last blank line; id-only blocks count.

        That is the "last event ID string" a browser sends on reconnect: an `id:` line of an
        event still open is not taken until the event ends, as in `EventSource`.
        """
        return self._last_event_id

    @property
    def retry(self) -> int | None:
        """The last valid reconnection time seen (ms), retry-only blocks included.

        Read when its event ends, or at `close()` for an event left open.
        """
        return self._retry

    @property
    def mid_event(self) -> bool:
        """Bytes of a block not ended yet are held (so a chunk that dispatched nothing while
        this is False was comments or blank lines only)."""
        return bool(self._parts) or bool(self._head)

    @property
    def failed(self) -> SSEError | None:
        """The error that ended parsing, if any."""
        return self._failed

    def feed(self, data: bytes) -> list[SSEEvent | SSEError]:
        """Consume a chunk; return the events it completed, possibly ending with an error."""
        return cast("list[SSEEvent | SSEError]", self._feed(data, False))  # runs only if asked

    def feed_runs(self, data: bytes) -> list[Item]:
        """As `feed`, but a stretch of plain events may come back as one `SSERun`."""
        return self._feed(data, True)

    def _feed(self, data: bytes, runs: bool) -> list[Item]:  # noqa: C901, PLR0912 - hot path, kept whole (see pyproject)
        if self._failed is not None or self._closed or not data:
            return []
        if self._at_start:
            data = self._head + data
            if len(data) < 3 and _BOM.startswith(data):
                self._head = data
                return []
            self._at_start = False
            self._head = b""
            if data.startswith(_BOM):
                data = data[3:]
                if not data:
                    return []
        if self._skip_lf:
            self._skip_lf = False
            if data[0] == _LF:
                data = data[1:]
                if not data:
                    return []
        if b"\r" in data:
            data = self._normalize_cr(data)

        end = data.rfind(b"\n\n")
        parts = self._parts
        if parts:
            if end < 0 and not (self._pending_lf and data[0] == _LF):
                parts.append(data)
                self._pending_len += len(data)
                self._pending_lf = data[-1] == _LF
                return self._check_pending([])
            # The last `\n\n` lies in this chunk, or straddles the seam with the tail.
            end = self._pending_len + end if end >= 0 else self._pending_len - 1
            parts.append(data)
            buf = b"".join(parts)
            parts.clear()
        else:
            if data[0] == _LF:
                # Blank lines between blocks dispatch nothing (all buffers are empty).
                data = data.lstrip(b"\n")
                if not data:
                    return []
                end = data.rfind(b"\n\n")
            if end < 0:
                parts.append(data)
                self._pending_len = len(data)
                self._pending_lf = data[-1] == _LF
                return self._check_pending([])
            buf = data

        out = self._parse_blocks(buf[:end], runs)
        if out and isinstance(out[-1], SSEError):
            return out
        # `end` is the last `\n\n`, so the tail cannot start with LF (invariant 2).
        rest = buf[end + 2 :]
        if rest:
            parts.append(rest)
            self._pending_len = len(rest)
            self._pending_lf = rest[-1] == _LF
            return self._check_pending(out)
        return out

    def close(self) -> list[SSEEvent | SSEError]:
        """End of stream: an unterminated event is discarded, as WHATWG says; returns `[]`.

        A `retry` line that did end in that event still counts: browsers apply it as soon as
        the line is read, and the reconnect that usually follows a close should honour it.
        """
        if self._failed is None and not self._closed and self._parts:
            tail = b"".join(self._parts)
            complete = tail[: tail.rfind(b"\n") + 1].decode("utf-8", "replace")
            for line in complete.split("\n"):
                name, _, value = line.partition(":")
                if value[:1] == " ":
                    value = value[1:]
                if name == "retry" and value.isascii() and value.isdigit():
                    with contextlib.suppress(ValueError):  # too many digits for int()
                        self._retry = int(value)
        self._closed = True
        self._parts.clear()
        self._pending_len = 0
        self._head = b""
        return []

    def _normalize_cr(self, data: bytes) -> bytes:
        """Turn CRLF and lone CR into LF (invariant 1)."""
        ends_with_cr = data[-1] == _CR
        if ends_with_cr:
            self._skip_lf = True
            data = data[:-1]
        if _LONE_CR.search(data) is None:
            # All CRs are in CRLF pairs, as the MCP SDK sends them: deleting a single byte
            # value is several times faster than replacing a two-byte pattern.
            data = data.replace(b"\r", b"")
        else:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return data + b"\n" if ends_with_cr else data

    def _check_pending(self, out: list[Item]) -> list[Item]:
        # A trailing LF is a terminator, not content (invariant 5).
        if self._pending_len - self._pending_lf > self._max:
            out.append(self._fail("too_large", f"event exceeds {self._max} bytes"))
        return out

    def _fail(self, kind: Literal["too_large", "undecodable"], message: str) -> SSEError:
        error = SSEError(kind, message)
        self._failed = error
        self._parts.clear()
        self._pending_len = 0
        return error

    def _parse_blocks(self, region: bytes, runs: bool) -> list[Item]:
        """Parse complete blocks: `region` stops just before the `\\n\\n` ending the last one."""
        if len(region) <= self._max:
            # Fast path: no block can be too large, and one decode call for all blocks is
            # cheaper than one per block. A decode error sends us to the exact path, which
            # finds the bad block and keeps the events before it.
            # ASCII is valid UTF-8 already: a run needs no str of it, so decode only to check
            # other bytes, or for the event path.
            text = None
            try:
                if not region.isascii():
                    text = region.decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:
                # A single event goes the event path: a run's set-up costs more than it
                # saves below a few events, and servers often write one event per chunk.
                if runs and b"\n\n" in region:
                    run = self._as_run(region)
                    if run is not None:
                        return [run]
                return self._parse_text(text if text is not None else region.decode("ascii"))
        out: list[Item] = []
        for raw in region.split(b"\n\n"):
            block = raw.strip(b"\n")
            if len(block) > self._max:
                out.append(self._fail("too_large", f"event exceeds {self._max} bytes"))
                return out
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError as exc:
                message = f"event is not valid UTF-8 at byte {exc.start}"
                out.append(self._fail("undecodable", message))
                return out
            out.extend(self._parse_text(text))
        return out

    def _as_run(self, region: bytes) -> SSERun | None:
        """`region` (valid UTF-8, complete blocks) as one SSERun, or None if its blocks do
        not all have one plain shape (`runcore.RunCore.scan_run`, which fails fast: a
        region that does not fit costs little before the event path takes it)."""
        found = runcore.CORE.scan_run(region, runcore.MAX_ID_BYTES)
        if found is None:
            return None
        data_lines, ids, notifications, plain_ids = found
        last_event_id = self._last_event_id
        if ids is not None:
            self._last_event_id = ids[-1]
        return SSERun(data_lines, ids, last_event_id, notifications, plain_ids)

    def _parse_text(self, text: str) -> list[Item]:  # noqa: C901, PLR0912 - hot path, kept whole (see pyproject)
        """Run the WHATWG line rules over whole blocks; the last one's blank line is implied.

        `data: `, `id: ` and `event: ` lines, what real servers send, are matched by prefix;
        every other line takes the general path, written straight from the spec.
        """
        out: list[Item] = []
        append = out.append
        last_id = self._last_event_id
        data: str | None = None  # the data buffer without its final LF; None when empty
        more: list[str] = []  # further data lines, joined only at dispatch (no quadratic +=)
        event = ""
        block_id: str | None = None
        retry: int | None = None
        for line in text.split("\n"):
            if not line:  # blank line: dispatch
                if data is not None:
                    if more:
                        data = "\n".join([data, *more])
                        more.clear()
                    append(SSEEvent(data, event or "message", block_id, last_id, retry))
                    data = None
                event = ""
                block_id = retry = None
            elif line[:6] == "data: ":
                if data is None:
                    data = line[6:]
                else:
                    more.append(line[6:])
            elif line[:4] == "id: ":
                if "\0" not in line:
                    block_id = last_id = line[4:]
            elif line[:7] == "event: ":
                event = line[7:]
            elif line[0] != ":":  # not a comment: the general field rules
                name, _, value = line.partition(":")
                if value[:1] == " ":
                    value = value[1:]
                if name == "data":
                    if data is None:
                        data = value
                    else:
                        more.append(value)
                elif name == "id":
                    if "\0" not in value:
                        block_id = last_id = value
                elif name == "event":
                    event = value
                elif name == "retry" and value.isascii() and value.isdigit():
                    try:
                        retry = int(value)
                    except ValueError:  # more digits than int() accepts: ignore the field
                        continue
                    self._retry = retry
        if data is not None:
            if more:
                data = "\n".join([data, *more])
            append(SSEEvent(data, event or "message", block_id, last_id, retry))
        self._last_event_id = last_id
        return out


def _check_field(name: str, value: str) -> None:
    if "\n" in value or "\r" in value:
        raise ValueError(f"SSE {name} must not contain CR or LF: {value!r}")


def encode_event(
    *, data: str, id: str | None = None, event: str = "message", retry: int | None = None
) -> bytes:
    """Serialize one event with LF line endings, so that `SSEParser` reads it back unchanged.

    Multi-line data becomes several `data:` lines; CR and CRLF in data become LF, the only
    line break the wire can carry. `event:` is omitted for "message" (or ""), which a reader
    assumes anyway. Raises ValueError for fields a reader could not get back intact.
    """
    lines: list[str] = []
    if id is not None:
        _check_field("id", id)
        if "\0" in id:
            raise ValueError("SSE id must not contain U+0000 (readers ignore such ids)")
        lines.append(f"id: {id}\n")
    if event and event != "message":
        _check_field("event", event)
        lines.append(f"event: {event}\n")
    if retry is not None:
        if retry < 0:
            raise ValueError(f"SSE retry must not be negative: {retry}")
        lines.append(f"retry: {retry:d}\n")
    if "\r" in data:
        data = data.replace("\r\n", "\n").replace("\r", "\n")
    if "\n" in data:
        lines.append("data: " + data.replace("\n", "\ndata: ") + "\n\n")
    else:
        lines.append(f"data: {data}\n\n")
    return "".join(lines).encode("utf-8")


def encode_comment(text: str) -> bytes:
    """Serialize a comment line (e.g. a keep-alive); line breaks in `text` become spaces."""
    text = text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    return f": {text}\n\n".encode()
