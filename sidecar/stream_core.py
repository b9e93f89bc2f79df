"""The life of one client-facing stream, without I/O: relay, completion, failure, revival.

A `StreamCore` is told what happens to a stream (upstream bytes, the end of an upstream
response, a client writer's progress, a stop, a client coming back) and answers with what to
do: how many events became deliverable and whether to pause reading the upstream
(`Relay`), whether to reconnect and from which cursor or to finish (`Reconnect` /
`Finished`), and what a client writer sends next (`Send` / `WAIT` / `Close` / `Behind`). The
aiohttp pump and writer (`sidecar.pump`, `sidecar.writer`) are thin loops that obey; the unit
tests, the property tests and the fuzz target call the very same methods.

Invariants:
1. States: OPEN -> COMPLETE | FAILED | STOPPED. FAILED and STOPPED go back to OPEN only through
   `revive()` (a client came back for the stream); COMPLETE is final. Nothing enters the
   tracker outside OPEN, except the error answers of rule 5.
2. Every item parsed from upstream bytes is relayed once and in order: what the tracker has not
   consumed when a relay pauses stays queued here (a run the bulk path cannot take expands in
   place in the queue), and the next `relay()` goes on from it. `relay(chunk)` may only be
   given new bytes once the previous relay did not pause.
3. Backpressure: a relay stops as soon as the events no client has been sent reach half of the
   replay buffer (in events or bytes) and says `paused`; the caller waits until `sent()` makes
   room, then relays again. Unsent events are therefore never evicted from the buffer: at most
   half the buffer plus one event is unsent, eviction keeps 7/8 of it, and the buffer holds at
   least three of the largest events (`check_buffer_fits_events`).
4. A POST stream whose request ids are known is COMPLETE once each has an answer; one whose ids
   are unknown (adopted, unparseable body) at its first answer, or at a clean close without
   `retry:` (a close with `retry:` is MCP polling, not an end). A stream adopted from another
   sidecar is the exception to the last: its client resumed it because it still waits for the
   answer, so a clean close before it (an upstream that only replayed, e.g. while the old
   owner's connection to it was still open) means "reconnect", not "done".
5. Failing a POST stream answers each request still pending with a JSON-RPC error event
   first, so no client waits forever for an answer that cannot come.
6. The cursor for reconnecting is the upstream's last-event-ID after the last item relayed;
   an upstream id the tracker refuses (see `tracker.unusable_upstream_id`) fails the stream
   with the reason instead of becoming a cursor.
7. Every client-facing stream of a revision that expects priming starts with an id before
   anything can end it: a new one with its priming event (`priming`), a resumed one with the
   id it resumed from (`resume_marker`). Both carry no data, so neither is a message.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Final, NamedTuple

from sidecar.jsonrpc import RequestId, answered_ids, error_body
from sidecar.reconnect import GiveUp, Outcome, ReconnectConfig, ReconnectPolicy
from sidecar.sse import SSEError, SSEEvent, SSEParser, SSERun, encode_comment, encode_event
from sidecar.tracker import (
    EVENT_OVERHEAD,
    EventId,
    Gap,
    StreamKind,
    StreamTracker,
    TrackerLimits,
)

Rewrite = Callable[[SSEEvent, str], tuple[SSEEvent, str | None]]
"""Rewrites an event of the upstream response at a URL; also returns a session name it
announced (the legacy `endpoint` event), if any."""


class StreamState(Enum):
    OPEN = "open"
    """Relaying; the upstream is read (or reconnected) as needed."""
    COMPLETE = "complete"
    """Every answer was delivered; writers send what is buffered and end without comment."""
    FAILED = "failed"
    """The upstream could not go on (see the reason); a returning client may revive it."""
    STOPPED = "stopped"
    """Ended from outside (drain, orphaned, replaced, deleted, fenced); may be revived."""


class Relay(NamedTuple):
    """What one `relay()` did."""

    delivered: int
    """Events added to the tracker (what writers can now send)."""
    duplicates: int
    """Upstream events dropped as already delivered."""
    paused: bool
    """Backlogged: wait until `sent()` makes room, then call `relay()` again."""
    announced: str | None = None
    """A legacy session name an `endpoint` event announced in this relay."""


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Open the upstream again after `delay` seconds, resuming after `cursor` ("" = afresh)."""

    delay: float
    cursor: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The stream left OPEN (it may already have been)."""

    state: StreamState
    reason: str


Next = Reconnect | Finished


@dataclass(frozen=True, slots=True)
class Send:
    """Write `data` (events up to seq `upto`, `count` of them) to the client."""

    data: bytes
    upto: int
    count: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to send yet: wait for new events (sending a keepalive now and then)."""


