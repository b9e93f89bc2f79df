"""Per-stream event bookkeeping: client-facing ids, duplicate drops and the replay buffer.

The sidecar, not the upstream, names the events a client sees. Invariants:
1. A client-facing id is `<stream>.<epoch>.<seq>[.<cursor>]`: unique across the streams of a
   session (stream ids are unique per session), it names its stream (so a `Last-Event-ID`
   alone says which stream to resume) and it stays stable when the upstream restarts (the
   sequence is ours). A new owner of the session continues with a higher epoch, so ids never
   collide. `<cursor>` is the upstream's own last-event-id after this event (base64url), so
   whichever sidecar a client comes back to can resume the upstream exactly where the client
   is, however far the persisted record lags or leads the client.
2. `seq` grows by one per delivered event and never goes backwards.
3. An event whose upstream id is in the dedup window was delivered already and is dropped;
   the window holds the last `dedup_window` upstream ids.
4. `last_event_id` and `last_upstream_event_id` change only after dedup: they describe what
   was delivered, and they are what the control plane persists.
5. The replay buffer holds the newest delivered events within `replay_max_events` and
   `replay_max_bytes` (the newest one always, even if larger); an id index (seq -> upstream
   cursor) reaches further back so an older resume can still be served through the upstream.
6. Every upstream id the tracker accepts round-trips: `EventId.parse(str(id))` gives it back
   exactly, and it is a valid `Last-Event-ID` header value for the upstream. An id that could
   not (over `MAX_UPSTREAM_ID_BYTES`, a control character, a space at either end) is refused:
   `accept_run` stops at it and says why, and the stream fails with that reason.
7. An upstream event with an id and no data (a priming event) is delivered as one too, with
   empty data: clients do not dispatch it but keep its id, so whichever sidecar the client
   comes back to can resume the upstream from it, even before the first message.

Pure: fed parsed events, returns bytes to write; no I/O, no clock.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from enum import Enum
from itertools import compress, islice, repeat
from operator import not_
from typing import Final

from sidecar import runcore
from sidecar.runcore import NOTIFICATION_DATA
from sidecar.sse import SSEError, SSEEvent, SSERun, encode_event
from tether.model import StreamId

MAX_UPSTREAM_ID_BYTES: Final = runcore.MAX_ID_BYTES
"""Longest upstream event id (UTF-8 bytes) the tracker accepts. Encoded into our id it stays far
below the 8 KiB header limits of common HTTP stacks (aiohttp, Node, nginx)."""

EVENT_OVERHEAD = 4096
"""Bytes an event's client-facing form adds to its upstream block at most: our id line (a
stream id, epoch, seq and an encoded cursor of up to `MAX_UPSTREAM_ID_BYTES`)."""

_STREAM_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_BASE64URL = re.compile(rf"^[A-Za-z0-9_-]{{1,{-(-MAX_UPSTREAM_ID_BYTES * 4 // 3)}}}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def unusable_upstream_id(upstream_id: str) -> str | None:
    """Why an upstream id cannot be carried in our ids and sent back as `Last-Event-ID`;
    None when it can. HTTP forbids control characters in header values (aiohttp refuses to
    send them) and receivers strip spaces at either end, so such an id would not come back."""
    if (
        upstream_id.isprintable()
        and len(upstream_id) <= MAX_UPSTREAM_ID_BYTES // 4
        and upstream_id[:1] != " "
        and upstream_id[-1:] != " "
    ):
        return None  # the common case, decided by C checks alone
    size = len(upstream_id.encode())
    if size > MAX_UPSTREAM_ID_BYTES:
        return f"upstream event id of {size} bytes exceeds {MAX_UPSTREAM_ID_BYTES}"
    if _CONTROL.search(upstream_id):
        return f"upstream event id {upstream_id[:64]!r} contains a control character"
    if upstream_id != upstream_id.strip(" "):
        return f"upstream event id {upstream_id[:64]!r} starts or ends with a space"
    return None


class StreamKind(Enum):
    """What a stream is; the first letter of its id, so a new sidecar knows from the id."""

    POST = "p"
    """The SSE response to one POST; complete once every request in it was answered."""
    STANDALONE = "g"
    """The GET stream of a Streamable HTTP session; open-ended."""
    LEGACY = "l"
    """A 2024-11-05 HTTP+SSE stream (`GET /sse`); the session lives as long as it does."""

    @classmethod
    def of(cls, stream_id: str) -> StreamKind | None:
        try:
            return cls(stream_id[:1])
        except ValueError:
            return None


def new_stream_id(kind: StreamKind) -> StreamId:
    """Mint an unguessable stream id (it appears in event ids that clients echo back)."""
    return StreamId(kind.value + secrets.token_hex(6))


def encode_cursor(cursor: str) -> str:
    """The upstream cursor as it goes into our id: as it is when it is plain printable ASCII
    (the usual case, and free), else `~` + base64url. Ids split on their first three dots
    only, so dots inside the cursor are fine; the result is always a valid header value."""
    if cursor.isascii() and cursor.isprintable() and cursor.strip() == cursor and cursor[0] != "~":
        return cursor
    return "~" + base64.urlsafe_b64encode(cursor.encode()).rstrip(b"=").decode()


def _decode_cursor(text: str) -> str | None:
    """The upstream cursor in one of our ids; None unless `encode_cursor` could have made it
    from an id the tracker accepts (so what a client sends back is as safe as what we sent)."""
    if not text.startswith("~"):
        ok = text.isascii() and text.isprintable() and text.strip() == text
        return text if ok and len(text) <= MAX_UPSTREAM_ID_BYTES else None
    if not _BASE64URL.match(text[1:]):
        return None
    try:
        decoded = base64.urlsafe_b64decode(text[1:] + "=" * (-(len(text) - 1) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return decoded if decoded and unusable_upstream_id(decoded) is None else None


@dataclass(frozen=True, slots=True)
class EventId:
    """A client-facing event id; orders by (epoch, seq) within one stream."""

    stream: StreamId
    epoch: int
    seq: int
    upstream: str = ""
    """The upstream's last-event-id after this event ("" when the upstream sends none)."""

    def __str__(self) -> str:
        base = f"{self.stream}.{self.epoch}.{self.seq}"
        return f"{base}.{encode_cursor(self.upstream)}" if self.upstream else base

    @property
    def order(self) -> tuple[int, int]:
        return (self.epoch, self.seq)

    @classmethod
    def parse(cls, text: str) -> EventId | None:
        """Parse an id a Tether sidecar minted; None for anything else (never raises)."""
        parts = text.split(".", 3)
        if len(parts) not in (3, 4) or not _STREAM_ID.match(parts[0]):
            return None
        epoch, seq = parts[1], parts[2]
        if not (epoch.isascii() and epoch.isdigit() and seq.isascii() and seq.isdigit()):
            return None
        if len(epoch) > 18 or len(seq) > 18:
            return None
        upstream = ""
        if len(parts) == 4:
            decoded = _decode_cursor(parts[3])
            if not decoded:
                return None
            upstream = decoded
        return cls(StreamId(parts[0]), int(epoch), int(seq), upstream)


