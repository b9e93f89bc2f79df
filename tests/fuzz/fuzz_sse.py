"""Coverage-guided fuzzing (atheris) of everything that reads bytes from the network.

Long runs, outside CI:   python tests/fuzz/fuzz_sse.py -max_total_time=3600 [corpus_dir]
A short run is part of the test suite (tests/fuzz/test_fuzz.py).

Properties checked on every input, fed in fuzzer-chosen chunks:
- the SSE parser never raises; it returns events and at most one trailing SSEError, after
  which it stays closed; its pending buffer stays within the event size limit;
- chunking does not change the result;
- the bulk path (`feed_runs`, runs through the tracker) delivers exactly what the event path
  does: the same events, and the same client-facing bytes out of the tracker;
- client-facing event ids either parse or are refused, never raise, and round-trip.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from sidecar.sse import SSEError, SSEEvent, SSEParser, SSERun
    from sidecar.tracker import EventId, StreamTracker, TrackerLimits
    from tether.model import StreamId

LIMIT = 4096


def parse(data: bytes, cuts: list[int]) -> list[SSEEvent | SSEError]:
    parser = SSEParser(max_event_bytes=LIMIT)
    out: list[SSEEvent | SSEError] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        out += parser.feed(data[start:cut])
        start = cut
    out += parser.close()
    errors = [i for i, item in enumerate(out) if isinstance(item, SSEError)]
    assert errors in ([], [len(out) - 1]), "an error must be last and alone"
    if errors:
        assert parser.failed is not None
        assert parser.feed(b"data: more\n\n") == []
    return out


def relay(data: bytes, cuts: list[int], runs: bool) -> tuple[list[SSEEvent | SSEError], bytes]:
    """Parse (expanding runs) and relay through a tracker, as the pump does."""
    parser = SSEParser(max_event_bytes=LIMIT)
    tracker = StreamTracker(
        StreamId("p0"),
        limits=TrackerLimits(dedup_window=8, replay_max_events=1 << 16, replay_max_bytes=1 << 30),
    )
    events: list[SSEEvent | SSEError] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        items: list[SSEEvent | SSEError | SSERun] = (
            parser.feed_runs(data[start:cut]) if runs else list(parser.feed(data[start:cut]))
        )
        start = cut
        for item in items:
            events.extend(item.events() if isinstance(item, SSERun) else [item])
        i = 0
        while i < len(items) and not isinstance(items[i], SSEError):
            i, _, _ = tracker.accept_run(
                items, i, seq_mark=1 << 40, bytes_mark=1 << 40, watch_answers=True
            )
    replay = tracker.events_after(0)
    assert isinstance(replay, list)
    return events, b"".join(replay)


def test_one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    cuts = [fdp.ConsumeIntInRange(0, 64) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    whole = parse(data, [])
    chunked = parse(data, [min(c, len(data)) for c in cuts])
    assert whole == chunked, "chunking changed the result"
    cut_list = [min(c, len(data)) for c in cuts]
    assert relay(data, cut_list, True) == relay(data, cut_list, False), "runs changed the result"
    text = data.decode("utf-8", "replace")
    eid = EventId.parse(text)
    if eid is not None:
        assert EventId.parse(str(eid)) == eid


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
