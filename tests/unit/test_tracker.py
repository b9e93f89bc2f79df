"""The event tracker: client-facing ids, dedup window, replay buffer bounds, id index."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.sse import SSEError, SSEEvent, SSEParser, SSERun
from sidecar.tracker import (
    MAX_UPSTREAM_ID_BYTES,
    EventId,
    Gap,
    StreamKind,
    StreamTracker,
    TrackerLimits,
    new_stream_id,
    unusable_upstream_id,
)
from tests.support.runcores import each_run_core  # noqa: F401 - a fixture
from tether.model import StreamId

S = StreamId("abc")


def ev(n: int | None, data: str | None = None) -> SSEEvent:
    uid = None if n is None else f"u{n}"
    return SSEEvent(data=data or f"payload {n}", id=uid, last_event_id=uid or "")


def parse_all(payloads: list[bytes]) -> list[SSEEvent]:
    p = SSEParser()
    return [e for e in p.feed(b"".join(payloads)) if isinstance(e, SSEEvent)]


def tracker(**kw: int) -> StreamTracker:
    return StreamTracker(S, limits=TrackerLimits(**kw))


def test_event_ids_roundtrip_and_order() -> None:
    a = EventId(S, 1, 9)
    assert str(a) == "abc.1.9"
    assert EventId.parse("abc.1.9") == a
    assert EventId(S, 1, 10).order > a.order
    assert EventId(S, 2, 1).order > EventId(S, 1, 999).order


@pytest.mark.parametrize(
    ("cursor", "raw"),
    [
        ("2:45", True),
        ("count.3.7.WzEsInQiXQ/12", True),  # dots inside the cursor are fine
        ("a.b.c", True),
        ("=", True),
        ("ünï cödé", False),  # not ASCII: base64url
        ("~tilde", False),  # the base64 marker itself
        ("a b", True),  # a space inside is fine
        ("é" * (MAX_UPSTREAM_ID_BYTES // 2), False),  # the longest accepted, in UTF-8 bytes
        ("x" * MAX_UPSTREAM_ID_BYTES, True),
    ],
)
def test_event_ids_carry_the_upstream_cursor(cursor: str, raw: bool) -> None:
    eid = EventId(S, 3, 17, cursor)
    text = str(eid)
    assert text.startswith("abc.3.17.")
    assert (text == f"abc.3.17.{cursor}") is raw
    assert text.isascii()
    assert text.isprintable()
    assert EventId.parse(text) == eid


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "abc.1",
        "abc.1.x",
        "abc.-1.2",
        "a/b.1.2",
        "abc.1.2.",
        "abc.1.2.~!!",  # bad base64
        "abc.1.2.~gA",  # not UTF-8 once decoded
        "abc.1.2. lead",
        "abc.1.2.ctl\x01",
        "2:3",
        "abc.1.²",
        "x" * 70,
        "abc.1.2." + "A" * 5000,
        "abc.1.2.~" + "A" * 5000,
    ],
)
def test_foreign_ids_do_not_parse(text: str) -> None:
    assert EventId.parse(text) is None


def test_accept_assigns_sequence_and_rewrites_ids() -> None:
    t = tracker()
    out = [t.accept(ev(n)) for n in (1, 2, 3)]
    assert all(o is not None for o in out)
    parsed = parse_all([o for o in out if o is not None])
    assert [e.id for e in parsed] == [str(EventId(S, 1, n, f"u{n}")) for n in (1, 2, 3)]
    assert [e.data for e in parsed] == ["payload 1", "payload 2", "payload 3"]
    assert t.last_event_id == EventId(S, 1, 3, "u3")
    assert t.last_upstream_event_id == "u3"


def test_duplicates_by_upstream_id_are_dropped_and_do_not_move_the_record() -> None:
    t = tracker()
    t.accept(ev(1))
    t.accept(ev(2))
    assert t.accept(ev(1)) is None
    assert t.accept(ev(2)) is None
    assert t.duplicates == 2
    assert t.seq == 2
    assert t.last_upstream_event_id == "u2"


def test_events_without_upstream_id_are_never_deduplicated() -> None:
    t = tracker()
    assert t.accept(ev(None, "x")) is not None
    assert t.accept(ev(None, "x")) is not None
    assert t.seq == 2


def test_dedup_window_is_bounded() -> None:
    t = tracker(dedup_window=3)
    for n in range(1, 6):
        t.accept(ev(n))
    assert t.accept(ev(5)) is None  # still in the window
    assert t.accept(ev(1)) is not None  # fell out of the window: delivered again


def test_replay_after_any_position() -> None:
    t = tracker()
    payloads = [t.accept(ev(n)) for n in range(1, 6)]
    assert t.events_after(0) == payloads
    assert t.events_after(3) == payloads[3:]
    assert t.events_after(5) == []


def test_replay_buffer_bounded_in_events() -> None:
    t = tracker(replay_max_events=3)
    payloads = [t.accept(ev(n)) for n in range(1, 11)]
    assert t.events_after(7) == payloads[7:]
    gap = t.events_after(6)
    assert isinstance(gap, Gap)
    assert gap.oldest_seq == 8


def test_replay_buffer_bounded_in_bytes() -> None:
    t = tracker(replay_max_bytes=1000)
    for n in range(1, 101):
        t.accept(ev(n, "x" * 200))
    assert t.buffered_bytes <= 1000
    kept = t.events_after(t.seq - 3)
    assert isinstance(kept, list)
    assert len(kept) == 3
    assert isinstance(t.events_after(0), Gap)


def test_id_index_reaches_past_the_buffer() -> None:
    t = tracker(replay_max_events=2, index_max_events=5)
    for n in range(1, 9):
        t.accept(ev(n))
    assert t.upstream_cursor_at(8) == "u8"
    assert t.upstream_cursor_at(4) == "u4"
    assert t.upstream_cursor_at(3) is None  # beyond the index
    assert t.upstream_cursor_at(0) is None
    assert t.seq_for_upstream_id("u6") == 6
    assert t.seq_for_upstream_id("u1") is None


def test_priming_event_names_the_current_position() -> None:
    t = tracker()
    (primed,) = parse_all([t.priming_event()])
    assert primed.id == "abc.1.0"
    assert primed.data == ""
    t.accept(ev(1))
    (primed,) = parse_all([t.priming_event()])
    assert primed.id is not None
    assert EventId.parse(primed.id) == EventId(S, 1, 1, "u1")


def test_events_without_upstream_ids_get_plain_ids() -> None:
    t = tracker()
    out = t.accept(ev(None, "x"))
    assert out is not None
    (parsed,) = parse_all([out])
    assert parsed.id == "abc.1.1"


def test_resumed_tracker_continues_sequence_in_a_new_epoch() -> None:
    t = StreamTracker(S, limits=TrackerLimits(), epoch=2, seq=41, last_upstream_event_id="u41")
    (primed,) = parse_all([t.priming_event()])
    assert primed.id is not None
    assert EventId.parse(primed.id) == EventId(S, 2, 41, "u41")
    out = t.accept(ev(42))
    assert out is not None
    (parsed,) = parse_all([out])
    assert parsed.id is not None
    assert EventId.parse(parsed.id) == EventId(S, 2, 42, "u42")
    assert isinstance(t.events_after(40), Gap)
    assert t.events_after(41) == [out]


@pytest.mark.parametrize("kind", list(StreamKind))
def test_stream_ids_name_their_kind(kind: StreamKind) -> None:
    sid = new_stream_id(kind)
    assert StreamKind.of(sid) is kind
    assert EventId.parse(f"{sid}.1.1") is not None
    assert StreamKind.of("zzz") is None


@pytest.mark.parametrize(
    "kw",
    [
        {"dedup_window": 0},
        {"replay_max_bytes": 0},
        {"replay_max_events": 10, "index_max_events": 5},
    ],
)
def test_bad_limits_rejected(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be"):
        TrackerLimits(**kw)


def test_unsent_bytes_after_a_position() -> None:
    t = tracker(replay_max_events=4)
    sizes = [len(p) for p in (t.accept(ev(n, "y" * n)) for n in range(1, 7)) if p is not None]
    assert t.unsent_bytes(6) == 0
    assert t.unsent_bytes(5) == sizes[5]
    assert t.unsent_bytes(3) == sum(sizes[3:])
    # Positions older than the buffer count what the buffer still holds.
    assert t.unsent_bytes(0) == sum(sizes[2:])
    assert t.unsent_bytes(2) == sum(sizes[2:])


@given(st.text(min_size=1, max_size=60).filter(lambda t: not {"\n", "\r", "\x00"} & set(t)))
@settings(max_examples=300, deadline=None)
def test_any_accepted_upstream_cursor_round_trips_through_our_id(cursor: str) -> None:
    if unusable_upstream_id(cursor) is not None:
        return  # refused by the tracker: never in an id (test_stream_core covers the refusal)
    eid = EventId(S, 2, 5, cursor)
    text = str(eid)
    assert text.isascii()
    assert text.isprintable()
    assert EventId.parse(text) == eid


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=300),
    max_events=st.integers(min_value=1, max_value=40),
    max_bytes=st.integers(min_value=1, max_value=4000),
)
@settings(max_examples=200, deadline=None)
def test_replay_buffer_matches_a_simple_model(
    sizes: list[int], max_events: int, max_bytes: int
) -> None:
    """Against a list of every payload: the buffer is a suffix of it, within both limits,
    replay after any position returns exactly the right payloads, and unsent bytes agree."""
    t = StreamTracker(
        S,
        limits=TrackerLimits(
            replay_max_events=max_events, replay_max_bytes=max_bytes, index_max_events=max_events
        ),
    )
    every: list[bytes] = []
    for n, size in enumerate(sizes, start=1):
        out = t.accept(SSEEvent(data="x" * size + str(n)))
        assert out is not None
        every.append(out)
        kept = t.events_after(0)
        if isinstance(kept, Gap):
            kept = t.events_after(kept.oldest_seq - 1)
        assert isinstance(kept, list)
        assert len(kept) <= max_events
        assert kept[-1] == out  # the newest event is always replayable
        assert t.buffered_bytes <= max_bytes or len(kept) == 1
        assert kept == every[len(every) - len(kept) :]
        assert t.buffered_bytes == sum(map(len, kept))
        for after in range(n + 1):
            got = t.events_after(after)
            if isinstance(got, Gap):
                assert after < n - len(kept)
            else:
                assert got == every[after:]
                assert t.unsent_bytes(after) == sum(map(len, every[after:]))


def test_priming_event_can_carry_a_retry_hint() -> None:
    (primed,) = parse_all([tracker().priming_event(2500)])
    assert primed.retry == 2500
    assert primed.data == ""


# --- the bulk path (SSERun) against the event path --------------------------------------------

# The bulk path is held equal to the event path through the stream core, which is what the
# pump calls: tests/unit/test_stream_core.py::test_bulk_path_relays_exactly_what_the_event_path_does


@pytest.mark.usefixtures("each_run_core")  # the bulk path on each run core
def test_a_duplicate_inside_a_run_is_dropped_and_counted_as_on_the_event_path() -> None:
    far = 1 << 30
    got = []
    raw = b"id: 1\ndata: a\n\nid: 1\ndata: b\n\nid: 2\ndata: c\n\n"
    for bulk in (True, False):
        items: list[SSEEvent | SSEError | SSERun] = []
        items += SSEParser().feed_runs(raw) if bulk else SSEParser().feed(raw)
        assert isinstance(items[0], SSERun) == bulk
        t = tracker()
        i = 0
        while i < len(items):
            i, *_ = t.accept_run(items, i, seq_mark=far, bytes_mark=far, watch_answers=False)
        got.append((t.seq, t.duplicates, t.events_after(0)))
    assert got[0] == got[1]
    assert got[0][:2] == (2, 1)
    # The bulk path undid its dedup update before the event path took over: without that,
    # the first "1" would be dropped as a duplicate too.
    assert got[0][2] == [b"id: abc.1.1.1\ndata: a\n\n", b"id: abc.1.2.2\ndata: c\n\n"]


@pytest.mark.usefixtures("each_run_core")  # the bulk path on each run core
def test_bulk_path_is_taken_for_plain_events_and_keeps_the_buffer_bounded() -> None:
    limits = TrackerLimits(dedup_window=4, replay_max_events=64, replay_max_bytes=1 << 20)
    t = StreamTracker(S, limits=limits)
    parser = SSEParser()
    items = parser.feed_runs(b"".join(b"id: %d\ndata: e%d\n\n" % (k, k) for k in range(1, 201)))
    assert len(items) == 1
    assert isinstance(items[0], SSERun)
    far = 1 << 30
    i, delivered, _, refused = t.accept_run(
        items, 0, seq_mark=far, bytes_mark=far, watch_answers=False
    )
    assert (i, delivered, t.seq, refused) == (1, 200, 200, None)
    assert len(items) == 1  # taken in bulk, not expanded into events
    assert t.events_after(199) == [b"id: abc.1.200.200\ndata: e200\n\n"]
    tail = t.events_after(200 - 56)
    assert isinstance(tail, list)
    assert len(tail) == 56  # evicted down to 7/8 of 64
    assert t.buffered_bytes == sum(map(len, tail))
    assert isinstance(t.events_after(100), Gap)
    # The dedup window holds the last 4 ids: 197 is a duplicate, 196 is not any more.
    more = parser.feed_runs(b"id: 197\ndata: again\n\nid: 196\ndata: again\n\n")
    t.accept_run(more, 0, seq_mark=far, bytes_mark=far, watch_answers=False)
    assert (t.duplicates, t.seq, t.last_upstream_event_id) == (1, 201, "196")