@dataclass(frozen=True, slots=True)
class TrackerLimits:
    dedup_window: int = 1024
    replay_max_events: int = 1024
    replay_max_bytes: int = 4 << 20
    index_max_events: int = 65536

    def __post_init__(self) -> None:
        if min(self.dedup_window, self.replay_max_events, self.replay_max_bytes) < 1:
            raise ValueError("tracker limits must be positive")
        if self.index_max_events < self.replay_max_events:
            raise ValueError("index_max_events must be >= replay_max_events")


class Gap:
    """The requested position is older than the replay buffer."""

    __slots__ = ("oldest_seq",)

    def __init__(self, oldest_seq: int) -> None:
        self.oldest_seq = oldest_seq


class StreamTracker:
    """The delivered history of one client-facing stream."""

    __slots__ = (
        "_buffer",
        "_buffer_bytes",
        "_buffer_head",
        "_cumulative",
        "_cursor_suffix",
        "_dedup_window",
        "_id_prefix",
        "_id_prefix_bytes",
        "_index",
        "_limits",
        "_max_bytes",
        "_max_events",
        "_seen",
        "_seen_order",
        "_total_bytes",
        "duplicates",
        "epoch",
        "last_upstream_event_id",
        "seq",
        "start_seq",
        "stream_id",
    )

    def __init__(
        self,
        stream_id: StreamId,
        *,
        limits: TrackerLimits,
        epoch: int = 1,
        seq: int = 0,
        last_upstream_event_id: str = "",
    ) -> None:
        self.stream_id = stream_id
        self.epoch = epoch
        self.seq = seq
        self.start_seq = seq
        """Where this tracker took over (non-zero for a stream adopted from another owner)."""
        self.last_upstream_event_id = last_upstream_event_id
        self._cursor_suffix = (
            f".{encode_cursor(last_upstream_event_id)}" if last_upstream_event_id else ""
        )
        self.duplicates = 0
        self._limits = limits
        self._seen: set[str] = set()
        # The window's ids, oldest first; at its maxlen, appending drops the oldest.
        self._seen_order: deque[str] = deque(maxlen=limits.dedup_window)
        # Replay buffer: payloads of seqs _buffer_head .. seq, oldest first.
        self._buffer: list[bytes] = []
        self._buffer_bytes = 0
        self._buffer_head = seq + 1
        self._total_bytes = 0
        # _cumulative[i]: bytes ever delivered up to and including buffer entry i.
        self._cumulative: list[int] = []
        # Upstream cursor after each of the last seqs (reaches further than the buffer).
        self._index: deque[str] = deque(maxlen=limits.index_max_events)
        # Hot-path constants.
        self._id_prefix = f"id: {stream_id}.{epoch}."
        self._id_prefix_bytes = self._id_prefix.encode()
        self._dedup_window = limits.dedup_window
        self._max_events = limits.replay_max_events
        self._max_bytes = limits.replay_max_bytes

    @property
    def last_event_id(self) -> EventId | None:
        if not self.seq:
            return None
        return EventId(self.stream_id, self.epoch, self.seq, self.last_upstream_event_id)

    @property
    def last_event_id_text(self) -> str | None:
        """`str(last_event_id)` without building the `EventId`: the position reported after
        every relay (issue 16). Rule: `_cursor_suffix` always encodes `last_upstream_event_id`."""
        if not self.seq:
            return None
        return f"{self.stream_id}.{self.epoch}.{self.seq}{self._cursor_suffix}"

    def event_id(self, seq: int) -> EventId:
        """The id of delivered event `seq` (with its upstream cursor while the index has it)."""
        return EventId(self.stream_id, self.epoch, seq, self.upstream_cursor_at(seq) or "")

    def accept(self, event: SSEEvent) -> bytes | None:
        """Record `event` and return its client-facing bytes, or None for a duplicate."""
        upstream_id = event.id
        if upstream_id:
            if upstream_id in self._seen:
                self.duplicates += 1
                return None
            seen_order = self._seen_order
            if len(seen_order) == self._dedup_window:
                self._seen.discard(seen_order[0])  # the append below drops it from the order
            self._seen.add(upstream_id)
            seen_order.append(upstream_id)
        self.seq = seq = self.seq + 1
        cursor = event.last_event_id
        if cursor != self.last_upstream_event_id:
            self.last_upstream_event_id = cursor
            self._cursor_suffix = f".{encode_cursor(cursor)}" if cursor else ""
        data = event.data
        if event.event == "message" and "\n" not in data and "\r" not in data:
            # The common case, without the general encoder's checks and splitting.
            payload = f"{self._id_prefix}{seq}{self._cursor_suffix}\ndata: {data}\n\n".encode()
        else:
            payload = encode_event(
                data=data,
                id=f"{self.stream_id}.{self.epoch}.{seq}{self._cursor_suffix}",
                event=event.event,
            )
        # Remember it (the hot half of it here; eviction is rare and bulk).
        size = len(payload)
        self._buffer.append(payload)
        self._buffer_bytes += size
        self._total_bytes += size
        self._cumulative.append(self._total_bytes)
        self._index.append(cursor)  # a bounded deque: the oldest falls out by itself
        if len(self._buffer) > self._max_events or self._buffer_bytes > self._max_bytes:
            self._evict()
        return payload

    def accept_run(  # noqa: C901 - hot path, kept whole (see pyproject)
        self,
        items: list[SSEEvent | SSEError | SSERun],
        start: int,
        *,
        seq_mark: int,
        bytes_mark: int,
        watch_answers: bool,
    ) -> tuple[int, int, list[str], str | None]:
        """Accept `items[start:]` in one call (the relay's per-event loop, here so that the
        compiled build runs it in C). Stops at the end, at an SSEError or an event whose
        upstream id is unusable (either left unconsumed), or once `seq >= seq_mark` or
        `total_bytes >= bytes_mark` (the caller checks backpressure). Returns (index of the
        first item not consumed, events delivered, data of delivered events that may be
        JSON-RPC answers, collected when `watch_answers`, why the item at the index is
        refused or None).

        An `SSERun` may be taken in part (at a mark): its `start` moves on and the returned
        index stays on it. One the bulk path cannot take (a duplicate id, a cursor that needs
        encoding) is replaced in `items` by its events, which then go one by one: `items`
        grows, so callers must compare the index with `len(items)`, never with a length
        taken before the call."""
        delivered = 0
        answers: list[str] = []
        i = start
        while i < len(items):
            item = items[i]
            if isinstance(item, SSEError):
                break
            if isinstance(item, SSERun):
                got = self._accept_bulk(item, seq_mark, bytes_mark, watch_answers, answers)
                if got < 0:
                    items[i : i + 1] = item.events()
                    continue
                delivered += got
                if len(item) == 0:
                    i += 1
                if self.seq >= seq_mark or self._total_bytes >= bytes_mark:
                    break
                continue
            upstream_id = item.id
            if upstream_id:
                refused = unusable_upstream_id(upstream_id)
                if refused is not None:
                    return i, delivered, answers, refused
            i += 1
            data = item.data
            if not data and (not upstream_id or upstream_id == self.last_upstream_event_id):
                continue  # a keep-alive: nothing to deliver, no new position
            # A priming event (an id, no data) is relayed too: the client's Last-Event-ID
            # then carries the upstream's cursor before the first message (rule 7).
            if self.accept(item) is None:
                continue
            delivered += 1
            if watch_answers and ('"result"' in data or '"error"' in data):
                answers.append(data)
            if self.seq >= seq_mark or self._total_bytes >= bytes_mark:
                break
        return i, delivered, answers, None

    def _accept_bulk(  # noqa: C901, PLR0912 - hot path, kept whole (see pyproject)
        self,
        run: SSERun,
        seq_mark: int,
        bytes_mark: int,
        watch_answers: bool,
        answers: list[str],
    ) -> int:
        """Take a prefix of `run` up to the marks with list and bytes operations only (each a
        C loop); the same effect as `accept` on each of its events. Returns how many events
        were taken, or -1 when the run must go event by event instead."""
        first = run.start
        k = min(len(run), max(1, seq_mark - self.seq))
        whole = first == 0 and k == len(run.data_lines)
        # The run's own lists when it is taken whole (never mutated here), else slices.
        data_lines = run.data_lines if whole else run.data_lines[first : first + k]
        seq = self.seq
        ids = run.ids
        if ids is not None:
            taken = ids if whole else ids[first : first + k]
            # Cursors go into our ids as they are only if each is plain (printable ASCII,
            # no surrounding spaces or leading "~", see `encode_cursor`), and refused ones
            # are refused on the event path, with the reason: else one by one.
            if not (run.plain_ids or runcore.plain_ids(taken, MAX_UPSTREAM_ID_BYTES)):
                return -1
            seen = self._seen
            if not seen.isdisjoint(taken):
                return -1  # a duplicate: dropped (and counted) on the event path
            suffix = b""
        else:
            cursor = run.last_event_id  # every event's: the blocks have no id line
            if cursor != self.last_upstream_event_id:
                self.last_upstream_event_id = cursor
                self._cursor_suffix = f".{encode_cursor(cursor)}" if cursor else ""
            suffix = self._cursor_suffix.encode()
        total = self._total_bytes
        payloads, cumulative = runcore.CORE.format_run(
            self._id_prefix_bytes, seq, ids and taken, data_lines, suffix, total
        )
        if cumulative[-1] >= bytes_mark and k > 1:
            # Stop at the event that crosses the bytes mark, as the event path would.
            cut = max(1, bisect_left(cumulative, bytes_mark, 1))
            if cut < k:
                k = cut
                del payloads[k:]
                del cumulative[k + 1 :]
                data_lines = data_lines[:k]
                if ids is not None:
                    taken = taken[:k]
        del cumulative[0]
        if ids is not None:
            before = len(seen)
            seen.update(taken)
            if len(seen) != before + k:
                # A duplicate within the run. None of its ids was seen before (isdisjoint
                # above), so this undoes the update; the event path drops and counts it.
                seen.difference_update(taken)
                return -1
        # Commit: from here on nothing can fail.
        run.start = first + k
        if ids is not None:
            window = self._dedup_window
            order = self._seen_order
            overflow = len(order) + k - window
            if overflow > 0:  # the ids the extend below pushes out of the window
                seen.difference_update(islice(order, min(overflow, len(order))))
                if k > window:  # and those of this run it keeps no room for
                    seen.difference_update(islice(taken, k - window))
            order.extend(taken)
            self._index.extend(taken)
            cursor = taken[-1]
            if cursor != self.last_upstream_event_id:
                self.last_upstream_event_id = cursor
                self._cursor_suffix = f".{cursor}"
        else:
            self._index.extend(repeat(self.last_upstream_event_id, k))
        self.seq = seq + k
        self._buffer.extend(payloads)
        self._cumulative.extend(cumulative)
        added = cumulative[-1] - total
        self._buffer_bytes += added
        self._total_bytes = cumulative[-1]
        if watch_answers and not run.notifications:
            # MCP notifications, most of what streams carry, are never answers: look into
            # the other lines only (the filter runs in C).
            notes = map(bytes.startswith, data_lines, repeat(NOTIFICATION_DATA))
            for line in compress(data_lines, map(not_, notes)):
                if b'"result"' in line or b'"error"' in line:
                    answers.append(line[6:].decode("utf-8"))
        if len(self._buffer) > self._max_events or self._buffer_bytes > self._max_bytes:
            self._evict()
        return k

    def priming_event(self, retry_ms: int | None = None, *, seq: int | None = None) -> bytes:
        """An empty event carrying the id of delivered event `seq` (default: the current
        one): lets a client resume before any message. `retry_ms` tells the client how long
        to wait before reconnecting."""
        if seq is None or seq == self.seq:
            at = EventId(self.stream_id, self.epoch, self.seq, self.last_upstream_event_id)
        else:
            at = self.event_id(seq)
        return encode_event(data="", id=str(at), retry=retry_ms)

    def _evict(self) -> None:
        """Evict in bulk, down to 7/8 of both limits: one memmove per many events instead of
        one per event. The limits stay maxima; the newest event always stays, however large:
        its writer has yet to send it."""
        limits = self._limits
        buffer = self._buffer
        keep_events = limits.replay_max_events - limits.replay_max_events // 8
        keep_bytes = limits.replay_max_bytes - limits.replay_max_bytes // 8
        drop = max(0, len(buffer) - keep_events)
        cumulative = self._cumulative
        base = self._total_bytes - self._buffer_bytes  # bytes before the buffer's head
        # Bytes kept after dropping `drop` events: total - cumulative[drop - 1].
        while (
            drop < len(buffer) - 1
            and self._total_bytes - (cumulative[drop - 1] if drop else base) > keep_bytes
        ):
            drop += 1
        freed = (cumulative[drop - 1] - base) if drop else 0
        del buffer[:drop]
        del cumulative[:drop]
        self._buffer_bytes -= freed
        self._buffer_head += drop

    def events_after(self, seq: int) -> list[bytes] | Gap:
        """Payloads of every event after `seq` (possibly none), or a Gap if some were evicted."""
        start = seq + 1
        if start < self._buffer_head:
            return Gap(self._buffer_head)
        offset = start - self._buffer_head
        if offset >= len(self._buffer):
            return []
        return self._buffer[offset:]

    def upstream_cursor_at(self, seq: int) -> str | None:
        """The upstream last-event-id right after event `seq`, if the index still reaches it.

        `seq == 0` (nothing delivered) has no upstream cursor.
        """
        index_head = self.seq - len(self._index) + 1
        if seq < index_head or seq > self.seq:
            return None
        cursor = self._index[seq - index_head]
        return cursor or None

    def seq_for_upstream_id(self, upstream_id: str) -> int | None:
        """Which delivered event carried `upstream_id`, if the index still reaches it."""
        index_head = self.seq - len(self._index) + 1
        for i in range(len(self._index) - 1, -1, -1):
            if self._index[i] == upstream_id:
                return index_head + i
        return None

    @property
    def limits(self) -> TrackerLimits:
        return self._limits

    @property
    def total_bytes(self) -> int:
        """Bytes of every event ever delivered on this stream."""
        return self._total_bytes

    @property
    def buffered_bytes(self) -> int:
        return self._buffer_bytes

    def unsent_bytes(self, sent_seq: int) -> int:
        """Bytes of the buffered events after `sent_seq` (what clients have not been sent).

        Counts only what the buffer still holds: anything older was evicted already. O(1)."""
        start = max(sent_seq + 1, self._buffer_head)
        if start > self.seq:
            return 0
        offset = start - self._buffer_head
        before = self._cumulative[offset - 1] if offset else self._total_bytes - self._buffer_bytes
        return self._total_bytes - before