@dataclass(frozen=True, slots=True)
class Close:
    """The stream ended and the client has everything: write `comment` (if any), then end."""

    comment: bytes | None


@dataclass(frozen=True, slots=True)
class Behind:
    """The client fell behind the replay buffer: close it so it resumes (or is refused)."""

    oldest_seq: int


WAIT: Final = Wait()
CLOSE: Final = Close(None)
"""The end of a stream that completed, or ended for a reason the client need not be told."""
CURSOR_ONLY_TAIL: Final = b"\ndata: \n\n"
"""How the tracker writes an event with an id and no data (tracker rule 7)."""
WriteStep = Send | Wait | Close | Behind


def check_buffer_fits_events(limits: TrackerLimits, max_event_bytes: int) -> None:
    """Rule 3 holds only if the replay buffer holds three of the largest events; ValueError
    saying so otherwise (a buffer smaller than that would evict events no client has had)."""
    need = 3 * (max_event_bytes + EVENT_OVERHEAD)
    if limits.replay_max_bytes < need:
        raise ValueError(
            f"the replay buffer ({limits.replay_max_bytes} bytes) must hold three of the "
            f"largest events: at least {need} bytes for events of up to {max_event_bytes}"
        )


class StreamCore:
    """One stream's state machine (see the module invariants)."""

    __slots__ = (
        "_bulk",
        "_parser",
        "_policy",
        "_queue",
        "_queue_at",
        "_rewrite",
        "_stream_url",
        "adopted",
        "cursor",
        "expects_responses",
        "kind",
        "max_event_bytes",
        "on_answer",
        "pending",
        "reason",
        "retry_ms",
        "sent_seq",
        "state",
        "tracker",
    )

    def __init__(
        self,
        tracker: StreamTracker,
        kind: StreamKind,
        *,
        reconnect: ReconnectConfig,
        max_event_bytes: int,
        request_ids: Iterable[RequestId] = (),
        rewrite: Rewrite | None = None,
        rng: random.Random | None = None,
        bulk: bool = True,
        adopted: bool = False,
    ) -> None:
        check_buffer_fits_events(tracker.limits, max_event_bytes)
        self.tracker = tracker
        self.kind = kind
        self.pending: set[RequestId] = set(request_ids)
        """JSON-RPC ids of the POST's requests not answered yet."""
        self.expects_responses = bool(self.pending)
        """The request ids are known, so completion is "every id answered" (rule 4)."""
        self.adopted = adopted
        """Taken over mid-response from another sidecar: only an answer completes it (rule 4)."""
        self.state = StreamState.OPEN
        self.reason = ""
        self.sent_seq = tracker.seq
        """The furthest any client writer got (rule 3)."""
        self.cursor = tracker.last_upstream_event_id
        self.retry_ms: int | None = None
        self.max_event_bytes = max_event_bytes
        self._policy = ReconnectPolicy(reconnect, rng=rng)
        self._parser: SSEParser | None = None
        self._queue: list[SSEEvent | SSEError | SSERun] = []
        self._queue_at = 0
        self._rewrite = rewrite
        self._stream_url = ""
        self.on_answer: Callable[[str], object] | None = None
        """Given each answer's data (a `tools/list` answer teaches `sidecar.reissue`)."""
        self._bulk = bulk
        """Parse plain stretches as runs (the bulk path); False forces the event path, which
        the property tests and the fuzz target hold the bulk path equal to."""

    @property
    def ended(self) -> bool:
        return self.state is not StreamState.OPEN

    @property
    def revivable(self) -> bool:
        return self.state in (StreamState.FAILED, StreamState.STOPPED)

    # -- upstream side ---------------------------------------------------------------------

    def upstream_opened(self, url: str = "") -> None:
        """A new upstream response begins (its URL, for rewrites): a fresh parser."""
        self._parser = SSEParser(max_event_bytes=self.max_event_bytes)
        self._queue = []
        self._queue_at = 0
        self._stream_url = url

    def relay(self, chunk: bytes = b"") -> Relay:
        """Parse `chunk` (if any) and relay what is queued through the tracker, until the
        queue is empty, the stream is backlogged, or it left OPEN."""
        parser = self._parser
        if parser is None:
            raise RuntimeError("relay() before upstream_opened()")
        if self.state is not StreamState.OPEN:
            return Relay(0, 0, False)  # rule 1: nothing more enters the tracker
        if chunk:
            if self._queue_at < len(self._queue):
                raise RuntimeError("relay(chunk) while the previous relay is paused (rule 2)")
            self._queue = parser.feed_runs(chunk) if self._bulk else list(parser.feed(chunk))
            self._queue_at = 0
        announced = self._rewrite_queue() if self._rewrite is not None and chunk else None
        tracker = self.tracker
        items = self._queue
        delivered = duplicates = 0
        watch = bool(self.pending) or self._ids_unknown
        while self.state is StreamState.OPEN and self._queue_at < len(items):
            seq_mark, bytes_mark = self.backlog_marks()
            if tracker.seq >= seq_mark or tracker.total_bytes >= bytes_mark:
                return Relay(delivered, duplicates, True, announced)
            before = tracker.duplicates
            at, got, answers, refused = tracker.accept_run(
                items, self._queue_at, seq_mark=seq_mark, bytes_mark=bytes_mark, watch_answers=watch
            )
            self._queue_at = at
            delivered += got
            duplicates += tracker.duplicates - before
            if got:
                self._policy.progress()
            self._note_answers(answers)
            if refused is not None:
                self.fail(refused)
            elif at < len(items) and isinstance(items[at], SSEError):
                error = items[at]
                assert isinstance(error, SSEError)
                self.fail(f"upstream sent a bad event: {error.message}")
        if self._queue_at >= len(items):
            self._queue = []
            self._queue_at = 0
            if parser.last_event_id:
                self.cursor = parser.last_event_id
        paused = self.state is StreamState.OPEN and self.backlogged()
        return Relay(delivered, duplicates, paused, announced)

    def upstream_ended(self, outcome: Outcome, *, now: float) -> Next:
        """The upstream response ended (or a reconnect attempt got none): finish, or when
        and from where to reconnect."""
        parser = self._parser
        self._parser = None
        if self.state is not StreamState.OPEN:
            return Finished(self.state, self.reason)
        if parser is not None:
            parser.close()  # an unterminated event is dropped; its `retry:` still counts
            if parser.retry is not None:
                self.retry_ms = parser.retry
            if parser.last_event_id and self._queue_at >= len(self._queue):
                self.cursor = parser.last_event_id
            if (
                outcome is Outcome.CLOSED
                and self._ids_unknown
                and self.kind is StreamKind.POST
                and parser.retry is None
                and not self.adopted
            ):
                return self._complete()
        if not self.cursor and self.kind is not StreamKind.STANDALONE:
            return self.fail("upstream stream broke and it gave no event id to resume")
        decision = self._policy.next(outcome, now=now, retry_ms=self.retry_ms)
        if isinstance(decision, GiveUp):
            return self.fail(f"gave up reconnecting: {decision.reason}")
        return Reconnect(decision.delay, self.cursor)

    def resume_now(self) -> Next:
        """Open the upstream at once from the cursor (a stream adopted from another
        sidecar); a stream with no cursor can only be a GET stream opened afresh."""
        if self.state is not StreamState.OPEN:
            return Finished(self.state, self.reason)
        if not self.cursor and self.kind is not StreamKind.STANDALONE:
            return self.fail("there is no upstream event id to resume from")
        return Reconnect(0.0, self.cursor)

    def session_renewed(self) -> Next:
        """The upstream lost the session and it was re-initialized: a GET stream starts
        afresh on the new session; a POST's request died with the old one."""
        if self.kind is not StreamKind.STANDALONE:
            return self.fail("the upstream restarted and lost this request; please retry it")
        self.cursor = ""
        return Reconnect(0.0, "")

    def fail(self, reason: str) -> Finished:
        """Leave OPEN as FAILED, answering pending requests with an error first (rule 5)."""
        if self.state is not StreamState.OPEN:
            return Finished(self.state, self.reason)
        if self.kind is StreamKind.POST and self.pending:
            for rid in sorted(self.pending, key=str):
                data = error_body(f"tether: {reason}", rid).decode()
                self.tracker.accept(SSEEvent(data=data))
            self.pending.clear()
        self.state = StreamState.FAILED
        self.reason = reason
        return Finished(self.state, reason)

    def stop(self, reason: str) -> Finished:
        """Leave OPEN as STOPPED (no error answers: the client resumes elsewhere)."""
        if self.state is StreamState.OPEN:
            self.state = StreamState.STOPPED
            self.reason = reason
        return Finished(self.state, self.reason)

    def revive(self) -> bool:
        """A client came back for a FAILED or STOPPED stream: OPEN again, with a fresh
        reconnect budget. False (and no change) for an OPEN or COMPLETE one."""
        if not self.revivable:
            return False
        self.state = StreamState.OPEN
        self.reason = ""
        self._policy.progress()
        self._parser = None
        self._queue = []
        self._queue_at = 0
        return True

    # -- client side -----------------------------------------------------------------------

    def sent(self, seq: int) -> bool:
        """A writer handed events up to `seq` to its client; True if that made room."""
        if seq > self.sent_seq:
            self.sent_seq = seq
            return True
        return False

    def backlog_marks(self) -> tuple[int, int]:
        """(seq, total bytes) at which the stream is backlogged: half the replay buffer
        unsent (rule 3). `sent_seq` only grows, so marks computed earlier are conservative."""
        tracker = self.tracker
        limits = tracker.limits
        sent_total = tracker.total_bytes - tracker.unsent_bytes(self.sent_seq)
        return (
            self.sent_seq + max(1, limits.replay_max_events // 2),
            sent_total + max(1, limits.replay_max_bytes // 2),
        )

    def backlogged(self) -> bool:
        seq_mark, bytes_mark = self.backlog_marks()
        return self.tracker.seq >= seq_mark or self.tracker.total_bytes >= bytes_mark

    def priming(self, retry_ms: int | None) -> tuple[bytes, int]:
        """The priming event a new client gets first, and the position it stands for. Its id
        is that of the last leading cursor-only event (an upstream priming event, relayed)
        when there is one, so it carries the upstream cursor: a client whose stream breaks
        right after it can resume on any sidecar (rule 6). Skipping such events loses
        nothing: they have no data."""
        tracker = self.tracker
        position = tracker.start_seq
        got = tracker.events_after(position)
        if not isinstance(got, Gap):
            for payload in got:
                if not payload.endswith(CURSOR_ONLY_TAIL):
                    break
                position += 1
        return tracker.priming_event(retry_ms, seq=position), position

    @staticmethod
    def resume_marker(client_id: EventId, retry_ms: int | None) -> bytes:
        """What a resumed stream's client gets first: an empty event carrying the very id it
        resumed from (rule 7). A client whose resumed stream ends before any new event then
        still holds that id, instead of forgetting it: the TypeScript SDK (1.32) reconnects a
        stream that ended before an id-bearing event with no Last-Event-ID at all, which for a
        POST response abandons the call and for a GET stream skips what it missed."""
        return encode_event(data="", id=str(client_id), retry=retry_ms)

    def next_write(self, position: int) -> WriteStep:
        """What a writer whose client has everything up to `position` does next."""
        got = self.tracker.events_after(position)
        if isinstance(got, Gap):
            return Behind(got.oldest_seq)
        if got:
            return Send(b"".join(got) if len(got) > 1 else got[0], position + len(got), len(got))
        if self.state is StreamState.OPEN:
            return WAIT
        if self.state is StreamState.COMPLETE or not self.reason:
            return CLOSE
        return Close(encode_comment(f"tether: stream ended: {self.reason}"))

    # -- internals -------------------------------------------------------------------------

    @property
    def _ids_unknown(self) -> bool:
        return self.kind is StreamKind.POST and not self.expects_responses

    def _note_answers(self, answers: list[str]) -> None:
        """Rule 4: settle the pending requests these answers answer."""
        if not answers:
            return
        pending = self.pending
        for data in answers:
            if self.on_answer is not None:
                self.on_answer(data)
            ids = answered_ids(data)
            if pending:
                pending.difference_update(ids)
                if not pending and self.expects_responses:
                    self._complete()
                    return
            elif self._ids_unknown and ids:
                # A POST stream carries its request's answer last. Resumed SDK streams never
                # close by themselves, so this is the only end we will see.
                self._complete()
                return

    def _complete(self) -> Finished:
        self.state = StreamState.COMPLETE
        self.reason = "complete"
        return Finished(self.state, self.reason)

    def _rewrite_queue(self) -> str | None:
        """Apply the rewrite to the events of a freshly parsed chunk (runs are plain
        `message` events, never rewritten)."""
        rewrite = self._rewrite
        assert rewrite is not None
        announced: str | None = None
        items = self._queue
        for n, item in enumerate(items):
            if isinstance(item, SSEEvent) and item.event != "message":
                new, name = rewrite(item, self._stream_url)
                items[n] = new
                announced = name or announced
        return announced


class CatchUp:
    """Events older than the replay buffer, fetched again from the upstream (which resumes
    after the client's cursor), mapped back onto the ids the client was first given.

    Fed the re-fetched response's bytes; returns the client-facing bytes to write. `done`
    once the buffer takes over (from `position` on); `failed` says why it cannot go on."""

    def __init__(self, tracker: StreamTracker, after_seq: int, *, max_event_bytes: int) -> None:
        self.tracker = tracker
        self.position = after_seq
        self.done = not isinstance(tracker.events_after(after_seq), Gap)
        self.failed: str | None = None
        self._parser = SSEParser(max_event_bytes=max_event_bytes)

    def feed(self, chunk: bytes) -> list[bytes]:
        out: list[bytes] = []
        for item in self._parser.feed(chunk):
            if self.done or self.failed is not None:
                break
            if isinstance(item, SSEError):
                self.failed = item.message
            elif item.data:
                self._map(item, out)
        return out

    def _map(self, item: SSEEvent, out: list[bytes]) -> None:
        tracker = self.tracker
        if not item.id:
            self.failed = "a re-fetched event has no id"
            return
        # Usually the next seq; otherwise look the upstream id up in the index.
        seq: int | None = self.position + 1
        if tracker.upstream_cursor_at(self.position + 1) != item.id:
            seq = tracker.seq_for_upstream_id(item.id)
        if seq is None:
            self.failed = f"re-fetched event {item.id!r} is not in the id index"
            return
        if seq <= self.position:
            return  # the upstream re-sent something the client has
        out.append(encode_event(data=item.data, id=str(tracker.event_id(seq)), event=item.event))
        self.position = seq
        self.done = not isinstance(tracker.events_after(seq), Gap)
